"""``anomap watch``: a station's photos judged as they arrive, each exactly once,
every verdict kept in the inspection record (:mod:`anomap.record`).

A camera's software drops photos into folders; the watcher hears of them from
the file system (watchdog; its polling observer for network shares, where
events do not travel) and, whatever the events said, rescans now and then. A
photo is judged once it is complete: its size and modification time unchanged
for ``settle_s``, and decodable (a photo that does not decode yet is retried
until it is ``incomplete_grace_s`` old, then recorded as an error). Photos are
judged in arrival order (modification time), in batches of what is ready.

Exactly once, across a kill at any moment: the record is the ledger. At start
the watcher reads which photos the record holds and judges every other photo
in the folders, so photos that arrived while it was down are judged when it
comes back; a photo judged but not yet written is judged again, and the
record's unique key keeps it once. Actions (moving or copying into ``pass/`` and
``fail/``) follow the record's commit and are marked done there, so an action
cut short is finished at the next start.

Drift: the station's recent scores are compared with the run's held-out
normals (:class:`DriftMonitor`); a change of state is printed and recorded.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from anomap.data import IMAGE_EXTENSIONS
from anomap.inspection import (
    Decoded,
    FoundImage,
    decode,
    path_from_text,
    path_text,
    result_row,
)
from anomap.notify import Mqtt, Notifier, Webhook
from anomap.record import Record, default_url, now
from anomap.run import Detector
from anomap.runfolder import load_json, run_version

log = logging.getLogger(__name__)

ACTIONS = ("move", "copy")


@dataclass(frozen=True)
class StationSettings:
    """Where photos arrive and what is done with them. ``stop_when_idle_s``: return
    after that long with nothing to judge (batch use, tests); None: run until stopped."""

    folders: tuple[Path, ...]
    station: str = "station"
    record_url: str | None = None  # default: FOLDER/.anomap/record.db of the first folder
    settle_s: float = 0.25
    incomplete_grace_s: float = 10.0
    poll: bool = False
    rescan_s: float = 5.0
    batch_size: int = 8
    action: str | None = None  # "move" or "copy" into sorted_to/pass and sorted_to/fail
    sorted_to: Path | None = None
    pictures: Path | None = None
    drift_window: int = 100
    drift_alpha: float = 1e-3
    stop_when_idle_s: float | None = None
    webhook: str | None = None  # each verdict POSTed as JSON (anomap.notify), never waited on
    mqtt: str | None = None  # each verdict published to mqtt://HOST[:PORT]/TOPIC

    def url(self) -> str:
        return self.record_url or default_url(self.folders[0])


class DriftMonitor:
    """Are the station's recent scores still the held-out normals' scores?

    Over the last ``window`` photos (tested every tenth of a window), a one-sided
    Mann-Whitney U test asks whether recent scores run higher than the held-out
    normals'; ``p < alpha`` is drift. It sees a shift of the whole distribution
    (new lighting, a new supplier) long before the shift pushes scores over the
    threshold and the false alarms pile up. Drift is cleared when the test no
    longer finds it."""

    def __init__(self, reference: np.ndarray, threshold: float, window: int = 100,
                 alpha: float = 1e-3) -> None:
        self.reference = np.asarray(reference, dtype=np.float64)
        self.threshold, self.window, self.alpha = threshold, window, alpha
        self.recent: deque[float] = deque(maxlen=window)
        self.every = max(1, window // 10)
        self.since_test = 0
        self.drifting = False

    def update(self, scores: list[float]) -> dict[str, Any] | None:
        """Add scores; returns the evidence when the state changes, else None."""
        change = None
        for score in scores:
            if not np.isfinite(score):
                continue
            self.recent.append(score)
            self.since_test += 1
            if len(self.recent) < self.window or self.since_test < self.every:
                continue
            self.since_test = 0
            recent = np.asarray(self.recent)
            p_value = float(stats.mannwhitneyu(recent, self.reference,
                                               alternative="greater").pvalue)
            drifting = p_value < self.alpha
            if drifting != self.drifting:
                self.drifting = drifting
                change = {"state": "drift" if drifting else "cleared", "p_value": p_value,
                          "window": self.window, "recent_median": float(np.median(recent)),
                          "normal_median": float(np.median(self.reference)),
                          "recent_share_over_threshold": float((recent >= self.threshold)
                                                               .mean()),
                          "test": "Mann-Whitney U, recent > held-out normals, "
                                  f"alpha {self.alpha:g}"}
        return change


@dataclass
class _Candidate:
    path: Path
    size: int
    mtime_ns: int
    stable_since: float


@dataclass
class Station:
    """A watcher over ``settings.folders`` for one Detector, writing to one Record."""

    detector: Detector
    settings: StationSettings
    model_name: str
    model_version: str
    reference_scores: np.ndarray | None = None
    on_row: Callable[[dict[str, Any]], None] | None = None
    run_folder: Path | None = None  # the run or export the Detector came from
    pending: dict[Path, _Candidate] = field(default_factory=dict)
    judged: int = 0

    def __post_init__(self) -> None:
        self.settings = replace(self.settings, folders=tuple(
            Path(os.path.abspath(f)) for f in self.settings.folders))
        self.record = Record(self.settings.url())
        self.run_threshold = self.detector.threshold
        self.last_drift: dict[str, Any] | None = None
        self._model_lock = threading.Lock()
        self.notifiers: list[Notifier] = [
            *([Webhook(self.settings.webhook)] if self.settings.webhook else []),
            *([Mqtt(self.settings.mqtt)] if self.settings.mqtt else [])]
        self.done = self.record.seen(self.settings.station)
        self.events: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self.root = Path(os.path.commonpath([os.path.abspath(f)
                                             for f in self.settings.folders]))
        self.drift = self._drift_monitor(self.reference_scores, self.detector.threshold)

    # ------------------------------------------------------------------ finding photos

    def _consider(self, path: Path) -> None:
        """A path heard of or found: a candidate unless judged, hidden or not an image."""
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(
                part.startswith(".") for part in path.relative_to(self.root).parts):
            return
        try:
            info = path.stat()
        except OSError:
            self.pending.pop(path, None)  # gone (moved away, deleted)
            return
        key = (path_text(path), info.st_size, info.st_mtime_ns)
        if key in self.done:
            self.pending.pop(path, None)
            return
        known = self.pending.get(path)
        if known is None or (known.size, known.mtime_ns) != (info.st_size, info.st_mtime_ns):
            self.pending[path] = _Candidate(path, info.st_size, info.st_mtime_ns,
                                            time.monotonic())

    def scan(self) -> None:
        for folder in self.settings.folders:
            for parent, subfolders, files in os.walk(folder):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                for name in files:
                    self._consider(Path(parent, name))

    def _observer(self) -> Any:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        events = self.events

        class Heard(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.is_directory:
                    return
                for attribute in ("src_path", "dest_path"):
                    path = getattr(event, attribute, "")
                    if path:
                        events.put(Path(os.fsdecode(path)))

        observer = PollingObserver(timeout=0.5) if self.settings.poll else Observer()
        for folder in self.settings.folders:
            observer.schedule(Heard(), str(folder), recursive=True)
        return observer

    # ------------------------------------------------------------------ judging

    def _ready(self) -> list[_Candidate]:
        """Candidates whose size and time have stood still for ``settle_s``."""
        now_s = time.monotonic()
        for path in list(self.pending):
            self._consider(path)  # re-stat: still growing?
        ready = [c for c in self.pending.values()
                 if now_s - c.stable_since >= self.settings.settle_s]
        return sorted(ready, key=lambda c: (c.mtime_ns, str(c.path)))

    def _drift_monitor(self, reference: np.ndarray | None, threshold: float
                       ) -> DriftMonitor | None:
        if reference is None or not len(reference):
            log.warning("the run holds no held-out normal scores: drift is not watched "
                        "(recalibrate it with this version: anomap retune)")
            return None
        return DriftMonitor(reference, threshold, self.settings.drift_window,
                            self.settings.drift_alpha)

    def use(self, detector: Detector, run: str | Path) -> None:
        """Judge with another version from the next batch on (the service's switch and
        rollback): its threshold, its held-out normals for drift, its version in rows."""
        version, reference = run_version(run), _normal_scores(run)
        with self._model_lock:
            self.detector, self.model_name = detector, Path(run).name
            self.model_version, self.run_folder = version, Path(run)
            self.run_threshold = detector.threshold
            self.drift = self._drift_monitor(reference, detector.threshold)

    def follow_threshold(self) -> None:
        """The threshold an operator's confirmed feedback set in the record, if any, in
        force from the next photo on (and the run's again after an undo)."""
        override = self.record.threshold(self.settings.station, self.model_version)
        reader = self.detector.reader
        wanted = self.run_threshold if override is None else override
        if reader.thresholds is not None and reader.thresholds.image != wanted:
            reader.thresholds = replace(reader.thresholds, image=wanted)
            log.warning("station %s: threshold %.6g from the record", self.settings.station,
                        wanted)

    def judge(self, batch: list[_Candidate]) -> None:
        with self._model_lock:  # one version judges the whole batch
            self.follow_threshold()
            detector, model_name, model_version = (self.detector, self.model_name,
                                                   self.model_version)
        settings = self.settings
        started = time.perf_counter()
        decoded: list[tuple[_Candidate, Decoded]] = []
        for candidate in batch:
            found = FoundImage(candidate.path, candidate.path.relative_to(self.root))
            item = decode(detector, found, settings.pictures is not None)
            young = time.time() - candidate.mtime_ns / 1e9 < settings.incomplete_grace_s
            if item.error is not None and item.error.reason == "cannot decode" and young:
                candidate.stable_since = time.monotonic()  # maybe still being written
                continue
            decoded.append((candidate, item))
            self.pending.pop(candidate.path, None)
        if not decoded:
            return
        good = [item for _, item in decoded if item.error is None]
        predictions = iter(detector.predict_prepared([i.prepared for i in good],
                                                     [str(i.found.path) for i in good]))
        rows = []
        for candidate, item in decoded:
            prediction = next(predictions) if item.error is None else None
            row = result_row(item, prediction, settings.pictures, detector.display_range)
            rows.append({
                "station": settings.station, "path": row["path"], "size": candidate.size,
                "mtime_ns": candidate.mtime_ns, "judged_at": now(), "model": model_name,
                "model_version": model_version, "threshold": row.get("threshold"),
                "pixel_threshold": row.get("pixel_threshold"), "score": row.get("score"),
                "verdict": row["verdict"], "overlay": row.get("overlay"),
                "mask": row.get("mask"), "error": row.get("error"), "action_done": False,
                "latency_ms": None})
        elapsed = (time.perf_counter() - started) * 1000
        for row in rows:
            row["latency_ms"] = round(elapsed, 1)  # from judging's start: the batch's time
        self.record.add(rows)
        for row in rows:
            self.done.add((row["path"], row["size"], row["mtime_ns"]))
            self.judged += 1
            if self.on_row is not None:
                self.on_row(row)
            for notifier in self.notifiers:
                notifier.send(row)
        self._act([(row, candidate.path) for row, (candidate, _) in zip(rows, decoded,
                                                                          strict=True)])
        if self.drift is not None:
            change = self.drift.update([r["score"] for r in rows if r["score"] is not None])
            if change is not None:
                self.last_drift = change
                self.record.add_drift(settings.station, change["state"], change["window"],
                                      change["p_value"], change, self.model_version)
                log.warning("%s at station %s: %s", change["state"], settings.station,
                            change)

    def _act(self, rows: list[tuple[dict[str, Any], Path]]) -> None:
        """Move or copy judged photos into sorted_to/pass and /fail, then mark it done."""
        settings = self.settings
        if settings.action is None or settings.sorted_to is None:
            return
        for row, source in rows:
            if row["verdict"] not in ("pass", "fail"):
                continue
            target = settings.sorted_to / row["verdict"] / source.relative_to(self.root)
            try:
                if source.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (shutil.move if settings.action == "move" else shutil.copy2)(
                        str(source), str(target))
                self.record.mark_action_done(settings.station, row["path"], row["size"],
                                             row["mtime_ns"])
            except OSError as error:
                log.warning("could not %s %s: %s (retried at the next start)",
                            settings.action, source, error)

    def finish_actions(self) -> None:
        """Actions cut short by a crash, finished now."""
        self._act([(row, path_from_text(row["path"]))
                   for row in self.record.pending_actions(self.settings.station)])

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event | None = None) -> int:
        """Judge until ``stop`` is set (or idle for ``stop_when_idle_s``); returns how
        many photos were judged."""
        stop = stop or threading.Event()
        settings = self.settings
        self.finish_actions()
        observer = self._observer()
        observer.start()
        self.scan()
        last_scan = idle_since = time.monotonic()
        try:
            while not stop.is_set():
                while True:
                    try:
                        self._consider(self.events.get_nowait())
                    except queue.Empty:
                        break
                if time.monotonic() - last_scan >= settings.rescan_s:
                    self.scan()
                    last_scan = time.monotonic()
                ready = self._ready()
                if ready:
                    self.judge(ready[: settings.batch_size])
                    idle_since = time.monotonic()
                    continue
                if (settings.stop_when_idle_s is not None and not self.pending
                        and time.monotonic() - idle_since >= settings.stop_when_idle_s):
                    break
                stop.wait(0.02)
        finally:
            observer.stop()
            observer.join(timeout=5)
            for notifier in self.notifiers:
                notifier.close()
            self.record.close()
        return self.judged


def open_station(run: str | Path, settings: StationSettings, device: str = "auto",
                 runtime: str = "auto", probe: str = "refuse",
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> Station:
    """Load the run (or export) once and make its station."""
    return station_for(Detector.load(run, device, runtime=runtime, probe=probe), run,
                       settings, on_row)


def station_for(detector: Detector, run: str | Path, settings: StationSettings,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> Station:
    """A station for a Detector already loaded from ``run`` (the service's)."""
    return Station(detector, settings, Path(run).name, run_version(run), _normal_scores(run),
                   on_row, Path(run))


def _normal_scores(run: str | Path) -> np.ndarray | None:
    """The run's held-out normals' scores (calibration.json), drift's reference."""
    scores = load_json(Path(run) / "calibration.json").get("normal_scores")
    return None if scores is None else np.asarray(scores)


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT end the loop after the batch in hand."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

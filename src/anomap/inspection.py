"""Inspecting a folder of photos: the predict loop that the CLI, the service and
library users share.

It is built for production folders, where one bad file must not cost the
others and a crash must not cost what was done:

* every input is accounted for: scored, failed with a reason (a row with
  ``verdict: error``), or ignored with a reason (wrong extension, hidden,
  listed twice, a linked folder not followed), and the summary counts them;
* rows are written and flushed as each batch is scored, so an interrupted run
  keeps its results, and ``resume`` skips the images already in the table
  (cutting a half-written last line), so the finished file equals an
  uninterrupted run's;
* overlay and mask pictures mirror the inputs' paths below their common
  folder, so ``lineA/001.png``, ``lineB/001.png`` and ``001.jpg`` never share
  a name; they are drawn at most ``picture_max_side`` pixels on a side, so a
  6000 px photo costs megabytes, not gigabytes;
* only regular files are opened (a FIFO named ``b.png`` is an error row, not
  a hang), every name a file system can hold is written (:func:`path_text`),
  and ignored files have rows too (``verdict: ignored``, with the reason);
* a small pool of threads decodes and resizes photos while the network
  scores the previous batch (Pillow releases the GIL while it decodes), and
  only a bounded window of photos is in memory however large the folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from anomap import report
from anomap.data import IMAGE_EXTENSIONS, ImageReadError, load_image
from anomap.files import save_json
from anomap.run import Detector, Prediction, PreparedImage

#: columns of the table, in order (CSV header; JSON lines carry the same keys)
COLUMNS = ("path", "score", "verdict", "threshold", "pixel_threshold", "overlay", "mask",
           "error")
FORMATS = ("jsonl", "csv")
IGNORED = "ignored"


def path_text(path: str | Path) -> str:
    r"""A path as it is written in a table: as it is where it is valid UTF-8 without
    a backslash; otherwise escaped as a Python bytes literal would be (``\\`` for a
    backslash, ``\xNN`` for a byte that is not UTF-8), which is lossless: Linux
    names are bytes, and not every name decodes."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        if "\\" not in text:
            return text
    raw = os.fsencode(text).replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def path_from_text(text: str) -> Path:
    """The path :func:`path_text` wrote, back (its inverse)."""
    if "\\" not in text:
        return Path(text)
    raw = text.encode("utf-8").decode("unicode_escape").encode("latin-1")
    return Path(os.fsdecode(raw))

log = logging.getLogger(__name__)


class OutputExistsError(RuntimeError):
    """Refuse to overwrite a results table: work is never lost by a repeated command."""


@dataclass(frozen=True)
class FoundImage:
    """A file to score; ``relative`` is unique among the inputs and names its pictures."""

    path: Path
    relative: Path


@dataclass
class Discovery:
    """What a list of files and folders holds: images to score, and what was left out."""

    images: list[FoundImage] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _common_root(inputs: Sequence[Path]) -> Path:
    folders = [os.path.abspath(p if p.is_dir() else p.parent) for p in inputs]
    return Path(os.path.commonpath(folders)) if folders else Path.cwd()


def find_images(inputs: Sequence[str | Path]) -> Discovery:
    """Expand files and folders (recursively, sorted) into the images to score.

    A file named on the command line is always tried, whatever its extension:
    the user asked for it. Inside folders only image extensions are taken, and
    every other entry is listed in ``ignored`` with the reason."""
    inputs = [Path(p) for p in inputs]
    root = _common_root(inputs)
    found = Discovery()
    seen: set[str] = set()

    def add(path: Path) -> None:
        absolute = os.path.abspath(path)
        if absolute in seen:
            found.ignored.append((str(path), "listed twice"))
            return
        seen.add(absolute)
        found.images.append(FoundImage(path, Path(os.path.relpath(absolute, root))))

    for item in inputs:
        if not item.is_dir():
            add(item)  # a missing or unreadable file becomes an error row naming it
            continue
        for folder, subfolders, files in os.walk(item, onerror=lambda error: found.ignored.append(
                (str(error.filename), f"folder cannot be read ({error.strerror})"))):
            subfolders.sort()
            for name in list(subfolders):
                if os.path.islink(os.path.join(folder, name)):
                    subfolders.remove(name)
                    found.ignored.append((os.path.join(folder, name),
                                          "link to a folder, not followed"))
            for name in sorted(files):
                path = Path(folder, name)
                if name.startswith("."):
                    found.ignored.append((str(path), "hidden file"))
                elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                    found.ignored.append((str(path), f"not an image extension "
                                                     f"({path.suffix or 'none'})"))
                else:
                    add(path)
    return found


@dataclass
class Summary:
    """Counts of what happened to every input, for the closing line and the JSON."""

    scored: int = 0
    failed_verdicts: int = 0
    already_done: int = 0
    errors: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)
    ignored_files: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def of(cls, found: Discovery) -> Summary:
        """A summary that starts with what discovery left out."""
        return cls(ignored=Counter(reason.split(" (")[0] for _, reason in found.ignored),
                   ignored_files=list(found.ignored))

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def describe(self) -> str:
        parts = [f"{self.scored} images scored ({self.failed_verdicts} fail)"]
        if self.already_done:
            parts.append(f"{self.already_done} already in the table")
        parts.append(f"{self.failed} unreadable" + _reasons(self.errors))
        parts.append(f"{sum(self.ignored.values())} ignored" + _reasons(self.ignored))
        return ", ".join(parts) + f", {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        return {"scored": self.scored, "fail": self.failed_verdicts,
                "already_done": self.already_done, "unreadable": dict(self.errors),
                "ignored": dict(self.ignored),
                "ignored_files": [{"path": p, "reason": r} for p, r in self.ignored_files],
                "seconds": round(self.seconds, 3),
                "images_per_second": round(self.scored / self.seconds, 3)
                if self.seconds > 0 else None}


def _reasons(counts: Counter) -> str:
    return f" ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))})" if counts else ""


class RowWriter:
    """Rows to a text stream as JSON lines or CSV, flushed (and synced to disk
    for a file) after every batch, so what was scored survives a crash."""

    def __init__(self, handle: IO[str], fmt: str = "jsonl", header: bool = True) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: choose one of {FORMATS}")
        self.handle = handle
        self.fmt = fmt
        self._csv = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore",
                                   lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None and header:
            self._csv.writeheader()

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            if self._csv is not None:
                self._csv.writerow(row)
            else:
                self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()
        # a terminal or a pipe cannot be synced: flushed is all there is
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.fsync(self.handle.fileno())


def read_done_paths(path: Path, fmt: str) -> set[str]:
    """The paths already in a table left by an interrupted run. A last line cut
    short by the interruption is removed from the file, so the image is redone."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(complete))
    text = complete.decode("utf-8")
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if text and rows and set(rows[0]) != set(COLUMNS):
            raise OutputExistsError(f"{path}: not a table written by 'anomap predict "
                                    "--format csv'; cannot resume into it")
        return {row["path"] for row in rows}
    done = set()
    for number, line in enumerate(text.splitlines(), 1):
        try:
            done.add(json.loads(line)["path"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise OutputExistsError(f"{path}:{number}: not a row written by 'anomap predict "
                                    "--format jsonl'; cannot resume into it") from None
    return done


def open_table(output: Path, fmt: str = "jsonl", resume: bool = False,
               overwrite: bool = False) -> tuple[IO[str], RowWriter, set[str]]:
    """Open ``output`` for a new run, or to continue an interrupted one."""
    exists = output.exists() and output.stat().st_size > 0
    if exists and not (resume or overwrite):
        raise OutputExistsError(f"{output} exists: continue it with --resume, or replace it "
                                "with --overwrite")
    done = read_done_paths(output, fmt) if exists and resume else set()
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = output.open("a" if resume else "w", encoding="utf-8", newline="",
                         errors="backslashreplace")  # an error naming a non-UTF-8 file
    header = not (resume and exists and fmt == "csv")
    return handle, RowWriter(handle, fmt, header=header), done


@dataclass(frozen=True)
class Decoded:
    found: FoundImage
    prepared: PreparedImage | None = None
    photo: np.ndarray | None = None  # kept only when pictures are written
    error: ImageReadError | None = None


def decode(detector: Detector, found: FoundImage, keep_photo: bool,
           fast_decode: bool = False, picture_max_side: int = report.PICTURE_MAX_SIDE,
           source: BinaryIO | None = None, max_pixels: int | None = None) -> Decoded:
    """One file (or its bytes already read, ``source``: an upload, a URI's) -> the
    network's input and, for pictures, the photo reduced to at most
    ``picture_max_side`` (its maps then come back at that size); the full-size
    decode is dropped at once, so a window of photos stays small. Every reader of
    photos for a Detector (predict, Ray, the service, a station) decodes here."""
    geometry = detector.geometry
    try:  # decoding at the network's own size only when no picture is drawn
        photo = load_image(found.path if source is None else source, max_pixels,
                           name=None if source is None else str(found.path),
                           draft=geometry.size if fast_decode and not keep_photo
                           else geometry.decode_floor)
    except ImageReadError as error:
        return Decoded(found, error=error)
    prepared = detector.prepare(photo)
    if not keep_photo:
        return Decoded(found, prepared)
    small = report.bounded(photo, picture_max_side)
    del photo
    return Decoded(found, replace(prepared, size=(small.height, small.width)), np.asarray(small))


def _decoded_in_order(detector: Detector, images: Sequence[FoundImage], keep_photo: bool,
                      workers: int, window: int, settings: InspectionSettings
                      ) -> Iterator[Decoded]:
    """Decode in a thread pool, at most ``window`` images ahead, yielding in input order."""
    def submit(found: FoundImage) -> Future[Decoded]:
        return pool.submit(decode, detector, found, keep_photo, settings.fast_decode,
                           settings.picture_max_side)

    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="anomap-decode") as pool:
        pending: deque[Future[Decoded]] = deque()
        queue = iter(images)
        for found in queue:
            pending.append(submit(found))
            if len(pending) >= window:
                break
        while pending:
            yield pending.popleft().result()
            for found in queue:
                pending.append(submit(found))
                break


def result_row(item: Decoded, prediction: Prediction | None, pictures: Path | None,
         display_range: tuple[float, float]) -> dict[str, Any]:
    path = path_text(item.found.path)
    if prediction is None:
        return {"path": path, "score": None, "verdict": "error", "error": str(item.error)}
    row: dict[str, Any] = {"path": path, "score": prediction.score,
                           "verdict": prediction.verdict, "threshold": prediction.threshold,
                           "pixel_threshold": prediction.pixel_threshold}
    if pictures is not None:
        stem = pictures / item.found.relative
        picture = report.overlay(item.photo, prediction.anomaly_map, *display_range,
                                 pred_mask=prediction.mask)
        row["overlay"] = path_text(report.save_png(picture, f"{stem}.overlay.png"))
        row["mask"] = path_text(report.save_png(prediction.mask.astype(np.uint8) * 255,
                                                f"{stem}.mask.png"))
    return row


@dataclass(frozen=True)
class Table:
    """Where rows go: a file (JSON lines or CSV; Parquet on Ray), continued with
    ``resume`` or replaced with ``overwrite``, or a ``stream`` when there is no file."""

    output: Path | None = None
    fmt: str = "jsonl"
    resume: bool = False
    overwrite: bool = False
    stream: IO[str] | None = None


@dataclass(frozen=True)
class InspectionSettings:
    """How to work through the images: ``batch_size`` per forward pass, ``workers``
    decoding beside the network (Ray: actors), ``pictures`` folder for overlay and
    mask PNGs (drawn at most ``picture_max_side`` pixels on a side), ``fast_decode``
    (JPEGs decoded at reduced size where the network is smaller than the photo; not
    with pictures), a progress bar."""

    batch_size: int = 8
    workers: int = 2
    pictures: Path | None = None
    fast_decode: bool = False
    progress: bool = True
    picture_max_side: int = report.PICTURE_MAX_SIDE


def _log_error(error: ImageReadError) -> None:
    log.warning("skipped %s", error)


def inspect(detector: Detector, found: Discovery, writer: RowWriter,
            settings: InspectionSettings | None = None, *,
            skip: set[str] | frozenset[str] = frozenset(),
            on_error: Callable[[ImageReadError], None] | None = None) -> Summary:
    """Score every image of ``found`` and write one row per image as it is done.

    ``skip``: paths already in the table (resume). ``on_error`` hears of each
    unreadable file as it happens (default: a logged warning). Returns the counts."""
    settings = settings or InspectionSettings()
    pictures, batch_size = settings.pictures, settings.batch_size
    started = time.perf_counter()
    summary = Summary.of(found)
    todo = [f for f in found.images if path_text(f.path) not in skip]
    summary.already_done = len(found.images) - len(todo)
    bar = tqdm(total=len(todo), unit="img", desc="inspecting", disable=not settings.progress,
               dynamic_ncols=True)
    chunk: list[Decoded] = []

    def flush() -> None:
        good = [item for item in chunk if item.error is None]
        predictions = iter(detector.predict_prepared([item.prepared for item in good],
                                                     [str(item.found.path) for item in good]))
        rows = []
        for item in chunk:
            prediction = next(predictions) if item.error is None else None
            rows.append(result_row(item, prediction, pictures, detector.display_range))
            if prediction is None:
                summary.errors[item.error.reason] += 1
                (on_error or _log_error)(item.error)
            else:
                summary.scored += 1
                summary.failed_verdicts += prediction.verdict == "fail"
        writer.write(rows)
        bar.update(len(chunk))
        chunk.clear()

    writer.write({"path": path_text(path), "score": None, "verdict": IGNORED, "error": reason}
                 for path, reason in found.ignored if path_text(path) not in skip)
    try:
        for item in _decoded_in_order(detector, todo, pictures is not None, settings.workers,
                                      window=batch_size * 2 + settings.workers,
                                      settings=settings):
            chunk.append(item)
            if (sum(i.error is None for i in chunk) >= batch_size
                    or len(chunk) >= 4 * batch_size):  # a run of bad files: write them too
                flush()
        flush()
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    return summary


def inspect_folder(detector: Detector, inputs: Sequence[str | Path], table: Table | None = None,
                   settings: InspectionSettings | None = None,
                   on_error: Callable[[ImageReadError], None] | None = None) -> Summary:
    """Files and folders -> a table at ``table.output`` (or its stream) and its summary,
    written next to the table as ``<output>.summary.json``."""
    table = table or Table()
    found = find_images(inputs)
    if not found.images:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}"
                                + (f" ({len(found.ignored)} files ignored: "
                                   f"{found.ignored[0][1]}, ...)" if found.ignored else ""))
    if table.output is None:
        if table.resume:
            raise ValueError("--resume needs --output FILE: the table to continue")
        writer = RowWriter(table.stream or io.StringIO(), table.fmt)
        return inspect(detector, found, writer, settings, on_error=on_error)
    handle, writer, done = open_table(table.output, table.fmt, table.resume, table.overwrite)
    try:
        summary = inspect(detector, found, writer, settings, skip=done, on_error=on_error)
    finally:
        handle.close()
    save_json(summary.to_json(), table.output.with_name(table.output.name + ".summary.json"))
    return summary

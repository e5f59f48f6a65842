"""Operator feedback into the threshold: a proposal, what it would have changed,
and a change kept in the record only when confirmed (and undoable).

The proposal starts from the run's own rule (the calibration quantile of the
held-out normals' scores) and adds what operators said: photos marked
``not_a_defect`` count as normals, and the threshold is raised just past the
highest of them, so every photo an operator cleared would pass; without such
marks, photos marked ``missed_defect`` lower it to their lowest score, so each
would fail. One wrong mark can move a threshold far: so the proposal says how
many past verdicts of the record would flip, both ways, and nothing changes
until someone confirms it (``anomap retune --feedback --apply``, or the page).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomap.metrics import calibrate_threshold
from anomap.record import Query, Record
from anomap.runfolder import load_json, run_version


@dataclass(frozen=True)
class Proposal:
    """A new threshold for one station and model, and what it would have changed."""

    station: str
    model_version: str
    current: float
    proposed: float
    held_out_normals: int
    marked_not_a_defect: int
    marked_missed_defect: int
    would_pass_now: int  # past fails that would pass
    would_fail_now: int  # past passes that would fail
    marks_still_wrong: int  # marked photos the proposal still judges against the mark

    @property
    def changes(self) -> bool:
        return not math.isclose(self.proposed, self.current, rel_tol=0, abs_tol=1e-12)

    def describe(self) -> str:
        if not (self.marked_not_a_defect or self.marked_missed_defect):
            return (f"station {self.station}: no feedback yet; the threshold stays "
                    f"{self.current:.6g}")
        return (f"station {self.station}, model {self.model_version}: threshold "
                f"{self.current:.6g} -> {self.proposed:.6g} from {self.held_out_normals} "
                f"held-out normals, {self.marked_not_a_defect} photos marked not a defect and "
                f"{self.marked_missed_defect} marked missed defects; over the record "
                f"{self.would_pass_now} fails would pass and {self.would_fail_now} passes "
                f"would fail; {self.marks_still_wrong} marks still judged against the mark")


def current_threshold(record: Record, station: str, run: str | Path) -> float:
    """The threshold in force: the record's last change for this model, or the run's."""
    override = record.threshold(station, run_version(run))
    return float(load_json(Path(run) / "calibration.json")["threshold"]) \
        if override is None else override


def propose(record: Record, station: str, run: str | Path) -> Proposal:
    calibration = load_json(Path(run) / "calibration.json")
    version = run_version(run)
    current = current_threshold(record, station, run)
    rows = [r for r in record.rows(Query(station=station, model=version))
            if r["score"] is not None]
    cleared = np.array([r["score"] for r in rows if r["feedback"] == "not_a_defect"])
    missed = np.array([r["score"] for r in rows if r["feedback"] == "missed_defect"])
    normals = np.asarray(calibration.get("normal_scores") or [], dtype=np.float64)
    if cleared.size:
        pooled = np.concatenate([normals, cleared])
        proposed = max(calibrate_threshold(pooled, quantile=calibration["quantile"]),
                       float(np.nextafter(cleared.max(), np.inf)))
    elif missed.size:
        proposed = min(current, float(missed.min()))
    else:
        proposed = current
    scores = np.array([r["score"] for r in rows])
    before, after = scores >= current, scores >= proposed
    still_wrong = int((cleared >= proposed).sum() + (missed < proposed).sum())
    return Proposal(station, version, current, proposed, int(normals.size), int(cleared.size),
                    int(missed.size), int((before & ~after).sum()), int((~before & after).sum()),
                    still_wrong)


def apply(record: Record, proposal: Proposal, who: str | None, why: str | None) -> int:
    """Keep the proposal's threshold as the station's (a change in the record)."""
    return record.change_threshold(proposal.station, proposal.model_version, proposal.current,
                                   proposal.proposed, who, why or proposal.describe())

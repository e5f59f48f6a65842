"""How well did ``--model auto`` choose? Its candidates on the test split (which
only reports: nothing here feeds back into the choice).

For a finished search (``anomap train --model auto --out RUN``): every judged
candidate is read its best way (``anomap retune`` into a scratch folder) and
tested; the JSON holds each candidate's judge score beside its test image AUROC,
pixel AUROC and AUPRO, the Spearman rank correlation between judge and test over
all candidates, the winner's test metrics and their gap to the best candidate's,
and the judge's ranking with the kinds-trained-on rule switched off (what the rule
changes). ``--rejudge`` judges every candidate's run again as it stands now, with
the judgement's standard error, and says which candidate the current rule (the
cheapest within one standard error of the best) keeps: the rule measured on a search
made before it.

    python benchmarks/auto_report.py --run runs/auto_mtd --name auto/mtd
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from anomap.auto import (
    JUDGE_IMAGES,
    Candidate,
    _held_out,
    candidate_run,
    cheapest_within_noise,
    judge,
    judge_set,
)
from anomap.calibrate import retune
from anomap.evaluate import evaluate_run
from anomap.machine import describe_machine
from anomap.methods import METHODS
from anomap.run import LoadSettings
from anomap.runfolder import RunConfig, load_json

ROOT = Path(__file__).resolve().parent
KEYS = ("image_auroc", "pixel_auroc", "aupro")


def tested(source: Path, reading: dict[str, Any], scratch: Path) -> dict[str, float]:
    """The candidate's run read its best way, on the test split."""
    out = scratch / source.name
    retune(source, out, {"image_score": reading["image_score"],
                         "score_window": reading["score_window"]},
           map_normalization=reading["map_normalization"], device="cpu", progress=False)
    result = evaluate_run(out, settings=LoadSettings(device="cpu"), panels=False,
                          progress=False)
    return {key: round(float(result[key]), 4) for key in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run auto wrote")
    parser.add_argument("--name", required=True, help="results/<name>.json")
    parser.add_argument("--rejudge", action="store_true",
                        help="judge every candidate again, with its standard error, and "
                             "apply the current rule")
    parser.add_argument("--tested", type=Path,
                        help="an earlier report of the same search: its test metrics are "
                             "taken instead of testing every candidate again")
    args = parser.parse_args()
    earlier = ({r["candidate"]: r["test"] for r in load_json(args.tested)["candidates"]}
               if args.tested else {})
    selection = load_json(args.run / "selection.json")
    rows = []
    judged_sets: dict[tuple[int, str, int], Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for row in selection["candidates"]:
            if "score" not in row:
                continue
            source = candidate_run(args.run, row["candidate"])
            entry = {key: row[key] for key in ("candidate", "state", "epochs", "score",
                                               "trained_on_kinds")}
            entry["test"] = earlier.get(row["candidate"]) or tested(
                source, row["best_reading"], Path(scratch))
            method, preset = row["candidate"].split(":")
            candidate = Candidate(method, preset, row["epochs"])
            config = RunConfig.load(source)
            geometry = config.geometry
            key = (geometry.size, geometry.mode, geometry.margin)
            if key not in judged_sets and (candidate.trained_on or args.rejudge):
                judged_sets[key] = judge_set(_held_out(config), geometry,
                                             selection["search"]["seed"])
            if candidate.trained_on:  # the same candidate judged on every kind, its own too
                entry["score_judged_on_every_kind"] = judge(
                    source, judged_sets[key], set(), torch.device("cpu"))["score"]
            if args.rejudge:
                again = judge(source, judged_sets[key], candidate.trained_on,
                              torch.device("cpu"))
                entry["rejudged"] = {k: again[k] for k in ("score", "standard_error",
                                                           "replicates")}
            rows.append(entry)
    judge_scores = [r["score"] for r in rows]
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/auto_report.py", *sys.argv[1:]]),
        "run": str(args.run), "winner": selection["winner"]["candidate"],
        "why": selection["why"], "budget_seconds": selection["budget_seconds"],
        "spent_seconds": selection["spent_seconds"], "judge_images": JUDGE_IMAGES,
        "candidates": rows, "machine": describe_machine(),
        "note": "the test split only reports here; no choice was made from it",
    }
    for key in KEYS:
        values = [r["test"][key] for r in rows]
        result[f"spearman_judge_vs_test_{key}"] = (
            round(float(spearmanr(judge_scores, values).statistic), 3) if len(rows) > 2
            else None)
    winner = next(r for r in rows if r["candidate"] == result["winner"])
    best = max(rows, key=lambda r: r["test"]["image_auroc"])
    result["winner_test"] = winner["test"]
    result["best_candidate_by_test"] = {"candidate": best["candidate"], **best["test"]}
    result["winner_gap_image_auroc"] = round(best["test"]["image_auroc"]
                                             - winner["test"]["image_auroc"], 4)
    unruled = {r["candidate"]: r.get("score_judged_on_every_kind", r["score"]) for r in rows}
    result["winner_without_the_rule"] = max(unruled, key=unruled.get)
    if args.rejudge:
        # the search's order (auto.candidates): by the cost each method declares, then
        # its presets in their declared order
        def search_order(row: dict[str, Any]) -> tuple[float, int]:
            method, preset = row["candidate"].split(":")
            return METHODS[method].relative_cost, list(METHODS[method].presets()).index(preset)

        cheapest_first = sorted(rows, key=search_order)
        kept, top = cheapest_within_noise([r["rejudged"] for r in cheapest_first])
        result["rule_now"] = {
            "kept": cheapest_first[kept]["candidate"],
            "best_by_judge": cheapest_first[top]["candidate"],
            "kept_test": cheapest_first[kept]["test"],
            "gap_image_auroc": round(best["test"]["image_auroc"]
                                     - cheapest_first[kept]["test"]["image_auroc"], 4)}
        for row in rows:
            row["rejudged"].pop("replicates")
    path = ROOT / "results" / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("candidates", "machine")},
                     indent=1))


if __name__ == "__main__":
    main()

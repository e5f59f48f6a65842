"""``--model auto``: the judge on hand-made maps, the rule that a candidate is never
judged on the anomalies it trained on, a killed search that resumes to the same
choice, a search that never opens the test split, and selection.json."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import anomap
from anomap import data as data_module
from anomap.auto import (
    BOOTSTRAP,
    SELECTION_FILE,
    Candidate,
    candidates,
    cheapest_within_noise,
    judge_maps,
    load_selection,
)
from anomap.cli import main
from anomap.run import Detector
from anomap.runfolder import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")

#: a quick search: two cheap candidates, small images, a few epochs
QUICK = {"methods": ["patchcore", "stpm"], "recipe": {"image_size": 64, "batch_size": 8},
         "max_epochs": 2, "device": "cpu", "progress": False, "budget_seconds": 600}


def _masks(count: int) -> torch.Tensor:
    masks = torch.zeros(count, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    return masks


def test_the_judge_on_hand_made_maps() -> None:
    generator = torch.Generator().manual_seed(0)
    normal = torch.rand(6, 16, 16, generator=generator) * 0.1
    masks = _masks(6)
    perfect = normal.clone()
    perfect[masks] += 1.0  # hot exactly where the anomaly is
    blind = torch.rand(6, 16, 16, generator=generator) * 0.1  # sees nothing
    verdict = judge_maps(normal[:3], normal, {"blob": (perfect, masks), "line": (blind, masks)})
    plain = next(r for r in verdict["readings"] if (r["image_score"], r["score_window"],
                                                    r["map_normalization"]) == ("max", 1, "none"))
    by_kind = plain["kinds"]
    assert by_kind["blob"]["image_auroc"] == 1.0 and by_kind["blob"]["pixel_auroc"] == 1.0
    assert by_kind["line"]["pixel_auroc"] < 0.75  # chance, give or take six images
    assert plain["score"] == pytest.approx(
        (by_kind["blob"]["score"] + by_kind["line"]["score"]) / 2, abs=1e-4)
    assert verdict["score"] == max(r["score"] for r in verdict["readings"])
    assert {r["map_normalization"] for r in verdict["readings"]} == {"none", "position"}
    with pytest.raises(ValueError, match="every kind"):
        judge_maps(normal[:3], normal, {})


def test_the_judges_standard_error_and_the_cheapest_within_noise() -> None:
    generator = torch.Generator().manual_seed(1)
    normal = torch.rand(8, 16, 16, generator=generator)
    masks = _masks(8)
    faint = normal.clone()
    faint[masks] += 0.3  # found on most images, not all: a judgement with some noise
    verdict = judge_maps(normal[:3], normal, {"blob": (faint, masks)})
    replicates = np.asarray(verdict["replicates"])
    assert len(replicates) == BOOTSTRAP and 0 < verdict["standard_error"] < 0.2
    # the replicates centre on the judgement (histogram pixel AUROC, resampled images)
    assert abs(np.median(replicates) - verdict["score"]) < 2 * verdict["standard_error"]
    again = judge_maps(normal[:3], normal, {"blob": (faint, masks)})
    assert again["replicates"] == verdict["replicates"]  # fixed draws: paired candidates

    def judged(score: float, shift: float, noise: float) -> dict[str, object]:
        wobble = np.random.default_rng(0).normal(0, noise, BOOTSTRAP)
        return {"score": score, "replicates": list(score + shift * wobble + 0.02 * np.sin(
            np.arange(BOOTSTRAP)))}

    # cheapest first: a cheap candidate 0.01 below the best, paired differences of
    # spread 0.03, is kept; 0.1 below (beyond the noise) it is not
    assert cheapest_within_noise([judged(0.90, 1, 0.03), judged(0.91, 0, 0.0)]) == (0, 1)
    assert cheapest_within_noise([judged(0.80, 1, 0.03), judged(0.90, 0, 0.0)]) == (1, 1)
    # without replicates (a search from before them) the best is kept
    assert cheapest_within_noise([{"score": 0.90}, {"score": 0.91}]) == (1, 1)


def test_a_candidate_is_never_judged_on_the_kinds_it_trained_on() -> None:
    assert Candidate("draem", "cpu", 25).trained_on == {"texture"}
    assert Candidate("fractalad", "cpu", 30).trained_on == {"fractal", "cutpaste"}
    assert Candidate("stpm", "paper", 100).trained_on == set()
    assert Candidate("patchcore", "paper", 1).trained_on == set()
    pool = candidates("cpu")
    assert pool[0].method == "patchcore"  # the cheapest is tried first
    assert "draem:paper" not in {c.name for c in pool}  # on a CPU its cpu preset stands in
    assert "draem:paper" in {c.name for c in candidates("cuda")}
    # one of paper, paper-lite and cpu per method: here (no ResNet files) paper-lite
    assert "stpm:paper-lite" in {c.name for c in pool} and "stpm:paper" not in {
        c.name for c in pool}


@pytest.mark.timeout(300)
def test_auto_never_reads_the_test_split_and_writes_an_ordinary_run(
        toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real = data_module.load_image

    def spying(path, *args, **kwargs):  # noqa: ANN001, ANN202
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_image", spying)
    out = tmp_path / "auto"
    selection = anomap.select(toy_data, out, **QUICK)
    assert opened and not [p for p in opened if "/test/" in p or "/ground_truth/" in p]
    assert selection["no_defective_image_used"]
    assert load_selection(out) == json.loads((out / SELECTION_FILE).read_text()) == selection
    ranked = [row for row in selection["candidates"] if "score" in row]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert selection["best_by_judge"] == ranked[0]["candidate"]
    kept = next(r for r in ranked if r["candidate"] == selection["winner"]["candidate"])
    if kept is not ranked[0]:  # a cheaper one, within noise of the best
        assert ranked[0]["score"] - kept["score"] <= 3 * ranked[0]["standard_error"]
    config = RunConfig.load(out)  # an ordinary run: test, predict, export work on it
    assert f"{config.method}:" in selection["winner"]["candidate"]
    assert config.model["image_score"] == selection["winner"]["reading"]["image_score"]
    photo = next((toy_data / "test" / "good").iterdir())
    assert Detector.load(out, "cpu").predict(photo)[0].verdict in ("pass", "fail")
    # the best by the judge, taken instead with the printed command, is a run of its own
    command = shlex.split(selection["take_best_by_judge"])
    assert command[:2] == ["anomap", "retune"]
    assert main([*command[1:], "--no-progress", "--device", "cpu"]) == 0
    taken = RunConfig.load(command[command.index("--out") + 1])
    assert f"{taken.method}:" in selection["best_by_judge"]
    assert taken.model["image_score"] == ranked[0]["best_reading"]["image_score"]


@pytest.mark.timeout(400)
def test_a_killed_search_resumes_to_the_same_choice(toy_data: Path, tmp_path: Path) -> None:
    whole = anomap.select(toy_data, tmp_path / "whole", **QUICK)
    out = tmp_path / "killed"
    code = (f"import torch, anomap; torch.set_num_threads(1); "
            f"anomap.select({str(toy_data)!r}, {str(out)!r}, "
            f"**{QUICK!r})")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE,
                               text=True)
    candidate_runs = out.with_name("killed.auto") / "candidates"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:  # first candidate done
        if (candidate_runs / "stpm-paper-lite" / "history.csv").is_file():
            break
        time.sleep(0.2)
    process.kill()
    process.wait(timeout=60)
    assert not out.exists()
    resumed = anomap.select(toy_data, out, **QUICK)
    assert resumed["winner"]["candidate"] == whole["winner"]["candidate"]
    scores = {r["candidate"]: r.get("score") for r in resumed["candidates"]}
    assert scores == {r["candidate"]: r.get("score") for r in whole["candidates"]}


def test_the_report_section_ranks_the_candidates_and_marks_what_each_trained_on() -> None:
    from anomap.report import selection_section

    reading = {"image_score": "max", "score_window": 21, "map_normalization": "none",
               "normal_score_spread": 0.1, "kinds": {"line": {"score": 0.9}}}
    selection = {"statement": "No defective image was used.", "why": "a won", "rule": "r",
                 "kinds": {"line": "", "texture": ""},
                 "candidates": [{"candidate": "a:paper", "state": "complete", "epochs": 1,
                                 "score": 0.9, "best_reading": reading,
                                 "standard_error": 0.012,
                                 "trained_on_kinds": [], "training_seconds": 3.0},
                                {"candidate": "b:cpu", "state": "pruned", "epochs": 1,
                                 "score": 0.5, "best_reading": reading,
                                 "trained_on_kinds": ["texture"]},
                                {"candidate": "c:paper", "state": "not tried (budget)",
                                 "trained_on_kinds": []}]}
    page = selection_section(selection)
    assert page.index("a:paper") < page.index("b:cpu") < page.index("c:paper")
    assert "No defective image was used." in page and page.count("trained on") == 1
    assert "0.900 ± 0.012" in page  # the judge with its standard error
    assert "take it instead" not in page
    kept_cheaper = {**selection, "winner": {"candidate": "b:cpu"}, "best_by_judge": "a:paper",
                    "take_best_by_judge": "anomap retune --run x --out y"}
    assert "take it instead: <code>anomap retune --run x --out y</code>" in selection_section(
        kept_cheaper)


def test_recipe_flags_reach_every_candidate(toy_data: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """``--batch-size`` (what bounds training memory) and ``--epochs`` are not dropped
    by ``--model auto``: every candidate trains with them."""
    from anomap import auto, cli

    seen = []

    def captured(search: auto.Search) -> dict[str, str]:
        seen.append(search)
        return {"why": "captured"}

    monkeypatch.setattr(auto, "run_search", captured)
    assert cli.main(["train", "--model", "auto", "--data", str(toy_data), "--out",
                     str(tmp_path / "auto"), "--batch-size", "4", "--epochs", "3"]) == 0
    assert seen[0].recipe == {"batch_size": 4} and seen[0].max_epochs == 3

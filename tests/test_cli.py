"""The command line as a user drives it: train on plain folders, test, predict."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap.cli import main
from anomap.run import Detector


def test_predict_scores_files_and_folders_and_reports_corrupt_ones(
        trained_run: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "inbox"
    inputs.mkdir()
    shutil.copy(toy_data / "test" / "hole" / "000.png", inputs / "hole.png")
    shutil.copy(toy_data / "test" / "good" / "000.png", inputs / "good.png")
    (inputs / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    extra = toy_data / "test" / "stain" / "001.png"
    out = tmp_path / "out"
    code = main(["predict", "--run", str(trained_run), str(inputs), str(extra), "--out", str(out),
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, captured.out.splitlines())}
    assert set(rows) == {"hole.png", "good.png", "corrupt.jpg", "001.png"}
    assert rows["corrupt.jpg"]["verdict"] == "error" and "corrupt.jpg" in captured.err
    assert "1 unreadable" in captured.err
    assert rows["hole.png"]["verdict"] == "fail"
    assert rows["hole.png"]["score"] > rows["good.png"]["score"]
    overlay = Image.open(rows["hole.png"]["overlay"])
    assert overlay.size == (128, 128) and overlay.mode == "RGB"
    assert Image.open(rows["hole.png"]["mask"]).getextrema()[1] == 255  # defect pixels marked


def test_predict_csv_to_file(trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    table = tmp_path / "scores.csv"
    scores = {}
    for precision in ("fp32", "bf16"):
        code = main(["predict", "--run", str(trained_run), str(toy_data / "test" / "scratch"),
                     "--format", "csv", "--output", str(table), "--device", "cpu",
                     "--precision", precision, "--overwrite"])
        assert code == 0
        rows = list(csv.DictReader(table.open()))
        assert len(rows) == 5 and {r["verdict"] for r in rows} <= {"pass", "fail"}
        scores[precision] = np.array([float(r["score"]) for r in rows])
    # bfloat16 really ran (scores moved), and moved only a little on defects
    assert not np.array_equal(scores["bf16"], scores["fp32"])
    # measured over training seeds 0-2: at most 2.5-3.3% apart; 0.06 leaves room for noise
    np.testing.assert_allclose(scores["bf16"], scores["fp32"], rtol=0.06)


def test_train_and_test_on_plain_folders(toy_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code = main(["train", "--data", str(toy_data / "train" / "good"),
                 "--defect-dir", str(toy_data / "test" / "hole"),
                 "--mask-dir", str(toy_data / "ground_truth" / "hole"),
                 "--test-normal-dir", str(toy_data / "test" / "good"),
                 "--out", str(run), "--epochs", "1", "--batch-size", "8", "--image-size", "64",
                 "--resize-mode", "mirror", "--margin", "4", "--augment", "flip",
                 "--device", "cpu", "--no-progress", "--test"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == 15 and metrics["n_defective"] == 5
    assert "64 px mirror, margin 4" in metrics["settings"]
    assert "augment flip" in metrics["settings"]
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"]["epochs"], config["recipe"]["augment"]) == (1, "flip")
    assert config["geometry"] == {"size": 64, "mode": "mirror", "margin": 4}
    # the same command again refuses to overwrite the finished run
    code = main(["train", "--data", str(toy_data / "train" / "good"), "--out", str(run),
                 "--no-progress"])
    assert code == 2 and "--resume" in capsys.readouterr().err
    # retune: same weights, another score window, maps read per position, tested on
    # the same plain-folder data
    code = main(["retune", "--run", str(run), "--out", str(tmp_path / "retuned"),
                 "--score-window", "3", "--map-normalization", "position", "--device", "cpu",
                 "--no-progress", "--test"])
    assert code == 0, capsys.readouterr().err
    assert "retuned:" in capsys.readouterr().out
    retuned = json.loads((tmp_path / "retuned" / "metrics.json").read_text())
    assert retuned["n_images"] == 15 and retuned["n_defective"] == 5
    assert "score window 3" in retuned["settings"]
    assert "map normalised per position" in retuned["settings"]
    assert "64 px mirror, margin 4" in retuned["settings"]  # the geometry travels with the run
    assert (tmp_path / "retuned" / "position_stats.pt").is_file()
    assert retuned["settings"].endswith("retuned from run")
    assert "score window 3" in (tmp_path / "retuned" / "report.html").read_text()
    code = main(["retune", "--run", str(run), "--out", str(tmp_path / "mean"),
                 "--image-score", "mean", "--device", "cpu", "--no-progress", "--test"])
    assert code == 0, capsys.readouterr().err
    mean = json.loads((tmp_path / "mean" / "metrics.json").read_text())
    assert "image score = map mean" in mean["settings"]
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["model"][
        "image_score"] == "mean"
    code = main(["retune", "--run", str(run), "--out", str(tmp_path / "bad"),
                 "--map-strides", "64", "--no-progress"])
    assert code == 2 and "map_strides" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_clear_errors(tmp_path: Path, toy_data: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and "train/good" in err
    assert main(["test", "--run", str(tmp_path / "nothing")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["train", "--data", str(toy_data), "--out", str(tmp_path / "r"),
                 "--backbone", "resnet999"]) == 2
    err = capsys.readouterr().err
    assert "resnet999" in err and "efficientnet_lite0" in err
    assert main(["train", "--data", str(toy_data), "--out", str(tmp_path / "r"),
                 "--image-size", "64", "--margin", "20"]) == 2
    assert "margin 20" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_samples_grid_and_method_options(toy_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    grid = tmp_path / "grid.png"
    assert main(["samples", "--data", str(toy_data), "--out", str(grid), "--image-size", "64",
                 "-n", "3"]) == 0
    width, height = Image.open(grid).size
    assert width > 3 * 64 and height >= 3 * 64  # 3 rows of image | anomaly | mask
    assert main(["samples", "--model", "stpm", "--data", str(toy_data),
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "normal images" in capsys.readouterr().err
    # an option the method does not have is refused, naming the method's options
    assert main(["train", "--model", "stpm", "--data", str(toy_data), "--out",
                 str(tmp_path / "r"), "--anomaly-source", "builtin"]) == 2
    err = capsys.readouterr().err
    assert "stpm has no option anomaly_source" in err and "backbone" in err
    assert main(["train", "--model", "draem", "--data", str(toy_data), "--out",
                 str(tmp_path / "r"), "--strides", "8", "16"]) == 2
    assert "draem has no option strides" in capsys.readouterr().err


def test_train_with_other_levels_score_window_and_lr_schedule(toy_data: Path,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(toy_data), "--out", str(run), "--epochs", "2",
                 "--batch-size", "8", "--image-size", "64", "--strides", "8", "16", "32",
                 "--map-strides", "16", "32", "--score-window", "5", "--lr", "0.2",
                 "--lr-milestones", "0.5", "--lr-gamma", "0.25", "--device", "cpu",
                 "--no-progress"]) == 0
    config = json.loads((run / "config.json").read_text())
    model_config = config["model"]
    assert model_config["strides"] == [8, 16, 32] and model_config["score_window"] == 5
    assert model_config["map_strides"] == [16, 32]
    assert config["recipe"]["lr_milestones"] == [0.5] and config["recipe"]["lr_gamma"] == 0.25
    # history.csv gives the lr each epoch trained with: 0.2, then 0.2 x 0.25 after the milestone
    with (run / "history.csv").open() as f:
        assert [float(row["lr"]) for row in csv.DictReader(f)] == pytest.approx([0.2, 0.05])
    detector = Detector.load(run, "cpu")
    assert detector.model.config["score_window"] == 5
    assert detector.model.config["map_strides"] == [16, 32]
    network = detector.model.method
    assert network.teacher.out_strides == network.student.out_strides == (8, 16, 32)
    assert detector.predict(np.zeros((40, 70), dtype=np.uint8))[0].anomaly_map.shape == (40, 70)


def test_the_cli_reference_in_docs_is_current() -> None:
    from anomap.cli import reference_markdown

    written = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert written == reference_markdown(), (
        "docs/cli.md is stale: python -m anomap.cli --reference > docs/cli.md")

"""The house stays one-way and a method is one file: a throwaway sixth method,
registered with one line, goes through train, test, export and predict on the
command line; its own option becomes a flag without touching the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_method import Tiny

from anomap.cli import build_parser, main
from anomap.methods import METHODS
from anomap.runfolder import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, Tiny.name, Tiny)  # the one registry line


@pytest.mark.timeout(300)
def test_a_new_method_is_one_file_and_one_registry_line(
        tiny_registered: None, toy_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run, export = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--model", "tiny", "--data", str(toy_data), "--out", str(run),
                 "--width", "3", "--epochs", "2", "--no-progress"]) == 0
    config = RunConfig.load(run)
    assert config.method == "tiny" and config.model["width"] == 3
    assert config.model["score_window"] == 3  # the method's own default, declared once
    assert main(["test", "--run", str(run), "--no-panels", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["settings"].startswith("tiny, score window 3")
    assert main(["retune", "--run", str(run), "--out", str(tmp_path / "retuned"),
                 "--score-window", "1", "--no-progress"]) == 0
    assert main(["export", "--run", str(run), "--out", str(export), "--no-progress"]) == 0
    capsys.readouterr()
    photo = next((toy_data / "test" / "good").iterdir())
    assert main(["predict", "--run", str(export), str(photo), "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["verdict"] in ("pass", "fail")


def test_method_flags_come_from_the_methods_declarations(tiny_registered: None) -> None:
    parser = build_parser()
    args = parser.parse_args(["train", "--out", "x", "--model", "tiny", "--width", "5"])
    assert args.width == 5
    retune = parser.parse_args(["retune", "--run", "a", "--out", "b", "--fusion", "pair1"])
    assert retune.fusion == "pair1"  # RSTPM's inference option, from its signature
    with pytest.raises(SystemExit):  # learnt options are not retune's
        parser.parse_args(["retune", "--run", "a", "--out", "b", "--width", "5"])


def test_every_method_declares_its_options_once() -> None:
    for name, cls in METHODS.items():
        options = cls.options()
        assert {"score_window", "image_score"} <= set(options), name
        assert set(cls.inference_options()) <= set(options)
        assert all(spec.opt.help for spec in options.values()), name
        json.dumps(cls.default_config())  # what config.json holds


def test_old_run_configs_still_load() -> None:
    """config.json from before the version was recorded: missing fields read as what
    those runs did, unknown ones are kept."""
    old = {"method": "stpm", "model": {"strides": [8, 16, 32]},
           "geometry": {"size": 128, "mode": "letterbox"},
           "data": {"root": "/data", "val_fraction": 0.2}, "seed": 3,
           "threshold_quantile": 0.99, "someday": 1}
    config = RunConfig.from_dict(old)
    assert config.version == 1 and config.geometry.margin == 0
    assert config.map_normalization == "none" and config.seed == 3
    again = config.to_dict()
    assert again["someday"] == 1 and again["version"] == 2
    assert RunConfig.from_dict(again).updated(version=1) == config

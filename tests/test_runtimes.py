"""Export to ONNX Runtime and OpenVINO: the exported network gives the run's maps
and verdicts, thresholds stay editable, int8 keeps the toy defects found, and a
failed check or a missing runtime is a clear error with nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fit_toy

from anomap import export, runtimes, trust
from anomap.cli import main
from anomap.evaluate import evaluate_run
from anomap.export import export_run
from anomap.methods import METHODS
from anomap.run import Detector

pytestmark = pytest.mark.usefixtures("one_thread")


def _photos(toy_data: Path) -> list[Path]:
    return sorted((toy_data / "test").rglob("00[01].png"))


def _assert_same_predictions(run: Path, export: Path, photos: list[Path],
                             runtime: str = "auto", rtol: float = 1e-4) -> None:
    ours = Detector.load(run, "cpu").predict(photos)
    theirs = Detector.load(export, runtime=runtime).predict(photos)
    for a, b in zip(ours, theirs, strict=True):
        span = float(np.abs(a.anomaly_map).max())
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= rtol * span
        assert a.verdict == b.verdict and abs(a.score - b.score) <= rtol * span


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_exports_with_the_runs_scores_and_verdicts_in_every_runtime(
        method: str, toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint and its export, in ONNX Runtime and in OpenVINO, give the same
    (score, verdict) through the one read path (anomap.scoring). (OpenVINO's own IR
    format is the same graph converted: the CLI test below exports one.)"""
    working = tmp_path / "working"
    working.mkdir()
    monkeypatch.chdir(working)
    run = fit_toy(method, toy_data, tmp_path / "run", epochs=1, image_size=64)
    record = export_run(run, tmp_path / "export", "onnx", progress=False)
    assert record["agreement"]["verdicts_differ"] == 0
    assert record["agreement"]["max_relative_map_difference"] <= \
        trust.FP32_EXPORT.relative_map_difference
    assert record["input"]["range"] == [0.0, 1.0] and record["method"] == method
    _assert_same_predictions(run, tmp_path / "export", _photos(toy_data), "onnxruntime")
    _assert_same_predictions(run, tmp_path / "export", _photos(toy_data), "openvino")
    if method == "draem":  # STPM's int8 has its own tests below
        # one epoch leaves maps of noise, which int8 moves more than its tolerance: here
        # the point is that this graph quantises at all. (FractalAD's, 25 s more here,
        # is quantised by benchmarks/int8_check.py: speed/int8_check_demo_amd.json)
        monkeypatch.setattr(export, "INT8_EXPORT", trust.Tolerance())
        int8 = export_run(run, tmp_path / "int8", "onnx", int8=True, progress=False)
        assert int8["int8"]  # these graphs defeat ORT's symbolic shape inference
        maps = [r.anomaly_map
                for r in Detector.load(tmp_path / "int8", probe="off").predict(_photos(toy_data))]
        assert all(np.isfinite(m).all() for m in maps)
    assert not list(working.iterdir())  # nothing left where the user ran it (ORT's dumps)


def test_openvino_export_through_the_cli_then_predict_and_test_with_it(
        trained_run: Path, toy_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    export = tmp_path / "ov"
    assert main(["export", "--run", str(trained_run), "--format", "openvino", "--out",
                 str(export), "--no-progress"]) == 0
    assert "0 verdicts differ" in capsys.readouterr().out
    assert (export / "model.xml").is_file() and not (export / "model.onnx").exists()
    _assert_same_predictions(trained_run, export, _photos(toy_data), runtime="openvino")
    assert main(["predict", "--run", str(export), str(toy_data / "test" / "hole"),
                 "--quiet"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5 and all(r["verdict"] in ("pass", "fail") for r in rows)
    torch_metrics = evaluate_run(trained_run, out_dir=tmp_path / "t", panels=False,
                                 progress=False)
    ov_metrics = evaluate_run(export, out_dir=tmp_path / "o", panels=False, progress=False)
    assert ov_metrics["runtime"] == "openvino"
    assert ov_metrics["image_auroc"] == pytest.approx(torch_metrics["image_auroc"], abs=1e-6)


def test_thresholds_stay_outside_the_graph_and_editable(
        trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    export_run(trained_run, export, progress=False)
    photo = toy_data / "test" / "good" / "000.png"
    score = Detector.load(export).predict(photo)[0].score
    calibration = json.loads((export / "calibration.json").read_text())
    for threshold, verdict in ((score * 0.5, "fail"), (score * 2.0, "pass")):
        calibration["threshold"] = threshold
        (export / "calibration.json").write_text(json.dumps(calibration))
        assert Detector.load(export).predict(photo)[0].verdict == verdict


@pytest.fixture(scope="module")
def int8_export(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checked int8 export of the toy STPM, shared: the tests only read it."""
    export = tmp_path_factory.mktemp("int8") / "int8"
    export_run(trained_run, export, "onnx", int8=True, progress=False)
    return export


def test_int8_keeps_the_toy_defects_found(trained_run: Path, int8_export: Path,
                                          tmp_path: Path) -> None:
    record = json.loads((int8_export / "export.json").read_text())
    assert record["int8"] and "training images" in record["quantisation_images"]
    fp32 = evaluate_run(trained_run, out_dir=tmp_path / "a", panels=False, progress=False)
    int8 = evaluate_run(int8_export, out_dir=tmp_path / "b", panels=False,
                        progress=False)
    assert int8["precision"] == "int8"
    # measured on a toy STPM: 0.984 -> 0.982 image, 0.986 -> 0.984 pixel (quantising the
    # distances too gave 0.952); the bounds leave room for another toy run
    assert int8["image_auroc"] >= fp32["image_auroc"] - 0.04
    assert int8["pixel_auroc"] >= fp32["pixel_auroc"] - 0.02


def test_a_disagreeing_export_is_refused_and_nothing_is_written(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "FP32_EXPORT", trust.Tolerance(relative_map_difference=0.0))
    with pytest.raises(trust.DisagreementError, match="maps differ by up to .* nothing written"):
        export_run(trained_run, tmp_path / "export", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_runtime_names_the_extra(trained_run: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    assert main(["export", "--run", str(trained_run), "--format", "openvino", "--out",
                 str(tmp_path / "ov"), "--no-progress"]) == 2
    assert 'pip install "anomap[openvino]"' in capsys.readouterr().err
    assert not (tmp_path / "ov").exists()
    with pytest.raises(Exception, match="export of it"):
        Detector.load(trained_run, runtime="onnxruntime")


def _int8_goes_wrong(monkeypatch: pytest.MonkeyPatch, runtime: str | None = None) -> None:
    """Make int8 graphs read maps the way a saturating CPU might: shifted up and
    mirrored, so verdicts and localisation both break (``runtime``: only that one)."""
    for cls in (runtimes.OnnxRuntimeNetwork, runtimes.OpenVinoNetwork):
        if runtime not in (None, cls.runtime):
            continue
        original = cls.anomaly_map

        def broken(self, images, _original=original):  # noqa: ANN001, ANN202
            maps = _original(self, images)
            if self.precision != "int8":
                return maps
            return maps.flip(-1) * 3.0 + maps.amax()

        monkeypatch.setattr(cls, "anomaly_map", broken)


def test_an_int8_export_that_changes_the_decisions_is_refused(
        trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    _int8_goes_wrong(monkeypatch)
    out = tmp_path / "exports" / "int8"
    assert main(["export", "--run", str(trained_run), "--out", str(out), "--int8",
                 "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "does not keep the run's decisions" in error and "nothing written" in error
    assert "pixel AUROC on the synthetic line anomalies" in error and "drop --int8" in error
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []


def test_int8_export_records_its_agreement_its_own_threshold_and_a_probe(
        trained_run: Path, int8_export: Path) -> None:
    export = int8_export
    record = json.loads((export / "export.json").read_text())
    for agreement in record["agreement_by_runtime"].values():
        assert agreement["passed"] and agreement["n_anomalous"] > 0
        for kind in ("texture", "line"):
            ours, theirs = agreement["synthetic_by_kind"][kind]["pixel_auroc"]
            assert theirs >= ours - 0.02
    old, new = record["recalibrated"]["threshold"]
    assert json.loads((export / "calibration.json").read_text())["threshold"] == new
    assert json.loads((export / "calibration.fp32.json").read_text())["threshold"] == old
    assert record["built_on"]["isa"].keys() >= {"avx2", "avx512_vnni", "amx_int8"}
    probe = trust.load_probe(export)
    check = probe.check
    assert set(check.kinds) == {"normal", "texture", "line"}
    assert check.masks[check.labels == 1].any() and not check.masks[check.labels == 0].any()
    # the stored readings are the run's own and the int8 graph's, through the same read path
    ours = Detector.load(trained_run, "cpu").read(check)
    assert np.abs(ours.maps - probe.run.maps).max() <= 1e-3 * np.abs(ours.maps).max()
    assert (ours.failed == probe.run.failed).all()
    int8 = Detector.load(export, runtime="onnxruntime", probe="off").read(check)
    assert np.abs(int8.maps - probe.int8.maps).max() <= 1e-3 * np.abs(int8.maps).max()
    assert probe.int8.threshold == new


def test_a_runtime_that_disagrees_where_it_runs_is_refused_or_falls_back(
        trained_run: Path, toy_data: Path, int8_export: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    export = int8_export
    assert Detector.load(export).load_report["graph"] == "int8"
    _int8_goes_wrong(monkeypatch)  # the same export on a machine whose int8 kernels differ
    with pytest.raises(trust.DisagreementError, match="does not keep the run's decisions on "
                       "this machine .*--probe fallback"):
        Detector.load(export)
    with pytest.raises(trust.DisagreementError):
        Detector.load(export, runtime="onnxruntime")
    fallback = Detector.load(export, probe="fallback")
    assert fallback.precision == "fp32" and fallback.load_report["graph"] == "fp32"
    assert "falling back to the export's fp32 graph" in caplog.text
    ours = Detector.load(trained_run, "cpu").predict(_photos(toy_data))
    for a, b in zip(ours, fallback.predict(_photos(toy_data)), strict=True):  # the run's fp32
        assert a.verdict == b.verdict and a.score == pytest.approx(b.score, rel=1e-4)
    assert Detector.load(export, probe="off").precision == "int8"


def test_a_runtime_that_failed_the_export_check_is_not_loaded_on_the_probe_alone(
        int8_export: Path, tmp_path: Path) -> None:
    """On an AMD CPU, OpenVINO's int8 RSTPM failed the export's check (25 of 435
    verdicts) while ONNX Runtime's passed, and the 18-image probe then passed it at
    load: the whole check, where it failed, outweighs the probe."""
    export = tmp_path / "export"
    shutil.copytree(int8_export, export)
    record = json.loads((export / "export.json").read_text())
    record["agreement_by_runtime"]["openvino"].update(
        passed=False, problems=["verdicts differ on 25 of 435 images"])
    (export / "export.json").write_text(json.dumps(record))
    with pytest.raises(trust.DisagreementError, match="failed the export's check where the "
                       "export was built .*25 of 435"):
        Detector.load(export, runtime="openvino")
    auto = Detector.load(export)
    assert auto.runtime == "onnxruntime" and auto.precision == "int8"
    assert "failed the export's check" in " ".join(
        " ".join(r["problems"]) for r in auto.load_report["tried"])
    fallback = Detector.load(export, runtime="openvino", probe="fallback")
    assert fallback.precision == "fp32" and fallback.load_report["graph"] == "fp32"
    assert Detector.load(export, runtime="openvino", probe="off").precision == "int8"


def test_runtime_auto_takes_the_fastest_runtime_that_passes_the_probe(
        toy_data: Path, int8_export: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    export = int8_export
    report = Detector.load(export).load_report
    tried = {r["runtime"]: r for r in report["tried"]}
    assert set(tried) == {"onnxruntime", "openvino"}
    assert report["runtime"] == max(tried, key=lambda name: tried[name]["images_per_second"])
    _int8_goes_wrong(monkeypatch, runtime=report["runtime"])  # the faster one now disagrees
    other = ({"onnxruntime", "openvino"} - {report["runtime"]}).pop()
    detector = Detector.load(export)
    assert detector.runtime == other and "failed the probe" in detector.load_report["why"]
    assert main(["predict", "--run", str(export), str(toy_data / "test" / "hole"),
                 "--quiet"]) == 0
    assert f"runtime {other}: passed the probe on this machine" in capsys.readouterr().err

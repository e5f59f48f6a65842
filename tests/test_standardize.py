"""Per-position standardisation of anomaly maps against held-out normals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.calibrate import retune
from anomap.data import load_set
from anomap.evaluate import evaluate_run
from anomap.metrics import image_auroc
from anomap.run import Detector, LoadSettings
from anomap.runfolder import POSITION_STATS_FILE, DataSource, RunConfig, RunError, normal_split
from anomap.standardize import PositionStats
from anomap.train import TrainingPlan, fit


def test_leave_one_out_matches_a_hand_computation() -> None:
    maps = torch.rand(6, 4, 5, generator=torch.Generator().manual_seed(0))
    stats, standardized = PositionStats.fit_leave_one_out(maps, chunk=4)  # chunks: 4 + 2
    values = maps.double().numpy()
    np.testing.assert_allclose(stats.mean.numpy(), values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.std.numpy(), values.std(0, ddof=1), rtol=1e-5)
    for i in range(6):
        others = np.delete(values, i, axis=0)
        expected = (values[i] - others.mean(0)) / others.std(0, ddof=1)
        np.testing.assert_allclose(standardized[i].numpy(), expected, rtol=1e-4)
    # applied to new maps: (x - mean) / std with the statistics of all six
    new = torch.rand(2, 4, 5)
    expected = (new.double().numpy() - values.mean(0)) / values.std(0, ddof=1)
    np.testing.assert_allclose(stats(new).numpy(), expected, rtol=1e-4)


def test_flat_positions_stay_finite_and_bad_input_is_refused(tmp_path: Path) -> None:
    maps = torch.rand(5, 3, 3)
    maps[:, 0, 0] = 0.5  # the same on every normal image: no spread to divide by
    stats, standardized = PositionStats.fit_leave_one_out(maps)
    assert torch.isfinite(standardized).all()
    probe = torch.full((1, 3, 3), 0.5)
    probe[0, 0, 0] = 0.6
    assert torch.isfinite(stats(probe)).all()
    loaded = PositionStats.load(stats.save(tmp_path / "stats.pt"))
    torch.testing.assert_close(loaded(probe), stats(probe))
    with pytest.raises(ValueError, match="at least 3"):
        PositionStats.fit_leave_one_out(maps[:2])
    with pytest.raises(ValueError, match="fitted at"):
        stats(torch.rand(1, 4, 4))


def test_a_place_that_is_hot_on_every_normal_image_no_longer_hides_defects() -> None:
    """Normal maps with a hot edge column outscore a defect in the middle under
    the plain max; per position, the defect is what stands out."""
    generator = torch.Generator().manual_seed(1)

    def normal_maps(count: int) -> torch.Tensor:
        maps = 0.1 + 0.01 * torch.rand(count, 16, 16, generator=generator)
        maps[:, :, 0] += 1.0 + 0.2 * torch.rand(count, 16, generator=generator)
        return maps

    held_out = normal_maps(30)
    test_normal, test_defective = normal_maps(10), normal_maps(10)
    test_defective[:, 7:9, 7:9] += 0.3
    maps = torch.cat([test_normal, test_defective])
    labels = np.array([0] * 10 + [1] * 10)
    raw = maps.flatten(1).amax(1).numpy()
    assert image_auroc(labels, raw) < 0.8
    stats, _ = PositionStats.fit_leave_one_out(held_out)
    assert image_auroc(labels, stats(maps).flatten(1).amax(1).numpy()) == 1.0


def test_retune_with_position_normalization(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "position"
    calibration = retune(trained_run, out, {}, map_normalization="position", device="cpu",
                         progress=False)
    assert calibration["map_normalization"] == "position"
    config = json.loads((out / "config.json").read_text())
    assert config["map_normalization"] == "position"
    detector = Detector.load(out, "cpu")
    assert detector.reader.standardize is not None
    # fitted on exactly the held-out maps: in their own statistics they have
    # mean 0 and standard deviation 1 at every position
    _, held_out = normal_split(RunConfig.from_dict(config))
    loaded = load_set(held_out, detector.geometry, progress=False)
    reading = detector.reader.read_set(detector.model, loaded, progress=False)
    maps, scores = reading.maps, reading.scores
    torch.testing.assert_close(maps.mean(0), torch.zeros(maps.shape[1:]), atol=1e-3, rtol=0)
    torch.testing.assert_close(maps.std(0), torch.ones(maps.shape[1:]), atol=1e-3, rtol=0)
    # the threshold is set leave-one-out, so above what the images' own statistics give
    assert calibration["threshold"] > np.quantile(scores, 0.99)
    # library predictions use the same standardised scale as the threshold
    prediction = detector.predict(held_out[0].path)[0]
    assert prediction.score == pytest.approx(scores[0], rel=1e-4)
    result = evaluate_run(
        out,
        settings=LoadSettings(device="cpu"),
        out_dir=tmp_path / "report",
        panels=False,
        progress=False,
    )
    assert result["image_auroc"] >= 0.9
    assert "map normalised per position" in result["settings"]
    (out / POSITION_STATS_FILE).unlink()
    with pytest.raises(RunError, match="retune"):
        Detector.load(out, "cpu")
    with pytest.raises(ValueError, match="map-normalization"):
        retune(trained_run, tmp_path / "bad", {}, map_normalization="global", progress=False)


def test_too_few_held_out_images_or_a_changed_normalization_fail_before_training(
        toy_data: Path, trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "few"
    with pytest.raises(ValueError, match="at least 3 held-out"):  # 5% of 40 images: 2
        fit(
            "stpm",
            DataSource(str(toy_data), val_fraction=0.05),
            run,
            TrainingPlan(recipe={"epochs": 1, "image_size": 64}, map_normalization="position"),
            device="cpu",
            progress=False,
        )
    assert not run.exists()
    before = (trained_run / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="anomap retune"):
        fit(
            "stpm",
            toy_data,
            trained_run,
            TrainingPlan(map_normalization="position"),
            resume=True,
            device="cpu",
            progress=False,
        )
    assert (trained_run / "last.pt").read_bytes() == before


def test_masks_use_a_pixel_threshold_that_a_mean_score_does_not_lower(
        trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    """The mean of a standardised map is far below its hot pixels: the defect mask and
    the heat-map colours must come from normal images' hottest pixels, not from the
    image threshold, or every normal photo would show a defect."""
    plain = json.loads((trained_run / "calibration.json").read_text())
    # plain max as the image score: the two thresholds are the same quantile of the same peaks
    assert plain["pixel_threshold"] == pytest.approx(plain["threshold"])
    out = tmp_path / "mean"
    calibration = retune(trained_run, out, {"image_score": "mean"},
                         map_normalization="position", device="cpu", progress=False)
    assert calibration["pixel_threshold"] > 3 * calibration["threshold"]
    detector = Detector.load(out, "cpu")
    normal = detector.predict(toy_data / "test" / "good" / "000.png")[0]
    defect = detector.predict(toy_data / "test" / "hole" / "000.png")[0]
    truth = np.asarray(Image.open(toy_data / "ground_truth" / "hole" / "000_mask.png")) > 0
    assert normal.mask.mean() < 0.01
    assert (normal.anomaly_map >= normal.threshold).mean() > 0.05  # what the old rule marked
    assert defect.verdict == "fail" and defect.mask[truth].mean() > 0.3
    assert defect.mask[~truth].mean() < 0.05
    # a run calibrated before the pixel threshold existed keeps its old mask rule
    old = json.loads((out / "calibration.json").read_text())
    del old["pixel_threshold"]
    (out / "calibration.json").write_text(json.dumps(old))
    assert Detector.load(out, "cpu").pixel_threshold == pytest.approx(old["threshold"])

"""STPM end to end on a toy defect set, plus its loss/map arithmetic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anomap import Detector, train
from anomap.calibrate import retune
from anomap.data import Geometry, discover, load_set, to_float
from anomap.evaluate import evaluate_run
from anomap.methods import build_model
from anomap.methods.stpm import normalized_distance
from anomap.run import LoadSettings
from anomap.runfolder import DataSource, RunConfig, normal_split
from anomap.scoring import MapReader, Thresholds, image_score
from anomap.train import RunExistsError, TrainingPlan, cache_frozen_targets, fit


def test_normalized_distance_hand_values() -> None:
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)  # two positions
    s = torch.tensor([[3.0, 0.0], [0.0, -1.0]]).T.reshape(1, 2, 1, 2)
    # position 0: same direction -> 0; position 1: opposite directions -> 0.5 * |2|^2 = 2
    assert torch.allclose(normalized_distance(t, s), torch.tensor([[[0.0, 2.0]]]))


def test_normalized_distance_is_float32_under_bfloat16_autocast() -> None:
    """Features nearly equal, as a trained student's are: the distance of the
    bfloat16 features must be computed in float32, not cancelled away in bfloat16."""
    t = torch.randn(2, 24, 8, 8).bfloat16()
    s = (t.float() + 0.01 * torch.randn(2, 24, 8, 8)).bfloat16()
    t64, s64 = (torch.nn.functional.normalize(x.double(), dim=1) for x in (t, s))
    exact = 0.5 * (t64 - s64).pow(2).sum(dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = normalized_distance(t, s)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-3, atol=0.0)


def test_map_is_product_of_levels_and_score_is_max() -> None:
    model = build_model("stpm", weights="random").eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        teacher, student = model._features(images)
        expected = torch.ones(2, 64, 64)
        for t, s in zip(teacher, student, strict=True):
            level = normalized_distance(t, s)[:, None]
            expected *= torch.nn.functional.interpolate(level, size=(64, 64), mode="bilinear",
                                                        align_corners=False)[:, 0]
        maps, scores = model(images)
        levels = model.level_maps(images)
    assert torch.allclose(maps, expected)
    assert len(levels) == 3 and torch.allclose(torch.stack(levels).prod(dim=0), maps)
    assert torch.allclose(scores, maps.flatten(1).amax(1))


def test_map_strides_multiply_only_the_chosen_levels() -> None:
    model = build_model("stpm", weights="random", map_strides=[16, 8]).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        levels = model.level_maps(images)
        maps = model.anomaly_map(images)
    assert model.config["map_strides"] == [8, 16]
    torch.testing.assert_close(maps, levels[1] * levels[2])
    assert not torch.allclose(maps, levels[0] * levels[1] * levels[2])
    for wrong in ([32], []):
        with pytest.raises(ValueError, match="some of the trained strides"):
            build_model("stpm", weights="random", map_strides=wrong)


def test_score_window_scores_the_hottest_region_not_the_hottest_pixel() -> None:
    model = build_model("stpm", weights="random", score_window=3)
    maps = torch.zeros(2, 8, 8)
    maps[0, 4, 4] = 0.9  # one hot pixel
    maps[1, 1:4, 1:4] = 0.2  # a warm 3x3 region
    torch.testing.assert_close(image_score(maps, model.config), torch.tensor([0.1, 0.2]))
    # the plain max would rank them the other way
    assert image_score(maps, model.config).argmax() == 1
    with pytest.raises(ValueError, match="positive odd"):
        build_model("stpm", weights="random", score_window=4)


def test_mean_image_score_adds_up_faint_evidence_over_the_whole_map() -> None:
    model = build_model("stpm", weights="random", image_score="mean", score_window=3)
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 8.0  # one strong spot: mean 0.5
    maps[1] = 0.75  # faint everywhere: mean 0.75
    torch.testing.assert_close(image_score(maps, model.config), torch.tensor([0.5, 0.75]))
    with pytest.raises(ValueError, match="unknown image_score 'median'"):
        build_model("stpm", weights="random", image_score="median")


def test_trained_stpm_finds_the_toy_defects(trained_run: Path) -> None:
    result = evaluate_run(trained_run, settings=LoadSettings(device="cpu"), progress=False)
    # measured over training seeds 0-2: image 0.88-0.95, pixel 0.985-0.987, AUPRO 0.967-0.969
    assert result["image_auroc"] > 0.85, result
    assert result["pixel_auroc"] > 0.95, result
    assert result["aupro"] > 0.9, result
    for name in ("metrics.json", "predictions.csv", "report.html"):
        assert (trained_run / name).is_file()
    saved = json.loads((trained_run / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold", "n_images",
                "seconds", "images_per_second"):
        assert key in saved
    assert saved["n_images"] == 25
    assert len(list((trained_run / "panels").rglob("*.png"))) == 25


def test_bfloat16_inference_finds_the_same_defects(trained_run: Path, tmp_path: Path) -> None:
    results = {
        p: evaluate_run(
            trained_run,
            settings=LoadSettings(device="cpu", precision=p),
            out_dir=tmp_path / p,
            panels=False,
            progress=False,
        )
        for p in ("fp32", "bf16")
    }
    for precision, result in results.items():
        assert result["precision"] == precision
        assert json.loads((tmp_path / precision / "metrics.json").read_text())[
            "precision"] == precision
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert abs(results["bf16"][key] - results["fp32"][key]) < 0.03, (key, results)


def test_heat_map_peaks_inside_the_defect(trained_run: Path, toy_data: Path) -> None:
    detector = Detector.load(trained_run, "cpu")
    image = toy_data / "test" / "hole" / "000.png"
    mask = np.asarray(Image.open(toy_data / "ground_truth" / "hole" / "000_mask.png")) > 0
    prediction = detector.predict(image)[0]
    assert prediction.anomaly_map.shape == mask.shape
    peak = np.unravel_index(prediction.anomaly_map.argmax(), mask.shape)
    grown = torch.nn.functional.max_pool2d(torch.tensor(mask[None, None]).float(), 9, 1, 4)
    assert grown[0, 0][peak] > 0, "the hottest pixel must lie on (or next to) the hole"
    assert prediction.verdict == "fail"
    assert prediction.mask[mask].mean() > 0.3


def test_detector_accepts_paths_pil_arrays_and_tensors(trained_run: Path, toy_data: Path
                                                       ) -> None:
    detector = Detector.load(trained_run, "cpu")
    path = toy_data / "test" / "scratch" / "001.png"
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    by_path, by_pil, by_array, by_tensor = (detector.predict(x)[0]
                                            for x in (path, pil, array, tensor))
    for other in (by_pil, by_array, by_tensor):
        assert other.score == pytest.approx(by_path.score, rel=1e-4)
    batch = detector.predict([path, path], batch_size=2)
    single = detector.predict([path], batch_size=1)
    np.testing.assert_allclose(batch[0].anomaly_map, single[0].anomaly_map, rtol=1e-4,
                               atol=1e-6)


def test_existing_run_is_never_overwritten(trained_run: Path, toy_data: Path) -> None:
    before = (trained_run / "model.pt").read_bytes()
    with pytest.raises(RunExistsError, match="--resume"):
        fit("stpm", toy_data, trained_run, progress=False)
    assert (trained_run / "model.pt").read_bytes() == before


def _tiny_fit(data: Path, run: Path, epochs: int, resume: bool = False,
              selection: str | None = None, **recipe: Any) -> dict:
    return fit(
        "stpm",
        data,
        run,
        TrainingPlan(
            recipe={
                "epochs": epochs,
                "batch_size": 4,
                "image_size": 64,
                "selection": selection,
                **recipe,
            },
            resize_mode="letterbox",
            seed=3,
        ),
        device="cpu",
        resume=resume,
        progress=False,
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=False)["model"]


def test_seeded_training_is_deterministic_and_resume_matches(toy_data: Path,
                                                             tmp_path: Path) -> None:
    _tiny_fit(toy_data, tmp_path / "a", epochs=3)
    _tiny_fit(toy_data, tmp_path / "b", epochs=2)
    resumed = _tiny_fit(toy_data, tmp_path / "b", epochs=3, resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert len(resumed["history"]) == 3
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history_a = json.loads((tmp_path / "a" / "calibration.json").read_text())["threshold"]
    history_b = json.loads((tmp_path / "b" / "calibration.json").read_text())["threshold"]
    assert history_a == pytest.approx(history_b)


def test_a_finished_run_trains_on_with_a_new_lr_schedule(
        toy_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resuming with more epochs and lr milestones must give exactly the run that had
    that schedule from the start; fields a resume cannot change are named, not obeyed."""
    _tiny_fit(toy_data, tmp_path / "planned", epochs=4, lr_milestones=(0.5,), lr_gamma=0.1)
    _tiny_fit(toy_data, tmp_path / "extended", epochs=2)
    with caplog.at_level("WARNING", logger="anomap"):
        extended = _tiny_fit(toy_data, tmp_path / "extended", epochs=4, resume=True,
                             lr_milestones=(0.5,), lr_gamma=0.1, lr=0.01)
    assert [row["lr"] for row in extended["history"]] == pytest.approx([0.4, 0.4, 0.04, 0.04])
    planned, trained_on = _weights(tmp_path / "planned"), _weights(tmp_path / "extended")
    for key in planned:
        assert torch.equal(planned[key], trained_on[key]), key
    assert "--lr is ignored on resume" in caplog.text
    with pytest.raises(ValueError, match="trained 4 epochs already"):
        _tiny_fit(toy_data, tmp_path / "extended", epochs=3, resume=True)
    with pytest.raises(ValueError, match="geometry cannot change on --resume"):
        fit(
            "stpm",
            toy_data,
            tmp_path / "extended",
            TrainingPlan(recipe={"epochs": 5}, margin=4),
            device="cpu",
            resume=True,
            progress=False,
        )
    saved = json.loads((tmp_path / "extended" / "config.json").read_text())["recipe"]
    assert (saved["epochs"], saved["lr_milestones"], saved["lr"]) == (4, [0.5], 0.4)
    assert len(json.loads((tmp_path / "extended" / "config.json").read_text())
               ["resume_commands"]) == 1


def test_large_defects_preset_sets_recipe_map_and_normalization_and_yields_to_options(
        toy_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fit(
        "stpm",
        toy_data,
        tmp_path / "preset",
        TrainingPlan(preset="large-defects", recipe={"epochs": 1, "image_size": 64}),
        device="cpu",
        progress=False,
    )
    config = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert config["preset"] == "large-defects"
    assert (config["model"]["strides"], config["model"]["map_strides"],
            config["model"]["image_score"]) == ([8, 16, 32], [32], "mean")
    assert (config["recipe"]["batch_size"], config["recipe"]["lr_milestones"],
            config["recipe"]["epochs"]) == (8, [0.8, 0.9], 1)
    assert config["map_normalization"] == "position"
    assert (tmp_path / "preset" / "position_stats.pt").is_file()

    fit(
        "stpm",
        toy_data,
        tmp_path / "options",
        TrainingPlan(
            preset="large-defects",
            model={"image_score": "max"},
            map_normalization="none",
            recipe={"epochs": 1, "image_size": 64, "batch_size": 4},
        ),
        device="cpu",
        progress=False,
    )
    config = json.loads((tmp_path / "options" / "config.json").read_text())
    assert (config["model"]["strides"], config["model"]["image_score"],
            config["recipe"]["batch_size"], config["map_normalization"]) == (
        [8, 16, 32], "max", 4, "none")
    with pytest.raises(ValueError, match="large-defects \\(large, low-contrast"):
        fit(
            "stpm",
            toy_data,
            tmp_path / "unknown",
            TrainingPlan(preset="mtd"),
            device="cpu",
            progress=False,
        )
    # an option that clashes with what the preset set says where the clash comes from
    with pytest.raises(ValueError, match="from --preset large-defects, which sets "
                                         "--map-strides 32"):
        fit(
            "stpm",
            toy_data,
            tmp_path / "clash",
            TrainingPlan(
                preset="large-defects", model={"strides": [4, 8, 16]}, recipe={"epochs": 1}
            ),
            device="cpu",
            progress=False,
        )
    # model options and the preset are fixed once the run exists: named, not obeyed
    with caplog.at_level("WARNING", logger="anomap"):
        fit(
            "stpm",
            toy_data,
            tmp_path / "preset",
            TrainingPlan(preset="paper", model={"image_score": "max", "strides": [8, 16, 32]}),
            resume=True,
            device="cpu",
            progress=False,
        )
    assert "--image-score is ignored on resume (the run keeps mean)" in caplog.text
    assert "--strides" not in caplog.text  # the same value as saved: nothing to say
    assert "--preset paper is ignored on resume" in caplog.text
    config = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert (config["model"]["image_score"], config["preset"]) == ("mean", "large-defects")


def test_augmented_training_recomputes_targets_and_resumes_exactly(
        toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Flipped images need their own teacher targets (the per-image cache would be
    wrong), and the orientations drawn must follow the seed so resume stays exact."""
    plain = _tiny_fit(toy_data, tmp_path / "plain", epochs=1)["history"]
    # a run made before --augment existed resumes as unaugmented, without a warning
    config_path = tmp_path / "plain" / "config.json"
    old = json.loads(config_path.read_text())
    del old["recipe"]["augment"]
    config_path.write_text(json.dumps(old))
    with caplog.at_level("WARNING", logger="anomap"):
        _tiny_fit(toy_data, tmp_path / "plain", epochs=2, resume=True, augment="none")
    assert "ignored on resume" not in caplog.text

    def no_cache(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("augmented training must not use cached targets")

    monkeypatch.setattr(train, "cache_frozen_targets", no_cache)
    _tiny_fit(toy_data, tmp_path / "a", epochs=3, augment="dihedral")
    flipped = _tiny_fit(toy_data, tmp_path / "b", epochs=2, augment="dihedral")["history"]
    _tiny_fit(toy_data, tmp_path / "b", epochs=3, resume=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert flipped[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-4)
    with caplog.at_level("WARNING", logger="anomap"):
        _tiny_fit(toy_data, tmp_path / "b", epochs=4, resume=True, augment="flip")
    assert "--augment is ignored on resume (the run keeps dihedral)" in caplog.text
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["recipe"]["augment"] == "dihedral"


def test_retune_reads_the_map_anew_and_recalibrates_on_held_out_normals(
        trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "retuned"
    calibration = retune(trained_run, out, {"map_strides": [8, 16], "score_window": 3},
                         device="cpu", progress=False)
    assert (out / "model.pt").read_bytes() == (trained_run / "model.pt").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["map_strides"] == [8, 16] and config["model"]["score_window"] == 3
    _, held_out = normal_split(RunConfig.from_dict(config))
    detector = Detector.load(out, "cpu")
    scores = [p.score for p in detector.predict([sample.path for sample in held_out])]
    assert calibration["threshold"] == pytest.approx(np.quantile(scores, 0.99), rel=1e-4)
    old = json.loads((trained_run / "calibration.json").read_text())["threshold"]
    assert calibration["threshold"] != pytest.approx(old, rel=0.05)  # the old one no longer fits
    with pytest.raises(ValueError, match="retraining"):
        retune(trained_run, tmp_path / "a", {"strides": [8, 16, 32]}, progress=False)
    with pytest.raises(ValueError, match="map_strides"):
        retune(trained_run, tmp_path / "b", {"map_strides": [32]}, progress=False)
    with pytest.raises(ValueError, match="quantile"):
        retune(trained_run, tmp_path / "c", {}, threshold_quantile=1.5, progress=False)
    with pytest.raises(RunExistsError):
        retune(trained_run, out, {"score_window": 5}, progress=False)
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_teacher_features_are_cached_per_image(toy_data: Path) -> None:
    train_set = load_set(discover(toy_data).train[:6], Geometry(64, "letterbox"), progress=False)
    model = build_model("stpm", weights="random")
    cache = cache_frozen_targets(model, train_set, batch_size=4, device=torch.device("cpu"),
                                 progress=False)
    assert cache is not None and [len(t) for t in cache] == [6, 6, 6]
    with torch.no_grad():
        fresh = model.teacher(model.teacher.normalize(to_float(train_set.images[4:5])))
    for stored, expected in zip(cache, fresh, strict=True):
        torch.testing.assert_close(stored[4:5], expected)
    assert cache_frozen_targets(model, train_set, batch_size=4, device=torch.device("cpu"),
                                budget_bytes=1000, progress=False) is None
    draem = build_model("draem", base_width=8, disc_base_width=8)
    assert cache_frozen_targets(draem, train_set, batch_size=4, device=torch.device("cpu"),
                                progress=False) is None


def test_cached_teacher_trains_like_a_teacher_run_every_step(
        toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch must get its own images' targets: a shuffled cache would
    train on the wrong targets and the losses would part at once."""
    cached = _tiny_fit(toy_data, tmp_path / "cached", epochs=2)["history"]
    monkeypatch.setattr(train, "TARGET_CACHE_BYTES", 0)
    recomputed = _tiny_fit(toy_data, tmp_path / "recomputed", epochs=2)["history"]
    for a, b in zip(cached, recomputed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["val_mean_score"] == pytest.approx(b["val_mean_score"], rel=1e-2)


@pytest.mark.parametrize("selection", ["last", "synthetic"])
def test_selection_rules_pick_the_epoch_they_promise(toy_data: Path, tmp_path: Path,
                                                     selection: str) -> None:
    result = _tiny_fit(toy_data, tmp_path / selection, epochs=3, selection=selection)
    history = result["history"]
    kept = torch.load(tmp_path / selection / "model.pt", weights_only=False)
    if selection == "last":
        assert kept["epoch"] == 3 and all(h["best"] for h in history)
        assert "synthetic_image_auroc" not in history[0]
    else:
        quality = [h["synthetic_image_auroc"] + h["synthetic_pixel_auroc"] for h in history]
        assert all(0.0 <= h["synthetic_image_auroc"] <= 1.0 for h in history)
        assert kept["epoch"] == 1 + int(np.argmax(quality))
        # the pasted anomalies are found far better than chance (0.5): 0.80-0.87 measured
        # over the runs of this test; 0.75 leaves room for seed noise
        assert max(h["synthetic_pixel_auroc"] for h in history) > 0.75
    assert json.loads((tmp_path / selection / "calibration.json").read_text())[
        "best_epoch"] == kept["epoch"]


def test_unknown_selection_rule_is_refused(toy_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        _tiny_fit(toy_data, tmp_path / "x", epochs=1, selection="best")


def test_threshold_is_calibrated_on_exactly_the_held_out_split(trained_run: Path,
                                                              toy_data: Path) -> None:
    config = json.loads((trained_run / "config.json").read_text())
    trained_on, held_out = normal_split(RunConfig.from_dict(config))
    spec = discover(toy_data)
    held = {s.path.resolve() for s in held_out}
    assert len(held) == 8  # 20% of the 40 training images
    assert held.isdisjoint(s.path.resolve() for s in trained_on)
    assert held.isdisjoint(s.path.resolve() for s in spec.test)
    assert held | {s.path.resolve() for s in trained_on} == {s.path.resolve()
                                                              for s in spec.train}
    calibration = json.loads((trained_run / "calibration.json").read_text())
    assert calibration["source"] == "validation" and calibration["n_images"] == len(held)
    detector = Detector.load(trained_run, "cpu")

    def quantile(samples: list[Any]) -> float:
        return float(np.quantile([p.score for p in detector.predict([x.path for x in samples])],
                                 config["threshold_quantile"]))

    assert calibration["threshold"] == pytest.approx(quantile(held_out), rel=1e-4)
    # and not on any other set of normal images of the same size
    test_normals = [x for x in spec.test if x.label == 0][:len(held)]
    for other in (trained_on[:len(held)], trained_on[-len(held):], test_normals):
        assert calibration["threshold"] != pytest.approx(quantile(other), rel=1e-3)


def test_network_maps_are_predicts_maps_before_the_geometry_is_undone(trained_run: Path
                                                                      ) -> None:
    """``network_maps_and_scores`` skips letterbox and crop back, ``predict`` does not:
    on a stretch run their scores agree; with a letterbox and margin, ``predict``'s are
    the network maps cropped back to the photo."""
    detector = Detector.load(trained_run, "cpu")
    batch = torch.randint(0, 256, (3, 3, 128, 128)).float() / 255  # lossless as uint8
    _, raw = detector.network_maps_and_scores(batch)
    assert [p.score for p in detector.predict(batch)] == pytest.approx(raw.tolist(), rel=1e-5)

    model = build_model("stpm", weights="random").eval()
    geometry = Geometry(64, "letterbox", margin=8)
    boxed = Detector(model, MapReader(geometry, model.config,
                                      thresholds=Thresholds(1.0, 1.0, (0.0, 1.0))))
    photo = (np.random.default_rng(0).random((30, 50, 3)) * 255).astype(np.uint8)
    network_input, box = geometry.apply(Image.fromarray(photo))
    tensor = torch.from_numpy(network_input).permute(2, 0, 1)[None].float() / 255
    maps, raw_scores = boxed.network_maps_and_scores(tensor)
    cropped = geometry.restore(maps, [box])
    predicted = boxed.predict(photo)[0].score
    assert predicted == pytest.approx(float(image_score(cropped, model.config)[0]), rel=1e-5)
    assert predicted != pytest.approx(float(raw_scores[0]), rel=1e-3)


def test_retune_without_changes_reproduces_the_training_threshold(trained_run: Path,
                                                                  tmp_path: Path) -> None:
    calibration = retune(trained_run, tmp_path / "same", {}, device="cpu", progress=False)
    saved = json.loads((trained_run / "calibration.json").read_text())
    # training calibrated with the model as trained, retune with its folded copy
    assert calibration["threshold"] == pytest.approx(saved["threshold"], rel=1e-4)
    assert calibration["pixel_threshold"] == pytest.approx(saved["pixel_threshold"], rel=1e-4)
    assert calibration["n_images"] == saved["n_images"]


def test_per_defect_type_auroc_against_hand_values() -> None:
    from anomap.data import Sample
    from anomap.evaluate import per_defect_type_auroc

    samples = [Sample(Path(f"{i}.png"), label, kind) for i, (label, kind) in enumerate(
        [(0, "good"), (0, "good"), (1, "hole"), (1, "hole"), (1, "crack")])]
    scores = np.array([0.2, 0.6, 0.7, 0.1, 0.4])
    # hole [0.7, 0.1] vs good [0.2, 0.6]: pairs won 2 of 4 -> 0.5; crack [0.4]: 1 of 2 -> 0.5
    # with crack's 0.4 raised to 0.9: 2 of 2 -> 1.0; hole unchanged
    assert per_defect_type_auroc(samples, scores) == {"crack": 0.5, "hole": 0.5}
    scores[4] = 0.9
    assert per_defect_type_auroc(samples, scores) == {"crack": 1.0, "hole": 0.5}


def test_defective_images_without_masks_stay_out_of_the_pixel_metrics(
        trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    holes = sorted((toy_data / "test" / "hole").glob("*.png"))
    all_defects, masked_only, masks = (tmp_path / n for n in ("all", "masked", "masks"))
    for folder in (all_defects, masked_only, masks):
        folder.mkdir()
    for i, image in enumerate(holes):
        (all_defects / image.name).write_bytes(image.read_bytes())
        if i < 2:  # masks for two of the five
            (masked_only / image.name).write_bytes(image.read_bytes())
            mask = toy_data / "ground_truth" / "hole" / f"{image.stem}_mask.png"
            (masks / mask.name).write_bytes(mask.read_bytes())
    results = {
        name: evaluate_run(
            trained_run,
            DataSource(
                toy_data / "train" / "good",
                defect_dir=folder,
                mask_dir=masks,
                test_normal_dir=toy_data / "test" / "good",
            ),
            settings=LoadSettings(device="cpu"),
            out_dir=tmp_path / f"out_{name}",
            panels=False,
            progress=False,
        )
        for name, folder in (("all", all_defects), ("masked", masked_only))
    }
    assert results["all"]["n_defective"] == 5 and results["masked"]["n_defective"] == 2
    assert results["all"]["n_pixel_images"] == results["masked"]["n_pixel_images"] == 12
    # pixel metrics: the normals and the two masked images in both cases
    assert results["all"]["pixel_auroc"] == pytest.approx(results["masked"]["pixel_auroc"])
    assert results["all"]["aupro"] == pytest.approx(results["masked"]["aupro"])


def test_training_with_nothing_held_out_calibrates_on_the_training_images(
        toy_data: Path, tmp_path: Path) -> None:
    from anomap.calibrate import NO_SPLIT_SOURCE

    run = tmp_path / "all"
    result = fit(
        "stpm",
        DataSource(str(toy_data), val_fraction=0.0),
        run,
        TrainingPlan(
            recipe={"epochs": 2, "batch_size": 8, "image_size": 64}, resize_mode="stretch"
        ),
        device="cpu",
        progress=False,
    )
    calibration = json.loads((run / "calibration.json").read_text())
    assert calibration["source"] == NO_SPLIT_SOURCE and calibration["n_images"] == 40
    assert result["best_epoch"] == 2  # no held-out score to choose by: the last epoch
    detector = Detector.load(run, "cpu")
    scores = [p.score for p in detector.predict(sorted((toy_data / "train" / "good").glob(
        "*.png")))]
    assert calibration["threshold"] == pytest.approx(np.quantile(scores, 0.99), rel=1e-4)

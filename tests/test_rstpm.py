"""RSTPM: its six maps, gates and fusion rules, and a short training on the toy defects."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_finds_toy_defects, fit_toy

from anomap import Detector
from anomap.calibrate import retune
from anomap.cli import main
from anomap.methods import build_model, build_untrained
from anomap.methods.rstpm import RSTPM, AttentionGate, fuse_maps
from anomap.methods.stpm import normalized_distance
from anomap.runfolder import load_model


def tiny(**config: object) -> RSTPM:
    """Random teachers: the arithmetic does not need ImageNet weights."""
    options = {"weights": None, "second_weights": None, "second_backbone": "efficientnet_lite0",
               "decoder_width": 8, **config}
    return build_model("rstpm", **options)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def rstpm_run(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fit_toy("rstpm", toy_data, tmp_path_factory.mktemp("runs") / "rstpm", epochs=8,
                   image_size=128)


def test_six_maps_at_input_size_and_teacher1_gives_the_decoder_its_stride_32() -> None:
    model = tiny().eval()
    assert model.teacher.out_strides == (4, 8, 16, 32)
    assert model.student.out_strides == (4, 8, 16) and model.teacher2.out_strides == (4, 8, 16)
    maps = model.level_maps(torch.rand(2, 3, 96, 96))
    assert len(maps) == 6 and all(m.shape == (2, 96, 96) for m in maps)
    assert all(bool((m >= 0).all()) and bool((m <= 2).all()) for m in maps)
    # the decoder's outputs match teacher 2's pyramid, level by level
    deep, guides = model.teacher(torch.rand(1, 3, 96, 96))[-1], model.teacher2(
        torch.rand(1, 3, 96, 96))
    rebuilt = model.reconstruction(deep, guides)
    assert [r.shape for r in rebuilt] == [g.shape for g in guides]


def test_default_second_teacher_is_another_pretrained_network() -> None:
    config = RSTPM.default_config()
    assert config["second_backbone"] != config["backbone"]
    assert config["second_weights"] == "imagenet"


def test_attention_gate_weights_lie_strictly_between_0_and_1_and_change_the_output() -> None:
    torch.manual_seed(0)
    gate = AttentionGate(5, 4).eval()
    weights = gate(torch.randn(3, 5, 7, 7) * 10)
    assert weights.shape == (3, 1, 7, 7)
    assert bool((weights > 0).all()) and bool((weights < 1).all())
    assert float(weights.std()) > 0.01  # spatially varying, not a constant
    torch.manual_seed(1)
    gated = tiny(attention=True).eval()
    torch.manual_seed(1)
    plain = tiny(attention=False).eval()
    assert sum(isinstance(m, AttentionGate) for m in plain.modules()) == 0
    assert sum(isinstance(m, AttentionGate) for m in gated.modules()) == 3
    images = torch.rand(2, 3, 64, 64)
    plain.load_state_dict(gated.state_dict(), strict=False)  # everything but the gates
    # a gate is one factor per position; the pair-2 maps still change, since the
    # gated features feed the output heads and the next stage
    assert not torch.allclose(gated.level_maps(images)[3], plain.level_maps(images)[3])


def test_fusion_rules_against_hand_computed_maps() -> None:
    a = [torch.full((1, 2, 2), v) for v in (1.0, 2.0, 3.0)]
    b = [torch.full((1, 2, 2), v) for v in (0.5, 1.0, 2.0)]
    b[0][0, 0, 0] = 4.0
    level_sum = fuse_maps(a, b, "level-sum")
    assert level_sum[0, 0, 0] == pytest.approx((1 + 4) * (2 + 1) * (3 + 2))
    assert level_sum[0, 1, 1] == pytest.approx(1.5 * 3 * 5)
    product = fuse_maps(a, b, "product")
    assert product[0, 0, 0] == pytest.approx(1 * 2 * 3 * 4 * 1 * 2)
    assert product[0, 1, 1] == pytest.approx(6 * 0.5 * 1 * 2)
    pair_sum = fuse_maps(a, b, "pair-sum")
    assert pair_sum[0, 0, 0] == pytest.approx(6 + 8)
    assert pair_sum[0, 1, 1] == pytest.approx(6 + 1)
    assert fuse_maps(a, b, "pair1")[0, 0, 0] == pytest.approx(6)
    assert fuse_maps(a, b, "pair2")[0, 0, 0] == pytest.approx(8)
    with pytest.raises(ValueError, match="fusion"):
        fuse_maps(a, b, "mean")


def test_anomaly_map_fuses_the_chosen_levels_of_both_pairs() -> None:
    torch.manual_seed(0)
    model = tiny(fusion="pair-sum", map_strides=[8, 16]).eval()
    images = torch.rand(2, 3, 64, 64)
    maps = model.level_maps(images)
    expected = maps[1] * maps[2] + maps[4] * maps[5]
    torch.testing.assert_close(model.anomaly_map(images), expected)


def test_pair2_on_synthetic_anomalies_rebuilds_the_clean_features() -> None:
    torch.manual_seed(0)
    model = tiny(pair2_training="synthetic", anomaly_source="procedural").train()
    images = torch.rand(4, 3, 64, 64)
    state = model.state_dict()
    model.config["p_anomaly"] = 0.0  # nothing pasted: the same input as normal training
    torch.manual_seed(1)
    clean = model.training_loss(images)
    model.load_state_dict(state)
    model.config["pair2_training"] = "normal"
    torch.manual_seed(1)
    normal = model.training_loss(images)
    model.load_state_dict(state)
    torch.testing.assert_close(clean["loss"], normal["loss"])
    model.config.update(pair2_training="synthetic", p_anomaly=1.0)
    torch.manual_seed(1)
    pasted = model.training_loss(images)
    # pair 1 never sees the anomalies; pair 2's student does, against the clean targets
    for key in ("pair1_level0", "pair1_level1", "pair1_level2"):
        torch.testing.assert_close(pasted[key], normal[key])
    assert not torch.allclose(pasted["pair2_level0"], normal["pair2_level0"])
    with pytest.raises(ValueError, match="pair2_training"):
        tiny(pair2_training="defects")


def test_training_samples_only_for_synthetic_pair2(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 32, 32)
    with pytest.raises(ValueError, match="synthetic"):
        tiny().write_training_samples(images, tmp_path / "s.png")
    path = tiny(pair2_training="synthetic", anomaly_source="procedural"
                ).write_training_samples(images, tmp_path / "s.png", n=3)
    assert path.is_file()


def test_trained_rstpm_finds_the_toy_defects(rstpm_run: Path) -> None:
    # measured over training seeds 0-2: image 0.87-0.93, pixel 0.971-0.984, AUPRO 0.942-0.963;
    # the bounds leave room for seed noise and stay far above chance (0.5)
    assert_finds_toy_defects(rstpm_run, image=0.8, pixel=0.95, aupro=0.9)
    config = json.loads((rstpm_run / "config.json").read_text())
    assert config["method"] == "rstpm" and config["model"]["fusion"] == "level-sum"
    settings = json.loads((rstpm_run / "metrics.json").read_text())["settings"]
    assert "pair 2 efficientnet_lite1, fusion level-sum" in settings


def test_save_load_gives_identical_maps_without_fetching_any_teacher(
        rstpm_run: Path, toy_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(name: str) -> None:
        raise AssertionError(f"{name}: a saved run must not load ImageNet weights again")

    monkeypatch.setattr("anomap.backbones.imagenet_state_dict", no_download)
    model, config = load_model(rstpm_run, "cpu")
    again = build_untrained("rstpm", **config.model)
    again.load_state_dict(model.state_dict())
    images = torch.rand(2, 3, 128, 128)
    assert torch.equal(model.anomaly_map(images), again.eval().anomaly_map(images))
    detector = Detector.load(rstpm_run, "cpu")
    photo = toy_data / "test" / "hole" / "000.png"
    first, second = detector.predict(photo)[0], Detector.load(rstpm_run, "cpu").predict(photo)[0]
    np.testing.assert_array_equal(first.anomaly_map, second.anomaly_map)


def test_retune_changes_the_fusion_but_not_what_was_learnt(rstpm_run: Path,
                                                           tmp_path: Path) -> None:
    calibration = retune(rstpm_run, tmp_path / "product", {"fusion": "product"}, device="cpu",
                         progress=False)
    old = json.loads((rstpm_run / "calibration.json").read_text())["threshold"]
    assert calibration["threshold"] != pytest.approx(old, rel=0.05)
    config = json.loads((tmp_path / "product" / "config.json").read_text())
    assert config["model"]["fusion"] == "product"
    with pytest.raises(ValueError, match="retraining"):
        retune(rstpm_run, tmp_path / "a", {"attention": False}, progress=False)


def test_cli_passes_rstpm_options_and_refuses_them_for_stpm(toy_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    run = tmp_path / "run"
    code = main(["train", "--model", "rstpm", "--data", str(toy_data), "--out", str(run),
                 "--epochs", "1", "--batch-size", "8", "--image-size", "64",
                 "--second-backbone", "efficientnet_lite2", "--attention", "off",
                 "--pair2-training", "synthetic", "--anomaly-source", "procedural",
                 "--fusion", "pair-sum", "--decoder-width", "16", "--no-progress",
                 "--device", "cpu"])
    assert code == 0
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["second_backbone"], model["attention"], model["pair2_training"],
            model["fusion"], model["decoder_width"]) == ("efficientnet_lite2", False,
                                                         "synthetic", "pair-sum", 16)
    code = main(["train", "--model", "stpm", "--data", str(toy_data), "--out",
                 str(tmp_path / "stpm"), "--fusion", "product", "--no-progress"])
    assert code == 2 and "stpm has no option fusion" in capsys.readouterr().err


def test_pair2_sends_no_gradient_into_pair1s_student() -> None:
    """Pair 1 is trained by STPM's loss alone: pair 2 only reads teacher 1."""
    torch.manual_seed(0)
    for training in ("normal", "synthetic"):
        model = tiny(pair2_training=training, anomaly_source="procedural").train()
        pair1, pair2 = model._pairs(torch.rand(2, 3, 64, 64))
        second = torch.stack([normalized_distance(t, s).mean() for t, s in pair2]).sum()
        student = list(model.student.parameters())
        assert all(g is None for g in torch.autograd.grad(second, student, allow_unused=True,
                                                          retain_graph=True))
        decoder = list(model.reconstruction.parameters())
        assert all(g is not None for g in torch.autograd.grad(second, decoder,
                                                              allow_unused=True))


def test_second_teacher_from_a_weights_file(tmp_path: Path) -> None:
    """ResNets come from a user's file (no offline ImageNet copy): pair 2 takes one."""
    from anomap.backbones import create_classifier

    torch.manual_seed(0)
    path = tmp_path / "resnet18.pth"
    torch.save(create_classifier("resnet18", weights=None).state_dict(), path)
    model = tiny(second_backbone="resnet18", second_weights=str(path)).eval()
    saved = torch.load(path, weights_only=True)
    assert torch.equal(model.teacher2.state_dict()["conv1.weight"], saved["conv1.weight"])
    maps = model.level_maps(torch.rand(1, 3, 64, 64))
    assert len(maps) == 6 and all(m.shape == (1, 64, 64) for m in maps)

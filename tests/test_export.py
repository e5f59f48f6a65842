"""Folding BatchNorm for inference must not change the maps."""

from __future__ import annotations

import pytest
import torch

from anomap import inference
from anomap.inference import InferenceModel
from anomap.methods import build_model
from anomap.scoring import image_score


def test_folded_model_gives_the_same_maps() -> None:
    torch.manual_seed(0)
    model = build_model("stpm", backbone="resnet18", weights="random").eval()
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    fast = InferenceModel(model)
    # per network: stem 1 + layer1 4 + layer2 (4 + downsample 1) + layer3 (4 + 1) = 15
    assert fast.method._fused_pairs == 2 * 15
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected, expected_scores = model(images)
        maps = fast(images)
        scores = image_score(maps, fast.config)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original kept


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Statistics and affine parameters far from the identity, as after training: a
    BatchNorm dropped or folded into the wrong convolution then changes the maps."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.3, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)


@pytest.mark.parametrize("method, config", [
    ("stpm", {"backbone": "efficientnet_lite0", "weights": "random"}),
    ("draem", {"base_width": 8, "disc_base_width": 8}),
    ("rstpm", {"weights": None, "second_weights": None, "decoder_width": 8}),
])
def test_every_pair_folds_into_its_own_convolution(method: str, config: dict) -> None:
    torch.manual_seed(0)
    model = build_model(method, **config).eval()
    _randomise_batchnorm(model)
    fast = InferenceModel(model)
    assert fast.method._fused_pairs > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.anomaly_map(images)
        folded = fast.anomaly_map(images)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-6)
    assert float((expected - expected.mean()).abs().max()) > 1e-3  # maps with contrast


def test_bfloat16_maps_stay_close_to_float32() -> None:
    torch.manual_seed(0)
    model = build_model("stpm", backbone="efficientnet_lite0", weights="random").eval()
    exact, fast = InferenceModel(model, "fp32"), InferenceModel(model, "bf16")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps, scores = exact(images)
        bf16_maps, bf16_scores = fast(images)
    assert bf16_maps.dtype == torch.float32 and fast.precision == "bf16"
    assert not torch.equal(bf16_maps, maps)  # it really computed in bfloat16
    # bfloat16 keeps 8 bits of mantissa: a few percent of the map's range at most
    assert (bf16_maps - maps).abs().max() < 0.05 * maps.max()
    torch.testing.assert_close(bf16_scores, scores, rtol=0.05, atol=0.0)


def test_auto_precision_follows_the_cpu_flags(tmp_path, monkeypatch, caplog) -> None:
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert inference.cpu_has_native_bf16(with_bf16)
    assert not inference.cpu_has_native_bf16(without)
    assert not inference.cpu_has_native_bf16(tmp_path / "missing")  # not Linux: stay exact
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: True)
    assert inference.resolve_precision("auto", cpu) == "bf16"
    assert inference.resolve_precision("auto", cuda) == "fp32"
    assert inference.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    assert inference.resolve_precision("auto", cpu) == "fp32"
    assert not caplog.records
    assert inference.resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated, still right
    assert "does not compute it natively" in caplog.text
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        inference.resolve_precision("fp16", cpu)

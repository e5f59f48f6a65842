"""Everything about a run on disk: its files, its typed config, its split of
normal images, and where it runs. The one module that knows the folder's layout.

A run folder holds everything needed to use a model offline, with no access to
the data or the teacher's original weights:

    config.json       RunConfig: method, model options, recipe, geometry, seed, data, command
    model.pt          the selected weights (teacher included)
    calibration.json  image and pixel thresholds, heat-map display range, from held-out normals
    position_stats.pt per-position normal map statistics (--map-normalization position)
    last.pt           full training state, for --resume
    history.csv       one row per epoch
    selection.json    how --model auto chose this run (only then)

An export folder (``anomap export``) holds the same config and calibration
beside its graph(s) and ``export.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from anomap.data import Geometry, Sample, discover, split_holdout
from anomap.files import save_json
from anomap.methods import DEFAULT_HOLDOUT, AnomalyModel, build_untrained
from anomap.standardize import PositionStats, check_normalization

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
STATE_FILE = "last.pt"
CALIBRATION_FILE = "calibration.json"
HISTORY_FILE = "history.csv"
#: ``--model auto``'s ranking of the candidates, in the run it chose
SELECTION_FILE = "selection.json"
POSITION_STATS_FILE = "position_stats.pt"
#: an int8 export keeps the run's own thresholds and statistics for its fp32 graph
FP32_CALIBRATION_FILE = "calibration.fp32.json"
FP32_POSITION_STATS_FILE = "position_stats.fp32.pt"
EXPORT_FILE = "export.json"
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
#: an int8 export also holds its fp32 graph, for ``--probe fallback``
FP32_ONNX_FILE = "model.fp32.onnx"
FP32_OPENVINO_FILE = "model.fp32.xml"

#: config.json's layout. 1: runs written before the version was recorded (they load:
#: missing fields read as what those runs did); 2: adds ``version``
CONFIG_VERSION = 2


class RunError(RuntimeError):
    """A run folder that is missing or incomplete."""


class RunExistsError(RuntimeError):
    """Refuse to overwrite a run: work is never lost by a repeated command."""


def load_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a folder written by 'anomap train'?") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not valid JSON ({error})") from None


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


def load_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's history.csv, one dict of numbers per epoch (``best`` as a bool)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        raise RunError(f"{path}: missing; training has not finished an epoch")
    with path.open(newline="") as handle:
        try:
            return [{key: (value == "True") if key == "best" else
                     int(value) if key == "epoch" else float(value)
                     for key, value in row.items()} for row in csv.DictReader(handle)]
        except (TypeError, ValueError) as error:
            raise RunError(f"{path}: not a history written by anomap ({error})") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' takes the GPU when there is one; asking for a missing one is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but PyTorch sees no CUDA GPU here; "
                           "use --device cpu or auto")
    return device


@dataclass(frozen=True)
class DataSource:
    """Where a run's images come from, and how many normals it holds out."""

    root: str
    val_fraction: float | None = None  # None: the preset's (DEFAULT_HOLDOUT unless it says)
    defect_dir: str | None = None
    mask_dir: str | None = None
    test_normal_dir: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """config.json, typed: loaded once, read by attribute everywhere.

    ``model`` holds the method's own options (the method validates them);
    ``recipe`` the training recipe as written; ``extra`` any key this version
    does not know, kept so that a round trip loses nothing."""

    method: str
    model: dict[str, Any]
    geometry: Geometry
    data: DataSource
    recipe: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    threshold_quantile: float = 0.99
    map_normalization: str = "none"
    preset: str | None = None
    decisions: dict[str, str] = field(default_factory=dict)
    anomap_version: str | None = None
    command: str = ""
    resume_commands: tuple[str, ...] = ()
    retuned_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | Path = "config") -> RunConfig:
        """A config as written by any anomap version (older runs lack fields: they read
        as what those runs did); a malformed one is a :class:`RunError` naming ``source``."""
        try:
            geometry = raw["geometry"]
            data = raw.get("data") or {}
            known = {f.name for f in fields(cls)} - {"extra"}
            return cls(
                method=str(raw["method"]), model=dict(raw["model"]),
                geometry=Geometry(size=int(geometry["size"]), mode=geometry["mode"],
                                  margin=int(geometry.get("margin", 0))),
                data=DataSource(**{f.name: data[f.name] for f in fields(DataSource)
                                   if f.name in data}) if data else DataSource(root=""),
                recipe=dict(raw.get("recipe") or {}), seed=int(raw.get("seed", 0)),
                threshold_quantile=float(raw.get("threshold_quantile", 0.99)),
                map_normalization=check_normalization(raw.get("map_normalization") or "none"),
                preset=raw.get("preset"), decisions=dict(raw.get("decisions") or {}),
                anomap_version=raw.get("anomap_version"), command=raw.get("command", ""),
                resume_commands=tuple(raw.get("resume_commands") or ()),
                retuned_from=raw.get("retuned_from"),
                extra={k: v for k, v in raw.items() if k not in known},
                version=int(raw.get("version", 1)))
        except (KeyError, TypeError, ValueError) as error:
            raise RunError(f"{source}: not a run config anomap can read ({error!r})") from None

    def to_dict(self) -> dict[str, Any]:
        """What config.json holds (written at the current version)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        values.update(geometry=asdict(self.geometry), data=asdict(self.data),
                      resume_commands=list(self.resume_commands), version=CONFIG_VERSION)
        if not self.resume_commands:
            del values["resume_commands"]
        for optional in ("retuned_from", "preset", "anomap_version"):
            if values[optional] is None:
                del values[optional]
        if not self.decisions:
            del values["decisions"]
        return {**self.extra, **values}

    def updated(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    @classmethod
    def load(cls, folder: str | Path) -> RunConfig:
        path = Path(folder) / CONFIG_FILE
        return cls.from_dict(load_json(path), path)

    def save(self, folder: str | Path) -> Path:
        return save_json(self.to_dict(), Path(folder) / CONFIG_FILE)


def normal_split(config: RunConfig) -> tuple[list[Sample], list[Sample]]:
    """A run's (training, held-out) normal images, as its config and seed define them."""
    spec = discover(config.data.root)
    for warning in spec.warnings:
        log.warning(warning)
    fraction = config.data.val_fraction
    return split_holdout(spec.train, DEFAULT_HOLDOUT if fraction is None else fraction,
                         config.seed)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               weights_file: str = WEIGHTS_FILE, config: RunConfig | None = None
               ) -> tuple[AnomalyModel, RunConfig]:
    """Rebuild the model from config.json (or the ``config`` given) and load the
    run's weights (no download: the teacher's weights are inside the checkpoint)."""
    run_dir = Path(run_dir)
    config = config or RunConfig.load(run_dir)
    model = build_untrained(config.method, **config.model)
    path = run_dir / weights_file
    if not path.is_file():
        raise RunError(f"{path}: no weights yet; training has not finished an epoch")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state))
    return model.to(resolve_device(device)).eval(), config


def load_position_stats(run_dir: str | Path, config: RunConfig,
                        name: str = POSITION_STATS_FILE) -> PositionStats | None:
    """The run's normal map statistics when its config asks for them, else None."""
    if config.map_normalization == "none":
        return None
    path = Path(run_dir) / name
    if not path.is_file():
        raise RunError(f"{path}: missing, but the run uses --map-normalization "
                       f"{config.map_normalization}; recalibrate it with 'anomap retune "
                       f"--run {run_dir} --out NEW --map-normalization "
                       f"{config.map_normalization}'")
    return PositionStats.load(path)


def run_version(folder: str | Path) -> str:
    """A short, stable name for exactly this model: the SHA-256 of every file of the
    run or export folder that decides its answers (configs, weights, calibration,
    statistics, graphs), so a record can say which version judged each photo."""
    folder = Path(folder)
    digest = hashlib.sha256()
    decisive = (".json", ".pt", ".onnx", ".xml", ".bin", ".data")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in decisive
                       and p.name not in ("history.json", "metrics.json", "last.pt")
                       and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def load_calibration(folder: str | Path, fp32_graph: bool = False) -> dict[str, Any]:
    """calibration.json (``fp32_graph``: an int8 export's copy for its fp32 graph)."""
    return load_json(Path(folder) / (FP32_CALIBRATION_FILE if fp32_graph else CALIBRATION_FILE))

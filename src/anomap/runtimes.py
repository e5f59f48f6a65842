"""Running an export (``anomap export``'s folder) in ONNX Runtime or OpenVINO.

A runtime gives only the network: a float batch (B, 3, S, S) of RGB in [0, 1]
-> the raw map (B, S, S). Everything after it (crop back, position statistics,
score, verdict) is :mod:`anomap.scoring`'s, the same lines a checkpoint goes
through, so runtimes can only differ in the network itself.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomap.runfolder import (
    EXPORT_FILE,
    FP32_ONNX_FILE,
    FP32_OPENVINO_FILE,
    ONNX_FILE,
    OPENVINO_FILE,
)

RUNTIMES = ("torch", "onnxruntime", "openvino")
INPUT_NAME, OUTPUT_NAME = "images", "map"
#: what a runtime needs installed, and the extra that installs it
EXTRAS = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "openvino"),
          "onnx": ("onnx", "onnx"), "onnxscript": ("onnxscript", "onnx"),
          "fastapi": ("fastapi", "serve"), "uvicorn": ("uvicorn", "serve"),
          "python_multipart": ("python-multipart", "serve"),
          "prometheus_client": ("prometheus-client", "serve"),
          "ray": ("ray[data]", "ray"), "pyarrow": ("pyarrow", "ray")}


class ExportError(RuntimeError):
    """An export that failed its check, or a runtime that is not installed."""


def require(module: str) -> Any:
    """Import an optional dependency (a runtime, the service's stack), or say which
    extra installs it."""
    package, extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install \"anomap[{extra}]\" "
                          f"(or pip install {package})") from None


@dataclass
class _Network:
    """What :class:`anomap.run.Detector` needs of a network: raw maps."""

    config: dict[str, Any]
    precision: str = "fp32"
    device: torch.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(images)

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class OnnxRuntimeNetwork(_Network):
    runtime = "onnxruntime"

    def __init__(self, path: Path, config: dict[str, Any], precision: str = "fp32",
                 threads: int | None = None) -> None:
        super().__init__(config, precision)
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


class OpenVinoNetwork(_Network):
    runtime = "openvino"

    def __init__(self, path: Path, config: dict[str, Any], precision: str = "fp32",
                 threads: int | None = None) -> None:
        super().__init__(config, precision)
        ov = require("openvino")
        # pinned: on a CPU with bfloat16 OpenVINO would otherwise choose it by itself
        settings = {"INFERENCE_PRECISION_HINT": "f32",
                    "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        self.compiled = ov.Core().compile_model(str(path), "CPU", settings)

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(np.array(self.compiled(array)[0]))


def network_file(folder: Path, runtime: str, fp32_graph: bool = False) -> Path:
    """The graph a runtime reads from an export folder (``fp32_graph``: an int8
    export's fp32 one)."""
    onnx_file, openvino_file = ((FP32_ONNX_FILE, FP32_OPENVINO_FILE) if fp32_graph
                                else (ONNX_FILE, OPENVINO_FILE))
    if runtime == "openvino" and (folder / openvino_file).is_file():
        return folder / openvino_file
    if (folder / onnx_file).is_file():
        return folder / onnx_file
    export = json.loads((folder / EXPORT_FILE).read_text())
    what = "an fp32 graph" if fp32_graph else f"a graph {runtime} reads"
    raise ExportError(f"{folder}: this {export['format']}{' int8' if export.get('int8') else ''}"
                      f" export holds no {what}")


def _installed(module: str) -> bool:
    try:
        require(module)
    except ExportError:
        return False
    return True


def readable_runtimes(folder: Path) -> list[str]:
    """The installed runtimes that read this export: OpenVINO reads its IR and ONNX,
    ONNX Runtime only ONNX."""
    names = [name for name, readable in (
        ("openvino", (folder / OPENVINO_FILE).is_file() or (folder / ONNX_FILE).is_file()),
        ("onnxruntime", (folder / ONNX_FILE).is_file())) if readable and _installed(name)]
    if not names:
        export = json.loads((folder / EXPORT_FILE).read_text())
        extra = "openvino" if export["format"] == "openvino" else "onnx"
        raise ExportError(f"{folder}: no installed runtime reads this {export['format']} "
                          f"export: pip install \"anomap[{extra}]\"")
    return names


def default_runtime(folder: Path) -> str:
    """The runtime an export's format is for (what ``auto`` took before probes)."""
    export = json.loads((folder / EXPORT_FILE).read_text())
    return "openvino" if export["format"] == "openvino" else "onnxruntime"


def load_network(folder: Path, runtime: str, config: dict[str, Any],
                 threads: int | None = None, fp32_graph: bool = False) -> _Network:
    export = json.loads((folder / EXPORT_FILE).read_text())
    precision = "int8" if export.get("int8") and not fp32_graph else "fp32"
    if runtime == "auto":
        runtime = default_runtime(folder)
    path = network_file(folder, runtime, fp32_graph)
    if runtime == "onnxruntime":
        return OnnxRuntimeNetwork(path, config, precision, threads)
    if runtime == "openvino":
        return OpenVinoNetwork(path, config, precision, threads)
    raise ExportError(f"{folder} is an export: read it with runtime onnxruntime or openvino "
                      f"(torch needs the run folder it came from)")

"""Exporting a trained run to fast inference runtimes, and running it there.

``anomap export`` writes a self-contained folder: the network as ONNX (or
OpenVINO IR), its input a float batch (B, 3, S, S) of RGB in [0, 1] at the
run's network size with the method's own normalisation inside, its output the
raw map (B, S, S) in the network's frame; next to it the run's config.json,
calibration.json and position statistics, and export.json with the input
contract and the export's measured agreement. Thresholds stay outside the
graph, so a user (or ``anomap retune`` before exporting) can change them.

Every runtime is driven through the same :class:`anomap.run.Detector`: decode,
letterbox, crop back, position normalisation, score and verdict are one code
path, and runtimes can only differ in the network itself. An export is
checked, not trusted: the held-out normal images go through both the torch
model and the exported one, and an fp32 export whose maps differ by more than
:data:`FP32_TOLERANCE` (relative to the map's range) is refused, nothing written.

``--int8`` quantises statically with ONNX Runtime's quantiser (QDQ format),
calibrated on the run's held-out normal images, never on test images; both
ONNX Runtime and OpenVINO run the quantised graph in int8.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anomap import __version__
from anomap.data import LoadedSet, load_set, to_float
from anomap.export import InferenceModel
from anomap.files import save_json
from anomap.methods.base import score_maps

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
FORMATS = ("onnx", "openvino")
EXPORT_FILE = "export.json"
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"
#: largest fp32 map difference accepted, relative to the largest map value on the
#: held-out normals (float rounding differs between runtimes, nothing more)
FP32_TOLERANCE = 1e-4
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
    import importlib

    package, extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{module} is not installed: pip install \"anomap[{extra}]\" "
                          f"(or pip install {package})") from None


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_FILE).is_file()


class _MapOnly(nn.Module):
    """The graph that is exported: images in [0, 1] -> raw maps; no score, no threshold."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.anomaly_map(images)


def export_onnx(model: nn.Module, path: Path, image_size: int) -> Path:
    """The folded fp32 network as ONNX with a dynamic batch. The dynamo exporter:
    EfficientNet-Lite's TF-style SAME padding pads weights at run time, which the
    TorchScript exporter rejects; torch.export folds it to constants."""
    require("onnx")
    require("onnxscript")
    graph = _MapOnly(InferenceModel(model).method.to(memory_format=torch.contiguous_format))
    example = torch.rand(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes on torchvision ops we do not use
    try:  # the exporter prints its progress; anomap says what matters itself
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(graph.eval(), (example,), dynamo=True,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"images": {0: batch}}, verbose=False)
    finally:
        quiet.setLevel(level)
    program.save(str(path))
    fold_weight_pads(path)
    return path


def fold_weight_pads(path: Path) -> int:
    """Replace each Pad of a constant (EfficientNet-Lite's padded depthwise weights,
    where the exporter left one unfolded) by the padded constant itself. ONNX Runtime's
    graph optimiser breaks on a Pad feeding a Conv's weight, and the model is leaner
    without it. Returns how many were folded."""
    onnx = require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    folded = []
    for node in graph.node:
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
        if (node.op_type != "Pad" or mode != b"constant" or len(node.input) > 3
                or not all(name in constants for name in node.input if name)):
            continue
        data = numpy_helper.to_array(constants[node.input[0]])
        pads = numpy_helper.to_array(constants[node.input[1]]).astype(int)
        value = (numpy_helper.to_array(constants[node.input[2]]).item()
                 if len(node.input) > 2 and node.input[2] else 0)
        width = list(zip(pads[: data.ndim], pads[data.ndim:], strict=True))
        padded = np.pad(data, width, mode="constant", constant_values=value)
        graph.initializer.append(numpy_helper.from_array(padded, node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    used |= {output.name for output in graph.output}
    for init in [init for init in graph.initializer if init.name not in used]:
        graph.initializer.remove(init)
    if folded:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return len(folded)


class _CalibrationReader:
    """ONNX Runtime's calibration interface over held-out normal images."""

    def __init__(self, images: torch.Tensor, batch_size: int = 8) -> None:
        self.batches = iter([to_float(images[i:i + batch_size]).numpy()
                             for i in range(0, len(images), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


#: the operators int8 computes: the networks' convolutions and activations. The
#: distances between teacher and student features (and the fusion after them) stay
#: float: they compare two nearly equal vectors, and rounding both to 8 bits drowns
#: the difference that is the anomaly (docs/deployment.md has the variants tried)
INT8_OPS = ("Conv", "Clip", "Relu")


def quantize_int8(fp32: Path, int8: Path, calibration: torch.Tensor) -> Path:
    """Static int8 (QDQ, per-channel weights) calibrated on ``calibration`` images."""
    require("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, int8 = fp32.resolve(), int8.resolve()
    prepared = int8.with_name("prepared.onnx")
    # ORT writes debugging dumps (the failed shape inference's model and its weights,
    # tens of MB) into the working directory: give it a scratch one, never the user's
    with tempfile.TemporaryDirectory(prefix="anomap-int8.") as scratch, \
            contextlib.chdir(scratch):
        try:
            quant_pre_process(str(fp32), str(prepared))
        except Exception:  # noqa: BLE001 - ORT's symbolic shapes miss some ops (FractalAD's
            # grid_sample, DRAEM's padding) and raise anything from a bare Exception on
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(int8), _CalibrationReader(calibration, batch_size=1),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        op_types_to_quantize=list(INT8_OPS),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    prepared.unlink()
    return int8


def to_openvino(onnx_path: Path, xml: Path) -> Path:
    ov = require("openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


@dataclass
class _Network:
    """What :class:`anomap.run.Detector` needs of a network: maps and scores."""

    config: dict[str, Any]
    precision: str = "fp32"
    device: torch.device = torch.device("cpu")

    def image_score(self, maps: torch.Tensor) -> torch.Tensor:
        return score_maps(maps, self.config)

    def eval(self) -> _Network:  # the torch model's interface, for anomap.evaluate.infer
        return self


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


def network_file(folder: Path, runtime: str) -> Path:
    """The graph a runtime reads from an export folder."""
    export = json.loads((folder / EXPORT_FILE).read_text())
    if runtime == "openvino" and (folder / OPENVINO_FILE).is_file():
        return folder / OPENVINO_FILE
    if (folder / ONNX_FILE).is_file():
        return folder / ONNX_FILE
    raise ExportError(f"{folder}: a {export['format']} export holds no graph {runtime} reads")


def load_network(folder: Path, runtime: str, config: dict[str, Any],
                 threads: int | None = None) -> _Network:
    export = json.loads((folder / EXPORT_FILE).read_text())
    precision = "int8" if export.get("int8") else "fp32"
    if runtime == "auto":
        runtime = "openvino" if export["format"] == "openvino" else "onnxruntime"
    if runtime == "onnxruntime":
        return OnnxRuntimeNetwork(network_file(folder, runtime), config, precision, threads)
    if runtime == "openvino":
        return OpenVinoNetwork(network_file(folder, runtime), config, precision, threads)
    raise ExportError(f"{folder} is an export: read it with runtime onnxruntime or openvino "
                      f"(torch needs the run folder it came from)")


def _agreement(reference: Any, exported: Any, images: LoadedSet,
               batch_size: int = 8) -> dict[str, Any]:
    """Maps, scores and verdicts of two Detectors on the same prepared images."""
    from anomap.run import PreparedImage

    prepared = [PreparedImage(array, box, (images.images.shape[-2], images.images.shape[-1]))
                for array, box in zip(images.images.permute(0, 2, 3, 1).numpy(),
                                      images.boxes, strict=True)]
    largest = biggest_map = 0.0
    verdicts_differ, score_diff = 0, 0.0
    for start in range(0, len(prepared), batch_size):
        chunk = prepared[start:start + batch_size]
        ours, theirs = reference.predict_prepared(chunk), exported.predict_prepared(chunk)
        for a, b in zip(ours, theirs, strict=True):
            largest = max(largest, float(np.abs(a.anomaly_map - b.anomaly_map).max()))
            biggest_map = max(biggest_map, float(np.abs(a.anomaly_map).max()))
            score_diff = max(score_diff, abs(a.score - b.score))
            verdicts_differ += a.verdict != b.verdict
    return {"n_images": len(prepared), "max_map_difference": largest,
            "max_relative_map_difference": largest / max(biggest_map, 1e-12),
            "max_score_difference": score_diff, "verdicts_differ": verdicts_differ}


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "onnx",
               int8: bool = False, progress: bool = True) -> dict[str, Any]:
    """``anomap export``: write ``out_dir`` (all or nothing) and return export.json."""
    from anomap.calibrate import normal_split
    from anomap.run import (
        CALIBRATION_FILE,
        CONFIG_FILE,
        POSITION_STATS_FILE,
        Detector,
        RunExistsError,
        geometry_from_config,
        load_model,
    )

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise RunExistsError(f"{out_dir} already exists; choose another --out folder")
    if is_export(run_dir):
        raise ExportError(f"{run_dir} is an export already; export the run it came from")
    model, config = load_model(run_dir, "cpu")
    geometry = geometry_from_config(config)
    train_samples, val_samples = normal_split(config)
    held_out = load_set(val_samples or train_samples, geometry,
                        desc="reading held-out normals", progress=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in (CONFIG_FILE, CALIBRATION_FILE, POSITION_STATS_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, partial / name)
        onnx_path = export_onnx(model, partial / ONNX_FILE, geometry.size)
        if int8:
            fp32_path = onnx_path.rename(partial / "model.fp32.onnx")
            quantize_int8(fp32_path, onnx_path, held_out.images)
            fp32_path.unlink()
        if fmt == "openvino":
            to_openvino(onnx_path, partial / OPENVINO_FILE)
            onnx_path.unlink()
        record: dict[str, Any] = {
            "anomap_version": __version__, "format": fmt, "int8": int8,
            "method": config["method"], "source_run": str(run_dir.resolve()),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, geometry.size, geometry.size],
                      "dtype": "float32", "layout": "NCHW", "channels": "RGB",
                      "range": [0.0, 1.0],
                      "normalization": "inside the graph: feed pixels / 255, nothing else",
                      "geometry": config["geometry"]},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", geometry.size, geometry.size],
                       "meaning": "raw anomaly map in the network's frame; anomap crops it "
                                  "back to the photo, normalises per position when the "
                                  "run does, and scores it (config.json 'model')"},
            "thresholds": "calibration.json (threshold, pixel_threshold): edit freely",
            "calibration_images": "held-out normal images of the run" if int8 else None,
        }
        save_json(record, partial / EXPORT_FILE)
        reference = Detector.load(run_dir, "cpu")
        exported = Detector.load(partial, runtime="auto")
        record["agreement"] = _agreement(reference, exported, held_out)
        if not int8 and record["agreement"]["max_relative_map_difference"] > FP32_TOLERANCE:
            raise ExportError(
                f"the exported {fmt} network disagrees with the run: maps differ by up to "
                f"{record['agreement']['max_relative_map_difference']:.2e} of their range "
                f"(tolerance {FP32_TOLERANCE:g}) on {len(held_out)} held-out normals; "
                "nothing written. Please report this with the run's config.json")
        save_json(record, partial / EXPORT_FILE)
        os.chmod(partial, 0o755)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record

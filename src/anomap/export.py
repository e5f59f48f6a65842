"""Exporting a trained run to fast inference runtimes (:mod:`anomap.runtimes` runs them).

``anomap export`` writes a self-contained folder: the network as ONNX (or
OpenVINO IR), its input a float batch (B, 3, S, S) of RGB in [0, 1] at the
run's network size with the method's own normalisation inside, its output the
raw map (B, S, S) in the network's frame; next to it the run's config.json,
calibration.json and position statistics, and export.json with the input
contract and the export's measured agreement. Thresholds stay outside the
graph, so a user (or ``anomap retune`` before exporting) can change them.

Every runtime is driven through the same :class:`anomap.run.Detector` and
:mod:`anomap.scoring`, so runtimes can only differ in the network itself. An
export is checked, not trusted (:mod:`anomap.trust`): the held-out normals and
synthetic anomalies pasted into them go through both the run and the export,
and an export that does not keep the run's decisions is refused, nothing written.

``--int8`` quantises statically with ONNX Runtime's quantiser (QDQ format),
calibrated on training images (never the held-out or test ones); both ONNX
Runtime and OpenVINO run the quantised graph in int8.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anomap.calibrate import Calibration
from anomap.data import LoadedSet, load_set, to_float
from anomap.files import save_json
from anomap.inference import InferenceModel
from anomap.machine import describe_machine
from anomap.run import Detector
from anomap.runfolder import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    EXPORT_FILE,
    FP32_CALIBRATION_FILE,
    FP32_ONNX_FILE,
    FP32_OPENVINO_FILE,
    FP32_POSITION_STATS_FILE,
    ONNX_FILE,
    OPENVINO_FILE,
    POSITION_STATS_FILE,
    RunConfig,
    RunExistsError,
    is_export,
    load_calibration,
    load_model,
    normal_split,
)
from anomap.runtimes import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    default_runtime,
    readable_runtimes,
    require,
)
from anomap.synth.check import line_check_set, synthetic_check_set
from anomap.trust import (
    FP32_EXPORT,
    FP32_PROBE,
    INT8_EXPORT,
    INT8_PROBE,
    PROBE_FILE,
    CheckSet,
    DisagreementError,
    Probe,
    compare,
    save_probe,
)
from anomap.version import __version__

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
#: training images whose activations set int8's ranges. Not the held-out normals: those
#: check the result, and a check on the images it was fitted to flattered int8 (the
#: demo's STPM lost 0.03 test pixel AUROC that such a check did not see)
QUANTISATION_IMAGES = 64
#: probe images of each kind (held-out normals, each kind of synthetic anomaly) in an export
PROBE_PER_KIND = 6


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
    for module in graph.modules():  # torch.export decomposes each in-place activation at
        if getattr(module, "inplace", False):  # a cost of seconds; the graph is the same
            module.inplace = False
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


def quantize_int8(fp32: Path, int8: Path, calibration: torch.Tensor,
                  reduce_range: bool = False) -> Path:
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
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range)
    prepared.unlink()
    return int8


def to_openvino(onnx_path: Path, xml: Path) -> Path:
    ov = require("openvino")
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str = "onnx",
               int8: bool = False, progress: bool = True) -> dict[str, Any]:
    """``anomap export``: write ``out_dir`` (all or nothing) and return export.json.

    The export must keep the run's decisions (:mod:`anomap.trust`) on the held-out
    normals and synthetic anomalies pasted into them, through at least one installed
    runtime, or nothing is written. int8 thresholds are recalibrated on the int8
    network's own held-out maps; a few check images ship inside as the probe."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise RunExistsError(f"{out_dir} already exists; choose another --out folder")
    if is_export(run_dir):
        raise ExportError(f"{run_dir} is an export already; export the run it came from")
    for module in ("onnx", "onnxscript", *(("openvino",) if fmt == "openvino" else ())):
        require(module)  # before minutes of work, not after
    reference = Detector.load(run_dir, "cpu")
    config = reference.config
    geometry = config.geometry
    train_samples, val_samples = normal_split(config)
    held_out = load_set(val_samples or train_samples, geometry,
                        desc="reading held-out normals", progress=progress)
    check = CheckSet.from_sets(
        held_out, texture=synthetic_check_set(held_out, geometry, config.seed),
        line=line_check_set(held_out, geometry, config.seed))
    expected = reference.read(check)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        quantise_on = (load_set(_sample(train_samples, config.seed), geometry,
                                desc="reading training images", progress=progress).images
                       if int8 else None)
        _write_graphs(run_dir, partial, fmt, quantise_on)
        record: dict[str, Any] = {
            "anomap_version": __version__, "format": fmt, "int8": int8,
            "method": config.method, "source_run": str(run_dir.resolve()),
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, geometry.size, geometry.size],
                      "dtype": "float32", "layout": "NCHW", "channels": "RGB",
                      "range": [0.0, 1.0],
                      "normalization": "inside the graph: feed pixels / 255, nothing else",
                      "geometry": asdict(geometry)},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", geometry.size, geometry.size],
                       "meaning": "raw anomaly map in the network's frame; anomap crops it "
                                  "back to the photo, normalises per position when the "
                                  "run does, and scores it (config.json 'model')"},
            "thresholds": "calibration.json (threshold, pixel_threshold): edit freely",
            "quantisation_images": (f"up to {QUANTISATION_IMAGES} of the run's training images "
                                    "(the held-out normals stay unseen, to check it)"
                                    if int8 else None),
            "built_on": describe_machine(),
        }
        save_json(record, partial / EXPORT_FILE)
        if int8:
            record["recalibrated"] = _recalibrate_int8(partial, config, held_out)
        tolerance = INT8_EXPORT if int8 else FP32_EXPORT
        record["tolerance"] = asdict(tolerance)
        record["check_set"] = {"n_normal": len(held_out), "n_anomalous": len(check) - len(held_out),
                               "what": "the run's held-out normals, and the same images with "
                                       "a texture pasted through a Perlin mask (texture) or "
                                       "thin lines drawn (line) into each"}
        readings = {name: Detector.load(partial, runtime=name, probe="off").read(check)
                    for name in readable_runtimes(partial)}
        by_runtime = {name: compare(expected, got, check, tolerance)
                      for name, got in readings.items()}
        record["agreement_by_runtime"] = by_runtime
        own = default_runtime(partial) if default_runtime(partial) in readings else \
            next(iter(readings))
        record["agreement"] = by_runtime[own]
        if not any(result["passed"] for result in by_runtime.values()):
            raise DisagreementError(_refusal(fmt, int8, len(held_out), len(check), by_runtime))
        picked = check.probe_indices(PROBE_PER_KIND)
        save_probe(Probe(check.subset(picked), expected.subset(picked),
                         readings[own].subset(picked) if int8 else None), partial / PROBE_FILE)
        record["probe"] = {"file": PROBE_FILE, "n_images": len(picked),
                           "int8_readings_from": own if int8 else None,
                           "tolerance": asdict(INT8_PROBE if int8 else FP32_PROBE)}
        save_json(record, partial / EXPORT_FILE)
        os.chmod(partial, 0o755)
        partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record


def _sample(samples: list[Any], seed: int, n: int = QUANTISATION_IMAGES) -> list[Any]:
    return random.Random(seed).sample(samples, min(n, len(samples)))


def _write_graphs(run_dir: Path, partial: Path, fmt: str,
                  quantise_on: torch.Tensor | None) -> None:
    """The run's files and the graph(s): the fp32 one, or (``quantise_on``: images whose
    activations set int8's ranges) int8 beside its fp32 one."""
    model, config = load_model(run_dir, "cpu")
    for name in (CONFIG_FILE, CALIBRATION_FILE, POSITION_STATS_FILE):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, partial / name)
    onnx_path = export_onnx(model, partial / ONNX_FILE, config.geometry.size)
    graphs = [(onnx_path, partial / OPENVINO_FILE)]
    if quantise_on is not None:
        fp32_path = onnx_path.rename(partial / FP32_ONNX_FILE)
        quantize_int8(fp32_path, onnx_path, quantise_on)
        graphs.append((fp32_path, partial / FP32_OPENVINO_FILE))
        for name, fp32_name in ((CALIBRATION_FILE, FP32_CALIBRATION_FILE),
                                (POSITION_STATS_FILE, FP32_POSITION_STATS_FILE)):
            if (partial / name).is_file():
                shutil.copy2(partial / name, partial / fp32_name)
    if fmt == "openvino":
        for source, xml in graphs:
            to_openvino(source, xml)
            source.unlink()


def _recalibrate_int8(folder: Path, config: RunConfig, held_out: LoadedSet
                      ) -> dict[str, Any]:
    """The int8 network's own thresholds (and position statistics), from its maps of
    the held-out normals, as training calibrated the run's from fp32 maps."""
    detector = Detector.load(folder, runtime=default_runtime(folder), probe="off")
    before = load_calibration(folder)
    reading = detector.reader.before_statistics().read_set(detector.model, held_out,
                                                         batch_size=8, progress=False)
    Calibration(folder, float(before["quantile"]), held_out.skipped,
                config.map_normalization, config.model).write(
        reading.maps, reading.scores, int(before.get("best_epoch", 0)),
        source=f"held-out normals through the int8 network ({detector.runtime})")
    after = load_calibration(folder)
    return {key: [before[key], after[key]] for key in ("threshold", "pixel_threshold")
            if key in before}


def _refusal(fmt: str, int8: bool, n_normal: int, n_check: int,
             by_runtime: dict[str, dict[str, Any]]) -> str:
    kind = f"{fmt}{' int8' if int8 else ''}"
    found = "; ".join(f"{name}: {', '.join(result['problems'])}"
                      for name, result in by_runtime.items())
    advice = ("Try an fp32 export (drop --int8): it is checked to match the run and runs on "
              "any CPU; int8 keeps decisions best on CPUs with VNNI (docs/deployment.md)"
              if int8 else "Please report this with the run's config.json")
    return (f"the {kind} export does not keep the run's decisions on its {n_normal} held-out "
            f"normals and {n_check - n_normal} synthetic anomalies ({found}); nothing written. "
            f"{advice}")

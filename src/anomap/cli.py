"""Command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomap.version import __version__

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, ValueError, RuntimeError, PermissionError)


class HelpFormatter(argparse.HelpFormatter):
    """One line per flag where the text allows, the same on every terminal (so the
    generated docs/cli.md does not depend on who ran it)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _add_data_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--data", required=required, type=Path, metavar="DIR",
                        help="an MVTec AD category, or a folder of defect-free images")
    parser.add_argument("--defect-dir", type=Path, metavar="DIR",
                        help="plain folders: defective test images")
    parser.add_argument("--mask-dir", type=Path, metavar="DIR",
                        help="plain folders: masks named <stem>.png or <stem>_mask.png")
    parser.add_argument("--test-normal-dir", type=Path, metavar="DIR",
                        help="plain folders: defect-free test images")


def _add_precision_arg(parser: argparse.ArgumentParser) -> None:
    from anomap.inference import PRECISIONS

    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32 (default); bf16: ~2x faster where native, noisier maps")


def _declared_options() -> dict[str, tuple[Any, dict[str, Any]]]:
    """Every option a method declares (its constructor's annotated signature), once:
    ``{name: (spec, {method: default})}``; the first method to declare it gives the help."""
    from anomap.methods import METHODS

    found: dict[str, tuple[Any, dict[str, Any]]] = {}
    for method, cls in METHODS.items():
        for name, spec in cls.options().items():
            found.setdefault(name, (spec, {}))[1][method] = spec.default
    return found


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _add_method_args(parser: Any, inference: bool) -> None:
    """The methods' own options as flags: those that change how a trained map is read
    (``inference``; ``retune`` may change them) or those that change what is learnt."""
    from anomap.methods import METHODS

    for name, (spec, defaults) in _declared_options().items():
        if spec.opt.inference != inference:
            continue
        owners = "" if len(defaults) == len(METHODS) else f"{', '.join(defaults)}: "
        shown = {method: _show(value) for method, value in defaults.items() if value is not None}
        if len(set(shown.values())) == 1 and len(shown) == len(defaults):
            default = f" (default {next(iter(shown.values()))})"
        else:
            by_value: dict[str, list[str]] = {}
            for method, value in shown.items():
                by_value.setdefault(value, []).append(method)
            default = (" (default " + ", ".join(f"{'/'.join(m)} {v}" for v, m in by_value.items())
                       + ")" if shown else "")
        listed = f": {', '.join(spec.opt.choices)}" if spec.opt.choices and spec.opt.metavar else ""
        settings: dict[str, Any] = {"metavar": spec.opt.metavar,
                                    "help": owners + spec.opt.help + listed + default}
        if spec.kind is bool:
            settings["choices"] = ["on", "off"]
        elif spec.opt.choices:
            settings["choices"] = spec.opt.choices
        else:
            settings["type"] = spec.kind
        if spec.many:
            settings["nargs"] = "+"
        parser.add_argument("--" + name.replace("_", "-"), **settings)


def _method_values(args: argparse.Namespace, inference_only: bool = False) -> dict[str, Any]:
    """The methods' options as given on the command line (None: not given)."""
    values = {}
    for name, (spec, _) in _declared_options().items():
        if inference_only and not spec.opt.inference:
            continue
        value = getattr(args, name, None)
        values[name] = (value == "on") if spec.kind is bool and value is not None else value
    return values


def _add_recipe_args(parser: Any) -> None:
    """Every settable :class:`~anomap.methods.base.Recipe` field as a flag, from its
    declaration (type, default, help): the command line reaches all of them."""
    import typing

    from anomap.methods import SELECTION_RULES, Recipe
    from anomap.orientation import ORIENTATIONS

    hints = typing.get_type_hints(Recipe)
    choices = {"optimizer": ("sgd", "adam", "adamw"), "selection": SELECTION_RULES,
               "augment": ORIENTATIONS}
    for name, (_, text) in Recipe.settable().items():
        kind = hints[name]
        settings: dict[str, Any] = {"help": text}
        if name in choices:
            settings.update(choices=choices[name], metavar="NAME")
        elif kind is bool:
            settings.update(choices=["on", "off"], metavar="on|off")
        elif typing.get_origin(kind) is tuple:
            settings.update(type=float, nargs="+", metavar="F")
        else:
            settings["type"] = next(k for k in typing.get_args(kind) or (kind,)
                                    if k is not type(None))
            settings["metavar"] = "N" if settings["type"] is int else "X"
        parser.add_argument("--" + name.replace("_", "-"), **settings)


def _recipe_values(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields given on the command line (None: not given)."""
    from anomap.methods import Recipe

    values = {name: getattr(args, name, None) for name in Recipe.settable()}
    if values.get("drop_last") is not None:
        values["drop_last"] = values["drop_last"] == "on"
    return values


def _add_calibration_args(parser: argparse.ArgumentParser, retuning: bool) -> None:
    """How the threshold is set on held-out normals (``retune`` may change it)."""
    from anomap.standardize import NORMALIZATIONS

    default = None if retuning else 0.99
    parser.add_argument("--threshold-quantile", type=float, default=default, metavar="Q",
                        help="threshold = this quantile of held-out normal scores"
                             + (" (default: the run's)" if retuning else f" (default {default})"))
    parser.add_argument("--map-normalization", choices=NORMALIZATIONS, metavar="HOW",
                        help="none, or position: in held-out standard deviations per position")


def _add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    from anomap.trust import PROBE_ACTIONS

    parser.add_argument("--runtime", default="auto",
                        choices=["auto", "torch", "onnxruntime", "openvino"],
                        help="auto (default): torch for a run; for an export the fastest "
                             "runtime that passes its probe here")
    parser.add_argument("--probe", default="refuse", choices=PROBE_ACTIONS,
                        help="an export whose runtime disagrees with the run here: refuse "
                             "(default), fallback to its fp32 graph, or off")


def _say_runtime(detector: Any) -> None:
    """Which runtime an export was loaded with, and why (the probe's verdict)."""
    report = detector.load_report
    if report:
        print(f"anomap: runtime {report['runtime']}: {report['why']}", file=sys.stderr)


def _timestamp(text: str) -> Any:
    """An ISO date or time (without a zone: this machine's), in UTC as the record keeps it."""
    import datetime as dt

    value = dt.datetime.fromisoformat(text)
    return (value if value.tzinfo else value.astimezone()).astimezone(dt.timezone.utc)


def _add_max_pixels_arg(parser: argparse.ArgumentParser) -> None:
    from anomap.data import DEFAULT_MAX_PIXELS

    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="refuse larger images before decoding "
                             f"(default {DEFAULT_MAX_PIXELS:,})")


def build_parser() -> argparse.ArgumentParser:
    from anomap.data import RESIZE_MODES
    from anomap.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="anomap", description="Unsupervised visual anomaly detection and localization.")
    parser.add_argument("--version", action="version", version=f"anomap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a model on defect-free images",
        usage="anomap train --data DIR --out RUN [--model METHOD] [--preset NAME] [options]",
        description="Every option in full: docs/usage.md; the methods' own: docs/<method>.md.")
    data = train.add_argument_group("data")
    photos = train.add_argument_group("reading the photos")
    model = train.add_argument_group("model (a method's own options name it)")
    recipe = train.add_argument_group("recipe (default: the method's, or its --preset)")
    run = train.add_argument_group("the run")
    _add_data_args(data, required=False)
    data.add_argument("--val-fraction", type=float, metavar="F",
                      help="share of normal images held out to select the epoch and set the "
                           "threshold (default: the preset's; 0.2 except paper DRAEM and "
                           "FractalAD, which train on all, as their code does)")
    photos.add_argument("--resize-mode", choices=RESIZE_MODES, metavar="MODE",
                        help="letterbox (default; pads with edge pixels), mirror, stretch")
    photos.add_argument("--margin", type=int, metavar="PX",
                        help="padding kept around the photo inside the input (default 0)")
    _add_max_pixels_arg(photos)
    by_preset: dict[str, list[str]] = {}
    for name in sorted(METHODS):
        for preset in METHODS[name].presets():
            by_preset.setdefault(preset, []).append(name)
    presets = ", ".join(f"{preset} ({'/'.join(names)})" for preset, names in by_preset.items()
                        if preset != "paper")
    model.add_argument("--model", default="stpm", choices=["auto", *sorted(METHODS)],
                       metavar="METHOD",
                       help="auto (choose by training candidates and judging them on "
                            "synthetic anomalies; docs/auto.md), " + ", ".join(sorted(METHODS))
                            + " (default stpm)")
    model.add_argument("--budget", type=_duration, default="45m", metavar="TIME",
                       help="--model auto: wall time for the search, e.g. 45m, 2h (45m)")
    model.add_argument("--candidates", type=lambda text: text.split(","), metavar="M,M",
                       help="--model auto: the methods to try (default all)")
    model.add_argument("--storage", metavar="URL",
                       help="--model auto: an Optuna storage URL to share the search "
                            "(default: SQLite beside the run)")
    model.add_argument("--preset", default="auto", metavar="NAME",
                       help="auto (default: cpu on a CPU where the method has one, else paper, "
                            "or paper-lite when the paper's ResNet weights are not on this "
                            f"machine), paper, {presets}")
    _add_method_args(model, inference=False)
    _add_recipe_args(recipe)
    recipe.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder to write")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    run.add_argument("--resume", action="store_true",
                     help="continue a killed run, or train a finished one on (--epochs)")
    run.add_argument("--test", action="store_true", help="run 'anomap test' afterwards")
    run.add_argument("--no-progress", action="store_true")
    _add_method_args(train.add_argument_group("reading the map (retune may change it)"),
                     inference=True)
    _add_calibration_args(train.add_argument_group("threshold"), retuning=False)

    test = commands.add_parser("test", help="evaluate a run on a test set, write the report")
    test.add_argument("--run", required=True, type=Path)
    _add_data_args(test, required=False)
    test.add_argument("--out", type=Path, help="where to write results (default: the run)")
    test.add_argument("--device", default="auto")
    _add_runtime_arg(test)
    test.add_argument("--batch-size", type=int, default=8,
                      help="images per forward pass (8: as fast as 32 on a CPU, less memory)")
    _add_precision_arg(test)
    test.add_argument("--no-panels", action="store_true", help="skip heat-map PNGs")
    test.add_argument("--no-progress", action="store_true")
    _add_max_pixels_arg(test)

    retune = commands.add_parser(
        "retune", help="copy a trained run with other map/score options and a recalibrated "
                       "threshold (no retraining)")
    retune.add_argument("--run", required=True, type=Path, help="the trained run")
    retune.add_argument("--out", type=Path, help="the new run folder (not with --feedback)")
    _add_method_args(retune, inference=True)
    _add_calibration_args(retune, retuning=True)
    retune.add_argument("--device", default="auto")
    retune.add_argument("--batch-size", type=int, default=8)
    retune.add_argument("--test", action="store_true", help="run 'anomap test' afterwards")
    retune.add_argument("--no-progress", action="store_true")
    _add_max_pixels_arg(retune)
    marks = retune.add_argument_group(
        "operator feedback (docs/line.md): a station's threshold from its record's marks")
    marks.add_argument("--feedback", action="store_true",
                       help="propose a threshold from the held-out normals and the photos "
                            "marked in the record, and say what it would have flipped")
    marks.add_argument("--record", metavar="URL", help="the record's database URL")
    marks.add_argument("--folder", type=Path, metavar="DIR",
                       help="a watched folder: its record (DIR/.anomap/record.db)")
    marks.add_argument("--station", help="the station (default: the folder's name)")
    marks.add_argument("--apply", action="store_true",
                       help="confirm: keep the proposal as the station's threshold")
    marks.add_argument("--undo", action="store_true",
                       help="take back the station's last threshold change")
    marks.add_argument("--who", default=os.environ.get("USER"), help="kept with the change")
    marks.add_argument("--why", help="kept with the change")

    predict = commands.add_parser("predict", help="score new images")
    predict.add_argument("--run", required=True, type=Path)
    predict.add_argument("inputs", nargs="+",
                         help="image files or folders (with --engine ray also URIs: s3://, "
                              "gs://, file://)")
    predict.add_argument("--out", type=Path, help="folder for overlay and mask PNGs")
    predict.add_argument("--format", default="jsonl", choices=["jsonl", "csv", "parquet"],
                         help="parquet: with --engine ray")
    predict.add_argument("--output", type=Path,
                         help="write the table here (row by row) instead of stdout")
    predict.add_argument("--resume", action="store_true",
                         help="continue an interrupted --output table: skip the images in it")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace an existing --output table")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.add_argument("--device", default="auto")
    _add_runtime_arg(predict)
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--workers", type=int, default=2,
                         help="threads decoding photos while the network scores (default 2); "
                              "with --engine ray: actors, each with the model loaded once")
    predict.add_argument("--fast-decode", action="store_true",
                         help="decode JPEGs at reduced size where the network is smaller than "
                              "the photo (faster; scores move slightly; not with --out)")
    predict.add_argument("--picture-max-side", type=int, default=2048, metavar="PX",
                         help="with --out: overlays and masks drawn at most PX on a side "
                              "(default 2048; bounds the memory a huge photo takes)")
    predict.add_argument("--engine", default="local", choices=["local", "ray"],
                         help="ray: an actor pool on Ray Data (pip install \"anomap[ray]\")")
    predict.add_argument("--address",
                         help="with --engine ray: the cluster to join (default: a local Ray)")
    _add_precision_arg(predict)
    _add_max_pixels_arg(predict)

    export = commands.add_parser(
        "export", help="write a run's network for ONNX Runtime or OpenVINO, checked against it")
    export.add_argument("--run", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path, help="export folder to write")
    export.add_argument("--format", default="onnx", choices=["onnx", "openvino"])
    export.add_argument("--int8", action="store_true",
                        help="quantise to int8, calibrated on the run's held-out normal images")
    export.add_argument("--no-progress", action="store_true")
    _add_max_pixels_arg(export)

    serve = commands.add_parser(
        "serve", help="serve trained models over HTTP: a JSON API and a web page")
    serve.add_argument("--run", required=True, action="append", metavar="[NAME=]RUN",
                       help="a run or export folder, named by its folder unless NAME= is "
                            "given; repeat to serve several")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; "
                            "any other needs --api-key)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("ANOMAP_API_KEY"),
                       help="key every API call must send as X-API-Key (default: "
                            "$ANOMAP_API_KEY)")
    serve.add_argument("--device", default="auto")
    _add_runtime_arg(serve)
    serve.add_argument("--max-request-bytes", type=int, default=64 * 2**20)
    serve.add_argument("--max-image-bytes", type=int, default=16 * 2**20)
    serve.add_argument("--max-images", type=int, default=32, help="images per request")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="images scored together, from concurrent requests (default 8)")
    serve.add_argument("--batch-window-ms", type=float, default=10.0,
                       help="how long the first image of a batch waits for others "
                            "(default 10 ms; 0: no batching)")
    _add_max_pixels_arg(serve)
    line = serve.add_argument_group("a station (docs/line.md)")
    line.add_argument("--watch", action="append", type=Path, metavar="DIR",
                      help="judge photos arriving in DIR with the first model, as anomap "
                           "watch does; the page shows them for operator feedback")
    line.add_argument("--station", help="the station's name (default: the folder's)")
    line.add_argument("--record", metavar="URL",
                      help="the record (default: sqlite:///DIR/.anomap/record.db)")
    line.add_argument("--webhook", metavar="URL", help="POST each verdict as JSON to URL")
    line.add_argument("--mqtt", metavar="URL", help="publish each verdict to "
                                                    "mqtt://HOST[:PORT]/TOPIC")
    line.add_argument("--model-store", type=Path, metavar="DIR",
                      help="runs a model may be switched to while serving (POST "
                           "/v1/models/NAME/switch {\"run\": \"SUBFOLDER\"}; rollback too)")
    guard = serve.add_argument_group("memory and slow clients (docs/deployment.md)")
    guard.add_argument("--memory-budget", type=float, metavar="MiB",
                       help="the whole process's memory: what the loaded models leave is "
                            "split between uploads (20%%), decoding and drawing (70%%) and "
                            "pictures kept for URLs (10%%); default: 128 + 768 + 64 MiB "
                            "beside the models")
    guard.add_argument("--max-in-flight", type=int, default=32,
                       help="requests handled at once; more get 503 with Retry-After")
    guard.add_argument("--picture-max-side", type=int, default=1024, metavar="PX",
                       help="overlays and masks drawn at most PX on a side (default 1024)")
    guard.add_argument("--head-timeout", type=float, default=10.0, metavar="S",
                       help="seconds a client has to send a request's headers")
    guard.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                       help="seconds a client has to send a request's body (408 after)")
    guard.add_argument("--allowed-hosts", default="", metavar="NAME[,NAME]",
                       help="Host names answered besides loopback's ('*': any); without "
                            "a key or this list, only loopback names are (no DNS rebinding)")

    bench = commands.add_parser(
        "benchmark", help="train and test every category under a folder: one table",
        usage="anomap benchmark ROOT --out DIR [--model METHOD] [--preset NAME] "
              "[--categories A,B] [options]",
        description="Each category in its own run under --out (resumable: run the same "
                    "command again); the table as benchmark.json, .md and .html beside the "
                    "published numbers. Layouts: MVTec AD, MVTec 3D-AD (RGB), VisA (its "
                    "split_csv), MVTec LOCO, plain folders.")
    bench.add_argument("root", type=Path, metavar="ROOT", help="the folder of categories")
    bench.add_argument("--out", required=True, type=Path, metavar="DIR")
    bench.add_argument("--model", default="stpm", choices=sorted(METHODS), metavar="METHOD",
                       help=", ".join(sorted(METHODS)) + " (default stpm)")
    bench.add_argument("--preset", default="auto", metavar="NAME", help="as for train")
    bench.add_argument("--categories", type=lambda text: tuple(text.split(",")),
                       metavar="A,B", help="only these (default: every category)")
    bench.add_argument("--val-fraction", type=float, metavar="F",
                       help="normals held out (default: the preset's)")
    bench.add_argument("--device", default="auto")
    bench.add_argument("--no-progress", action="store_true")
    _add_method_args(bench.add_argument_group("model"), inference=False)
    _add_method_args(bench.add_argument_group("reading the map"), inference=True)
    bench_recipe = bench.add_argument_group("recipe (default: the preset's)")
    _add_recipe_args(bench_recipe)
    bench_recipe.add_argument("--seed", type=int, default=0)

    compare = commands.add_parser(
        "compare", help="put tested runs side by side on one HTML page")
    compare.add_argument("runs", nargs="+", metavar="[NAME=]RUN",
                         help="run folders, each tested; NAME= labels a run (default: its "
                              "folder's name)")
    compare.add_argument("--out", required=True, type=Path, help="HTML file to write")
    compare.add_argument("-n", type=int, default=12,
                         help="images where the runs disagree most, shown (default 12)")
    compare.add_argument("--device", default="auto")

    watch = commands.add_parser(
        "watch", help="judge photos as they arrive in folders, each once, kept in a record",
        description="Runs until stopped (Ctrl-C, SIGTERM). docs/line.md")
    watch.add_argument("folders", nargs="+", type=Path, metavar="DIR")
    watch.add_argument("--run", required=True, type=Path, help="a run or export folder")
    watch.add_argument("--station", help="this station's name in the record (default: the "
                                         "first folder's name)")
    watch.add_argument("--record", metavar="URL",
                       help="the record's database URL (default: sqlite:///DIR/.anomap/"
                            "record.db; postgresql://... for several stations)")
    watch.add_argument("--poll", action="store_true",
                       help="poll the folders instead of file-system events (network shares)")
    watch.add_argument("--settle", type=float, default=0.25, metavar="S",
                       help="a photo is complete when its size and time stand still this "
                            "long (default 0.25 s)")
    watch.add_argument("--move-to", type=Path, metavar="DIR",
                       help="move judged photos into DIR/pass and DIR/fail")
    watch.add_argument("--copy-to", type=Path, metavar="DIR",
                       help="copy judged photos into DIR/pass and DIR/fail")
    watch.add_argument("--out", type=Path, help="folder for overlay and mask PNGs")
    watch.add_argument("--webhook", metavar="URL",
                       help="POST each verdict as JSON to URL, retried without making the "
                            "line wait")
    watch.add_argument("--mqtt", metavar="URL",
                       help="publish each verdict as JSON to mqtt://HOST[:PORT]/TOPIC "
                            "(QoS 1; pip install \"anomap[mqtt]\")")
    watch.add_argument("--batch-size", type=int, default=8)
    watch.add_argument("--drift-window", type=int, default=100, metavar="N",
                       help="recent photos compared with the held-out normals (default 100)")
    watch.add_argument("--stop-when-idle", type=float, metavar="S",
                       help="stop after S seconds with nothing to judge (batch use)")
    watch.add_argument("--device", default="auto")
    _add_runtime_arg(watch)
    _add_max_pixels_arg(watch)

    history = commands.add_parser(
        "history", help="query the inspection record; export it as CSV, JSON lines or Parquet")
    where = history.add_mutually_exclusive_group(required=True)
    where.add_argument("--record", metavar="URL", help="the record's database URL")
    where.add_argument("--folder", type=Path, metavar="DIR",
                       help="a watched folder: its record (DIR/.anomap/record.db)")
    history.add_argument("--since", type=_timestamp, metavar="ISO",
                         help="e.g. 2026-12-07 or 2026-12-07T08:00")
    history.add_argument("--until", type=_timestamp, metavar="ISO")
    history.add_argument("--verdict", choices=["pass", "fail", "error"])
    history.add_argument("--min-score", type=float)
    history.add_argument("--max-score", type=float)
    history.add_argument("--model", help="a model's name or version")
    history.add_argument("--station")
    history.add_argument("--drift", action="store_true", help="the drift warnings instead")
    history.add_argument("--mark", nargs=2, metavar=("ID", "KIND"),
                         help="an operator's word on inspection ID: not_a_defect or "
                              "missed_defect (then: anomap retune --feedback)")
    history.add_argument("--note", help="with --mark: a note kept with it")
    history.add_argument("--who", default=os.environ.get("USER"), help="with --mark")
    history.add_argument("--format", default="csv", choices=["csv", "jsonl", "parquet"])
    history.add_argument("--output", type=Path, help="file to write (default: CSV to stdout)")

    samples = commands.add_parser(
        "samples", help="write a PNG grid of the synthetic training samples a method sees")
    samples.add_argument("--model", default="draem", choices=sorted(METHODS))
    samples.add_argument("--data", required=True, type=Path)
    samples.add_argument("--out", required=True, type=Path, help="PNG file to write")
    samples.add_argument("--anomaly-source")
    samples.add_argument("--image-size", type=int, default=256)
    samples.add_argument("-n", type=int, default=8, help="number of rows")
    samples.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser("demo", help="make built-in data, train, test, report")
    demo.add_argument("--out", type=Path, default=Path("demo_run"))
    demo.add_argument("--texture", default="brick", choices=["brick", "grass", "gravel"])
    demo.add_argument("--model", default="stpm", choices=sorted(METHODS))
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--device", default="auto")
    demo.add_argument("--no-progress", action="store_true")
    for command in commands.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def reference_markdown() -> str:
    """docs/cli.md: every command's ``--help``, generated from the parser so the
    reference cannot drift from the code (a test compares the two)."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix it
    try:
        parser = build_parser()
        commands = next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction))
        parts = ["# Command-line reference\n\nGenerated from the parser by "
                 "`python -m anomap.cli --reference > docs/cli.md`; "
                 "`tests/test_cli.py` checks it is current.\n"]
        for name, sub in commands.choices.items():
            parts.append(f"\n## anomap {name}\n\n```\n{sub.format_help().rstrip()}\n```\n")
        return "".join(parts)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def _print_metrics(result: dict[str, Any]) -> None:
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold", "n_images",
            "n_skipped", "images_per_second")
    print("  ".join(f"{k}={result[k]:.4f}" if isinstance(result[k], float) else f"{k}={result[k]}"
                    for k in keys if k in result))


def _duration(text: str) -> float:
    """``90``, ``90s``, ``45m``, ``2h`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 45m, 2h or 900s"
                                         ) from None


def cmd_auto(args: argparse.Namespace) -> int:
    from anomap.auto import Search, run_search
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings
    from anomap.runfolder import DataSource

    if args.data is None:
        raise ValueError("--model auto needs --data (a killed search resumes when the same "
                         "command is run again)")
    source = DataSource(str(args.data.resolve()), val_fraction=args.val_fraction,
                        defect_dir=args.defect_dir, mask_dir=args.mask_dir,
                        test_normal_dir=args.test_normal_dir)
    # recipe flags apply to every candidate (--batch-size bounds training memory);
    # --epochs caps each candidate's epochs, the search still cuts them into rungs
    given = {k: v for k, v in _recipe_values(args).items() if v is not None}
    search = Search(source, args.out, budget_seconds=args.budget, methods=args.candidates,
                    seed=args.seed, device=args.device, storage=args.storage,
                    recipe={k: v for k, v in given.items() if k != "epochs"},
                    max_epochs=given.get("epochs"), progress=not args.no_progress)
    if search.workspace.exists():
        print(f"anomap: resuming the search in {search.workspace}", file=sys.stderr)
    selection = run_search(search)
    print(f"chose: {selection['why']}\nrun: {args.out}  (ranking: {args.out / 'selection.json'})")
    if args.test:
        _print_metrics(evaluate_run(args.out, settings=LoadSettings(device=args.device),
                                    progress=not args.no_progress))
        print(f"report: {args.out / 'report.html'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings
    from anomap.runfolder import DataSource
    from anomap.train import TrainingPlan, fit

    if args.model == "auto":
        return cmd_auto(args)
    if args.data is None and not args.resume:
        raise ValueError("--data is required (unless --resume)")
    recipe = _recipe_values(args)
    try:
        source = None if args.data is None else DataSource(
            str(args.data), val_fraction=args.val_fraction, defect_dir=args.defect_dir,
            mask_dir=args.mask_dir, test_normal_dir=args.test_normal_dir)
        plan = TrainingPlan(preset=args.preset, model=_method_values(args), recipe=recipe,
                            resize_mode=args.resize_mode, margin=args.margin, seed=args.seed,
                            threshold_quantile=args.threshold_quantile,
                            map_normalization=args.map_normalization)
        result = fit(args.model, source, args.out, plan, device=args.device, resume=args.resume,
                     progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished epochs are saved. Continue with\n"
              f"  anomap train --out {args.out} --resume", file=sys.stderr)
        return 130
    from anomap.distributed import current

    if not current().is_main:  # torchrun's other ranks: rank 0 reports
        return 0
    for option, (value, why) in result.get("decisions", {}).items():
        print(f"--{option.replace('_', '-')} auto: {value}, because {why}")
    print(f"trained: {args.out}  best epoch {result['best_epoch']}  "
          f"threshold {result['threshold']:.6g}  skipped files {result['n_skipped']}")
    if args.test:
        _print_metrics(evaluate_run(args.out, settings=LoadSettings(device=args.device),
                                    progress=not args.no_progress))
        print(f"report: {args.out / 'report.html'}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings
    from anomap.runfolder import DataSource

    folders = (args.defect_dir, args.mask_dir, args.test_normal_dir)
    source = None if args.data is None and not any(folders) else DataSource(
        str(args.data or ""), defect_dir=args.defect_dir, mask_dir=args.mask_dir,
        test_normal_dir=args.test_normal_dir)
    settings = LoadSettings(args.device, args.precision, args.runtime, args.probe)
    result = evaluate_run(args.run, source, out_dir=args.out, settings=settings,
                          batch_size=args.batch_size, panels=not args.no_panels,
                          progress=not args.no_progress)
    _print_metrics(result)
    out = args.out or args.run
    print(f"metrics: {out / 'metrics.json'}  report: {out / 'report.html'}")
    return 0


def cmd_retune_feedback(args: argparse.Namespace) -> int:
    from anomap import feedback
    from anomap.record import Record, default_url
    from anomap.runfolder import run_version

    if not (args.record or args.folder):
        raise ValueError("--feedback needs the record: --record URL or --folder DIR")
    station = args.station or (args.folder.resolve().name if args.folder else None)
    if station is None:
        raise ValueError("--feedback with --record needs --station NAME")
    record = Record(args.record or default_url(args.folder))
    try:
        if args.undo:
            undone = record.undo_threshold(station, run_version(args.run), args.who)
            print(f"undone: change {undone['id']} ({undone['old']:.6g} -> "
                  f"{undone['new']:.6g}); the threshold is {undone['old']:.6g} again")
            return 0
        proposal = feedback.propose(record, station, args.run)
        print(proposal.describe())
        if args.apply and proposal.changes:
            change = feedback.apply(record, proposal, args.who, args.why)
            print(f"applied as change {change}: the station's watcher takes it at once")
        elif proposal.changes:
            print("nothing changed: confirm with --apply")
    finally:
        record.close()
    return 0


def cmd_retune(args: argparse.Namespace) -> int:
    if args.feedback or args.undo:
        return cmd_retune_feedback(args)
    if args.out is None:
        raise ValueError("retune needs --out NEW_RUN (or --feedback for a station)")
    from anomap.calibrate import retune
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings

    calibration = retune(args.run, args.out, _method_values(args, inference_only=True),
                         threshold_quantile=args.threshold_quantile,
                         map_normalization=args.map_normalization, device=args.device,
                         batch_size=args.batch_size, progress=not args.no_progress)
    print(f"retuned: {args.out}  threshold {calibration['threshold']:.6g} (quantile "
          f"{calibration['quantile']} of {calibration['n_images']} {calibration['source']})")
    if args.test:
        _print_metrics(evaluate_run(args.out, settings=LoadSettings(device=args.device),
                                    batch_size=args.batch_size, progress=not args.no_progress))
        print(f"report: {args.out / 'report.html'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from anomap.inspection import InspectionSettings, Table, inspect_folder
    from anomap.run import Detector

    table = Table(args.output, args.format, args.resume, args.overwrite, sys.stdout)
    settings = InspectionSettings(args.batch_size, args.workers, args.out,
                                  args.fast_decode,
                                  progress=not args.quiet and sys.stderr.isatty(),
                                  picture_max_side=args.picture_max_side)
    if args.engine == "ray":
        from anomap.scale import inspect_on_ray

        summary = inspect_on_ray(args.run, args.inputs, table, settings, runtime=args.runtime,
                                 address=args.address, probe=args.probe)
        print(f"anomap: {summary.describe()}", file=sys.stderr)
        return 1 if summary.failed and not (summary.scored or summary.already_done) else 0
    if args.format == "parquet":
        raise ValueError("--format parquet is written by --engine ray; use jsonl or csv")
    detector = Detector.load(args.run, args.device, args.precision, args.runtime, args.probe)
    _say_runtime(detector)
    try:
        summary = inspect_folder(detector, [Path(i) for i in args.inputs], table, settings,
                                 on_error=lambda error: print(f"anomap: skipped {error}",
                                                              file=sys.stderr))
    except KeyboardInterrupt:
        if args.output:
            print(f"\ninterrupted: the rows scored so far are in {args.output}. Continue "
                  f"with the same command and --resume", file=sys.stderr)
        return 130
    for path, reason in summary.ignored_files[:20]:
        print(f"anomap: ignored {path}: {reason}", file=sys.stderr)
    if len(summary.ignored_files) > 20:
        print(f"anomap: ... and {len(summary.ignored_files) - 20} more ignored"
              + (f" (listed in {args.output}.summary.json)" if args.output else ""),
              file=sys.stderr)
    print(f"anomap: {summary.describe()}", file=sys.stderr)
    return 1 if summary.failed and not (summary.scored or summary.already_done) else 0


def cmd_export(args: argparse.Namespace) -> int:
    from anomap.export import export_run

    record = export_run(args.run, args.out, args.format, args.int8,
                        progress=not args.no_progress)
    print(f"exported: {args.out}  {args.format}{' int8' if args.int8 else ''}")
    for name, agreement in record["agreement_by_runtime"].items():
        line = (f"  {name}: on {agreement['n_normal']} held-out normals and "
                f"{agreement['n_anomalous']} synthetic anomalies, maps within "
                f"{agreement['max_relative_map_difference']:.1e} of their range, "
                f"{agreement['verdicts_differ']} verdicts differ")
        for kind, aurocs in agreement.get("synthetic_by_kind", {}).items():
            line += ", {kind} pixel AUROC {1:.3f} (run {0:.3f})".format(
                *aurocs["pixel_auroc"], kind=kind)
        print(line + ("" if agreement["passed"] else
                      f"; FAILS: {', '.join(agreement['problems'])}; it will not be loaded "
                      f"with this export (runtime auto takes one that passed)"))
    if "recalibrated" in record:
        old, new = record["recalibrated"]["threshold"]
        print(f"  int8 threshold recalibrated on its own held-out maps: {old:.6g} -> {new:.6g}")
    print(f"use it: anomap predict --run {args.out} IMAGES   (thresholds: "
          f"{args.out / 'calibration.json'})")
    return 0


def named_runs(items: Sequence[str]) -> list[tuple[str, Path]]:
    """``[NAME=]RUN`` arguments as (name, folder); a run is named by its folder unless
    NAME= is given (serve and compare label runs this way)."""
    pairs = []
    for item in items:
        name, _, path = item.rpartition("=")  # no '=': name is ''
        pairs.append((name or Path(path).name, Path(path)))
    return pairs


def cmd_serve(args: argparse.Namespace) -> int:
    from anomap.runtimes import require

    for module in ("fastapi", "uvicorn", "python_multipart", "prometheus_client"):
        require(module)  # the serve extra, or a message naming it
    from anomap.admission import Budget
    from anomap.record import station_folder
    from anomap.serve import ServeSettings, serve
    from anomap.watch import StationSettings

    models: dict[str, Path] = {}
    for name, path in named_runs(args.run):
        if name in models:
            raise ValueError(f"two models named {name!r}: name them with --run NAME=RUN")
        models[name] = path
    settings = ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key,
        max_request_bytes=args.max_request_bytes, max_image_bytes=args.max_image_bytes,
        max_images=args.max_images, max_pixels=args.max_pixels, max_batch=args.max_batch,
        batch_window_ms=args.batch_window_ms, picture_max_side=args.picture_max_side,
        budget=Budget(max_in_flight=args.max_in_flight),
        memory_budget_bytes=None if args.memory_budget is None
        else int(args.memory_budget * 2**20),
        head_timeout_s=args.head_timeout, body_timeout_s=args.body_timeout,
        allowed_hosts=tuple(h.strip() for h in args.allowed_hosts.split(",") if h.strip()),
        station=None if not args.watch else StationSettings(
            folders=tuple(args.watch), station=args.station or args.watch[0].resolve().name,
            record_url=args.record, pictures=station_folder(args.watch[0]) / "pictures",
            webhook=args.webhook, mqtt=args.mqtt),
        model_store=args.model_store)
    settings.check()
    print(f"anomap serve: {', '.join(models)} on http://{args.host}:{args.port}/  "
          f"(API schema: /openapi.json)", file=sys.stderr)
    serve(models, settings, runtime=args.runtime, device=args.device, probe=args.probe)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    import threading

    from anomap.watch import StationSettings, open_station, stop_on_signals

    for folder in args.folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder to watch")
    if args.move_to and args.copy_to:
        raise ValueError("give --move-to or --copy-to, not both")
    settings = StationSettings(
        folders=tuple(args.folders), station=args.station or args.folders[0].resolve().name,
        record_url=args.record, settle_s=args.settle, poll=args.poll,
        batch_size=args.batch_size, action="move" if args.move_to else "copy"
        if args.copy_to else None, sorted_to=args.move_to or args.copy_to,
        pictures=args.out, drift_window=args.drift_window,
        stop_when_idle_s=args.stop_when_idle, webhook=args.webhook, mqtt=args.mqtt)

    def said(row: dict[str, Any]) -> None:
        score = "-" if row["score"] is None else f"{row['score']:.4g}"
        print(f"{row['verdict']}\t{score}\t{row['path']}", flush=True)

    station = open_station(args.run, settings, args.device, args.runtime, args.probe, said)
    _say_runtime(station.detector)
    print(f"anomap watch: {', '.join(map(str, settings.folders))} as station "
          f"{settings.station!r}, model {station.model_name} {station.model_version}, "
          f"record {settings.url()}", file=sys.stderr, flush=True)
    stop = threading.Event()
    stop_on_signals(stop)
    judged = station.run(stop)
    print(f"anomap watch: {judged} photos judged", file=sys.stderr)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from anomap.record import Query, Record, default_url, export_rows

    record = Record(args.record or default_url(args.folder))
    try:
        if args.mark:
            record.add_feedback(int(args.mark[0]), args.mark[1], args.note, args.who)
            print(f"inspection {args.mark[0]}: marked {args.mark[1]}", file=sys.stderr)
            return 0
        if args.drift:
            rows = record.drift(args.station)
            for row in rows:
                print(f"{row['at']}\t{row['station']}\t{row['state']}\tp={row['p_value']:.3g}"
                      f"\t{row['evidence']}")
            return 0
        query = Query(args.since, args.until, args.verdict, args.min_score, args.max_score,
                      args.model, args.station)
        rows = record.rows(query)
        if args.output is None:
            if args.format != "csv":
                raise ValueError(f"--format {args.format} needs --output FILE")
            import csv

            from anomap.record import HISTORY_COLUMNS

            writer = csv.DictWriter(sys.stdout, fieldnames=list(HISTORY_COLUMNS),
                                    extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            return 0
        count = export_rows(rows, args.output, args.format)
        print(f"anomap history: {count} inspections -> {args.output}", file=sys.stderr)
    finally:
        record.close()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from anomap.compare import compare_runs

    names, runs = zip(*named_runs(args.runs), strict=True)
    page = compare_runs(list(runs), args.out, names=list(names), n_images=args.n,
                        device=args.device)
    print(f"wrote {page}")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    import torch

    from anomap.data import Geometry, discover, load_set, to_float
    from anomap.methods import build_untrained
    from anomap.train import seed_everything

    seed_everything(args.seed)
    spec = discover(args.data)
    images = load_set(spec.train[: args.n], Geometry(args.image_size, "letterbox"),
                      progress=False).images
    config = {"anomaly_source": args.anomaly_source} if args.anomaly_source else {}
    model = build_untrained(args.model, **config)
    with torch.no_grad():
        path = model.write_training_samples(to_float(images), args.out, n=args.n)
    print(f"wrote {path}: rows of normal image | synthetic anomaly | mask")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from anomap.demo import make_demo_dataset
    from anomap.evaluate import evaluate_run
    from anomap.run import LoadSettings
    from anomap.train import TrainingPlan, fit

    data = make_demo_dataset(args.out / "data", args.texture)
    run = args.out / "run"
    print(f"demo data: {data}  (train/good, test/<defect>, ground_truth/)")
    fit(
        args.model,
        data,
        run,
        TrainingPlan(
            recipe={"epochs": args.epochs, "batch_size": 16, "image_size": args.image_size},
            resize_mode="stretch",
        ),
        device=args.device,
        resume=(run / "last.pt").exists(),
        progress=not args.no_progress,
    )
    result = evaluate_run(run, settings=LoadSettings(device=args.device),
                          progress=not args.no_progress)
    _print_metrics(result)
    print(f"report: {run / 'report.html'}  heat maps: {run / 'panels'}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from anomap.benchmark import TABLE_HTML, Benchmark, run_benchmark
    from anomap.train import TrainingPlan

    plan = TrainingPlan(preset=args.preset, model=_method_values(args),
                        recipe=_recipe_values(args), seed=args.seed)
    table = run_benchmark(Benchmark(args.root, args.model, args.out, plan, args.categories,
                                    args.val_fraction, args.device, not args.no_progress))
    mean = {k: "-" if v is None else f"{v:.4f}" for k, v in table["mean"].items()
            if k in ("image_auroc", "pixel_auroc")}
    count = len(table["rows"])
    print(f"{count} categor{'y' if count == 1 else 'ies'}, mean image AUROC "
          f"{mean['image_auroc']}, pixel AUROC {mean['pixel_auroc']}; table: "
          f"{args.out / TABLE_HTML}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="anomap: %(levelname)s: %(message)s")
    handler = {"train": cmd_train, "test": cmd_test, "retune": cmd_retune,
               "predict": cmd_predict, "export": cmd_export, "serve": cmd_serve,
               "compare": cmd_compare, "watch": cmd_watch, "history": cmd_history,
               "samples": cmd_samples, "benchmark": cmd_benchmark,
               "demo": cmd_demo}[args.command]
    if getattr(args, "max_pixels", None) is not None:
        from anomap.data import set_max_pixels

        set_max_pixels(args.max_pixels)
    try:
        return handler(args)
    except EXPECTED_ERRORS as error:
        if args.verbose:
            raise
        print(f"anomap: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if sys.argv[1:] == ["--reference"]:
        sys.stdout.write(reference_markdown())
        sys.exit(0)
    sys.exit(main())

"""The docs' tables, made from the JSON in benchmarks/results/ (mtd/, speed/, diagnostics/).

Each generated table sits in a markdown file between ``<!-- summarize: NAME -->`` and
``<!-- /summarize -->``; ``--write`` refreshes them all, ``--check`` lists the stale
ones (tests/test_docs.py runs it), so a quoted number cannot drift from its evidence.

    python benchmarks/summarize.py              # print every table
    python benchmarks/summarize.py --write      # refresh README.md and docs/
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from anomap.data import describe_geometry
from anomap.machine import machine_line
from anomap.methods import METHODS
from anomap.methods.stpm import STPM

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
MTD = RESULTS / "mtd"
SPEED = RESULTS / "speed"
DIAGNOSTICS = RESULTS / "diagnostics"
REPOSITORY = BENCHMARKS.parent
#: a block: its opening line, a body that holds no other marker (it may be empty), its end
BLOCK = re.compile(r"(<!-- summarize: (?P<name>[\w./-]+) -->\n)"
                   r"(?P<body>(?:(?!<!-- /?summarize)[\s\S])*?)\n?(<!-- /summarize -->)")


def mtd_record(name: str) -> dict:
    return json.loads((MTD / f"{name}.json").read_text())


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _epochs(record: dict) -> str:
    """The recipe's epochs, or 'N of M' for a run read before its last epoch."""
    trained = record.get("epochs_trained", record["epochs"])
    return str(trained) if trained == record["epochs"] else f"{trained} of {record['epochs']}"


def _model(config: dict) -> str:
    """What distinguishes the network: the backbone and its pyramid levels, or DRAEM's
    widths and texture source."""
    model = config["model"]
    if "backbone" in model:
        text = model["backbone"]
        if model.get("strides"):
            text += f", strides {'/'.join(map(str, model['strides']))}"
        if model.get("map_strides"):
            text += f", map {'/'.join(map(str, model['map_strides']))}"
        # the method's own options; the backbone, the levels (STPM's phrases) and the
        # score are written above and below, in this table's words
        levels = STPM.option_phrases(model)
        for phrase in METHODS[config["method"]].option_phrases(model):
            if phrase not in levels:
                text += f", {phrase}"
        if model.get("image_score", "max") == "mean":
            text += ", score = mean"
        elif model.get("score_window", 1) != 1:
            text += f", window {model['score_window']}"
        if config.get("map_normalization", "none") != "none":
            text += f", normalised per {config['map_normalization']}"
        if config.get("retuned_from"):
            text += f", retuned from {Path(config['retuned_from']).name}"
        return text
    return (f"widths {model['base_width']}/{model['disc_base_width']}, "
            f"source {model.get('anomaly_source') or 'builtin'}")


def _lr(recipe: dict) -> str:
    """Learning rate and its schedule, e.g. '0.4, x0.1 at 80/90%'."""
    if not recipe["lr_milestones"]:
        return f"{recipe['lr']:g}"
    at = "/".join(f"{100 * f:g}" for f in recipe["lr_milestones"])
    return f"{recipe['lr']:g}, x{recipe['lr_gamma']:g} at {at}%"


def _augment(recipe: dict) -> str:
    kind = recipe.get("augment", "none")
    return "" if kind == "none" else f", augment {kind}"


def accuracy_table() -> str:
    lines = ["| run | method | model | input | epochs (kept) | batch | lr | image AUROC "
             "| pixel AUROC | AUPRO | F1-max | train ms/img | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(MTD.glob("*.json")):
        record = json.loads(path.read_text())
        m, config = record["metrics"], record["config"]
        lines.append(
            f"| {record['name']} | {config['method']} | {_model(config)} "
            f"| {describe_geometry(config['geometry'])}{_augment(config['recipe'])} "
            f"| {_epochs(record)} ({record['best_epoch']}) | {config['recipe']['batch_size']} "
            f"| {_lr(config['recipe'])} | {_fmt(m['image_auroc'])} "
            f"| {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
            f"| {_fmt(m['image_f1_max'])} | {record['train_ms_per_image']} "
            f"| `{record['command']}` |")
    return "\n".join(lines)


def per_type_table() -> str:
    records = [json.loads(p.read_text()) for p in sorted(MTD.glob("*.json"))]
    records = [r for r in records if r.get("per_defect_type_image_auroc")]
    if not records:
        return ""
    types = sorted(records[0]["per_defect_type_image_auroc"])
    lines = ["| run | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for r in records:
        values = r["per_defect_type_image_auroc"]
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(values.get(t)) for t in types) + " |")
    return "\n".join(lines)


def _machine(record: dict) -> str:
    """Which machine a result file was measured on, in one line."""
    machine = record.get("machine")
    if not isinstance(machine, dict) or "isa" not in machine:
        return ("Machine: not recorded (measured before anomap recorded the CPU; earlier "
                "machines of this project were Intel CPUs with VNNI)")
    load = machine.get("load_average_1_5_15_min")
    return f"Machine: {machine_line(machine)}" + (f"; load average {load[0]} at the end"
                                                  if load else "")


def speed_table(path: Path) -> str:
    """Inference rows (model x precision x batch), then one training row per model."""
    record = json.loads(path.read_text())
    lines = [_machine(record), "",
             f"Device: {record['device']}, {record['size']}x{record['size']}"]
    if any(e["inference"] for e in record["results"].values()):
        lines += ["", "| model | GFLOP/img | precision | batch | model img/s "
                  "| end-to-end img/s | GFLOP/s (model / e2e) |", "|---|---|---|---|---|---|---|"]
    for name, e in record["results"].items():
        for row in e["inference"]:
            lines.append(
                f"| {name} | {e['gflops_per_image']} | {row['precision']} | {row['batch']} "
                f"| {row['model_images_per_second']} | {row['end_to_end_images_per_second']} "
                f"| {row['model_gflop_per_second']} / {row['end_to_end_gflop_per_second']} |")
    # older files predate the frozen-target cache: no column for it
    cached = any("train_ms_per_image_uncached" in e for e in record["results"].values())
    lines += ["", "| model | train batch | train ms/img | train samples/s "
              + ("| train ms/img, frozen targets recomputed every step " if cached else "")
              + "| synthetic anomalies samples/s (p 0.5 / 1) |",
              "|---|---|---|---|---|" + ("---|" if cached else "")]
    for name, e in record["results"].items():
        synth = (f"{e['synthesis_samples_per_second_p0.5']} / "
                 f"{e['synthesis_samples_per_second_p1.0']}"
                 if "synthesis_samples_per_second_p0.5" in e else "")
        lines.append(f"| {name} | {e['train_batch']} | {e['train_ms_per_image']} "
                     f"| {e['train_samples_per_second']} "
                     + (f"| {e.get('train_ms_per_image_uncached', '')} " if cached else "")
                     + f"| {synth} |")
    return "\n".join(lines)


def score_window_table() -> str:
    """Image AUROC per image-score window, one row per trained run
    (``benchmarks/score_window.py``)."""
    lines: list[str] = []
    for path in sorted(DIAGNOSTICS.glob("score_window*.json")):
        for run, entry in json.loads(path.read_text())["runs"].items():
            windows = entry["windows"]
            if not lines:
                lines = ["| data | run | " + " | ".join(f"window {w}" for w in windows)
                         + " | 21 vs 1 |", "|---|---|" + "---|" * (len(windows) + 1)]
            values = {w: v["image_auroc"] for w, v in windows.items()}
            gain = (f"{values['21'] - values['1']:+.3f}" if {"1", "21"} <= set(values) else "")
            lines.append(f"| {path.stem.removeprefix('score_window_')} | {run} | "
                         + " | ".join(_fmt(v) for v in values.values()) + f" | {gain} |")
    return "\n".join(lines)


def precision_table() -> str:
    """float32 against bfloat16 on trained runs (``benchmarks/precision.py``)."""
    lines: list[str] = []
    for path in sorted(DIAGNOSTICS.glob("precision*.json")):
        for run, e in json.loads(path.read_text())["runs"].items():
            if not lines:
                lines = ["| run | image AUROC fp32 / bf16 | pixel AUROC | AUPRO | F1-max "
                         "| score change median / max | verdicts changed |",
                         "|---|---|---|---|---|---|---|"]
            pairs = [f"{e['fp32'][k]:.3f} / {e['bf16'][k]:.3f}"
                     for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")]
            change = e["score_relative_change"]
            lines.append(f"| {run} | " + " | ".join(pairs)
                         + f" | {change['median']:.1%} / {change['max']:.1%} "
                         f"| {e['verdicts_changed']} of {e['n_images']} |")
    return "\n".join(lines)


#: interleaved one-sitting runs of ``speed.py --models stpm:efficientnet_lite0 --precisions
#: fp32``, in the order run (N_...): before = commit f61472a, system_malloc =
#: ANOMAP_SYSTEM_MALLOC=1, after = this code
BEFORE_AFTER = DIAGNOSTICS / "speed_before_after"


def before_after_table() -> str:
    """Lite0 STPM float32 speed before and after the padding/allocator changes."""
    lines: list[str] = []
    for path in sorted(BEFORE_AFTER.glob("*.json"), key=lambda p: int(p.stem.split("_")[0])):
        e = json.loads(path.read_text())["results"]["stpm:efficientnet_lite0"]
        rows = {r["batch"]: r for r in e["inference"] if r["precision"] == "fp32"}
        if not lines:
            lines = ["| run | " + " | ".join(f"batch {b} model / e2e img/s" for b in rows)
                     + " | train ms/img |", "|---|" + "---|" * (len(rows) + 1)]
        lines.append(f"| {path.stem} | " + " | ".join(
            f"{r['model_images_per_second']} / {r['end_to_end_images_per_second']}"
            for r in rows.values()) + f" | {e['train_ms_per_image']} |")
    return "\n".join(lines)


def _evidence(name: str, here: Path) -> str:
    """mtd/<name>.json relative to the page in ``here``, for a markdown link."""
    up = "../" * len(here.relative_to(REPOSITORY).parts)
    return up + (MTD / f"{name}.json").relative_to(REPOSITORY).as_posix()


def _link(name: str, here: Path) -> str:
    return f"[{name}]({_evidence(name, here)})"


@dataclass(frozen=True)
class Row:
    """One curated row: a label a reader understands and the MTD record behind it."""

    label: str
    name: str
    max_name: str | None = None  # FractalAD: the same run read with the max as image score
    note: str = ""
    speed: tuple[str, str] | None = None  # (speed/<file>.json, model key): one-sitting speed


def _recorded(rows: list[Row]) -> Iterator[tuple[Row, dict]]:
    """The curated rows whose MTD record exists, each with its record."""
    for row in rows:
        if (MTD / f"{row.name}.json").exists():
            yield row, mtd_record(row.name)


def _end_to_end(row: Row, record: dict) -> str:
    """Batch-8 end-to-end images/s from a one-sitting speed file when the row names one,
    else what ``anomap test`` measured (marked: other jobs may have shared the CPU)."""
    if row.speed is None:
        return f"{record['metrics']['images_per_second']:.1f} †"
    file, key = row.speed
    entry = json.loads((SPEED / f"{file}.json").read_text())["results"][key]
    b8 = next(r for r in entry["inference"] if r["batch"] == 8 and r["precision"] == "fp32")
    return f"{b8['end_to_end_images_per_second']:.1f}"


#: FractalAD's paper recipe, one 100-epoch run read at the epochs ``snapshot_epochs.py``
#: kept (``..._e100_at<N>``): the full recipe did not fit in a session here
FRACTALAD_LONG_RUN = "fractalad_lite0_e100_at"


def fractalad_long_run_epochs() -> list[tuple[int, str]]:
    """(epoch, record name) of every reading of the long run, the earliest first."""
    return sorted((int(path.stem.removeprefix(FRACTALAD_LONG_RUN)), path.stem)
                  for path in MTD.glob(f"{FRACTALAD_LONG_RUN}*.json"))


#: its latest reading: the closest to the full recipe measured
FRACTALAD_LONGEST = (fractalad_long_run_epochs() or [(0, "fractalad_lite0_e10")])[-1][1]

#: the README's results table: MTD, one row per method and recipe (¹ ² ³ are the
#: README's footnotes: settings chosen after seeing the test split, and so on)
README_ROWS = [
    Row("STPM, paper recipe as first built ³", "stpm_lite0_letterbox_e100",
        speed=("speed_methods", "stpm:efficientnet_lite0")),
    Row("STPM, `--preset large-defects` ¹",
        "stpm_lite0_strides8-32_b8_e100_lr-step80-90_map32_mean_position"),
    Row("STPM, `--preset large-defects`, 300 epochs ¹",
        "stpm_lite0_strides8-32_b8_e300_lr-step80-90_map32_mean_position"),
    Row("DRAEM, `--preset cpu` (128 px, narrow networks)", "draem_cpu",
        speed=("speed_128", "draem:cpu")),
    Row("RSTPM, paper recipe as first built (Lite1 second teacher) ³", "rstpm_lite0-lite1_e100",
        speed=("speed_methods", "rstpm:paper")),
    Row("FractalAD, paper recipe as first built, stopped before its last epoch ³",
        FRACTALAD_LONGEST,
        speed=("speed_methods", "fractalad:paper")),
    Row("STPM, paper recipe as first built ³", "stpm_lite0_e10",
        speed=("speed_methods", "stpm:efficientnet_lite0")),
    Row("STPM, `--preset paper-lite`", "stpm_paper-lite_e10",
        speed=("speed_methods", "stpm:efficientnet_lite0")),
    Row("RSTPM, paper recipe as first built ³", "rstpm_lite0-lite1_e10",
        speed=("speed_methods", "rstpm:paper")),
    Row("RSTPM, `--preset paper-lite`", "rstpm_paper-lite_e10",
        speed=("speed_methods", "rstpm:paper")),
    Row("FractalAD, paper recipe as first built ³", "fractalad_lite0_e10",
        speed=("speed_methods", "fractalad:paper")),
    Row("FractalAD, `--preset paper-lite` (10 epochs of 391 samples)", "fractalad_paper-lite_e10"),
    Row("FractalAD, `--distillation off` ²", "fractalad_lite0_nodistill_e10"),
    Row("FractalAD, `--preset cpu` (the paper's recipe as first built, 30 passes) ³",
        "fractalad_lite0_preset-cpu", speed=("speed_methods", "fractalad:paper")),
]


def readme_results(here: Path = REPOSITORY) -> str:
    lines = ["| MTD, Lite0 teacher, 256 px letterbox, seed 0 | epochs | image AUROC | pixel AUROC "
             "| AUPRO | training min | img/s end to end, batch 8 | evidence |",
             "|---|---|---|---|---|---|---|---|"]
    for row, r in _recorded(README_ROWS):
        m = r["metrics"]
        lines.append(f"| {row.label} | {_epochs(r)} | {_fmt(m['image_auroc'])} "
                     f"| {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
                     f"| {r['train_seconds'] / 60:.0f} | {_end_to_end(row, r)} "
                     f"| {_link(row.name, here)} |")
    return "\n".join(lines)


#: method -> (what it learns, use it for, its CPU preset, paper-recipe record, other-preset record)
METHOD_ROWS = {
    "stpm": ("a student copies a frozen ImageNet teacher's feature pyramid on normal images; "
             "where they disagree is the anomaly",
             "the default: fast, small defects; `--preset large-defects` for large, "
             "low-contrast ones on textures", "`paper-lite` runs in minutes",
             "stpm_lite0_letterbox_e100",
             "stpm_lite0_strides8-32_b8_e100_lr-step80-90_map32_mean_position"),
    "rstpm": ("STPM's pair plus a second teacher (Lite1) whose pyramid a decoder rebuilds "
              "from teacher 1's deepest features, with attention gates; six maps fused",
              "more accuracy than STPM at 2-3x its cost", "`paper-lite`",
              "rstpm_lite0-lite1_e100", None),
    "fractalad": ("pastes fractal-shaped patches of each image into itself and segments them "
                  "from where a student stops matching a frozen teacher",
                  "objects and textures; learns what a defect looks like",
                  "`cpu`: 30 passes over the images",
                  FRACTALAD_LONGEST, "fractalad_lite0_preset-cpu"),
    "draem": ("a network paints synthetic defects away; a U-Net segments where input and "
              "reconstruction differ", "nothing pretrained allowed; a GPU for the paper recipe",
              "`cpu` (narrow, 128 px, 25 epochs)", None, "draem_cpu"),
}


def methods_table(here: Path = REPOSITORY) -> str:
    lines = ["| method | what it learns | use it for | on a CPU | MTD image AUROC: paper recipe "
             "as first built, Lite teachers / other preset |", "|---|---|---|---|---|"]
    for method, (learns, use, cpu, paper, best) in METHOD_ROWS.items():
        cells = []
        for name in (paper, best):
            if name is None or not (MTD / f"{name}.json").exists():
                cells.append("-")
                continue
            r = mtd_record(name)
            cells.append(f"[{_fmt(r['metrics']['image_auroc'])}]({_evidence(name, here)}) "
                         f"({_epochs(r)} epochs)")
        lines.append(f"| `{method}` | {learns} | {use} | {cpu} | {' / '.join(cells)} |")
    return "\n".join(lines)


def _synthetic_check(name: str) -> str:
    path = DIAGNOSTICS / "synthetic_check_mtd.json"
    entry = json.loads(path.read_text())["runs"].get(name) if path.exists() else None
    if entry is None:
        return "-"
    return f"{entry['synthetic_image_auroc']:.3f} / {entry['synthetic_pixel_auroc']:.3f}"


RSTPM_ROWS = [
    Row("STPM alone (levels 4/8/16), seed 0", "stpm_lite0_e10"),
    Row("STPM alone, seed 1", "stpm_lite0_e10_seed1"),
    Row("RSTPM seed 0 read as pair 1 only (`--fusion pair1`: the STPM inside the run)",
        "rstpm_lite0-lite1_e10_pair1"),
    Row("RSTPM seed 1 read as pair 1 only", "rstpm_lite0-lite1_e10_seed1_pair1"),
    Row("**RSTPM default** (pair 2 Lite1, attention, normal images, level-sum), seed 0",
        "rstpm_lite0-lite1_e10"),
    Row("**RSTPM default**, seed 1", "rstpm_lite0-lite1_e10_seed1"),
    Row("1. pair 2's teacher the same network as pair 1's (Lite0)", "rstpm_lite0-lite0_e10"),
    Row("1. pair 2's teacher Lite2", "rstpm_lite0-lite2_e10"),
    Row("2. no attention (`--attention off`)", "rstpm_lite0-lite1_noattn_e10"),
    Row("3. pair 2 on synthetic anomalies (`--pair2-training synthetic`)",
        "rstpm_lite0-lite1_synthetic_e10"),
    Row("4. fusion: product of all six (`anomap retune --fusion product`)",
        "rstpm_lite0-lite1_e10_product"),
    Row("4. fusion: pair-sum", "rstpm_lite0-lite1_e10_pair-sum"),
    Row("4. pair 2 alone (`--fusion pair2`)", "rstpm_lite0-lite1_e10_pair2"),
]


RSTPM_PAPER_LENGTH = [
    Row("STPM alone, paper recipe (levels 4/8/16)", "stpm_lite0_letterbox_e100"),
    Row("RSTPM read as pair 1 only (`--fusion pair1`)", "rstpm_lite0-lite1_e100_pair1"),
    Row("**RSTPM default**", "rstpm_lite0-lite1_e100"),
]


def rstpm_ablation(here: Path = REPOSITORY, rows: list[Row] = RSTPM_ROWS) -> str:
    lines = ["| row (seed 0 unless said) | synthetic check: image / pixel AUROC | test: image "
             "AUROC | pixel AUROC | AUPRO | training, ms per image | command |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        r = mtd_record(row.name)
        m = r["metrics"]
        lines.append(f"| {row.label} | {_synthetic_check(row.name)} | {_fmt(m['image_auroc'])} "
                     f"| {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
                     f"| {r['train_ms_per_image']} | `{r['command']}` |")
    return "\n".join(lines)


FRACTALAD_ROWS = [
    Row("FractalAD, distillation on (the paper's setting for objects)", "fractalad_lite0_e10",
        "fractalad_lite0_e10_max"),
    Row("FractalAD, `--distillation off` (the paper's setting for textures; MTD is one)",
        "fractalad_lite0_nodistill_e10", "fractalad_lite0_nodistill_e10_max"),
    Row("FractalAD, `--anomalies perlin` (DRAEM's anomalies instead of the fractal patches; "
        "distillation on)", "fractalad_lite0_perlin_e10", note=" (another job shared the CPU)"),
    Row("FractalAD, `--preset cpu`: the paper's recipe for 30 epochs", "fractalad_lite0_preset-cpu",
        note=" (shared the CPU part of the time)"),
]


def fractalad_ablation(here: Path = REPOSITORY) -> str:
    lines = ["| | image AUROC, score = mean / max | pixel AUROC | AUPRO | training ms per image "
             "| command |", "|---|---|---|---|---|---|"]
    for row in FRACTALAD_ROWS:
        r = mtd_record(row.name)
        m = r["metrics"]
        by_max = (_fmt(mtd_record(row.max_name)["metrics"]["image_auroc"])
                  if row.max_name else "-")
        lines.append(f"| {row.label} | {_fmt(m['image_auroc'])} / {by_max} "
                     f"| {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
                     f"| {r['train_ms_per_image']}{row.note} | `{r['command']}` |")
    return "\n".join(lines)


def fractalad_length(here: Path = REPOSITORY) -> str:
    lines = ["| | epochs | image AUROC | pixel AUROC | AUPRO | training loss, last epoch "
             "| evidence |", "|---|---|---|---|---|---|---|"]
    rows = [("a 10-epoch run", "fractalad_lite0_e10"),
            ("a 30-epoch run (`--preset cpu`)", "fractalad_lite0_preset-cpu"),
            *((f"the 100-epoch run at epoch {epoch}", name)
              for epoch, name in fractalad_long_run_epochs())]
    for label, name in rows:
        r = mtd_record(name)
        m = r["metrics"]
        lines.append(f"| {label} | {_epochs(r)} | {_fmt(m['image_auroc'])} "
                     f"| {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
                     f"| {r['curve']['loss'][-1]:.3f} | {_link(name, here)} |")
    return "\n".join(lines)


def runtimes_table(run: str) -> str:
    """One trained run through every runtime (``benchmarks/runtimes.py``)."""
    record = json.loads((SPEED / "runtimes.json").read_text())
    entry = record[run]
    lines = [_machine(record), "",
             "| runtime | precision | model img/s b1 | model img/s b8 | end to end b8, same "
             "thread | end to end b8, decode pool | GFLOP/s (b8 model) | peak RSS MiB "
             "| image AUROC | pixel AUROC | AUPRO |", "|---" * 11 + "|"]
    for variant, e in entry.items():
        runtime, precision = variant.split("-")
        b1, b8 = e["batches"]
        lines.append(
            f"| {runtime} | {precision} | {b1['model_images_per_second']:.1f} "
            f"| {b8['model_images_per_second']:.1f} | {b8['end_to_end_images_per_second']:.1f} "
            f"| {e['inspection_batch8_images_per_second']:.1f} "
            f"| {b8['model_gflop_per_second']:.1f} | {e['peak_rss_mib']:.0f} "
            f"| {e['image_auroc']:.4f} | {e['pixel_auroc']:.4f} | {e['aupro']:.4f} |")
    return "\n".join(lines)


def int8_table(path: Path) -> str:
    """int8 against fp32 for every method (``benchmarks/int8_check.py``)."""
    record = json.loads(path.read_text())
    start = record["machine"].get("load_average_1_5_15_min")
    end = record.get("machine_at_end", {}).get("load_average_1_5_15_min")
    lines = [f"Machine: {machine_line(record['machine'])}"
             + (f"{', GPU ' + record['machine']['gpu'] if record['machine'].get('gpu') else ''}")
             + (f"; load average {start[0]} at the start, {end[0]} at the end"
                if start and end else ""), "",
             "| method | epochs | variant | image AUROC | pixel AUROC | AUPRO "
             "| good test images failed | model img/s | end to end img/s | export check "
             "| probe here |", "|---" * 11 + "|"]
    for method, entry in record["methods"].items():
        for variant in ("torch-fp32", "onnxruntime-fp32", "openvino-fp32", "onnxruntime-int8",
                        "openvino-int8"):
            row = entry.get(variant)
            if not row or "skipped" in row:
                continue
            runtime, kind = variant.split("-")
            own = (entry.get(f"{kind}_agreement") or {}).get(runtime, {})
            check = ("" if variant == "torch-fp32" else
                     "refused (measured unchecked)" if entry.get(f"{kind}_refused") else
                     "failed for this runtime; accepted for the other" if own.get(
                         "passed") is False else "passed")
            probe = ("" if variant == "torch-fp32" else
                     "refused" if row.get("probe_refused") else
                     f"passed, {row['probe']['seconds']:.2f} s")
            lines.append(
                f"| {method} | {entry['epochs']} | {variant} | {row['image_auroc']:.3f} "
                f"| {row['pixel_auroc']:.3f} | {row['aupro']:.3f} "
                f"| {row['good_test_images_failed']} of {row['n_good_test_images']} "
                f"| {row['model_images_per_second']:.1f} | {row['images_per_second']:.1f} "
                f"| {check} | {probe} |")
    return "\n".join(lines)


def _runtime_runs() -> list[str]:
    path = SPEED / "runtimes.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    return [key for key, value in record.items() if isinstance(value, dict)
            and key != "machine"]


#: docs/papers.md: each preset change against the recipe it replaced (MTD, Lite teachers,
#: 10 epochs, seed 0); a row whose JSON is absent is left out
PAPER_ROWS = [
    Row("STPM, the paper recipe as first built: loss x1/2, lowest mean held-out score",
        "stpm_paper-lite_old-loss-selection_e10"),
    Row("STPM, the same recipe recorded before (earlier code; its JSON names no CPU)",
        "stpm_lite0_e10"),
    Row("STPM, `--preset paper-lite`: the official loss (no 1/2) and selection "
        "(lowest mean held-out map)", "stpm_paper-lite_e10"),
    Row("RSTPM (Lite0 + Lite1), the paper recipe as first built (earlier code; no CPU named)",
        "rstpm_lite0-lite1_e10"),
    Row("RSTPM, `--preset paper-lite`", "rstpm_paper-lite_e10"),
    Row("RSTPM, `--preset paper-lite --discriminator on` (width 16, 10 epochs after the "
        "students, about 36 min more as run, not in the minutes column)",
        "rstpm_paper-lite_discriminator_e10"),
    Row("FractalAD (Lite0), the paper recipe as first built: 10 passes over the 610 "
        "images, distillation on, 20% held out (earlier code; no CPU named)",
        "fractalad_lite0_e10"),
    Row("FractalAD, `--preset paper-lite`: 10 epochs of 391 samples, distillation and "
        "foreground decided (off: a texture), head weight decay 0.01, shared jitter, "
        "pasted at 2x, every image trained on", "fractalad_paper-lite_e10"),
    Row("DRAEM, `--preset cpu` for 5 epochs, 20% held out (earlier code; no CPU named)",
        "draem_cpu_e5"),
    Row("DRAEM, the same on every normal image (`--val-fraction 0`, as `paper` does)",
        "draem_cpu_e5_all-normals"),
]


def papers_table(here: Path = REPOSITORY) -> str:
    lines = ["| MTD, seed 0, Lite teachers, 10 epochs unless said | image AUROC | pixel AUROC "
             "| AUPRO | training min, as run | command |", "|---|---|---|---|---|---|"]
    for row, r in _recorded(PAPER_ROWS):
        m = r["metrics"]
        lines.append(f"| {row.label} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} "
                     f"| {_fmt(m['aupro'])} | {r['train_seconds'] / 60:.0f} "
                     f"| `{r['command']}` |")
    return "\n".join(lines)


def tables() -> dict[str, Callable[[Path], str]]:
    """Every generated table by the name its block carries; each takes the folder of the
    page it is written into (for relative links)."""
    named: dict[str, Callable[[Path], str]] = {
        "readme-results": readme_results, "methods": methods_table,
        "rstpm-ablation": rstpm_ablation, "fractalad-ablation": fractalad_ablation,
        "papers-mtd": papers_table,
        "fractalad-length": fractalad_length,
        "rstpm-paper-length": lambda here: rstpm_ablation(here, RSTPM_PAPER_LENGTH),
        "all-runs": lambda here: accuracy_table(), "per-type": lambda here: per_type_table(),
        "score-window": lambda here: score_window_table(),
        "precision": lambda here: precision_table(),
        "speed-before-after": lambda here: before_after_table()}
    for run in _runtime_runs():
        named[f"runtimes/{run}"] = lambda here, run=run: runtimes_table(run)
    for path in sorted(SPEED.glob("int8_check*.json")):
        named[f"int8/{path.stem}"] = lambda here, path=path: int8_table(path)
    for path in sorted(SPEED.glob("speed*.json")):
        named[f"speed/{path.stem}"] = lambda here, path=path: speed_table(path)
    return named


def pages() -> list[Path]:
    return [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").rglob("*.md"))]


def refreshed(page: Path) -> tuple[str, list[str]]:
    """The page with every block regenerated, and the names of the blocks that changed.
    An unknown block name is an error, so a renamed table cannot silently go stale."""
    text = page.read_text()
    named = tables()
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in named:
            raise KeyError(f"{page}: no table named {name!r} (known: {', '.join(named)})")
        body = named[name](page.parent)
        if body != match["body"]:
            changed.append(name)
        return match.group(1) + body + "\n" + match.group(4)

    return BLOCK.sub(replace, text), changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="refresh the blocks in place")
    action.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    args = parser.parse_args()
    if not (args.write or args.check):
        for name, make in tables().items():
            print(f"<!-- summarize: {name} -->\n{make(REPOSITORY)}\n")
        return 0
    stale = []
    for page in pages():
        text, changed = refreshed(page)
        stale += [f"{page.relative_to(REPOSITORY)}: {name}" for name in changed]
        if args.write and changed:
            page.write_text(text)
    print("\n".join(stale) or "every table is current")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

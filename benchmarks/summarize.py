"""Print the tables of docs/mtd.md and docs/speed.md (markdown) from benchmarks/results/*.json.

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

from anomap.data import describe_geometry
from anomap.methods import METHODS

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _model(config: dict) -> str:
    """What distinguishes the network: the backbone and its pyramid levels, or DRAEM's
    widths and texture source."""
    model = config["model"]
    if "backbone" in model:
        text = f"{model['backbone']}, strides {'/'.join(map(str, model['strides']))}"
        if model.get("map_strides"):
            text += f", map {'/'.join(map(str, model['map_strides']))}"
        for phrase in METHODS[config["method"]].describe_options(model):
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
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        if "metrics" not in record:  # speed files
            continue
        m, config = record["metrics"], record["config"]
        lines.append(
            f"| {record['name']} | {config['method']} | {_model(config)} "
            f"| {describe_geometry(config['geometry'])}{_augment(config['recipe'])} "
            f"| {record['epochs']} ({record['best_epoch']}) | {config['recipe']['batch_size']} "
            f"| {_lr(config['recipe'])} | {_fmt(m['image_auroc'])} "
            f"| {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
            f"| {_fmt(m['image_f1_max'])} | {record['train_ms_per_image']} "
            f"| `{record['command']}` |")
    return "\n".join(lines)


def per_type_table() -> str:
    records = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    records = [r for r in records if r.get("per_defect_type_image_auroc")]
    if not records:
        return ""
    types = sorted(records[0]["per_defect_type_image_auroc"])
    lines = ["| run | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for r in records:
        values = r["per_defect_type_image_auroc"]
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(values.get(t)) for t in types) + " |")
    return "\n".join(lines)


def speed_table(path: Path) -> str:
    """Inference rows (model x precision x batch), then one training row per model."""
    record = json.loads(path.read_text())
    lines = [f"Device: {record['device']}, {record['size']}x{record['size']}"]
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
    for path in sorted((RESULTS / "diagnostics").glob("score_window*.json")):
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
    for path in sorted((RESULTS / "diagnostics").glob("precision*.json")):
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
BEFORE_AFTER = RESULTS / "diagnostics" / "speed_before_after"


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


if __name__ == "__main__":
    speed = [speed_table(path) for path in sorted(RESULTS.glob("speed*.json"))]
    for table in (accuracy_table(), per_type_table(), score_window_table(),
                  precision_table(), before_after_table(), *speed):
        if table:
            print(table, end="\n\n")

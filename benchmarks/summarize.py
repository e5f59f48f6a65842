"""Print the README's result tables (markdown) from benchmarks/results/*.json.

    python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def accuracy_table() -> str:
    lines = ["| run | backbone | resize | epochs (best) | image AUROC | pixel AUROC | AUPRO "
             "| F1-max | train ms/img | command |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        if "metrics" not in record:
            continue
        m, config = record["metrics"], record["config"]
        lines.append(
            f"| {record['name']} | {config['model'].get('backbone')} "
            f"| {config['geometry']['mode']} | {record['epochs']} ({record['best_epoch']}) "
            f"| {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} "
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


def speed_table() -> str:
    path = RESULTS / "speed.json"
    if not path.is_file():
        return ""
    record = json.loads(path.read_text())
    lines = [f"Device: {record['device']}, {record['size']}x{record['size']}, "
             f"`{record['command']}`", "",
             "| backbone | GFLOP/img | model img/s b1 | model img/s b32 | end-to-end img/s b1 "
             "| end-to-end img/s b32 | GFLOP/s (e2e b32) | train ms/img b32 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in record["results"].items():
        lines.append(
            f"| {name} | {e['gflops_per_image']} | {e['model_images_per_second_b1']} "
            f"| {e['model_images_per_second_b32']} | {e['end_to_end_images_per_second_b1']} "
            f"| {e['end_to_end_images_per_second_b32']} | {e['end_to_end_gflop_per_second_b32']} "
            f"| {e['train_ms_per_image_b32']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for table in (accuracy_table(), per_type_table(), speed_table()):
        if table:
            print(table, end="\n\n")

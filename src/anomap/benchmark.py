"""``anomap benchmark``: a paper's table in one command.

Every category folder under a root is trained and tested in turn with one
method and plan, each in its own run folder under the output; a category
whose row is written is done, and a killed benchmark resumes where it
stopped (the unfinished category's run resumes from its last epoch). The
table, per category and the mean, goes out as JSON, Markdown and an HTML
page linking each category's report, beside the published numbers
(``published.json``) and our difference from them.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from anomap.data import PLAIN_DEFECTS, PLAIN_MASKS, PLAIN_TEST_NORMALS, VISA_SPLIT, layout_of
from anomap.evaluate import evaluate_run
from anomap.files import save_json, save_text
from anomap.run import LoadSettings
from anomap.runfolder import CONFIG_FILE, DataSource, load_history, load_json
from anomap.train import TrainingPlan, fit

log = logging.getLogger(__name__)

#: one category's finished row, in its run folder: present = the category is done
ROW_FILE = "benchmark_row.json"
TABLE_JSON, TABLE_MARKDOWN, TABLE_HTML = "benchmark.json", "benchmark.md", "benchmark.html"
MVTEC_AD_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                       "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor",
                       "wood", "zipper")
#: the table's columns: key, heading, and whether published tables have it (in percent)
COLUMNS = (("image_auroc", "image AUROC", True), ("pixel_auroc", "pixel AUROC", True),
           ("aupro", "AUPRO", True), ("train_seconds", "training s", False),
           ("images_per_second", "images/s", False))


@dataclass(frozen=True)
class Benchmark:
    """What to run: every category under ``root`` (or those named) with one
    method and plan, written under ``out``."""

    root: Path
    method: str
    out: Path
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    categories: tuple[str, ...] | None = None
    val_fraction: float | None = None  # None: the preset's
    device: str = "auto"
    progress: bool = True


def find_categories(root: Path, wanted: tuple[str, ...] | None = None) -> list[Path]:
    """The category folders under ``root`` in a layout the data layer reads (``root``
    itself when it is one category); ``wanted`` must all exist."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    layout = layout_of(root)
    if layout in ("mvtec", "mvtec3d", "visa") or (layout == "folder"
                                                  and (root / PLAIN_DEFECTS).is_dir()):
        found = {root.name: root}
    else:
        skipped = {VISA_SPLIT.parts[0], PLAIN_DEFECTS, PLAIN_MASKS, PLAIN_TEST_NORMALS}
        found = {p.name: p for p in sorted(root.iterdir())
                 if p.is_dir() and not p.name.startswith(".") and p.name not in skipped
                 and layout_of(p) is not None}
    if wanted:
        missing = [name for name in wanted if name not in found]
        if missing:
            raise ValueError(f"{root}: no category {', '.join(missing)}; found: "
                             f"{', '.join(found) or 'none'}")
        return [found[name] for name in wanted]
    if not found:
        raise ValueError(f"{root}: no category folders in a known layout (MVTec AD, MVTec "
                         "3D-AD, VisA, MVTec LOCO or plain folders; see `anomap train --help`)")
    return list(found.values())


def run_category(bench: Benchmark, folder: Path) -> dict[str, Any]:
    """Train (or resume) and test one category; its row, written last."""
    run_dir = bench.out / folder.name
    row_path = run_dir / ROW_FILE
    if row_path.is_file():
        return load_json(row_path)
    resume = (run_dir / CONFIG_FILE).is_file()
    if resume:
        log.info("%s: resuming its run", folder.name)
    fit(bench.method, None if resume else DataSource(str(folder), bench.val_fraction),
        run_dir, bench.plan, device=bench.device, resume=resume, progress=bench.progress)
    result = evaluate_run(run_dir, settings=LoadSettings(device=bench.device),
                          progress=bench.progress)
    history = load_history(run_dir)
    row = {"category": folder.name, "layout": layout_of(folder),
           **{key: result.get(key) for key in ("image_auroc", "pixel_auroc", "aupro",
                                                 "images_per_second", "n_images")},
           "train_seconds": round(sum(float(h["seconds"]) for h in history), 1),
           "report": f"{folder.name}/report.html",
           "preset": load_json(run_dir / CONFIG_FILE).get("preset")}
    save_json(row, row_path)
    return row


def published(method: str, dataset: str = "mvtec_ad") -> dict[str, Any]:
    """The published table of ``method`` (in percent, with its sources), or {}."""
    text = resources.files("anomap").joinpath("published.json").read_text(encoding="utf-8")
    return json.loads(text).get(dataset, {}).get(method, {})


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None
              and not math.isnan(float(r[key]))]
    return sum(values) / len(values) if values else None


def build_table(bench: Benchmark, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, the mean row, and the published numbers beside ours (percent)."""
    paper = published(bench.method)
    mean = {"category": "mean", **{key: _mean(rows, key) for key, _, _ in COLUMNS}}
    for row in rows:
        row["published"] = {key: paper[key][row["category"]] for key, _, in_paper in COLUMNS
                            if in_paper and row["category"] in paper.get(key, {})}
    mean["published"] = {}
    names = {row["category"] for row in rows}
    for key, _, in_paper in COLUMNS:
        theirs = paper.get(key, {}) if in_paper else {}
        if rows and all(row["category"] in theirs for row in rows):  # the same categories
            mean["published"][key] = sum(theirs[n] for n in names) / len(names)
        elif names >= set(MVTEC_AD_CATEGORIES) and "mean" in theirs:  # means only
            mean["published"][key] = theirs["mean"]
    return {"method": bench.method, "root": str(bench.root), "plan": {
        "preset": bench.plan.preset, "model": {k: v for k, v in bench.plan.model.items()
                                               if v is not None},
        "recipe": {k: v for k, v in bench.plan.recipe.items() if v is not None},
        "seed": bench.plan.seed}, "rows": rows, "mean": mean,
        "published": {"paper": paper.get("paper"), "sources": paper.get("sources", {})}}


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key in ("train_seconds", "images_per_second"):
        return f"{value:.1f}"
    return f"{100 * value:.1f}"


def _against(row: dict[str, Any], key: str) -> str:
    """'ours (published, difference)' for a metric the paper reports."""
    ours = _cell(row.get(key), key)
    if key not in row.get("published", {}) or row.get(key) is None:
        return ours
    theirs = row["published"][key]
    return f"{ours} ({theirs:.1f}, {100 * row[key] - theirs:+.1f})"


def markdown(table: dict[str, Any]) -> str:
    lines = [f"# anomap benchmark: {table['method']} on {table['root']}", "",
             "Metrics in percent; in brackets the published number and our difference.", "",
             "| category | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for row in [*table["rows"], table["mean"]]:
        lines.append(f"| {row['category']} | " + " | ".join(
            _against(row, key) for key, _, _ in COLUMNS) + " |")
    paper = table["published"]
    if paper["paper"]:
        lines += ["", f"Published: {paper['paper']}."]
        lines += [f"- {key}: {text}" for key, text in paper["sources"].items()]
    return "\n".join(lines) + "\n"


def page(table: dict[str, Any]) -> str:
    """The table as one self-contained HTML page, each category linked to its report."""
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in COLUMNS)
    body = []
    for row in [*table["rows"], table["mean"]]:
        name = esc(row["category"])
        link = f'<a href="{esc(row["report"])}">{name}</a>' if "report" in row else name
        body.append(f"<tr><td>{link}</td>" + "".join(
            f"<td>{esc(_against(row, key))}</td>" for key, _, _ in COLUMNS) + "</tr>")
    paper = table["published"]
    sources = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in paper["sources"].items())
    said = (f"<p>Published: {esc(paper['paper'])}</p><ul>{sources}</ul>" if paper["paper"]
            else "<p>No published table for this method.</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>anomap benchmark: {esc(table['method'])}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}tr:last-child{{font-weight:bold}}
</style></head><body><h1>{esc(table['method'])} on {esc(table['root'])}</h1>
<p>Metrics in percent; in brackets the published number and our difference.
Plan: <code>{esc(json.dumps(table['plan']))}</code></p>
<table><tr><th>category</th>{head}</tr>{''.join(body)}</table>{said}</body></html>
"""


def run_benchmark(bench: Benchmark) -> dict[str, Any]:
    """Every category in turn (finished ones read back), then the table in three forms."""
    bench.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for folder in find_categories(bench.root, bench.categories):
        log.info("benchmark: %s", folder.name)
        rows.append(run_category(bench, folder))
    table = build_table(bench, rows)
    save_json(table, bench.out / TABLE_JSON)
    save_text(markdown(table), bench.out / TABLE_MARKDOWN)
    save_text(page(table), bench.out / TABLE_HTML)
    return table

"""``anomap compare``: trained runs side by side on the same test set, one page.

Each run must have been tested (``anomap test``: metrics.json and
predictions.csv). The page holds a metrics table, the ROC curves overlaid, the
detection and false-alarm rates per defect type at each run's own threshold,
and the test images on which the runs disagree most, a row per image with each
run's heat map. Scores of different methods live on different scales, so
disagreement is measured on ranks: each image's score as a percentile among
its run's scores; the rows are the images whose percentiles spread the most.
"""

from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from anomap import report
from anomap.data import load_image
from anomap.files import save_text
from anomap.run import Detector
from anomap.runfolder import SELECTION_FILE, RunError, load_json


def _tested(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    metrics_path, table = run / "metrics.json", run / "predictions.csv"
    if not metrics_path.is_file() or not table.is_file():
        raise RunError(f"{run}: not tested yet; run 'anomap test --run {run}' first")
    with table.open(newline="") as handle:
        rows = [{**row, "label": int(row["label"]), "score": float(row["score"])}
                for row in csv.DictReader(handle)]
    return load_json(metrics_path), rows


def _percentiles(scores: np.ndarray) -> np.ndarray:
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(len(scores))
    return ranks / max(len(scores) - 1, 1)


def _roc_overlay(names: list[str], tables: list[list[dict[str, Any]]]) -> bytes:
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = Figure(figsize=(4.6, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, rows in zip(names, tables, strict=True):
        labels = np.array([r["label"] for r in rows])
        scores = np.array([r["score"] for r in rows])
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, lw=2, label=f"{name} ({roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
    return report.style_roc(fig, ax)


def _png_uri(array: np.ndarray, box: int = 220) -> str:
    image = Image.fromarray(array)
    image.thumbnail((box, box))  # keeps the aspect ratio
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return report._data_uri(buffer.getvalue(), "image/png")


def compare_runs(runs: list[str | Path], out: str | Path, *, names: list[str] | None = None,
                 n_images: int = 12, device: str = "auto") -> Path:
    """Write the comparison page of ``runs`` to ``out`` and return its path."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    names = names or [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"two runs share a name ({', '.join(names)}): label them NAME=RUN")
    tested = [_tested(r) for r in runs]
    metrics = [m for m, _ in tested]
    common = set.intersection(*({row["path"] for row in rows} for _, rows in tested))
    if not common:
        raise ValueError("the runs were tested on different images: nothing to compare")
    tables = [[row for row in rows if row["path"] in common] for _, rows in tested]
    for rows in tables:
        rows.sort(key=lambda row: row["path"])
    paths = [row["path"] for row in tables[0]]

    head = ("<tr><th>run</th><th>method</th><th>settings</th><th>image AUROC</th>"
            "<th>pixel AUROC</th><th>AUPRO</th><th>F1-max</th><th>threshold</th>"
            "<th>images/s</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(str(m.get('method')))}</td>"
        f"<td>{html.escape(str(m.get('settings', '')))}</td>"
        + "".join(f"<td>{report._fmt(m.get(k))}</td>" for k in (
            "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "threshold",
            "images_per_second")) + "</tr>"
        for n, m in zip(names, metrics, strict=True))

    types = sorted({row["defect_type"] for row in tables[0]})
    type_rows = []
    for kind in types:
        cells = []
        for rows, m in zip(tables, metrics, strict=True):
            chosen = [r for r in rows if r["defect_type"] == kind]
            hits = sum(r["score"] >= m["threshold"] for r in chosen)
            cells.append(f"<td>{hits}/{len(chosen)} ({hits / max(len(chosen), 1):.0%})</td>")
        label = "good (false alarms)" if kind == "good" else f"{kind} (found)"
        type_rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")

    ranks = np.stack([_percentiles(np.array([r["score"] for r in rows])) for rows in tables])
    spread = ranks.max(axis=0) - ranks.min(axis=0)
    worst = np.argsort(-spread, kind="stable")[:n_images]
    detectors = [Detector.load(run, device) for run in runs]
    gallery = []
    for index in worst:
        path = paths[index]
        decoded = load_image(path)
        photo = np.asarray(decoded)
        cells = []
        for detector, run_ranks in zip(detectors, ranks, strict=True):
            prediction = detector.predict(decoded)[0]
            picture = report.overlay(photo, prediction.anomaly_map, *detector.display_range,
                                     pred_mask=prediction.mask)
            cells.append(f"<td><img src='{_png_uri(picture)}' alt='heat map'><br>"
                         f"score {prediction.score:.4g} <b class='{prediction.verdict}'>"
                         f"{prediction.verdict}</b> (rank {run_ranks[index]:.0%})"
                         "</td>")
        label = tables[0][index]
        gallery.append(f"<tr><td>{html.escape(Path(path).name)}<br>"
                       f"{html.escape(label['defect_type'])}</td>{''.join(cells)}</tr>")

    run_heads = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    chosen = "".join(  # runs --model auto chose: how, and against which candidates
        f"<h2>{html.escape(name)}</h2>" + report.selection_section(load_json(run / SELECTION_FILE))
        for name, run in zip(names, runs, strict=True) if (run / SELECTION_FILE).is_file())
    roc = report._data_uri(_roc_overlay(names, tables), "image/png")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>anomap compare: {html.escape(' vs '.join(names))}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}
table{{border-collapse:collapse;margin:0.8em 0}}td,th{{border:1px solid #ddd;padding:4px 8px;
vertical-align:top;text-align:left}}th{{background:#f4f4f4}}.fail{{color:#c0262d}}
.pass{{color:#11772d}}img{{display:block}}</style></head><body>
<h1>{html.escape(' vs '.join(names))}</h1>
<p>{len(paths)} test images scored by every run.</p>
<h2>Metrics</h2><table>{head}{body}</table>
<h2>ROC</h2><img src="{roc}" alt="ROC curves">
<h2>Per defect type, at each run's threshold</h2>
<table><tr><th>type</th>{run_heads}</tr>{''.join(type_rows)}</table>
<h2>Where the runs disagree most</h2>
<p>Images whose score ranks (percentile among the run's own scores) differ most
between the runs, most first.</p>
<table><tr><th>image</th>{run_heads}</tr>{''.join(gallery)}</table>
{chosen}</body></html>
"""
    return save_text(page, out)

"""Visual reporting: heat-map overlays, per-image panels and a self-contained HTML report.

The goal is that a person opening ``report.html`` sees at a glance how well the model
works and *where* it fails, so the report favours pictures (ROC, histograms, panels of the
worst misses) over tables. Everything is rendered off-screen with matplotlib's Agg canvas
through the object-oriented API, so no GUI backend or global pyplot state is touched.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from anomap.files import atomic_write, save_text
from anomap.scoring import is_anomalous

__all__ = [
    "colorize",
    "confusion_at",
    "overlay",
    "panel",
    "save_png",
    "write_html_report",
]

GT_COLOR: tuple[int, int, int] = (0, 255, 0)
PRED_COLOR: tuple[int, int, int] = (255, 255, 255)
EMBED_MAX_WIDTH = 384
JPEG_QUALITY = 85
_SEPARATOR = 4
_SEPARATOR_COLOR = (255, 255, 255)

_LUT_CACHE: dict[str, np.ndarray] = {}


# --------------------------------------------------------------------------- images


def _lut(name: str = "jet") -> np.ndarray:
    """256x3 uint8 lookup table; cached because colormap evaluation is the slow part."""
    lut = _LUT_CACHE.get(name)
    if lut is None:
        cmap = matplotlib.colormaps[name]
        lut = np.asarray(cmap(np.linspace(0.0, 1.0, 256), bytes=True))[:, :3].copy()
        _LUT_CACHE[name] = lut
    return lut


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Map an anomaly map to jet RGB with a *fixed* scale so colours are comparable across images.

    Values are clipped to ``[vmin, vmax]``. If ``vmax <= vmin`` the scale degenerates into a
    step at ``vmin`` (above -> red, else blue) instead of dividing by zero. NaNs map to the
    low end.
    """
    a = np.asarray(amap, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"amap must be 2-D (H, W), got shape {a.shape}")
    vmin = float(vmin)
    vmax = float(vmax)
    span = vmax - vmin
    if not math.isfinite(span) or span <= 0.0:
        span = 1e-12
    norm = (a - vmin) / span
    norm = np.nan_to_num(norm, nan=0.0, posinf=1.0, neginf=0.0)
    idx = np.rint(np.clip(norm, 0.0, 1.0) * 255.0).astype(np.intp)
    return _lut("jet")[idx]


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Accept grayscale, single-channel, RGB or RGBA input; callers pass whatever they loaded."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        if img.dtype == np.bool_:
            img = img.astype(np.uint8) * 255
        else:
            img = np.clip(np.rint(img.astype(np.float64)), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return np.ascontiguousarray(img[:, :, :3])
    raise ValueError(f"image must be (H,W), (H,W,1), (H,W,3) or (H,W,4), got {img.shape}")


def _resize_float(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (PIL 'F' mode keeps full float precision)."""
    a = np.asarray(amap, dtype=np.float32)
    if a.shape == (height, width):
        return a
    resized = Image.fromarray(np.ascontiguousarray(a), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize so a binary mask stays binary."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > 0 if m.dtype != np.bool_ else m
    if m.shape == (height, width):
        return m
    img = Image.fromarray(m.astype(np.uint8) * 255, mode="L")
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)) > 127


def _contour(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Inner boundary of a mask; a contour keeps the heat map under it visible, a fill would not.

    Pixels on the image border count as boundary so defects touching the edge stay closed.
    """
    if not mask.any():
        return mask
    eroded = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~eroded


#: the longest side of a drawn picture (overlay, mask) unless a caller says otherwise:
#: a 6000 px photo's overlay at its own size costs gigabytes to draw and says no more
PICTURE_MAX_SIDE = 2048


def bounded(photo: Image.Image, max_side: int = PICTURE_MAX_SIDE) -> Image.Image:
    """``photo`` scaled down (aspect kept) so that its longer side is at most
    ``max_side``; returned as it is when already within."""
    width, height = photo.size
    if max(width, height) <= max_side:
        return photo
    scale = max_side / max(width, height)
    return photo.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                        Image.BILINEAR)


def overlay(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    *,
    gt_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend the colourised anomaly map over the image and outline GT (green) / prediction (white).

    ``amap`` is resized bilinearly and masks nearest-neighbour to the image size. The GT
    contour is drawn last so it stays visible where both contours coincide. Contours are
    1 px, or 2 px for images whose short side is >= 256 px (they survive downscaling).
    """
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    amap_r = _resize_float(amap, h, w)
    colors = colorize(amap_r, vmin, vmax)
    a = float(np.clip(alpha, 0.0, 1.0))
    out = (1.0 - a) * rgb.astype(np.float32) + a * colors.astype(np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    thickness = 2 if min(h, w) >= 256 else 1
    if pred_mask is not None:
        out[_contour(_resize_mask(pred_mask, h, w), thickness)] = PRED_COLOR
    if gt_mask is not None:
        out[_contour(_resize_mask(gt_mask, h, w), thickness)] = GT_COLOR
    return out


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int) -> str:
    """Truncate with '...' so long paths never run off the strip."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "...", font=font) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "..."


def _caption_strip(caption: str, width: int) -> np.ndarray:
    """White strip with black text using PIL's default font (no font files needed)."""
    font = ImageFont.load_default()
    lines = caption.splitlines() or [""]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(probe.textbbox((0, 0), "Hgy", font=font)[3], 8) + 3
    pad = 3
    strip = Image.new("RGB", (width, pad * 2 + line_h * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        y = pad + i * line_h
        try:
            draw.text(
                (pad, y), _fit_text(draw, line, font, width - 2 * pad), fill=(0, 0, 0), font=font
            )
        except (UnicodeEncodeError, UnicodeError):
            safe = line.encode("ascii", "replace").decode("ascii")
            draw.text(
                (pad, y), _fit_text(draw, safe, font, width - 2 * pad), fill=(0, 0, 0), font=font
            )
    return np.asarray(strip)


def panel(
    image: np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    *,
    gt_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
    caption: str | None = None,
) -> np.ndarray:
    """Side-by-side ``original | overlay (| GT mask)`` so a reviewer can compare without toggling.

    Tiles are separated by a thin white gap; an optional caption strip goes underneath.
    """
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    tiles = [rgb, overlay(rgb, amap, vmin, vmax, gt_mask=gt_mask, pred_mask=pred_mask)]
    if gt_mask is not None:
        tiles.append(
            np.repeat((_resize_mask(gt_mask, h, w).astype(np.uint8) * 255)[..., None], 3, axis=2)
        )
    gap = np.empty((h, _SEPARATOR, 3), dtype=np.uint8)
    gap[:] = _SEPARATOR_COLOR
    parts: list[np.ndarray] = []
    for i, tile in enumerate(tiles):
        if i:
            parts.append(gap)
        parts.append(tile)
    out = np.concatenate(parts, axis=1)
    if caption:
        out = np.concatenate([out, _caption_strip(caption, out.shape[1])], axis=0)
    return np.ascontiguousarray(out)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a PNG atomically so a crash or a concurrent reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr))
    atomic_write(path, lambda handle: img.save(handle, format="PNG"))
    return path


# --------------------------------------------------------------------------- metrics


def confusion_at(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> dict[str, int]:
    """Confusion counts with 'defective' predicted when ``score >= threshold`` (NaN -> normal)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    pred = is_anomalous(s, threshold)
    return {
        "tp": int(np.sum(pred & y)),
        "fn": int(np.sum(~pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "tn": int(np.sum(~pred & ~y)),
    }


def _fmt(value: Any) -> str:
    """Floats with 4 decimals (tiny non-zero values in scientific notation), NaN as 'n/a'."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0.0 and abs(v) < 1e-4:
            return f"{v:.4e}"
        return f"{v:.4f}"
    if value is None:
        return "n/a"
    return str(value)


def _pct(num: int, den: int) -> str:
    return f"{100.0 * num / den:.0f}%" if den else "n/a"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


# --------------------------------------------------------------------------- embedding


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure_png(fig: Figure) -> bytes:
    """Render an OO figure with the Agg canvas: no pyplot, no GUI backend, no global state."""
    canvas = FigureCanvasAgg(fig)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _embed_image_file(path: str | Path) -> str | None:
    """Downscaled JPEG data URI of an image file; None when missing/unreadable."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.width > EMBED_MAX_WIDTH:
                new_h = max(1, round(im.height * EMBED_MAX_WIDTH / im.width))
                im = im.resize((EMBED_MAX_WIDTH, new_h), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return _data_uri(buf.getvalue(), "image/jpeg")


# --------------------------------------------------------------------------- figures


def _roc_png(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[bytes, float]:
    """Image-level ROC with the operating point at the calibrated threshold marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    auroc = float(roc_auc_score(labels, scores))
    conf = confusion_at(labels, scores, threshold)
    op_tpr = conf["tp"] / max(conf["tp"] + conf["fn"], 1)
    op_fpr = conf["fp"] / max(conf["fp"] + conf["tn"], 1)

    fig = Figure(figsize=(3.84, 3.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, color="tab:blue", lw=2, label=f"ROC (AUROC = {auroc:.4f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
    ax.plot([op_fpr], [op_tpr], "o", color="tab:red", ms=6, label=f"threshold {_fmt(threshold)}")
    return style_roc(fig, ax), auroc


def style_roc(fig: Figure, ax: Any) -> bytes:
    """The ROC figure's axes, labels and legend (the report's and compare's), as PNG."""
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (good rejected)", fontsize=8)
    ax.set_ylabel("true positive rate (defects found)", fontsize=8)
    ax.set_title("Image-level ROC", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def _hist_png(
    normal: np.ndarray, defective_by_type: dict[str, np.ndarray], threshold: float
) -> bytes:
    """Score histogram: normal in grey, defect types stacked on top, threshold as a red line."""
    all_scores = np.concatenate([normal.ravel(), *(v.ravel() for v in defective_by_type.values())])
    all_scores = all_scores[np.isfinite(all_scores)]
    lo = float(min(all_scores.min(), threshold)) if all_scores.size else float(threshold) - 1
    hi = float(max(all_scores.max(), threshold)) if all_scores.size else float(threshold) + 1
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)

    fig = Figure(figsize=(3.84, 3.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    fin = normal[np.isfinite(normal)]
    if fin.size:
        ax.hist(fin, bins=bins, color="0.55", alpha=0.6, label=f"good (n={fin.size})")
    if defective_by_type:
        names = list(defective_by_type)
        data = [v[np.isfinite(v)] for v in defective_by_type.values()]
        cmap = matplotlib.colormaps["tab10"]
        colors = [cmap(i % 10) for i in range(len(names))]
        labels = [f"{n} (n={d.size})" for n, d in zip(names, data, strict=True)]
        ax.hist(data, bins=bins, stacked=True, color=colors, alpha=0.75, label=labels)
    if fin.size:
        # outline on top so good scores stay visible where defect bars cover them
        ax.hist(fin, bins=bins, histtype="step", color="0.15", lw=1.2)
    ax.axvline(threshold, color="red", lw=1.5, ls="--", label=f"threshold {_fmt(threshold)}")
    ax.set_xlabel("image anomaly score", fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.set_title("Score distribution", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper right", framealpha=0.8)
    fig.tight_layout()
    return _figure_png(fig)


# --------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;
color:#222;background:#fafafa}
h1{margin-bottom:4px}h2{margin-top:28px;border-bottom:1px solid #ccc;padding-bottom:3px}
.summary{font-size:1.15em;background:#fff;border-left:5px solid #2a7ae2;padding:8px 12px}
table{border-collapse:collapse;background:#fff;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:.92em}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.cm td{width:110px;text-align:center;font-size:1.05em}
.ok{background:#d8f2dc}.bad{background:#f8d7d7}
.bar{background:#eee;width:140px;height:11px;display:inline-block;vertical-align:middle}
.bar>span{display:block;height:100%}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:3px solid #bbb;padding:4px;max-width:392px;font-size:.8em}
.card.wrong{border-color:#d33}.card.right{border-color:#3a3}
.card img{display:block;max-width:100%}
.card .p{word-break:break-all;color:#444}
.noimg{width:240px;height:60px;background:#eee;color:#888;display:flex;align-items:center;
justify-content:center}
.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-weight:bold}
.badge.fail{background:#c33}.badge.pass{background:#393}
.note{color:#666;font-style:italic}
"""


def _row_score(row: dict) -> float:
    try:
        return float(row.get("score", float("nan")))
    except (TypeError, ValueError):
        return float("nan")


def _row_label(row: dict) -> int:
    return 1 if int(row.get("label", 0) or 0) else 0


def _row_verdict(row: dict, threshold: float) -> str:
    verdict = row.get("verdict")
    if verdict:
        return str(verdict)
    return verdict(_row_score(row), threshold)


def _card(row: dict, threshold: float, cache: dict[str, str | None]) -> str:
    """One image card: panel (or placeholder), path, score, verdict; border shows right/wrong."""
    panel_path = row.get("panel_png")
    uri: str | None = None
    if panel_path:
        key = str(panel_path)
        if key not in cache:
            cache[key] = _embed_image_file(key)
        uri = cache[key]
    verdict = _row_verdict(row, threshold)
    label = _row_label(row)
    correct = (verdict == "fail") == bool(label)
    img = f'<img src="{uri}" alt="panel">' if uri else '<div class="noimg">no panel image</div>'
    path = _esc(row.get("path", ""))
    vclass = "fail" if verdict == "fail" else "pass"
    return (
        f'<div class="card {"right" if correct else "wrong"}">{img}'
        f'<div class="p" title="{path}">{path}</div>'
        f"<div>type <b>{_esc(row.get('defect_type', ''))}</b> &middot; "
        f"score <b>{_esc(_fmt(_row_score(row)))}</b> &middot; "
        f'<span class="badge {vclass}">{_esc(verdict)}</span>'
        f"{'' if correct else ' &middot; <b>wrong</b>'}</div></div>"
    )


def _cards(rows: Iterable[dict], threshold: float, cache: dict[str, str | None]) -> str:
    inner = "".join(_card(r, threshold, cache) for r in rows)
    return f'<div class="cards">{inner}</div>' if inner else '<p class="note">none</p>'


def _bar(frac: float, good_is_high: bool) -> str:
    """Tiny CSS bar so rates are readable at a glance without a chart."""
    if not math.isfinite(frac):
        return ""
    pct = max(0.0, min(1.0, frac)) * 100
    hue_frac = frac if good_is_high else 1.0 - frac
    color = f"hsl({int(120 * max(0.0, min(1.0, hue_frac)))},65%,45%)"
    return f'<span class="bar"><span style="width:{pct:.0f}%;background:{color}"></span></span>'


def _nan_last_sort(rows: list[dict], descending: bool) -> list[dict]:
    """Sort by score; NaN scores are treated as 'not flagged' (lowest)."""

    def key(r: dict) -> float:
        s = _row_score(r)
        return -math.inf if math.isnan(s) else s

    return sorted(rows, key=key, reverse=descending)


def write_html_report(
    path: str | Path,
    *,
    title: str,
    metrics: dict[str, float | int | str],
    rows: list[dict],
    threshold: float,
    max_gallery_per_type: int = 6,
    worst_k: int = 8,
    selection: dict | None = None,
) -> Path:
    """Write ONE self-contained HTML file (all images as data URIs) summarising a test run.

    ``selection``: the run's selection.json (``--model auto``): a section ranks the
    candidates and says why the winner won.

    Sections: summary sentence, metrics + confusion counts, ROC and score histogram,
    per-defect-type table, worst misses / false alarms, and a per-type gallery.
    Confusion counts use ``score >= threshold``; cards display each row's own ``verdict``.
    """
    path = Path(path)
    threshold = float(threshold)
    labels = np.array([_row_label(r) for r in rows], dtype=np.int64)
    scores = np.array([_row_score(r) for r in rows], dtype=np.float64)
    conf = confusion_at(labels, scores, threshold)
    n_def = conf["tp"] + conf["fn"]
    n_good = conf["fp"] + conf["tn"]
    cache: dict[str, str | None] = {}

    # --- summary sentence
    thr_txt = _fmt(threshold)
    if n_def and n_good:
        summary = (
            f"At the calibrated threshold {thr_txt}: {_pct(conf['tp'], n_def)} of defective "
            f"images flagged ({conf['tp']}/{n_def}), {_pct(conf['fp'], n_good)} of good images "
            f"falsely rejected ({conf['fp']}/{n_good})."
        )
    elif n_good:
        summary = (
            f"At the calibrated threshold {thr_txt}: no defective images in this set; "
            f"{_pct(conf['fp'], n_good)} of good images falsely rejected "
            f"({conf['fp']}/{n_good})."
        )
    elif n_def:
        summary = (
            f"At the calibrated threshold {thr_txt}: {_pct(conf['tp'], n_def)} of defective "
            f"images flagged ({conf['tp']}/{n_def}); no good images in this set."
        )
    else:
        summary = "No test images were given."

    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="summary">{_esc(summary)}</p>',
    ]

    # --- metrics + confusion
    metric_rows = "".join(
        f'<tr><th>{_esc(k)}</th><td class="num">{_esc(_fmt(v))}</td></tr>'
        for k, v in metrics.items()
    )
    if "threshold" not in metrics:
        metric_rows += f'<tr><th>threshold</th><td class="num">{_esc(thr_txt)}</td></tr>'
    cm = (
        '<table class="cm"><tr><th></th><th>predicted defective</th><th>predicted good</th></tr>'
        f'<tr><th>defective</th><td class="ok">TP {conf["tp"]}</td>'
        f'<td class="bad">FN {conf["fn"]}</td></tr>'
        f'<tr><th>good</th><td class="bad">FP {conf["fp"]}</td>'
        f'<td class="ok">TN {conf["tn"]}</td></tr></table>'
    )
    parts += [
        "<h2>Metrics</h2>",
        '<div class="row">',
        f"<table><tr><th>metric</th><th>value</th></tr>{metric_rows}</table>",
        f"<div><b>Confusion at threshold {_esc(thr_txt)}</b>{cm}</div>",
        "</div>",
    ]

    # --- figures
    parts.append('<h2>Scores</h2><div class="row">')
    finite = np.isfinite(scores)
    has_both = bool(np.any(labels[finite] == 1) and np.any(labels[finite] == 0))
    if has_both:
        roc_png, auroc = _roc_png(labels[finite], scores[finite], threshold)
        parts.append(
            f'<img id="roc-curve" src="{_data_uri(roc_png, "image/png")}" '
            f'alt="ROC curve, AUROC {auroc:.4f}">'
        )
    elif not n_def:
        parts.append('<p class="note">ROC skipped: no defective images in this set.</p>')
    else:
        parts.append('<p class="note">ROC skipped: no good images in this set.</p>')

    normal_scores = scores[labels == 0]
    by_type: dict[str, list[dict]] = {}
    for r in rows:
        by_type.setdefault(
            str(r.get("defect_type", "good" if not _row_label(r) else "?")), []
        ).append(r)
    defective_types = {
        t: np.array([_row_score(r) for r in rs if _row_label(r)], dtype=np.float64)
        for t, rs in sorted(by_type.items())
        if any(_row_label(r) for r in rs)
    }
    if rows:
        hist_png = _hist_png(normal_scores, defective_types, threshold)
        parts.append(
            f'<img id="score-histogram" src="{_data_uri(hist_png, "image/png")}" '
            'alt="score histogram">'
        )
    parts.append("</div>")

    # --- per defect type
    def type_order(item: tuple[str, list[dict]]) -> tuple[int, float, str]:
        name, rs = item
        is_def = any(_row_label(r) for r in rs)
        flagged = int(is_anomalous([_row_score(r) for r in rs], threshold).sum())
        return (1 if is_def else 0, flagged / len(rs) if is_def else 0.0, name)

    type_rows = []
    for name, rs in sorted(by_type.items(), key=type_order):
        is_def = any(_row_label(r) for r in rs)
        s = np.array([_row_score(r) for r in rs], dtype=np.float64)
        flagged = int(is_anomalous(s, threshold).sum())
        rate = flagged / len(rs)
        fin_s = s[np.isfinite(s)]
        mean = float(fin_s.mean()) if fin_s.size else float("nan")
        kind = "detection rate" if is_def else "false-alarm rate"
        type_rows.append(
            f'<tr><th>{_esc(name)}</th><td class="num">{len(rs)}</td>'
            f'<td class="num">{flagged}</td>'
            f'<td class="num">{rate * 100:.1f}% {_bar(rate, good_is_high=is_def)}</td>'
            f"<td>{kind}</td>"
            f'<td class="num">{_esc(_fmt(mean))}</td></tr>'
        )
    parts += [
        "<h2>Per defect type</h2>",
        '<p class="note">Worst-detected defect types first.</p>' if defective_types else "",
        "<table><tr><th>type</th><th>images</th><th>flagged</th><th>rate</th><th>meaning</th>"
        f"<th>mean score</th></tr>{''.join(type_rows)}</table>",
    ]

    # --- worst misses / false alarms
    defective_rows = [r for r in rows if _row_label(r)]
    normal_rows = [r for r in rows if not _row_label(r)]
    k = max(int(worst_k), 0)
    worst_def = _nan_last_sort(defective_rows, descending=False)[:k]
    worst_good = _nan_last_sort(normal_rows, descending=True)[:k]
    parts.append("<h2>Worst misses</h2>")
    parts.append(
        f"<h3>Defective images with the lowest scores ({conf['fn']} missed at the threshold)</h3>"
    )
    if defective_rows:
        parts.append(_cards(worst_def, threshold, cache))
    else:
        parts.append('<p class="note">No defective images in this set.</p>')
    parts.append(
        f"<h3>Good images with the highest scores "
        f"({conf['fp']} false alarm{'' if conf['fp'] == 1 else 's'} at the threshold)</h3>"
    )
    if normal_rows:
        parts.append(_cards(worst_good, threshold, cache))
    else:
        parts.append('<p class="note">No good images in this set.</p>')

    # --- gallery
    parts.append("<h2>Gallery (highest-scoring first)</h2>")
    g = max(int(max_gallery_per_type), 0)
    for name, rs in sorted(by_type.items(), key=type_order):
        parts.append(f'<h3>{_esc(name)} <span class="note">({len(rs)} images)</span></h3>')
        parts.append(_cards(_nan_last_sort(rs, descending=True)[:g], threshold, cache))
    if not any(cache.values()):
        parts.append('<p class="note">No panel images were available for this run.</p>')

    parts.append(
        '<p class="note">Card border: green = correct verdict, red = wrong verdict. '
        "Overlay contours: green = ground truth, white = prediction.</p>"
    )
    if selection:
        parts.append(selection_section(selection))
    parts.append("</body></html>")
    save_text("\n".join(parts), path)
    return path


def selection_section(selection: dict) -> str:
    """How ``--model auto`` chose this model: the candidates ranked by the judge, per
    kind of synthetic anomaly, and the plain statement that no defect was used."""
    kinds = list(selection.get("kinds", {}))
    head = "".join(f"<th>{_esc(k)}</th>" for k in kinds)
    rows = []
    for row in selection.get("candidates", []):
        reading = row.get("best_reading") or {}
        per_kind = reading.get("kinds", {})
        cells = "".join(
            f"<td>{per_kind[k]['score']:.3f}</td>" if k in per_kind else
            '<td class="note">trained on</td>' if k in row.get("trained_on_kinds", []) else
            "<td></td>" for k in kinds)
        how = (f"{reading.get('image_score')}"
               + (f" {reading.get('score_window')}px" if reading.get("score_window", 1) > 1
                  else "") + f", {reading.get('map_normalization')}") if reading else ""
        score = f"{row['score']:.3f}" if "score" in row else ""
        if row.get("standard_error") is not None:
            score += f" ± {row['standard_error']:.3f}"
        spread = (f"{reading['normal_score_spread']:.3f}"
                  if "normal_score_spread" in reading else "")
        seconds = f"{row['training_seconds']:.0f}" if "training_seconds" in row else ""
        rows.append(f"<tr><td>{_esc(row['candidate'])}</td><td>{_esc(row.get('state', ''))}"
                    f"</td><td>{row.get('epochs', '')}</td><td><b>{score}</b></td>"
                    f"<td>{_esc(how)}</td>{cells}<td>{spread}</td><td>{seconds}</td></tr>")
    return (
        "<h2>How this model was chosen</h2>"
        f"<p>{_esc(selection.get('statement', ''))}</p>"
        f"<p><b>Why:</b> {_esc(selection.get('why', ''))}. Rule: "
        f"{_esc(selection.get('rule', ''))}.</p>"
        + (f"<p>The best by the judge was {_esc(selection['best_by_judge'])}, kept out as "
           "within noise of a cheaper one. If your defects look like the kinds it scored "
           f"best on, take it instead: <code>{_esc(selection['take_best_by_judge'])}</code></p>"
           if selection.get("take_best_by_judge")
           and selection.get("best_by_judge") != selection["winner"]["candidate"] else "")
        + "<table><tr><th>candidate</th><th>state</th><th>epochs</th><th>judge ± s.e.</th>"
        f"<th>best reading</th>{head}<th>normal score spread</th><th>training s</th></tr>"
        + "".join(rows) + "</table>")

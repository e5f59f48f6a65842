"""Behavioural tests for anomap.report: colours, overlays, atomic PNGs and the HTML report."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap.report import (
    colorize,
    confusion_at,
    overlay,
    panel,
    save_png,
    write_html_report,
)

DATA_URI_RE = re.compile(r'src="(data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+))"')


# --------------------------------------------------------------------------- colorize


def test_colorize_shape_dtype_and_ends_of_scale() -> None:
    amap = np.array([[0.0, 0.5], [1.0, 2.0]])
    rgb = colorize(amap, 0.0, 1.0)
    assert rgb.shape == (2, 2, 3)
    assert rgb.dtype == np.uint8
    low = rgb[0, 0].astype(int)
    high = rgb[1, 0].astype(int)
    assert low[2] > low[0], "vmin must map to the blue end of jet"
    assert high[0] > high[2], "vmax must map to the red end of jet"
    # values above vmax are clipped to the vmax colour
    assert np.array_equal(rgb[1, 1], rgb[1, 0])


def test_colorize_degenerate_range_and_nan() -> None:
    amap = np.array([[0.0, 1.0], [np.nan, 5.0]])
    with np.errstate(all="raise"):
        rgb = colorize(amap, 1.0, 1.0)
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0, 2] > rgb[0, 0, 0]  # below -> blue
    assert rgb[1, 1, 0] > rgb[1, 1, 2]  # above -> red
    assert rgb[1, 0, 2] > rgb[1, 0, 0]  # NaN -> low end


# --------------------------------------------------------------------------- overlay


def test_overlay_draws_green_gt_contour_on_mask_boundary() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    amap = np.zeros((64, 64), dtype=np.float32)
    gt = np.zeros((64, 64), dtype=bool)
    gt[20:40, 20:40] = True
    out = overlay(image, amap, 0.0, 1.0, gt_mask=gt)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    green = (out[..., 0] == 0) & (out[..., 1] == 255) & (out[..., 2] == 0)
    # boundary pixels of the square are green ...
    for y, x in [(20, 20), (20, 30), (39, 39), (30, 20), (39, 25)]:
        assert green[y, x], (y, x)
    # ... but the interior and the far background are not (contour, not fill)
    assert not green[30, 30]
    assert not green[5, 5]
    assert green.sum() < gt.sum() / 2


def test_overlay_pred_contour_white_and_gt_wins_on_overlap() -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    amap = np.zeros((32, 32))
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:24, 8:24] = True
    pred = np.zeros_like(mask)
    pred[4:12, 4:12] = True
    out = overlay(image, amap, 0.0, 1.0, gt_mask=mask, pred_mask=pred)
    assert tuple(out[4, 4]) == (255, 255, 255)
    assert tuple(out[8, 16]) == (0, 255, 0)


def test_overlay_resizes_small_map_and_masks_to_image_size() -> None:
    image = np.zeros((100, 150, 3), dtype=np.uint8)
    amap = np.zeros((10, 15), dtype=np.float32)
    amap[5:, :] = 1.0
    gt = np.zeros((10, 15), dtype=bool)
    gt[2:8, 2:8] = True
    out = overlay(image, amap, 0.0, 1.0, gt_mask=gt, alpha=1.0)
    assert out.shape == (100, 150, 3)
    assert out[5, 140, 2] > out[5, 140, 0]  # top half low -> blue
    assert out[95, 140, 0] > out[95, 140, 2]  # bottom half high -> red
    green = (out[..., 0] == 0) & (out[..., 1] == 255) & (out[..., 2] == 0)
    assert green.any()


def test_overlay_accepts_grayscale() -> None:
    gray = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    out = overlay(gray, np.random.default_rng(1).random((40, 30)), 0.0, 1.0)
    assert out.shape == (40, 30, 3) and out.dtype == np.uint8


def test_overlay_alpha_zero_keeps_image() -> None:
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = overlay(img, np.ones((16, 16)), 0.0, 1.0, alpha=0.0)
    assert np.array_equal(out, img)


# --------------------------------------------------------------------------- panel


def test_panel_layout_with_mask_and_caption() -> None:
    img = np.zeros((32, 48, 3), dtype=np.uint8)
    amap = np.zeros((8, 12))
    gt = np.zeros((32, 48), dtype=bool)
    gt[10:20, 10:20] = True
    two = panel(img, amap, 0.0, 1.0)
    three = panel(img, amap, 0.0, 1.0, gt_mask=gt)
    captioned = panel(img, amap, 0.0, 1.0, gt_mask=gt, caption="score 0.9 fail " + "x" * 200)
    assert two.dtype == np.uint8 and two.shape[0] == 32 and two.shape[2] == 3
    assert three.shape[1] > two.shape[1] >= 2 * 48
    assert captioned.shape[1] == three.shape[1]
    assert captioned.shape[0] > three.shape[0]
    # the caption strip actually contains dark text pixels
    assert (captioned[32:] < 100).any()


# --------------------------------------------------------------------------- save_png


def test_save_png_atomic_creates_dirs_and_readable(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    target = tmp_path / "a" / "b" / "x.png"
    out = save_png(arr, target)
    assert out == target and target.is_file()
    with Image.open(target) as im:
        assert im.format == "PNG"
        assert np.array_equal(np.asarray(im.convert("RGB")), arr)
    # readable by others like a normal file (mkstemp alone would give 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # overwrite works and leaves no temporary files behind
    save_png(arr[:, :, 0], str(target))
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]


# --------------------------------------------------------------------------- confusion


def test_confusion_at_uses_greater_equal() -> None:
    c = confusion_at([1, 1, 0, 0, 1], [0.5, 0.2, 0.5, 0.1, np.nan], 0.5)
    assert c == {"tp": 1, "fn": 2, "fp": 1, "tn": 1}


# --------------------------------------------------------------------------- HTML


def _make_rows(tmp_path: Path, *, with_defects: bool = True) -> list[dict]:
    rng = np.random.default_rng(42)
    rows: list[dict] = []
    specs = [("good", 0, 0.2)] * 10
    if with_defects:
        specs += [("crack", 1, 0.8)] * 6 + [("scratch", 1, 0.6)] * 5
    for i, (dtype, label, mu) in enumerate(specs):
        score = float(np.clip(mu + rng.normal(0, 0.15), 0, 1))
        panel_png: str | None = None
        if i % 3 != 2:  # some rows have no panel at all
            p = tmp_path / "panels" / f"{dtype}_{i:03d}.png"
            save_png(rng.integers(0, 256, (24, 600, 3), dtype=np.uint8), p)
            panel_png = str(p)
        rows.append(
            {
                "path": f"/data/test/{dtype}/{i:03d}.png",
                "label": label,
                "defect_type": dtype,
                "score": score,
                "verdict": "fail" if score >= 0.5 else "pass",
                "panel_png": panel_png,
            }
        )
    return rows


def _assert_self_contained(text: str) -> None:
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs, "expected embedded images"
    assert all(s.startswith("data:") for s in srcs), [s[:40] for s in srcs]
    assert not re.search(r'href="(?!#)', text)
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()


def test_write_html_report_self_contained(tmp_path: Path) -> None:
    rows = _make_rows(tmp_path)
    rows.append(
        {
            "path": "/data/test/crack/<missed & hidden>.png",
            "label": 1,
            "defect_type": "crack",
            "score": 0.01,
            "verdict": "pass",
            "panel_png": str(tmp_path / "panels" / "does_not_exist.png"),
        }
    )
    metrics = {"image_auroc": 0.9312345, "pixel_aupro": float("nan"), "n_images": len(rows)}
    out = write_html_report(
        tmp_path / "run" / "report.html",
        title="bottle <test>",
        metrics=metrics,
        rows=rows,
        threshold=0.5,
        worst_k=3,
        max_gallery_per_type=2,
    )
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    text = out.read_text(encoding="utf-8")
    for name in metrics:
        assert name in text
    assert "0.9312" in text and "n/a" in text
    assert "data:image/png;base64," in text
    assert "data:image/jpeg;base64," in text
    _assert_self_contained(text)
    # worst miss is listed, with its path HTML-escaped
    assert "/data/test/crack/&lt;missed &amp; hidden&gt;.png" in text
    assert "<missed & hidden>" not in text
    assert "bottle &lt;test&gt;" in text
    # confusion counts and summary sentence
    for tag in ("TP ", "FN ", "FP ", "TN "):
        assert tag in text
    assert "of defective images flagged" in text
    assert "AUROC" in text
    # embedded panels were downscaled to at most 384 px wide
    for _uri, kind, payload in DATA_URI_RE.findall(text):
        with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
            assert im.width <= 400, (kind, im.size)


def test_write_html_report_all_normal_and_no_panels(tmp_path: Path) -> None:
    rows = _make_rows(tmp_path, with_defects=False)
    for r in rows:
        r["panel_png"] = None
    out = write_html_report(
        tmp_path / "report.html",
        title="all good",
        metrics={"image_auroc": float("nan")},
        rows=rows,
        threshold=0.5,
    )
    text = out.read_text(encoding="utf-8")
    assert "ROC skipped" in text
    assert "no defective images" in text.lower()
    assert "no panel image" in text.lower()
    _assert_self_contained(text)  # still has the histogram


@pytest.mark.parametrize("rows", [[]])
def test_write_html_report_empty(tmp_path: Path, rows: list[dict]) -> None:
    out = write_html_report(tmp_path / "r.html", title="t", metrics={}, rows=rows, threshold=1.0)
    assert "No test images" in out.read_text(encoding="utf-8")

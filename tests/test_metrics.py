"""Tests for anomap.metrics: hand-computed tiny cases plus agreement with references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomap.metrics import (
    aupro,
    calibrate_threshold,
    evaluate_all,
    f1_max,
    image_auroc,
    pixel_auroc,
    roc_curve_points,
)

# ------------------------------------------------------------------- image AUROC


def test_image_auroc_hand_case_with_tie() -> None:
    # positives {0.4, 0.8}, negatives {0.1, 0.4, 0.3}; count pos > neg pairs (tie = 0.5):
    #   0.4: beats 0.1 (1), ties 0.4 (0.5), beats 0.3 (1) -> 2.5
    #   0.8: beats all three                             -> 3
    # AUROC = 5.5 / (2 * 3) = 11/12
    labels = np.array([0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3])
    assert image_auroc(labels, scores) == pytest.approx(11 / 12)


def test_image_auroc_single_class_is_nan() -> None:
    assert math.isnan(image_auroc(np.zeros(4), np.arange(4.0)))
    assert math.isnan(image_auroc(np.ones(3, dtype=bool), np.arange(3.0)))


def test_image_auroc_accepts_torch() -> None:
    labels = torch.tensor([0, 0, 1, 1, 0])
    scores = torch.tensor([0.1, 0.4, 0.4, 0.8, 0.3], requires_grad=True)
    assert image_auroc(labels, scores) == pytest.approx(11 / 12)


# ------------------------------------------------------------------- pixel AUROC


def test_pixel_auroc_hand_case() -> None:
    # positives {0.9, 0.5}; negatives {0.2, 0.5, 0.5, 0.1}
    #   0.9 beats all 4 -> 4;  0.5: 1 + 0.5 + 0.5 + 1 -> 3;  AUROC = 7 / 8
    masks = np.array([[[1, 0, 0], [0, 1, 0]]])
    maps = np.array([[[0.9, 0.2, 0.5], [0.5, 0.5, 0.1]]])
    assert pixel_auroc(masks, maps) == pytest.approx(7 / 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((5, 16, 12)) < 0.2
    maps = rng.random((5, 16, 12)).astype(np.float32) + 0.3 * masks
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # heavy ties
    tied = np.round(maps * 4) / 4
    expected = roc_auc_score(masks.ravel(), tied.ravel())
    assert pixel_auroc(masks, tied) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_single_class_is_nan() -> None:
    assert math.isnan(pixel_auroc(np.zeros((2, 3, 3)), np.ones((2, 3, 3))))
    assert math.isnan(pixel_auroc(np.ones((2, 3, 3)), np.ones((2, 3, 3))))


# ------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_separation_is_one() -> None:
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, 1:3, 1:4] = True
    masks[0, 5:7, 5:7] = True
    masks[1, 0, 0] = True  # image 2 is defect-free
    rng = np.random.default_rng(0)
    maps = rng.random(masks.shape) + 2.0 * masks
    assert aupro(masks, maps) == pytest.approx(1.0)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1.0)


def test_aupro_two_regions_hand_computed() -> None:
    # 1 image, 1x8 pixels:
    #   mask   = [1,   1,   1,   0,   0,   1,   0,   0  ]
    #   scores = [0.9, 0.5, 0.2, 0.8, 0.4, 0.7, 0.3, 0.1]
    # Regions: A = pixels 0-2 (size 3), B = pixel 5 (size 1); 4 normal pixels.
    # Descending thresholds (flag score >= t) -> (FPR, PRO = mean(overlap_A, overlap_B)):
    #   t=0.9: (0,   (1/3 + 0)/2 = 1/6)
    #   t=0.8: (1/4, 1/6)
    #   t=0.7: (1/4, (1/3 + 1)/2 = 2/3)
    #   t=0.5: (1/4, (2/3 + 1)/2 = 5/6)
    #   t=0.4: (1/2, 5/6)
    #   t=0.3: (3/4, 5/6)
    #   t=0.2: (3/4, 1)
    #   t=0.1: (1,   1)
    # Curve from (0,0): the area is a staircase:
    #   FPR limit 1.0: 1/6 * 1/4 + 5/6 * 1/2 + 1 * 1/4 = 1/24 + 10/24 + 6/24 = 17/24
    #   FPR limit 0.5: (1/24 + 5/6 * 1/4) / 0.5 = (6/24) / 0.5 = 1/2
    #   FPR limit 0.3: (1/24 + 5/6 * 0.05) / 0.3 = (2/24) / 0.3 = 5/18
    masks = np.array([[[1, 1, 1, 0, 0, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.2, 0.8, 0.4, 0.7, 0.3, 0.1]]])
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(17 / 24)
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx(1 / 2)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(5 / 18)
    assert aupro(masks, maps) == pytest.approx(5 / 18)


def test_aupro_interpolates_at_fpr_limit_on_tied_scores() -> None:
    # 1 image, 1x5: region = pixels 0-1 (size 2), 3 normal pixels.
    #   scores = [0.9, 0.5 | 0.5, 0.5, 0.1]  (a region pixel ties with two normal pixels)
    #   t=0.9: (FPR 0, PRO 1/2);  t=0.5: (2/3, 1);  t=0.1: (1, 1)
    # The tie makes one diagonal segment (0, 1/2) -> (2/3, 1). At FPR 0.3 it is at
    #   PRO = 1/2 + 1/2 * 0.3 / (2/3) = 0.725
    # area = 0.3 * (0.5 + 0.725) / 2 = 0.18375;  AUPRO = 0.18375 / 0.3 = 0.6125.
    # (Stepping instead of interpolating would give 0.5 or 1.0.)
    masks = np.array([[[1, 1, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.5, 0.1]]])
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.6125)
    # limit 1: 2/3 * (1/2 + 1)/2 + 1/3 * 1 = 1/2 + 1/3 = 5/6
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(5 / 6)


def test_aupro_uses_8_connectivity() -> None:
    # 2x3 image, mask [[1,1,0],[0,0,1]]: pixel (1,2) touches (0,1) only diagonally.
    # 8-connected -> ONE region of size 3 (4-connected would give sizes 2 and 1).
    # scores [[0.5,0.5,0.7],[0.1,0.3,0.9]]; normals 0.7, 0.1, 0.3.
    #   t=0.9: (0, 1/3); t=0.7: (1/3, 1/3); t=0.5: (1/3, 1); t=0.3: (2/3, 1); t=0.1: (1, 1)
    #   area (limit 1) = 1/3 * 1/3 + 2/3 * 1 = 7/9   (4-connected would give 5/6)
    masks = np.array([[[1, 1, 0], [0, 0, 1]]], dtype=bool)
    maps = np.array([[[0.5, 0.5, 0.7], [0.1, 0.3, 0.9]]])
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(7 / 9)


def test_aupro_regions_do_not_connect_across_images() -> None:
    # The same pixel position is defective in both images: two regions, not one merged one.
    # Image 0: mask [1,1,0], scores [0.2,0.2,0.5] -> region R0 of size 2
    # Image 1: mask [1,0,0], scores [0.9,0.1,0.5] -> region R1 of size 1
    # Normals: 0.5, 0.1, 0.5.
    #   t=0.9: (FPR 0, PRO (0 + 1)/2 = 1/2); t=0.5: (2/3, 1/2); t=0.2: (2/3, 1); t=0.1: (1, 1)
    #   limit 0.5: area = 0.5 * 1/2 = 0.25 -> AUPRO 0.5
    #   (a merged 3-pixel region would have PRO 1/3 at t=0.9 -> AUPRO 1/3)
    masks = np.array([[[1, 1, 0]], [[1, 0, 0]]])
    maps = np.array([[[0.2, 0.2, 0.5]], [[0.9, 0.1, 0.5]]])
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx(0.5)


def test_aupro_nan_without_regions_and_validation() -> None:
    assert math.isnan(aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 2, 2)), np.ones((1, 2, 2)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="0 and 1"):
        aupro(np.full((1, 2, 2), 255, dtype=np.uint8), np.ones((1, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.ones((1, 2, 2)), np.full((1, 2, 2), np.nan))


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    """Slow, direct definition: evaluate every distinct threshold explicitly."""
    regions: list[np.ndarray] = []
    normal: list[np.ndarray] = []
    for mask, scores in zip(masks, maps, strict=True):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions.extend(scores[labeled == k] for k in range(1, n + 1))
        normal.append(scores[labeled == 0])
    normal_all = np.concatenate(normal)
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal_all >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for i in range(1, len(xs)):
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 7, 9)) < 0.25  # scattered blobs incl. diagonal contacts
    masks[-1] = False  # a defect-free image still contributes normal pixels
    if seed % 2:
        maps = rng.integers(0, 6, masks.shape) / 5.0 + 0.2 * masks  # many ties
    else:
        maps = rng.random(masks.shape) + 0.5 * masks
    expected = _reference_aupro(masks, maps, limit)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------- F1 max


def test_f1_max_hand_case() -> None:
    # labels [0,0,1,1,1], scores [0.1,0.6,0.4,0.7,0.9]; predict defective if score >= t:
    #   t=0.9: P=1,   R=1/3 -> F1 1/2
    #   t=0.7: P=1,   R=2/3 -> F1 4/5
    #   t=0.6: P=2/3, R=2/3 -> F1 2/3
    #   t=0.4: P=3/4, R=1   -> F1 6/7   <- best
    #   t=0.1: P=3/5, R=1   -> F1 3/4
    f1, threshold = f1_max(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.7, 0.9]))
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.4)


def test_f1_max_ties_go_to_the_highest_threshold() -> None:
    # labels [0,1,0,0,1], scores [0.1,0.2,0.3,0.4,0.5]:
    #   t=0.5: P=1,   R=1/2 -> F1 2/3   <- tied best, highest threshold
    #   t=0.4: P=1/2, R=1/2 -> F1 1/2
    #   t=0.3: P=1/3, R=1/2 -> F1 2/5
    #   t=0.2: P=1/2, R=1   -> F1 2/3   <- tied best
    #   t=0.1: P=2/5, R=1   -> F1 4/7
    f1, threshold = f1_max(np.array([0, 1, 0, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.5)


def test_f1_max_without_defects_is_nan() -> None:
    f1, threshold = f1_max(np.zeros(3), np.arange(3.0))
    assert math.isnan(f1) and math.isnan(threshold)


# ------------------------------------------------------------ threshold calibration


def test_calibrate_threshold_hand_case() -> None:
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    # sorted 1..5; linear quantile 0.75 -> position 0.75 * 4 = 3 -> 4.0; median 3.0
    assert calibrate_threshold(scores, quantile=0.75) == pytest.approx(4.0)
    # margin 0.5 -> 4 + 0.5 * (4 - 3) = 4.5
    assert calibrate_threshold(scores, quantile=0.75, margin=0.5) == pytest.approx(4.5)
    # quantile 0.9 -> position 3.6 -> 4.6
    assert calibrate_threshold(torch.tensor(scores), quantile=0.9) == pytest.approx(4.6)


def test_calibrate_threshold_empty_raises() -> None:
    with pytest.raises(ValueError, match="at least one"):
        calibrate_threshold(np.array([]))


# ------------------------------------------------------------------ ROC / all / shapes


def test_roc_curve_points() -> None:
    fpr, tpr = roc_curve_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and fpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    with pytest.raises(ValueError, match="both"):
        roc_curve_points(np.zeros(3), np.arange(3.0))


def test_evaluate_all_keys_and_values() -> None:
    labels = np.array([0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.3])
    out = evaluate_all(labels, scores)
    assert set(out) == {"image_auroc", "image_f1_max", "f1_threshold"}
    assert out["image_auroc"] == pytest.approx(11 / 12)

    rng = np.random.default_rng(3)
    masks = np.zeros((5, 10, 10), dtype=bool)
    masks[2, 2:5, 2:5] = True
    masks[3, 6:9, 1:3] = True
    maps = rng.random(masks.shape) + 0.4 * masks
    out = evaluate_all(labels, scores, torch.from_numpy(masks), torch.from_numpy(maps))
    assert set(out) == {"image_auroc", "image_f1_max", "f1_threshold", "pixel_auroc", "aupro"}
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert out["aupro"] == pytest.approx(aupro(masks, maps))

    out = evaluate_all(np.zeros(5), scores, np.zeros_like(masks), maps)
    assert all(math.isnan(out[k]) for k in out)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"\(4,\).*\(5,\)"):
        image_auroc(np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="shape"):
        aupro(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        f1_max(np.zeros(3), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="shape"):
        evaluate_all(np.zeros(3), np.zeros(3), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))

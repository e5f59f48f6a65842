"""Evaluation metrics for visual anomaly detection.

Image level: AUROC, best F1 (with its threshold), ROC curve points, and a threshold
calibrated on defect-free validation scores only. Pixel level: AUROC over all pixels
and AUPRO, the MVTec AD per-region-overlap metric.

The pixel metrics are written for full test sets (hundreds of 256x256 maps, tens of
millions of pixels): both are exact and reduce to one ``np.sort`` of the normal pixel
scores plus work proportional to the (usually few) anomalous pixels. scikit-learn's
``roc_auc_score`` is exact too but needs a full ``argsort`` of every pixel, which is
several times slower at that size, so it is only used for image-level scores.

Every function accepts numpy arrays, sequences or torch tensors (any device).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "aupro",
    "calibrate_threshold",
    "evaluate_all",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "roc_curve_points",
]

# 8-connectivity inside each image and no connection between images: the MVTec AD
# evaluation code labels each ground-truth map with ``structure=np.ones((3, 3))``.
# Putting that 3x3 block in the middle plane of a 3x3x3 element lets a single
# ``ndimage.label`` call process an (N, H, W) stack with identical results.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# --------------------------------------------------------------------------- inputs


def _to_numpy(x: Any) -> np.ndarray:
    """Convert arrays, sequences and torch tensors (any device) to a numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
    return np.asarray(x)


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} shape {a.shape} does not match {name_b} shape {b.shape}")


def _as_binary(x: np.ndarray, name: str) -> np.ndarray:
    """Return a bool array; reject anything that is not 0/1 so 0/255 masks fail loudly."""
    if x.dtype == bool:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {x.dtype}")
    if x.size and not np.all((x == 0) | (x == 1)):
        raise ValueError(
            f"{name} must contain only 0 and 1 (or bool); got values in "
            f"[{np.nanmin(x)}, {np.nanmax(x)}] - threshold or rescale it first"
        )
    return x.astype(bool)


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    """Return real-valued scores without NaN (NaN has no place in a ranking)."""
    if x.dtype == bool:
        return x.astype(np.uint8)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and np.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level labels/scores and return them as flat (bool, real) arrays."""
    y = _to_numpy(labels)
    s = _to_numpy(scores)
    _check_same_shape(y, s, "labels", "scores")
    return _as_binary(y, "labels").ravel(), _as_scores(s, "scores").ravel()


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate masks/maps; a single (H, W) pair is treated as one image."""
    m = _to_numpy(masks)
    s = _to_numpy(maps)
    _check_same_shape(m, s, "masks", "maps")
    if m.ndim == 2:
        m, s = m[None], s[None]
    if m.ndim != 3:
        raise ValueError(f"masks and maps must have shape (N, H, W), got {m.shape}")
    return _as_binary(m, "masks"), _as_scores(s, "maps")


# ------------------------------------------------------------------ pixel internals


def _sorted_normal_scores(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Scores of all normal pixels, ascending; the single big sort both pixel metrics use."""
    normal = maps[~masks]  # boolean indexing returns a copy, so sorting in place is safe
    normal.sort()
    return normal


def _auroc_vs_sorted(positive: np.ndarray, negative_sorted: np.ndarray) -> float:
    """Exact AUROC = P(pos > neg) + 0.5 P(pos == neg) (Mann-Whitney U with ties).

    For each positive score the number of negatives strictly below it (``left``) and
    not above it (``right``) come from binary searches in the sorted negatives;
    ``left + right`` is twice the positive's U contribution (ties count half). Integer
    sums keep it exact.
    """
    n_pos, n_neg = positive.size, negative_sorted.size
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    queries = np.sort(positive)  # sorted queries make searchsorted much faster
    left = np.searchsorted(negative_sorted, queries, side="left")
    right = np.searchsorted(negative_sorted, queries, side="right")
    twice_u = int(left.sum(dtype=np.int64)) + int(right.sum(dtype=np.int64))
    return twice_u / (2.0 * n_pos * n_neg)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a curve with non-decreasing ``x`` from x[0] to ``x_max``.

    If ``x_max`` falls inside a segment, ``y`` is linearly interpolated at ``x_max``
    (as in the MVTec AD evaluation code) instead of dropping or keeping the whole segment.
    """
    if x_max < x[-1]:
        end = int(np.searchsorted(x, x_max, side="right"))  # x[end-1] <= x_max < x[end]
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        x = np.append(x[:end], x_max)
        y = np.append(y[:end], y_at)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) * 0.5)


def _pro_curve(
    anomalous_scores: np.ndarray,
    anomalous_weights: np.ndarray,
    normal_sorted: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve (fpr, pro) over every distinct threshold, as a polyline.

    A pixel counts as detected at threshold t when its score >= t. Sweeping t downwards,
    each anomalous pixel adds its weight 1 / (region size * number of regions) to PRO and
    each normal pixel adds 1 / (number of normal pixels) to FPR; a group of tied scores
    is added at once, so ties produce one (possibly diagonal) segment.

    Thresholds that only move normal pixels change FPR at constant PRO, i.e. they lie on
    a horizontal line and add nothing to a trapezoid integral or to interpolation on it.
    So the curve is fully described, with no approximation, by two points per distinct
    anomalous score v: (FPR(> v), PRO before v) and (FPR(>= v), PRO including v). The
    FPR counts are binary searches in the sorted normal scores, so the only large sort is
    that of the normal pixels (done once by the caller).
    """
    order = np.argsort(anomalous_scores, kind="stable")[::-1]  # descending
    desc = anomalous_scores[order]
    pro = np.cumsum(anomalous_weights[order])
    last_of_tie = np.append(desc[1:] != desc[:-1], True)
    values = desc[last_of_tie]  # distinct anomalous scores, descending
    pro_at = np.minimum(pro[last_of_tie], 1.0)  # PRO(>= v); clip float round-off
    pro_before = np.concatenate(([0.0], pro_at[:-1]))  # PRO(> v)

    n_normal = normal_sorted.size
    fpr_above = (n_normal - np.searchsorted(normal_sorted, values, side="right")) / n_normal
    fpr_at = (n_normal - np.searchsorted(normal_sorted, values, side="left")) / n_normal

    k = values.size
    fpr = np.empty(2 * k + 2)
    pros = np.empty(2 * k + 2)
    fpr[0], pros[0] = 0.0, 0.0  # threshold above every score
    fpr[1:-1:2], pros[1:-1:2] = fpr_above, pro_before
    fpr[2:-1:2], pros[2:-1:2] = fpr_at, pro_at
    fpr[-1], pros[-1] = 1.0, 1.0  # threshold at the lowest score: everything detected
    return fpr, pros


def _aupro_arrays(
    masks: np.ndarray, maps: np.ndarray, normal_sorted: np.ndarray, fpr_limit: float
) -> float:
    """AUPRO on validated (N, H, W) arrays, reusing already-sorted normal scores."""
    regions, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    if n_regions == 0 or normal_sorted.size == 0:
        return float("nan")
    region_ids = regions[masks]
    region_sizes = np.bincount(region_ids, minlength=n_regions + 1)
    weights = 1.0 / (region_sizes[region_ids] * float(n_regions))
    fpr, pro = _pro_curve(maps[masks], weights, normal_sorted)
    return _trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return fpr_limit


# ---------------------------------------------------------------------- public API


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (1 = defective); NaN if only one class is present.

    NaN instead of an exception because categories with only good (or only bad) test
    images are legitimate and should not abort a whole benchmark run.
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images pooled; NaN if one class.

    Exact (ties count half), computed from one sort of the normal pixels so that tens
    of millions of pixels take a couple of seconds.
    """
    m, s = _pixel_inputs(masks, maps)
    return _auroc_vs_sorted(s[m], _sorted_normal_scores(m, s))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected components of each ground-truth mask (as in the MVTec
    AD evaluation code). For every threshold t (score >= t is flagged): PRO = mean over
    all regions of all images of the fraction of the region flagged, FPR = fraction of
    all normal pixels (defect-free images included) flagged. PRO is integrated over FPR
    in [0, fpr_limit] with the trapezoid rule, interpolating PRO at ``fpr_limit``, and
    divided by ``fpr_limit`` so a perfect detector scores 1.0. Exact over all distinct
    thresholds. NaN if there is no defect region (or no normal pixel).
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    if not m.any():
        return float("nan")
    return _aupro_arrays(m, s, _sorted_normal_scores(m, s), fpr_limit)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best image-level F1 over all thresholds and the threshold reaching it.

    Predict defective when ``score >= threshold``. Returns (nan, nan) when there is no
    defective image (F1 undefined); ties between thresholds go to the highest one.
    """
    y, s = _image_inputs(labels, scores)
    if not y.any():
        return float("nan"), float("nan")
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    # sklearn returns thresholds ascending; search from the top so ties pick the highest.
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))
    return float(f1[best]), float(thresholds[best])


def calibrate_threshold(
    normal_scores: np.ndarray, quantile: float = 0.99, margin: float = 0.0
) -> float:
    """Decision threshold from defect-free validation scores only.

    Returns ``q + margin * (q - median)`` with ``q = np.quantile(scores, quantile)``
    (linear interpolation). The margin is expressed in units of the upper spread of the
    normal scores (quantile minus median), so it means the same for any score scale:
    ``margin=0.5`` pushes the threshold half that spread above the quantile (fewer false
    alarms), a negative margin pulls it below.
    """
    s = _as_scores(_to_numpy(normal_scores), "normal_scores").ravel()
    if s.size == 0:
        raise ValueError("calibrate_threshold needs at least one normal score, got none")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    q = float(np.quantile(s, quantile))
    median = float(np.median(s))
    return q + float(margin) * (q - median)


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) arrays of the image-level ROC curve, for plotting.

    Raises ValueError if only one class is present, since the curve is then undefined.
    """
    y, s = _image_inputs(labels, scores)
    if y.all() or not y.any():
        raise ValueError("ROC curve needs both normal (0) and defective (1) labels")
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def evaluate_all(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics in one dict; NaN where a metric is undefined.

    Keys: ``image_auroc``, ``image_f1_max``, ``f1_threshold`` and, when masks are given,
    ``pixel_auroc`` and ``aupro`` (FPR limit 0.3). The normal-pixel sort is shared by the
    two pixel metrics, so this is faster than calling them separately.
    """
    f1, threshold = f1_max(labels, scores)
    result = {
        "image_auroc": image_auroc(labels, scores),
        "image_f1_max": f1,
        "f1_threshold": threshold,
    }
    if masks is None:
        return result
    if maps is None:
        raise ValueError("masks were given without anomaly maps")
    m, s = _pixel_inputs(masks, maps)
    n_images = _to_numpy(labels).ravel().shape[0]
    if m.shape[0] != n_images:
        raise ValueError(
            f"masks shape {m.shape} has {m.shape[0]} images but labels have {n_images}"
        )
    normal_sorted = _sorted_normal_scores(m, s)
    result["pixel_auroc"] = _auroc_vs_sorted(s[m], normal_sorted)
    result["aupro"] = _aupro_arrays(m, s, normal_sorted, 0.3) if m.any() else float("nan")
    return result

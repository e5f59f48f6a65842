"""Run a trained model over a dataset: maps and scores, then metrics, the
per-image table, heat-map panels and the HTML report."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anomap import metrics, report
from anomap.data import Box, Sample, describe_geometry, discover, load_set
from anomap.files import save_json, save_text
from anomap.machine import describe_machine
from anomap.methods import METHODS
from anomap.run import Detector, LoadSettings
from anomap.runfolder import SELECTION_FILE, DataSource, RunConfig, load_json
from anomap.scoring import pixel_mask, verdict


def _crop(images: torch.Tensor, index: int, box: Box) -> np.ndarray:
    """The photo as the network saw it, without letterbox padding: (h, w, 3) uint8."""
    image = images[index, :, box.top:box.top + box.height, box.left:box.left + box.width]
    return image.permute(1, 2, 0).numpy()


def evaluate_run(run_dir: str | Path, data: str | Path | DataSource | None = None, *,
                 out_dir: str | Path | None = None, settings: LoadSettings | None = None,
                 batch_size: int = 8, panels: bool = True, progress: bool = True
                 ) -> dict[str, Any]:
    """``anomap test``: score the test split, write metrics.json, predictions.csv,
    panels/ and report.html into ``out_dir`` (default: the run folder). ``data``: the
    run's own test images by default, another folder, or a :class:`DataSource` naming
    plain test folders (its root empty: the run's folder). ``run_dir`` may be an export
    folder (``anomap export``), scored by ``settings.runtime`` once it passed its probe
    on this machine."""
    run_dir = Path(run_dir)
    settings = settings or LoadSettings()
    detector = Detector.load(run_dir, settings.device, settings.precision, settings.runtime,
                             settings.probe)
    config = detector.config
    assert config is not None
    source = (config.data if data is None else data if isinstance(data, DataSource)
              else DataSource(str(data)))
    spec = discover(source.root or config.data.root, defect_dir=source.defect_dir,
                    mask_dir=source.mask_dir, test_normal_dir=source.test_normal_dir)
    if not spec.test:
        raise ValueError(f"{spec.root}: no test images found (MVTec layout: test/<type>/; "
                         "plain folders: --defect-dir and --test-normal-dir)")
    out = Path(out_dir) if out_dir else run_dir
    started = time.perf_counter()
    loaded = load_set(spec.test, detector.geometry, with_masks=True, desc="reading test images",
                      progress=progress)
    model_started = time.perf_counter()
    reading = detector.reader.read_set(detector.model, loaded, batch_size=batch_size,
                                       device=detector.device, progress=progress)
    maps, scores = reading.maps, reading.scores
    model_seconds = time.perf_counter() - model_started
    seconds = time.perf_counter() - started

    labels = loaded.labels
    has_mask = np.array([s.label == 0 or s.mask_path is not None for s in loaded.samples])
    pixel_masks = pixel_maps = None
    if loaded.masks is not None and has_mask.any() and labels[has_mask].any():
        pixel_masks = loaded.masks[torch.from_numpy(has_mask)].numpy()
        pixel_maps = maps[torch.from_numpy(has_mask)].numpy()
    metrics_started = time.perf_counter()
    result: dict[str, Any] = metrics.evaluate_all(labels, scores)
    if pixel_masks is not None:  # pixel metrics on the normals and the masked defects only
        pixel = metrics.evaluate_all(labels[has_mask], scores[has_mask], pixel_masks,
                                     pixel_maps)
        result.update(pixel_auroc=pixel["pixel_auroc"], aupro=pixel["aupro"])
    result["n_pixel_images"] = int(has_mask.sum()) if pixel_masks is not None else 0
    result["metrics_seconds"] = round(time.perf_counter() - metrics_started, 3)
    result["per_defect_type"] = per_defect_type_auroc(loaded.samples, scores)
    result.setdefault("pixel_auroc", float("nan"))
    result.setdefault("aupro", float("nan"))
    threshold = detector.threshold
    result.update(
        threshold=threshold, pixel_threshold=detector.pixel_threshold,
        n_images=len(loaded), n_defective=int(labels.sum()),
        n_skipped=len(loaded.skipped), skipped=loaded.skipped, seconds=round(seconds, 3),
        images_per_second=round(len(loaded) / seconds, 3),
        model_images_per_second=round(len(loaded) / model_seconds, 3),
        precision=detector.precision, runtime=detector.runtime, batch_size=batch_size,
        runtime_choice=detector.load_report, machine=describe_machine(),
        method=config.method, backbone=config.model.get("backbone"),
        settings=describe_settings(config),
        data=str(spec.root), **report.confusion_at(labels, scores, threshold))

    rows = []
    vmin, vmax = detector.display_range
    for i, sample in enumerate(tqdm(loaded.samples, desc="writing panels", disable=not progress
                                    or not panels, leave=False)):
        said = verdict(scores[i], threshold)
        row = {"path": str(sample.path), "label": int(sample.label),
               "defect_type": sample.defect_type, "score": float(scores[i]), "verdict": said,
               "panel_png": None}
        if panels:
            # report.panel resizes map and masks to the cropped photo itself
            gt = loaded.masks[i].numpy() if sample.mask_path else None
            amap = maps[i].numpy()
            caption = f"{sample.defect_type}  score {scores[i]:.4g}  {said}"
            picture = report.panel(_crop(loaded.images, i, loaded.boxes[i]), amap, vmin, vmax,
                                   gt_mask=gt, pred_mask=pixel_mask(amap, detector.pixel_threshold),
                                   caption=caption)
            path = out / "panels" / sample.defect_type / f"{sample.path.stem}.png"
            row["panel_png"] = str(report.save_png(picture, path))
        rows.append(row)

    write_predictions_csv(rows, out / "predictions.csv")
    save_json(result, out / "metrics.json")
    title = f"anomap {config.method} on {spec.root.name}"
    selection = run_dir / SELECTION_FILE  # a run chosen by --model auto ranks its rivals
    report.write_html_report(out / "report.html", title=title, metrics=_headline(result),
                             rows=rows, threshold=threshold,
                             selection=load_json(selection) if selection.is_file() else None)
    return result


def per_defect_type_auroc(samples: list[Sample], scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against the normal test images: shows
    which kinds of defect a model misses."""
    types = np.array([s.defect_type for s in samples])
    labels = np.array([s.label for s in samples])
    normal = labels == 0
    return {t: metrics.image_auroc(np.r_[np.zeros(normal.sum()), np.ones((types == t).sum())],
                                   np.r_[scores[normal], scores[types == t]])
            for t in sorted(set(types[labels == 1]))}


def describe_settings(config: RunConfig) -> str:
    """One line that says which model a report is about: the options that change its
    numbers (the method names its own, :meth:`AnomalyModel.describe_options`)."""
    recipe = config.recipe
    parts = [config.method]
    if config.method in METHODS:
        parts.extend(METHODS[config.method].describe_options(config.model))
    parts.append(describe_geometry(asdict(config.geometry)))
    if recipe:
        parts.append(f"{recipe.get('epochs')} epochs, batch {recipe.get('batch_size')}")
    if recipe.get("augment", "none") != "none":
        parts.append(f"augment {recipe['augment']}")
    if config.map_normalization != "none":
        parts.append(f"map normalised per {config.map_normalization}")
    if config.retuned_from:
        parts.append(f"retuned from {Path(config.retuned_from).name}")
    return ", ".join(part for part in parts if part)


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("settings", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "f1_threshold",
            "threshold", "n_images", "n_defective", "n_skipped", "seconds", "images_per_second")
    return {k: result[k] for k in keys if k in result}


def write_predictions_csv(rows: list[dict[str, Any]], path: Path | None = None,
                          columns: tuple[str, ...] = ("path", "label", "defect_type", "score",
                                                      "verdict")) -> str:
    """The per-image table; returned as text and written to ``path`` when given."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    text = buffer.getvalue()
    if path is not None:
        save_text(text, path)
    return text

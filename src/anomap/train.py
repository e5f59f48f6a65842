"""One training loop for every method.

The loop knows nothing of the method it trains: it asks the model for
``training_loss(images)`` on normal images, steps the optimiser the recipe
names, scores the held-out normal images after every epoch, keeps the
checkpoint the recipe's ``selection`` rule prefers (lowest held-out scores,
the last epoch, or best AUROC on synthetic anomalies pasted into the held-out
normals; no test image is ever looked at),
writes the full state atomically every epoch so an interrupted run resumes
where it stopped, and finally calibrates the pass/fail threshold on the
held-out normals.
"""

from __future__ import annotations

import csv
import io
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from anomap import distributed
from anomap.allocator import keep_freed_memory
from anomap.calibrate import NO_SPLIT_SOURCE, Calibration
from anomap.data import Geometry, LoadedSet, load_set, to_float
from anomap.files import save_text, save_torch
from anomap.inference import InferenceModel
from anomap.methods import AnomalyModel, Recipe, build_model, get_method
from anomap.metrics import image_auroc, pixel_auroc
from anomap.orientation import random_orientations
from anomap.runfolder import (
    CONFIG_FILE,
    HISTORY_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    DataSource,
    RunConfig,
    RunExistsError,
    load_calibration,
    normal_split,
    resolve_device,
)
from anomap.scoring import MapReader
from anomap.standardize import PositionStats, check_normalization, require_enough_images
from anomap.synth.augment import color_jitter
from anomap.synth.check import synthetic_check_set
from anomap.version import __version__

log = logging.getLogger(__name__)

#: offset of the per-epoch seed that draws augmentation variants (apart from the order's)
AUGMENT_STREAM = 50_000_017


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(recipe: Recipe, params: list[torch.nn.Parameter] | list[dict[str, Any]]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimiser and schedule over ``params`` (tensors, or a method's
    parameter groups, each of which may set its own weight decay)."""
    name = recipe.optimizer.lower()
    if name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    elif name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}: sgd, adam or adamw")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestone_epochs(recipe),
                                                     recipe.lr_gamma)
    return optimizer, scheduler


def lr_milestone_epochs(recipe: Recipe) -> list[int]:
    """The epochs after which the lr is multiplied by ``lr_gamma``: fractions of the
    schedule's length, which is the training's own unless ``schedule_epochs`` is set."""
    length = recipe.schedule_epochs or recipe.epochs
    return sorted({max(1, int(round(f * length))) for f in recipe.lr_milestones})


#: Recipe fields a resumed run may change: train it on for longer and decay the lr at the end.
EXTENDABLE = ("epochs", "lr_milestones", "lr_gamma", "schedule_epochs")


def _extended_recipe(saved: dict[str, Any], overrides: dict[str, Any], run_dir: Path
                     ) -> dict[str, Any]:
    """The saved recipe with the fields a resume may change; others given are ignored, loudly.
    Fields added to ``Recipe`` after the run was made read as their defaults (what it ran with)."""
    saved = {**asdict(Recipe()), **saved}
    recipe = dict(saved)
    for key, value in overrides.items():
        if value is None or (key in recipe and _same(recipe[key], value)):
            continue
        if key in EXTENDABLE:
            recipe[key] = list(value) if key == "lr_milestones" else value
            log.info("%s: %s changed from %s to %s on resume", run_dir, key, saved.get(key), value)
        else:
            log.warning("%s: --%s is ignored on resume (the run keeps %s); only %s may change",
                        run_dir, key.replace("_", "-"), saved.get(key),
                        ", ".join("--" + k.replace("_", "-") for k in EXTENDABLE))
    return recipe


def _warn_fixed_on_resume(config: RunConfig, model_config: dict[str, Any], preset: str,
                          run_dir: Path) -> None:
    """Model options and the preset are fixed once a run exists: name any given that differ."""
    for key, value in model_config.items():
        saved = config.model.get(key)
        if value is None or _same(saved, value):
            continue
        log.warning("%s: --%s is ignored on resume (the run keeps %s); change how a trained "
                    "model is read with 'anomap retune', what it learns with a new --out",
                    run_dir, key.replace("_", "-"), saved)
    if preset not in ("auto", config.preset):
        log.warning("%s: --preset %s is ignored on resume (the run keeps %s)", run_dir, preset,
                    config.preset)


def _epochs_done(run_dir: Path) -> int:
    state = run_dir / STATE_FILE
    if not state.is_file():
        return 0
    return int(torch.load(state, map_location="cpu", weights_only=False, mmap=True)["epoch"])


def _same(saved: Any, given: Any) -> bool:
    if isinstance(saved, (list, tuple)) and isinstance(given, (list, tuple)):
        return list(saved) == list(given)
    return saved == given


def _follow_recipe(scheduler: torch.optim.lr_scheduler.MultiStepLR, recipe: Recipe,
                   epoch: int) -> None:
    """Point a restored scheduler at the recipe's milestones (a resume may move them) and set
    the lr the recipe gives after ``epoch`` finished epochs."""
    milestones = Counter(lr_milestone_epochs(recipe))
    if milestones == scheduler.milestones and recipe.lr_gamma == scheduler.gamma:
        return  # the saved schedule: keep its lr exactly as it was
    scheduler.milestones, scheduler.gamma = milestones, recipe.lr_gamma
    passed = sum(count for milestone, count in milestones.items() if milestone <= epoch)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        lr = base
        for _ in range(passed):  # as MultiStepLR multiplies, to the last bit
            lr *= recipe.lr_gamma
        if lr > group["lr"]:
            log.warning("lr goes up from %g to %g on resume: the new milestones lie after "
                        "epoch %d, where the old schedule had decayed it", group["lr"], lr, epoch)
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


@dataclass(frozen=True)
class TrainingPlan:
    """How to train, shared by the CLI, the library and ``--model auto``: one of the
    method's presets (``paper``; ``cpu`` for methods too heavy for a CPU; others
    measured for a kind of data, such as STPM's ``large-defects``; ``auto``: paper
    or cpu by device), then single method options (``model``) and recipe fields
    (``recipe``) changed on top (None: not given), how photos become the network's
    input, the seed, and how the threshold is calibrated."""

    preset: str = "auto"
    model: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    resize_mode: str | None = None  # letterbox (default), mirror, stretch
    margin: int | None = None
    seed: int = 0
    threshold_quantile: float = 0.99
    map_normalization: str | None = None  # default: the preset's


def fit(method: str, data: str | Path | DataSource | None, run_dir: str | Path,
        plan: TrainingPlan | None = None, *, device: str = "auto", resume: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """``anomap train``: everything from a data folder to a usable run folder.

    ``data``: the folder (its normals, 20% held out), or a :class:`DataSource`
    naming test folders and the share held out; None on ``resume``. ``plan``:
    how to train (:class:`TrainingPlan`); on ``resume`` only its recipe's
    length and schedule may change.
    """
    plan = plan or TrainingPlan()
    model_config, recipe_overrides = plan.model, plan.recipe
    preset, map_normalization = plan.preset, plan.map_normalization
    resize_mode, margin = plan.resize_mode, plan.margin
    run_dir = Path(run_dir)
    ranks = distributed.current()
    torch_device = ranks.device(resolve_device(device))
    ranks.start(torch_device)
    progress = progress and ranks.is_main
    config_path = run_dir / CONFIG_FILE
    if map_normalization is not None:
        check_normalization(map_normalization)
    if resume:
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: nothing to resume in {run_dir}")
        config = RunConfig.load(run_dir)
        config = config.updated(
            recipe=_extended_recipe(config.recipe, recipe_overrides or {}, run_dir),
            resume_commands=(*config.resume_commands, " ".join(sys.argv)))
        _warn_fixed_on_resume(config, model_config or {}, preset, run_dir)
        from_preset: dict[str, Any] = {}
        fixed = config.map_normalization
        if map_normalization not in (None, fixed):
            raise ValueError(f"{run_dir} is calibrated with --map-normalization {fixed}; to "
                             f"read it otherwise use 'anomap retune --map-normalization "
                             f"{map_normalization}'")
        saved = config.geometry
        wanted = (resize_mode or saved.mode, saved.margin if margin is None else margin)
        if wanted != (saved.mode, saved.margin):
            raise ValueError(f"{run_dir} was trained with --resize-mode {saved.mode} --margin "
                             f"{saved.margin}; the input geometry cannot change on --resume: "
                             "start a new run with --out")
        done = _epochs_done(run_dir)
        if config.recipe["epochs"] < done:
            raise ValueError(f"{run_dir} has trained {done} epochs already; --epochs "
                             f"{config.recipe['epochs']} would end before that")
    else:
        if (run_dir / STATE_FILE).exists() or config_path.exists():
            raise RunExistsError(
                f"{run_dir} already holds a run. Continue it with --resume, "
                "or choose another --out folder.")
        ranks.barrier()  # every rank has checked before rank 0 writes
        method_cls = get_method(method)
        given = {k: v for k, v in (model_config or {}).items() if v is not None}
        unknown = sorted(set(given) - set(method_cls.default_config()))
        if unknown:
            raise ValueError(f"{method_cls.name} has no option {', '.join(unknown)}; its "
                             f"options: {', '.join(method_cls.default_config())}")
        preset = method_cls.resolve_preset(preset, torch_device.type)
        chosen = method_cls.presets()[preset]
        from_preset = {k: v for k, v in chosen.config.items() if k not in given}
        recipe = chosen.recipe.updated(**(recipe_overrides or {}))
        data = _resolved(data, chosen.holdout)
        config = RunConfig(
            anomap_version=__version__, method=method_cls.name, preset=preset,
            model={**method_cls.default_config(), **chosen.config, **given},
            recipe=asdict(recipe),
            geometry=Geometry(recipe.image_size, resize_mode or "letterbox", margin or 0),
            data=data, seed=plan.seed, threshold_quantile=plan.threshold_quantile,
            map_normalization=map_normalization or chosen.map_normalization,
            command=" ".join(sys.argv))
    recipe_dict = dict(config.recipe)
    recipe_dict["lr_milestones"] = tuple(recipe_dict["lr_milestones"])
    recipe = Recipe(**recipe_dict)
    geometry = config.geometry
    seed = config.seed
    seed_everything(seed)
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick kernels

    # Build first: a wrong backbone name or unavailable weights fail before any data is read.
    try:
        model = build_model(config.method, **config.model).to(torch_device)
    except ValueError as error:
        if not from_preset:
            raise
        settings = ", ".join(f"--{k.replace('_', '-')} "
                             + (" ".join(map(str, v)) if isinstance(v, list) else str(v))
                             for k, v in from_preset.items())
        raise ValueError(f"{error} (from --preset {config.preset}, which sets {settings}: "
                         "give the conflicting option too, or another --preset)") from error
    train_samples, val_samples = normal_split(config)
    train_set = load_set(train_samples, geometry, desc="reading training images",
                         progress=progress)
    val_set = (load_set(val_samples, geometry, desc="reading validation images",
                        progress=progress) if val_samples else None)
    require_enough_images(config.map_normalization,
                          len(val_set) if val_set is not None else len(train_set),
                          config.data.root)
    skipped = train_set.skipped + (val_set.skipped if val_set else [])
    for line in skipped:
        log.warning("skipped unreadable file %s", line)

    if not resume:  # ``auto`` options settled once, from the normal images, and recorded
        sample = to_float(train_set.images[:: max(1, len(train_set) // 64)])
        for option, (value, why) in model.decide_from_data(sample).items():
            config.model[option] = value
            config.decisions[option] = why
            log.info("%s auto -> %s: %s", option, value, why)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir)
    calibration = Calibration(run_dir, config.threshold_quantile, skipped,
                              config.map_normalization, config.model)
    history = train_loop(model, recipe, train_set, val_set, geometry, run_dir,
                         device=torch_device, seed=seed, resume=resume, progress=progress,
                         calibration=calibration, ranks=ranks)
    if ranks.is_main:
        _finish_training(model, train_set, val_set, geometry, run_dir, recipe, calibration,
                         torch_device, seed, progress)
    if val_set is None and ranks.is_main:  # nothing held out: calibrate on the training images
        reading = MapReader(geometry, model.config).read_set(
            model, train_set, device=torch_device, batch_size=recipe.batch_size,
            progress=progress, desc="calibrating")
        calibration.write(reading.maps, reading.scores, history[-1]["epoch"],
                          source=NO_SPLIT_SOURCE)
    ranks.barrier()  # rank 0 has written the run
    return {"run_dir": str(run_dir), "history": history,
            "decisions": {k: (config.model[k], why) for k, why in config.decisions.items()},
            **load_calibration(run_dir)}


def _finish_training(model: AnomalyModel, train_set: LoadedSet, val_set: LoadedSet | None,
                     geometry: Geometry, run_dir: Path, recipe: Recipe,
                     calibration: Calibration, device: torch.device, seed: int,
                     progress: bool) -> None:
    """A method's second stage (RSTPM's discriminator), once, on the kept epoch's
    weights; model.pt and the threshold then include it."""
    if type(model).finish_training is AnomalyModel.finish_training:
        return
    weights = run_dir / WEIGHTS_FILE
    kept = torch.load(weights, map_location="cpu", weights_only=False)
    model.load_state_dict(kept["model"])
    if "finished" in kept:  # a resumed run whose second stage is done
        return
    finished = model.finish_training(train_set.images, device=device, seed=seed,
                                     progress=progress)
    if not finished:
        return
    _save_checkpoint({**kept, "model": model.state_dict(), "finished": finished}, weights)
    if val_set is not None:
        reading = MapReader(geometry, model.config).read_set(
            model, val_set, batch_size=recipe.batch_size, device=device, progress=False)
        calibration.write(reading.maps, reading.scores, kept["epoch"])


def _resolved(data: str | Path | DataSource | None, holdout: float) -> DataSource:
    """The data source with absolute folders and its hold-out settled (``holdout``,
    the preset's, unless the source gives one)."""
    if data is None:
        raise ValueError("--data is required (unless --resume)")
    source = data if isinstance(data, DataSource) else DataSource(root=str(data))
    fraction = holdout if source.val_fraction is None else source.val_fraction
    return replace(source, root=str(Path(source.root).resolve()), val_fraction=fraction, **{
        name: str(getattr(source, name)) for name in ("defect_dir", "mask_dir",
                                                      "test_normal_dir")
        if getattr(source, name)})


def synthetic_aurocs(model: AnomalyModel | InferenceModel, geometry: Geometry,
                     check: LoadedSet, normal_maps: torch.Tensor, normal_scores: np.ndarray, *,
                     batch_size: int, device: torch.device,
                     standardize: PositionStats | None = None) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of clean held-out normals against ``check``
    (``standardize``: read the maps as a run with position statistics does)."""
    reading = MapReader(geometry, model.config, standardize).read_set(
        model, check, batch_size=batch_size, device=device, progress=False)
    maps, scores = reading.maps, reading.scores
    labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(scores))]
    assert check.masks is not None
    masks = torch.cat((torch.zeros_like(normal_maps, dtype=torch.bool), check.masks))
    return (image_auroc(labels, np.r_[normal_scores, scores]),
            pixel_auroc(masks.numpy(), torch.cat((normal_maps, maps)).numpy()))


#: most memory the frozen-target cache may take; beyond it targets are recomputed per step
TARGET_CACHE_BYTES = 2 * 2**30


@torch.no_grad()
def cache_frozen_targets(model: AnomalyModel, train_set: LoadedSet, *, batch_size: int,
                         device: torch.device, budget_bytes: int | None = None,
                         progress: bool = True) -> list[torch.Tensor] | None:
    """The method's ``frozen_targets`` for every training image, on ``device``,
    or None when the method has none or they would not fit in ``budget_bytes``
    (default ``TARGET_CACHE_BYTES``)."""
    budget_bytes = TARGET_CACHE_BYTES if budget_bytes is None else budget_bytes
    first = model.frozen_targets(to_float(train_set.images[:1]).to(device))
    if first is None:
        return None
    needed = len(train_set) * sum(t.numel() * t.element_size() for t in first)
    if needed > budget_bytes:
        log.info("frozen targets need %.1f GiB, over the %.1f GiB cache: computing them "
                 "every step", needed / 2**30, budget_bytes / 2**30)
        return None
    cache = [torch.empty(len(train_set), *t.shape[1:], dtype=t.dtype, device=device)
             for t in first]
    for start in tqdm(range(0, len(train_set), batch_size), desc="caching frozen targets",
                      disable=not progress, leave=False, unit="batch"):
        images = to_float(train_set.images[start:start + batch_size]).to(device)
        for stored, target in zip(cache, model.frozen_targets(images), strict=True):
            stored[start:start + len(images)] = target
    return cache


class _TrainingStep(torch.nn.Module):
    """``training_loss`` as a forward pass, so DistributedDataParallel can wrap it
    (and average its gradients over ranks) without the method knowing."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, targets: list[torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        return self.model.training_loss(images, targets)


def _training_step(model: AnomalyModel, device: torch.device,
                   ranks: distributed.Distributed) -> torch.nn.Module:
    """The loss as a module; DistributedDataParallel when torchrun started several ranks."""
    if (not ranks.enabled and device.type == "cuda" and torch.cuda.device_count() > 1):
        log.warning("training on one of %d GPUs; to use them all: torchrun "
                    "--nproc_per_node %d -m anomap train ...", torch.cuda.device_count(),
                    torch.cuda.device_count())
    return ranks.wrap(_TrainingStep(model), device)


def train_loop(model: AnomalyModel, recipe: Recipe, train_set: LoadedSet,
               val_set: LoadedSet | None, geometry: Geometry, run_dir: Path, *,
               device: torch.device, seed: int = 0, resume: bool = False,
               progress: bool = True, calibration: Calibration | None = None,
               ranks: distributed.Distributed | None = None) -> list[dict[str, float]]:
    """Train for ``recipe.epochs``; returns the per-epoch history. With several
    ``ranks`` each trains on its share of every batch and only rank 0 writes."""
    ranks = ranks or distributed.Distributed()
    if device.type == "cpu":
        keep_freed_memory()
    check = (synthetic_check_set(val_set, geometry, seed)
             if recipe.selection == "synthetic" and val_set is not None else None)
    # a method with nothing to learn by gradient (PatchCore) memorises the images instead
    memorizing = not model.trainable_parameters()
    optimizer, scheduler = ((None, None) if memorizing
                            else build_optimizer(recipe, model.parameter_groups()))
    start_epoch, best_val, history = 0, float("inf"), []
    state_path = run_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"])
        start_epoch, best_val, history = state["epoch"], state["best_val"], state["history"]
        if optimizer is not None and scheduler is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _follow_recipe(scheduler, recipe, start_epoch)
        log.info("resuming %s after epoch %d", run_dir, start_epoch)
    model.to(device).train()
    step_fn = None if memorizing else _training_step(model, device, ranks)
    n = len(train_set)
    per_epoch = recipe.epoch_samples or n
    batch_size = min(recipe.batch_size, per_epoch)
    # Augmented images change every epoch, so their frozen targets must be computed anew.
    altered = recipe.augment != "none" or recipe.color_jitter > 0
    targets = (None if altered or memorizing else
               cache_frozen_targets(model, train_set, batch_size=batch_size, device=device,
                                    progress=progress))
    steps = steps_per_epoch(recipe, n)
    epochs = tqdm(range(start_epoch, recipe.epochs), desc="epochs", initial=start_epoch,
                  total=recipe.epochs, disable=not progress, unit="epoch")
    for epoch in epochs:
        started = time.perf_counter()
        order = epoch_order(n, per_epoch, seed * 100_003 + epoch)
        variants = torch.Generator().manual_seed(seed * 100_003 + epoch + AUGMENT_STREAM)
        total, seen = 0.0, 0
        if memorizing:
            model.eval().memorize(_batches(train_set, batch_size, device, progress), n, seed)
            total, seen = 0.0, n
        epoch_lr = optimizer.param_groups[0]["lr"] if optimizer is not None else 0.0
        bar = tqdm(range(0 if memorizing else steps), desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   leave=False, disable=not progress, unit="batch")
        for step in bar:
            index = order[step * batch_size:(step + 1) * batch_size]
            if len(index) < 2 * ranks.world_size and steps > 1:  # a share of 1 breaks BatchNorm
                continue
            index = ranks.share(index)
            # uint8 travels to the device (4x less than float), then is converted and turned there
            images = train_set.images[index].to(device, non_blocking=True)
            images = random_orientations(to_float(images), recipe.augment, variants)
            if recipe.color_jitter > 0:  # one jitter per image, before any anomaly is pasted
                images = color_jitter(images, recipe.color_jitter, variants)
            batch_targets = (None if targets is None
                             else [t[index.to(t.device)] for t in targets])
            losses = {k: v.mean() for k, v in step_fn(images, batch_targets).items()}  # GPU mean
            assert optimizer is not None
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            total += float(losses["loss"].detach()) * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{total / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - started):.1f}")
        if scheduler is not None:
            scheduler.step()
        train_seconds = time.perf_counter() - started
        val_score, val_map, judged = float("nan"), float("nan"), {}
        if val_set is not None and ranks.is_main:
            reading = MapReader(geometry, model.config).read_set(
                model, val_set, batch_size=recipe.batch_size, device=device, progress=False)
            maps, scores = reading.maps, reading.scores
            val_score, val_map = float(scores.mean()), float(maps.mean())
            if check is not None:
                image, pixel = synthetic_aurocs(model, geometry, check, maps, scores,
                                                batch_size=recipe.batch_size, device=device)
                judged = {"synthetic_image_auroc": image, "synthetic_pixel_auroc": pixel}
            model.train()
        # Lower is better; NaN (no validation) always counts as better: the latest is kept.
        criterion = {"val_score": val_score, "last": -float(epoch + 1),
                     "val_map_mean": val_map,
                     "synthetic": -sum(judged.values()) / 2 if judged else float("nan")
                     }[recipe.selection]
        val_score, criterion = ranks.broadcast([val_score, criterion])  # rank 0 judged
        improved = not (criterion >= best_val)
        if improved:
            best_val = criterion if criterion == criterion else best_val
        if improved and ranks.is_main:
            _save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1,
                              "val_score": val_score, **judged}, run_dir / WEIGHTS_FILE)
            if calibration is not None and val_set is not None:
                calibration.write(maps, scores, epoch + 1)
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1),
                        "val_mean_score": val_score, "val_mean_map": val_map, **judged,
                        "lr": epoch_lr,
                        "seconds": round(time.perf_counter() - started, 3),
                        "train_images_per_second": round(seen / train_seconds, 3),
                        "best": improved})
        if ranks.is_main:
            _save_checkpoint({"model": model.state_dict(),
                              "optimizer": optimizer and optimizer.state_dict(),
                              "scheduler": scheduler and scheduler.state_dict(),
                              "rng": torch.get_rng_state(),
                              "epoch": epoch + 1, "best_val": best_val, "history": history},
                             state_path, epoch)
            _write_history(history, run_dir / HISTORY_FILE)
        epochs.set_postfix(loss=f"{history[-1]['loss']:.4f}", val=f"{val_score:.4g}",
                           best=f"{best_val:.4g}")
    return history


def steps_per_epoch(recipe: Recipe, n: int) -> int:
    """Optimiser steps in one epoch over ``n`` training images (FractalAD's paper
    recipe: 391 samples in batches of 32, the short one dropped: 12)."""
    samples = recipe.epoch_samples or n
    batch = min(recipe.batch_size, samples)
    if recipe.drop_last and samples >= batch:
        return samples // batch
    return (samples + batch - 1) // batch


def epoch_order(n: int, samples: int, seed: int) -> torch.Tensor:
    """The image indices of one epoch: ``samples`` of the ``n`` images (all of them
    repeated in turn when more, as FractalAD's dataset does), shuffled by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if samples == n:
        return torch.randperm(n, generator=generator)
    cycled = torch.arange(samples) % n
    return cycled[torch.randperm(samples, generator=generator)]


def _batches(train_set: LoadedSet, batch_size: int, device: torch.device, progress: bool
             ) -> Iterator[torch.Tensor]:
    """The training images in order, as float batches on ``device``."""
    for start in tqdm(range(0, len(train_set), batch_size), desc="memorising", leave=False,
                      disable=not progress, unit="batch"):
        yield to_float(train_set.images[start:start + batch_size]).to(device)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, say); the previous one is intact."""


def _save_checkpoint(state: dict[str, Any], path: Path, epochs_before: int | None = None
                     ) -> None:
    """Write atomically; on failure say what survived and how to continue."""
    try:
        save_torch(state, path)
    except OSError as error:
        after = f" (after epoch {epochs_before})" if epochs_before is not None else ""
        kept = (f"the previous {path.name}{after} is intact" if path.exists()
                else f"no {path.name} was written")
        raise CheckpointError(
            f"could not write {path} ({error.strerror or error}); {kept}. Free the space "
            f"and continue with: anomap train --out {path.parent} --resume") from error


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    # every epoch's keys: a run resumed by a newer anomap may log more columns
    fields = list(dict.fromkeys(key for epoch in history for key in epoch))
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="nan", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    save_text(buffer.getvalue(), path)

"""``paper`` means the paper: each paper preset equals the official code field by
field, FractalAD's epoch is the code's, RSTPM's discriminator trains alone after
the students and survives save and load, the teachers' weights are found where
the error message says, and every recipe field is a flag."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.backbones import create_classifier
from anomap.benchmark import Benchmark, find_categories
from anomap.cli import _recipe_values, build_parser, main
from anomap.data import discover, load_mask
from anomap.demo import make_demo_dataset
from anomap.evaluate import evaluate_run
from anomap.methods import METHODS, Recipe, build_model
from anomap.methods.base import PAPER, PAPER_LITE
from anomap.methods.rstpm import RSTPM
from anomap.run import Detector
from anomap.runfolder import DataSource
from anomap.train import TrainingPlan, epoch_order, fit, steps_per_epoch
from anomap.unet import focal_loss

# What each official code does, field by field: (method, field, value, where).
# STFPM = gdwang08/STFPM @ 2598a5e; DRAEM = VitjanZ/DRAEM @ 2dbf673;
# FractalAD = AIRS-CSR/FractalAD @ e3c45b0. "recipe." fields are Recipe's, "model."
# the method's options, "holdout" the preset's share of normals held out.
OFFICIAL: list[tuple[str, str, Any, str]] = [
    ("stpm", "recipe.optimizer", "sgd", "STFPM main.py:180 torch.optim.SGD"),
    ("stpm", "recipe.lr", 0.4, "STFPM main.py:180"),
    ("stpm", "recipe.momentum", 0.9, "STFPM main.py:180"),
    ("stpm", "recipe.weight_decay", 1e-4, "STFPM main.py:180"),
    ("stpm", "recipe.batch_size", 32, "STFPM main.py:79"),
    ("stpm", "recipe.epochs", 100, "STFPM main.py:76"),
    ("stpm", "recipe.image_size", 256, "STFPM main.py:91-95 Resize([256, 256])"),
    ("stpm", "recipe.lr_milestones", (), "STFPM main.py: no scheduler"),
    ("stpm", "recipe.augment", "none", "STFPM main.py:91-95"),
    ("stpm", "recipe.selection", "val_map_mean", "STFPM main.py:202-214 lowest mean map"),
    ("stpm", "holdout", 0.2, "STFPM main.py:98-99 train_test_split(test_size=0.2)"),
    ("stpm", "model.loss_factor", 1.0, "STFPM main.py:191-195 no 0.5"),
    ("stpm", "model.backbone", "resnet18", "STFPM main.py:39-53 models.resnet18"),
    ("stpm", "model.strides", [4, 8, 16], "STFPM main.py:39-53 layer1-3"),
    ("stpm", "model.image_score", "max", "STFPM main.py:146 max of the map"),
    ("draem", "recipe.optimizer", "adam", "DRAEM train_DRAEM.py:43-45"),
    ("draem", "recipe.lr", 1e-4, "DRAEM README.md training command --lr 0.0001"),
    ("draem", "recipe.lr_milestones", (0.8, 0.9), "DRAEM train_DRAEM.py:47"),
    ("draem", "recipe.lr_gamma", 0.2, "DRAEM train_DRAEM.py:47"),
    ("draem", "recipe.batch_size", 8, "DRAEM README.md --bs 8"),
    ("draem", "recipe.epochs", 700, "DRAEM README.md --epochs 700"),
    ("draem", "recipe.image_size", 256, "DRAEM train_DRAEM.py:53 resize_shape"),
    ("draem", "recipe.selection", "last", "DRAEM train_DRAEM.py:100-101 saved every epoch"),
    ("draem", "holdout", 0.0, "DRAEM train_DRAEM.py:53 all of train/good"),
    ("draem", "model.base_width", 128, "DRAEM model_unet.py:6"),
    ("draem", "model.disc_base_width", 64, "DRAEM model_unet.py:17"),
    ("draem", "model.score_window", 21, "DRAEM test_DRAEM.py:105-107"),
    ("draem", "model.p_anomaly", 0.5, "DRAEM data_loader.py:131-134"),
    ("fractalad", "recipe.optimizer", "adamw", "FractalAD run.py:48-51"),
    ("fractalad", "recipe.lr", 1e-3, "FractalAD run.py:225"),
    ("fractalad", "recipe.weight_decay", 1e-3, "FractalAD run.py:48-49 objects"),
    ("fractalad", "model.head_weight_decay", 0.01, "FractalAD run.py:51 AdamW's default"),
    ("fractalad", "recipe.batch_size", 32, "FractalAD run.py:226"),
    ("fractalad", "recipe.epochs", 100, "FractalAD run.py:224"),
    ("fractalad", "recipe.epoch_samples", 391, "FractalAD mvtec.py:12-14, 69-70"),
    ("fractalad", "recipe.drop_last", True, "FractalAD run.py:88-89"),
    ("fractalad", "recipe.image_size", 256, "FractalAD run.py:227"),
    ("fractalad", "recipe.color_jitter", 0.05, "FractalAD fag.py:158-163"),
    ("fractalad", "recipe.lr_milestones", (), "FractalAD run.py: no scheduler"),
    ("fractalad", "recipe.selection", "last", "FractalAD run.py:137-145"),
    ("fractalad", "holdout", 0.0, "FractalAD mvtec.py:64 all of train/good"),
    ("fractalad", "model.backbone", "resnet18", "FractalAD run.py:222"),
    ("fractalad", "model.distillation", "auto", "FractalAD run.py:24-26 kd_cfg per category"),
    ("fractalad", "model.foreground", "auto", "FractalAD run.py:21-23 findobj_cfg"),
    ("fractalad", "model.image_score", "mean", "FractalAD run.py:191"),
    ("fractalad", "model.anomalies", "fractal", "FractalAD fag.py"),
    ("rstpm", "model.backbone", "resnet18", "RSTPM paper: pair 1 ResNet-18"),
    ("rstpm", "model.second_backbone", "resnet50", "RSTPM paper: pair 2 ResNet-50"),
    ("rstpm", "recipe.lr", 0.4, "RSTPM builds on STFPM main.py:180"),
    ("rstpm", "recipe.selection", "val_map_mean", "as STFPM main.py:202-214"),
]


def _resolved_field(method: str, preset: str, name: str) -> Any:
    chosen = METHODS[method].presets()[preset]
    if name == "holdout":
        return chosen.holdout
    kind, key = name.split(".")
    if kind == "recipe":
        return getattr(chosen.recipe, key)
    return {**METHODS[method].default_config(), **chosen.config}[key]


@pytest.mark.parametrize(("method", "name", "value", "where"), OFFICIAL,
                         ids=[f"{m}-{n}" for m, n, _, _ in OFFICIAL])
def test_paper_preset_is_the_official_code(method: str, name: str, value: Any,
                                           where: str) -> None:
    assert _resolved_field(method, PAPER, name) == value, where


def test_paper_lite_differs_from_paper_only_in_teachers() -> None:
    for method in ("stpm", "rstpm", "fractalad"):
        paper, lite = (METHODS[method].presets()[p] for p in (PAPER, PAPER_LITE))
        assert paper.recipe == lite.recipe and paper.holdout == lite.holdout
        differ = {k for k in paper.config if paper.config[k] != lite.config.get(k)}
        assert differ <= {"backbone", "second_backbone"}, method


def test_fractalad_epoch_is_391_samples_in_12_steps() -> None:
    recipe = METHODS["fractalad"].presets()[PAPER].recipe
    for n in (10, 200, 391, 1000):
        assert steps_per_epoch(recipe, n) == 12
    order = epoch_order(10, 391, seed=3)
    counts = np.bincount(order.numpy(), minlength=10)
    assert len(order) == 391 and set(counts) == {39, 40}
    assert steps_per_epoch(Recipe(batch_size=32), 100) == 4  # default: one pass, kept short


def test_auto_preset_uses_resnet_weights_where_the_message_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stpm = METHODS["stpm"]
    monkeypatch.setenv("ANOMAP_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise OSError("no network in this test")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert stpm.resolve_preset("auto", "cuda") == PAPER_LITE
    with pytest.raises(Exception, match="ANOMAP_WEIGHTS_DIR") as raised:
        build_model("stpm", **stpm.presets()[PAPER].config)
    assert "resnet18-f37072fd.pth" in str(raised.value)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(create_classifier("resnet18", weights=None).state_dict(),
               weights / "resnet18-f37072fd.pth")
    monkeypatch.setenv("ANOMAP_WEIGHTS_DIR", str(weights))
    assert stpm.resolve_preset("auto", "cuda") == PAPER
    assert stpm.resolve_preset("auto", "cpu") == PAPER
    assert METHODS["fractalad"].resolve_preset("auto", "cpu") == "cpu"
    assert METHODS["rstpm"].resolve_preset("auto", "cuda") == PAPER_LITE  # ResNet-50 absent
    model = build_model("stpm", **stpm.presets()[PAPER].config)
    assert model.config["backbone"] == "resnet18"


def test_every_recipe_field_is_a_flag() -> None:
    args = build_parser().parse_args([
        "train", "--out", "r", "--epochs", "3", "--batch-size", "4", "--image-size", "64",
        "--optimizer", "adamw", "--lr", "0.01", "--momentum", "0.5", "--weight-decay", "0.02",
        "--lr-milestones", "0.5", "--lr-gamma", "0.3", "--selection", "val_map_mean",
        "--augment", "flip", "--epoch-samples", "391", "--drop-last", "on",
        "--color-jitter", "0.05"])
    values = _recipe_values(args)
    assert set(values) == set(Recipe.settable())
    recipe = Recipe().updated(**values)
    assert (recipe.optimizer, recipe.weight_decay, recipe.momentum, recipe.epoch_samples,
            recipe.drop_last, recipe.color_jitter, recipe.lr_milestones) == (
        "adamw", 0.02, 0.5, 391, True, 0.05, (0.5,))


def _tiny_rstpm(**options: Any) -> RSTPM:
    torch.manual_seed(0)
    return RSTPM(weights=None, second_weights=None, discriminator=True,
                 discriminator_width=4, discriminator_epochs=2, anomaly_source="procedural",
                 **options)


def test_discriminator_trains_alone_after_the_students() -> None:
    model = _tiny_rstpm()
    images = torch.randn(1, 3, 64, 64).clamp(-1, 1).add(1).mul(100).byte().repeat(6, 1, 1, 1)
    # its loss reaches only the discriminator
    summed = model.level_sums(images.float() / 255)
    masks = (torch.rand(6, 1, 64, 64) > 0.9).float()
    focal_loss(model._discriminate(summed).softmax(dim=1), masks).backward()
    others = [p for n, p in model.named_parameters() if not n.startswith("discriminator.")]
    assert all(p.grad is None for p in others)
    assert any(p.grad is not None for p in model.discriminator.parameters())
    assert not any(id(p) in {id(q) for q in model.discriminator.parameters()}
                   for p in model.trainable_parameters())
    model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = model.finish_training(images, device=torch.device("cpu"), seed=0)
    assert len(history) == 2
    for name, value in model.named_parameters():
        changed = not torch.equal(before[name], value)
        assert changed == name.startswith("discriminator."), name


def test_discriminator_run_saves_and_loads(tmp_path: Path) -> None:
    toy_data = make_demo_dataset(tmp_path / "data", "brick", n_train=10, n_test_good=2,
                                 n_test_per_defect=1, tile_size=64, seed=2)
    run = tmp_path / "run"
    fit("rstpm", toy_data, run, TrainingPlan(
        preset=PAPER_LITE, model={"discriminator": True, "discriminator_width": 4,
                                  "discriminator_epochs": 1, "anomaly_source": "procedural",
                                  "decoder_width": 8},
        recipe={"epochs": 1, "batch_size": 8, "image_size": 64}, resize_mode="stretch"),
        device="cpu", progress=False)
    saved = torch.load(run / "model.pt", weights_only=False)
    assert "finished" in saved and any(k.startswith("discriminator.") for k in saved["model"])
    detector = Detector.load(run, "cpu")
    photo = Image.open(next((toy_data / "test" / "good").iterdir()))
    first = detector.predict([photo])[0].anomaly_map
    assert np.array_equal(first, Detector.load(run, "cpu").predict([photo])[0].anomaly_map)
    # resuming a finished run trains nothing again
    fit("rstpm", None, run, device="cpu", resume=True, progress=False)
    assert torch.equal(torch.load(run / "model.pt", weights_only=False)["model"][
        "discriminator.head.weight"], saved["model"]["discriminator.head.weight"])


def _write(path: Path, value: int = 128, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def _write_mask(path: Path, value: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((32, 32), np.uint8)
    array[4:8, 4:8] = value
    Image.fromarray(array).save(path)


def test_each_layout_reads(tmp_path: Path) -> None:
    # MVTec 3D-AD: RGB images and gt beside them
    cat = tmp_path / "3d" / "bagel"
    for i in range(3):
        _write(cat / "train" / "good" / "rgb" / f"{i:03}.png")
    _write(cat / "test" / "good" / "rgb" / "000.png")
    _write(cat / "test" / "crack" / "rgb" / "000.png")
    _write_mask(cat / "test" / "crack" / "gt" / "000.png")
    spec = discover(cat)
    assert (spec.layout, len(spec.train), [s.label for s in spec.test]) == ("mvtec3d", 3,
                                                                           [1, 0])
    assert load_mask(spec.test[0].mask_path).sum() == 16
    # VisA: the split CSV beside the categories, masks valued by defect index
    visa = tmp_path / "visa"
    for name in ("Normal/0000.JPG", "Normal/0001.JPG", "Normal/0002.JPG", "Anomaly/000.JPG"):
        _write(visa / "candle" / "Data" / "Images" / name)
    _write_mask(visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png", value=3)
    (visa / "split_csv").mkdir()
    (visa / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,train,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0002.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,"
        "candle/Data/Masks/Anomaly/000.png\n"
        "capsules,train,normal,capsules/Data/Images/Normal/0000.JPG,\n")
    spec = discover(visa / "candle")
    assert (spec.layout, len(spec.train), [s.label for s in spec.test]) == ("visa", 2, [0, 1])
    assert load_mask(spec.test[1].mask_path).sum() == 16
    # MVTec LOCO: a folder of masks per image, united
    loco = tmp_path / "loco" / "juice_bottle"
    _write(loco / "train" / "good" / "000.png")
    _write(loco / "test" / "logical_anomalies" / "000.png")
    _write_mask(loco / "ground_truth" / "logical_anomalies" / "000" / "000.png")
    second = np.zeros((32, 32), np.uint8)
    second[20:22, 20:22] = 255
    Image.fromarray(second).save(loco / "ground_truth" / "logical_anomalies" / "000" / "001.png")
    spec = discover(loco)
    assert spec.layout == "mvtec" and load_mask(spec.test[0].mask_path).sum() == 16 + 4
    # plain folders: normals directly, defect/, mask/, test_good/
    plain = tmp_path / "plain"
    for i in range(3):
        _write(plain / f"{i}.png")
    _write(plain / "defect" / "d0.png")
    _write_mask(plain / "mask" / "d0.png")
    _write(plain / "test_good" / "g0.png")
    spec = discover(plain)
    assert (spec.layout, len(spec.train), sorted(s.label for s in spec.test)) == (
        "folder", 3, [0, 1])
    assert all(s.mask_path is not None for s in spec.test if s.label)
    # the benchmark finds each layout's categories (a root, or one category itself)
    assert [p.name for p in find_categories(visa)] == ["candle"]
    assert [p.name for p in find_categories(tmp_path / "3d")] == ["bagel"]
    assert [p.name for p in find_categories(loco)] == ["juice_bottle"]
    assert [p.name for p in find_categories(plain)] == ["plain"]


TINY = {"epochs": 1, "batch_size": 4, "image_size": 32}


def _categories(root: Path) -> Path:
    """Two tiny MVTec-layout categories under root/cats."""
    (root / "cats").mkdir()
    for name, texture in (("alpha", "brick"), ("beta", "grass")):
        made = make_demo_dataset(root / "made" / name, texture, n_train=8, n_test_good=2,
                                 n_test_per_defect=1, tile_size=32, seed=2)
        made.rename(root / "cats" / name)
    return root / "cats"


def test_benchmark_equals_separate_runs_and_resumes_after_a_kill(tmp_path: Path) -> None:
    cats = _categories(tmp_path)
    plan = TrainingPlan(preset=PAPER_LITE, recipe=TINY)
    separate = {}
    for name in ("alpha", "beta"):
        run = tmp_path / "separate" / name
        fit("stpm", DataSource(str(cats / name)), run, plan, device="cpu", progress=False)
        separate[name] = evaluate_run(run, panels=False, progress=False)
    out = tmp_path / "bench"
    arguments = ["benchmark", str(cats), "--out", str(out), "--preset", PAPER_LITE,
                 "--device", "cpu", "--no-progress",
                 *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    process = subprocess.Popen([sys.executable, "-m", "anomap.cli", *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "beta" / "config.json").is_file():  # killed inside the second category
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert (out / "alpha" / "benchmark_row.json").is_file()
    assert not (out / "benchmark.json").exists()
    assert main(arguments) == 0  # the same command again resumes
    table = json.loads((out / "benchmark.json").read_text())
    for row in table["rows"]:
        ours = separate[row["category"]]
        assert row["image_auroc"] == pytest.approx(ours["image_auroc"], abs=1e-9)
        assert row["pixel_auroc"] == pytest.approx(ours["pixel_auroc"], abs=1e-6)
    assert table["mean"]["image_auroc"] == pytest.approx(
        np.mean([r["image_auroc"] for r in table["rows"]]))
    page = (out / "benchmark.html").read_text()
    assert 'href="alpha/report.html"' in page and (out / "alpha" / "report.html").is_file()
    assert "| mean |" in (out / "benchmark.md").read_text()


def test_benchmark_puts_published_numbers_beside_ours(tmp_path: Path) -> None:
    from anomap.benchmark import build_table, markdown

    rows = [{"category": "bottle", "image_auroc": 0.99, "pixel_auroc": 0.97, "aupro": None,
             "train_seconds": 1.0, "images_per_second": 2.0, "report": "bottle/report.html"}]
    table = build_table(Benchmark(tmp_path, "stpm", tmp_path), rows)
    assert table["rows"][0]["published"]["image_auroc"] == 100.0
    assert "99.0 (100.0, -1.0)" in markdown(table)
    assert table["mean"]["published"]["pixel_auroc"] == 98.8  # the same categories' mean
    assert build_table(Benchmark(tmp_path, "fractalad", tmp_path), rows)["mean"][
        "published"] == {}


def test_pasting_at_twice_the_size_leaves_the_rest_of_the_image_alone() -> None:
    from anomap.synth.fractal import fractal_anomalies

    images = torch.rand(4, 3, 64, 64)
    out, masks = fractal_anomalies(images, torch.Generator().manual_seed(0), scale=2)
    assert out.shape == images.shape and masks.shape == (4, 1, 64, 64)
    changed = (out - images).abs().amax(dim=1, keepdim=True) > 0
    assert not (changed & (masks == 0)).any()  # every changed pixel is in the target
    assert masks.flatten(1).any(dim=1).all()


def test_object_patches_are_sized_by_the_object() -> None:
    from anomap.synth.fractal import object_side

    foreground = torch.zeros(64, 64, dtype=torch.bool)
    foreground[10:30, 5:55] = True
    assert object_side(foreground) == 20

"""Training survives what a factory PC does to it: a process killed with SIGKILL
mid-epoch or mid-checkpoint resumes to the same weights, and a full disk
leaves the previous checkpoint intact and says so."""

from __future__ import annotations

import csv
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anomap.train import CheckpointError, TrainingPlan, fit

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCHS = 5
TRAIN = ["train", "--epochs", str(EPOCHS), "--batch-size", "8", "--image-size", "64",
         "--resize-mode", "stretch", "--device", "cpu", "--seed", "3", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(data: Path, run: Path, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m anomap train`` in a fresh process; ``prelude`` runs first (a fault to inject)."""
    code = f"{prelude}\nimport sys\nfrom anomap.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *TRAIN, "--data", str(data), "--out",
                           str(run), *extra], env=ENV, capture_output=True, text=True,
                          timeout=300)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model.pt", weights_only=True)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key
    assert (torch.load(a / "last.pt", weights_only=False)["epoch"]
            == torch.load(b / "last.pt", weights_only=False)["epoch"] == EPOCHS)


@pytest.fixture(scope="module")
def reference(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _train(toy_data, run).returncode == 0
    return run


def test_sigkill_at_a_random_moment_then_resume_gives_the_same_weights(
        toy_data: Path, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "anomap", *TRAIN, "--data", str(toy_data),
                                "--out", str(run)], env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while (not (run / "last.pt").exists() and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))  # mid-epoch, at some point
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = torch.load(run / "last.pt", weights_only=False)["epoch"]
    assert done < EPOCHS, "the run finished before it was killed; the test proved nothing"
    resumed = _train(toy_data, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(run, reference)


KILL_IN_CHECKPOINT = """
import os, signal
import anomap.files
real_replace, writes = os.replace, []
def replace(source, target):
    if str(target).endswith("last.pt"):
        writes.append(target)
        if len(writes) == 2:  # epoch 2's state fully in its temporary file, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
anomap.files.os.replace = replace
"""


def test_sigkill_during_the_checkpoint_write_then_resume_gives_the_same_weights(
        toy_data: Path, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    killed = _train(toy_data, run, prelude=KILL_IN_CHECKPOINT)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1  # the previous one
    resumed = _train(toy_data, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_weights(run, reference)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(
        toy_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anomap.files

    real_save, calls = torch.save, []

    def save(obj: object, handle: object) -> None:
        calls.append(isinstance(obj, dict) and "optimizer" in obj)  # last.pt, not model.pt
        if sum(calls) == 2 and calls[-1]:  # epoch 2's training state
            handle.write(b"half a checkpoint")  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, handle)

    monkeypatch.setattr(anomap.files.torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous last\.pt "
                                              r"\(after epoch 1\) is intact.*--resume"):
        fit(
            "stpm",
            toy_data,
            run,
            TrainingPlan(
                recipe={"epochs": 3, "batch_size": 8, "image_size": 64},
                resize_mode="stretch",
                seed=3,
            ),
            device="cpu",
            progress=False,
        )
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no debris
    monkeypatch.setattr(anomap.files.torch, "save", real_save)
    fit(
        "stpm",
        toy_data,
        run,
        TrainingPlan(recipe={"epochs": 3}),
        device="cpu",
        resume=True,
        progress=False,
    )
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 3


def test_training_in_steps_along_one_schedule_gives_the_weights_of_one_run(
        toy_data: Path, tmp_path: Path) -> None:
    """``--schedule-epochs``: ``--model auto`` trains a candidate rung by rung; stopping
    part way along the preset's lr schedule and resuming along it must be the preset's
    recipe, with no lr restarted at a rung."""
    schedule = ["--lr", "0.2", "--lr-milestones", "0.6", "--lr-gamma", "0.25"]
    whole, stepped = tmp_path / "whole", tmp_path / "stepped"
    assert _train(toy_data, whole, *schedule).returncode == 0
    first = _train(toy_data, stepped, *schedule, "--epochs", "2", "--schedule-epochs",
                   str(EPOCHS))
    assert first.returncode == 0, first.stderr
    resumed = _train(toy_data, stepped, "--resume", "--epochs", str(EPOCHS))
    assert resumed.returncode == 0, resumed.stderr
    assert "lr goes up" not in resumed.stderr
    _assert_same_weights(stepped, whole)
    for run in (whole, stepped):
        with (run / "history.csv").open() as f:
            lrs = [float(row["lr"]) for row in csv.DictReader(f)]
        assert lrs == pytest.approx([0.2, 0.2, 0.2, 0.05, 0.05])

"""Training one run over 2 processes with the real torchrun (gloo, CPU): one run
folder, written by rank 0, whose held-out scores follow a one-process run with
the same global batch; a rank killed mid-run, then --resume, completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from anomap.runfolder import load_history

EPOCHS = 4
# the paper loss as its equation writes it (1/2): the step the bound below was measured with;
# the official code's doubled step makes the ranks' BatchNorm differences grow faster
TRAIN = ["train", "--epochs", str(EPOCHS), "--batch-size", "8", "--image-size", "64",
         "--resize-mode", "stretch", "--device", "cpu", "--seed", "3", "--no-progress",
         "--preset", "paper-lite", "--loss-factor", "0.5", "--selection", "val_score"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "anomap"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args], env=ENV, capture_output=True, text=True,
                          timeout=180)


def test_two_ranks_train_one_run_that_follows_the_one_process_run(
        toy_data: Path, tmp_path: Path) -> None:
    two = _torchrun(*TRAIN, "--data", str(toy_data), "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("trained:") == 1  # rank 0 reports, rank 1 is quiet
    one = subprocess.run([sys.executable, "-m", "anomap", *TRAIN, "--data", str(toy_data),
                          "--out", str(tmp_path / "one")], env=ENV, capture_output=True,
                         text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    ranks, single = load_history(tmp_path / "two"), load_history(tmp_path / "one")
    assert [row["epoch"] for row in ranks] == list(range(1, EPOCHS + 1))
    # Each rank's BatchNorm sees its 4 of the 8 images (PyTorch has no SyncBatchNorm on
    # CPUs), so the runs part a little: measured 2-17% apart per epoch; 30% is the bound
    for a, b in zip(ranks, single, strict=True):
        assert a["val_mean_score"] == pytest.approx(b["val_mean_score"], rel=0.3)
    assert ranks[-1]["val_mean_score"] < ranks[0]["val_mean_score"]  # it learnt


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                           timeout=30).stdout
    return [int(p) for p in found.split()]


def test_a_rank_killed_mid_run_resumes_to_completion(toy_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    agent = subprocess.Popen([*TORCHRUN, *TRAIN, "--epochs", "8", "--data", str(toy_data),
                              "--out", str(run)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = _children(agent.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies mid-run
    assert agent.wait(timeout=120) != 0
    done = torch.load(run / "last.pt", weights_only=False)["epoch"]
    assert done < 8, "the run finished before a rank was killed; the test proved nothing"
    resumed = _torchrun(*TRAIN, "--epochs", "8", "--data", str(toy_data), "--out", str(run),
                        "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 8
    assert [row["epoch"] for row in load_history(run)] == list(range(1, 9))

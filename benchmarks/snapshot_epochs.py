"""Keep a training run's weights at chosen epochs, to read one long run at several lengths.

A run with ``--selection last`` rewrites its ``model.pt`` every epoch; this watcher
copies the run folder (without the resumable state ``last.pt``) to
``<out>/<run>_at<N>`` as soon as ``history.csv`` reaches epoch N. Each copy is a complete
run that ``mtd_accuracy.py --retune`` evaluates. With a constant learning rate
(FractalAD's recipe) epoch N of a long run is the N-epoch recipe.

    python benchmarks/snapshot_epochs.py /tmp/anomap_runs/fractalad_lite0_e100 \
        --epochs 50 70 90 --out /tmp/snapshots
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from anomap.runfolder import STATE_FILE, RunError, load_history


def epochs_done(run: Path) -> int:
    try:
        return len(load_history(run))
    except RunError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/snapshots"))
    parser.add_argument("--poll", type=float, default=10.0, help="seconds between looks")
    args = parser.parse_args()
    for epoch in sorted(args.epochs):
        while (done := epochs_done(args.run)) < epoch:
            time.sleep(args.poll)
        if done > epoch:
            print(f"epoch {epoch} already passed ({done} done): not kept", flush=True)
            continue
        target = args.out / f"{args.run.name}_at{epoch}"
        shutil.copytree(args.run, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(STATE_FILE))
        print(f"{time.strftime('%H:%M:%S')} kept epoch {epoch} in {target}", flush=True)


if __name__ == "__main__":
    main()

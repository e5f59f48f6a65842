"""`anomap watch` latency: photo written -> verdict in the record, p50/p99, at 1, 10
and 30 photos/s on this machine.

A real watcher process (`python -m anomap watch`) on a demo STPM at 256 px; this
process writes 1024x768 JPEGs into the watched folder at a fixed rate (each
written to a temporary name and renamed, as cameras do, so it is complete when
it appears) and notes when each was written; latency is the record's
``judged_at`` minus that time (the same clock). The settle time
(``--settle``, default 0.25 s) is part of the latency: it is what tells a
complete photo from one still being written.

    python benchmarks/watch_latency.py --name line/watch_latency
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from anomap.files import save_json
from anomap.machine import describe_machine
from anomap.record import Record

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def one_rate(run: Path, photo: Path, work: Path, rate: float, seconds: float,
             settle: float) -> dict:
    folder = work / f"inbox_{rate:g}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    url = f"sqlite:///{work / f'record_{rate:g}.db'}"
    Path(work / f"record_{rate:g}.db").unlink(missing_ok=True)
    watcher = subprocess.Popen([sys.executable, "-m", "anomap", "watch", str(folder), "--run",
                                str(run), "--device", "cpu", "--record", url, "--settle",
                                str(settle)], stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # the watcher loads its model
    written: dict[str, float] = {}
    count = int(rate * seconds)
    started = time.monotonic()
    for index in range(count):
        due = started + index / rate
        time.sleep(max(0.0, due - time.monotonic()))
        target = folder / f"{index:05d}.jpg"
        temporary = folder / f".{index:05d}.jpg.part"
        shutil.copyfile(photo, temporary)
        os.replace(temporary, target)
        written[str(target)] = time.time()
    behind = time.monotonic() - started - count / rate
    deadline = time.monotonic() + 120
    record = Record(url)
    while time.monotonic() < deadline:
        rows = list(record.rows())
        if len(rows) >= count:
            break
        time.sleep(0.5)
    watcher.terminate()
    watcher.wait(timeout=30)
    latencies = []
    for row in rows:
        judged = row["judged_at"]
        if judged.tzinfo is None:
            judged = judged.replace(tzinfo=dt.timezone.utc)
        latencies.append(judged.timestamp() - written[row["path"]])
    record.close()
    latency = np.array(latencies) * 1000
    return {"photos_per_second": rate, "photos": count, "judged": len(rows),
            "writer_behind_seconds": round(behind, 2),
            "latency_ms": {"p50": round(float(np.percentile(latency, 50)), 1),
                           "p99": round(float(np.percentile(latency, 99)), 1),
                           "max": round(float(latency.max()), 1)} if latency.size else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a demo STPM)")
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 10, 30])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--settle", type=float, default=0.25)
    parser.add_argument("--name", default="line/watch_latency")
    args = parser.parse_args()
    from predict_folder import demo_run, make_folder

    work = Path("/tmp/anomap_watch_latency")
    run = args.run or demo_run(Path("/tmp/anomap_predict_folder"), 256)
    photo = sorted(make_folder(Path("/tmp/anomap_predict_folder") / "photos_1024x768", 1,
                               1024, 768).rglob("*.jpg"))[0]
    result = {"command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name,
                                                          *sys.argv[1:]]),
              "run": str(run), "photo": "1024x768 JPEG, written then renamed",
              "settle_s": args.settle, "seconds_per_rate": args.seconds, "rates": []}
    for rate in args.rates:
        row = one_rate(run, photo, work, rate, args.seconds, args.settle)
        print(json.dumps(row), flush=True)
        result["rates"].append(row)
    save_json({**result, "machine": describe_machine()},
              ROOT / "results" / f"{args.name}.json")


if __name__ == "__main__":
    main()

"""`anomap watch` through kills, at length: photos copied into a watched folder at
20/s for a minute, the watcher SIGKILLed twice in the middle and restarted, then
left to finish; is every photo in the record exactly once, with `predict`'s score
and verdict? Run against SQLite and, given its URL, PostgreSQL.

(The test suite runs the same scenario for 10 s on SQLite:
tests/test_watch.py.)

    python benchmarks/watch_exactly_once.py --postgres "$(.ci/postgres)"
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from anomap.files import save_json
from anomap.machine import describe_machine
from anomap.record import Query, Record
from anomap.run import Detector

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def start(folder: Path, run: Path, url: str, station: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "anomap", "watch", str(folder), "--run",
                             str(run), "--device", "cpu", "--record", url, "--station",
                             station, *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def scenario(run: Path, sources: list[Path], work: Path, url: str, rate: float,
             seconds: float) -> dict:
    station = f"bench-{uuid.uuid4().hex[:8]}"  # a shared server keeps earlier rows
    folder = work / station
    folder.mkdir(parents=True)
    count = int(rate * seconds)
    kills_at = {count // 3, 2 * count // 3}
    watcher = start(folder, run, url, station)
    arrived, started = [], time.monotonic()
    for index in range(count):
        time.sleep(max(0.0, started + index / rate - time.monotonic()))
        target = folder / f"cam_{index:05d}.png"
        shutil.copyfile(sources[index % len(sources)], target)
        arrived.append(target)
        if index in kills_at:
            watcher.send_signal(signal.SIGKILL)
            watcher.wait(timeout=30)
            watcher = start(folder, run, url, station)
    watcher.send_signal(signal.SIGTERM)
    watcher.wait(timeout=60)
    final = start(folder, run, url, station, "--stop-when-idle", "3")
    final.wait(timeout=600)
    record = Record(url)
    rows = list(record.rows(Query(station=station)))
    record.close()
    paths = [row["path"] for row in rows]
    expected = {str(p): r for p, r in zip(
        arrived, Detector.load(run, "cpu").predict(arrived), strict=True)}
    mismatched = [row["path"] for row in rows
                  if row["verdict"] != expected[row["path"]].verdict
                  or abs(row["score"] - expected[row["path"]].score)
                  > 1e-5 * abs(expected[row["path"]].score)]
    return {"database": url.split(":", 1)[0], "photos": count, "rate_per_s": rate,
            "seconds": seconds, "kills": len(kills_at), "rows": len(rows),
            "distinct_photos_in_record": len(set(paths)),
            "missing": len({str(p) for p in arrived} - set(paths)),
            "duplicates": len(paths) - len(set(paths)),
            "score_or_verdict_differs_from_predict": len(mismatched),
            "exactly_once": len(paths) == len(set(paths)) == count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a demo STPM)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=20)
    parser.add_argument("--postgres", help="a PostgreSQL URL to run the scenario on too")
    parser.add_argument("--name", default="line/watch_exactly_once")
    args = parser.parse_args()
    from predict_folder import demo_run

    work = Path("/tmp/anomap_watch_exactly_once")
    shutil.rmtree(work, ignore_errors=True)
    run = args.run or demo_run(Path("/tmp/anomap_predict_folder"), 256)
    sources = sorted((Path("/tmp/anomap_predict_folder") / "demo_data").rglob("test/*/*.png"))
    urls = [f"sqlite:///{work / 'record.db'}", *([args.postgres] if args.postgres else [])]
    result = {"command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name,
                                                          *sys.argv[1:]]),
              "run": str(run), "photos_from": "the demo's brick test tiles", "scenarios": []}
    for url in urls:
        row = scenario(run, sources, work, url, args.rate, args.seconds)
        print(row, flush=True)
        result["scenarios"].append(row)
    result["postgres_url_given"] = bool(args.postgres)
    os.sync()
    save_json({**result, "machine": describe_machine()}, ROOT / "results" / f"{args.name}.json")


if __name__ == "__main__":
    main()

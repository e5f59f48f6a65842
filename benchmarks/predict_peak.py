"""Peak memory of `anomap predict --out` (pictures on) over a hostile folder whose
largest photos are 6000x6000: pictures at their bounded size (the default,
``--picture-max-side 2048``) against pictures at the photos' own size (what
predict did before). Each run is its own process; its peak RSS is the kernel's
(getrusage of the child).

    python benchmarks/predict_peak.py --name robustness/predict_peak
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from anomap.files import save_json
from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))


def peak_of(command: list[str]) -> dict[str, float]:
    """Runs ``command`` alone and returns its seconds and peak RSS (MiB)."""
    script = ("import resource, subprocess, sys, time; started = time.perf_counter(); "
              "code = subprocess.run(sys.argv[1:]).returncode; "
              "print(code, time.perf_counter() - started, "
              "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", script, *command], capture_output=True,
                         text=True, timeout=1800)
    code, seconds, peak_kib = out.stdout.split()[-3:]
    return {"returncode": int(code), "seconds": round(float(seconds), 1),
            "peak_rss_mib": round(int(peak_kib) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a demo STPM)")
    parser.add_argument("--name", default="robustness/predict_peak")
    args = parser.parse_args()
    from predict_folder import demo_run
    from test_inspection import make_corpus

    work = Path("/tmp/anomap_predict_peak")
    run = args.run or demo_run(Path("/tmp/anomap_predict_folder"), 256)
    corpus = work / "corpus"
    if not corpus.exists():
        photo = Image.new("RGB", (256, 256), (100, 120, 140))
        make_corpus(corpus, photo)
        Image.new("RGB", (6000, 6000), (130, 100, 70)).save(corpus / "large_6000x6000.jpg",
                                                          quality=90)
    files = sum(1 for _ in corpus.rglob("*"))
    result: dict = {"command": "python benchmarks/" + " ".join(
        [Path(sys.argv[0]).name, *sys.argv[1:]]), "run": str(run), "folder_entries": files,
        "largest": "6000x6000 PNG and JPEG", "runs": {}}
    for label, side in (("pictures at most 2048 px (default)", 2048),
                        ("pictures at the photo's size (before)", 100_000)):
        out = work / f"pictures_{side}"
        table = work / f"rows_{side}.jsonl"
        table.unlink(missing_ok=True)
        command = [sys.executable, "-m", "anomap", "predict", "--run", str(run), str(corpus),
                   "--output", str(table), "--out", str(out), "--quiet", "--device", "cpu",
                   "--picture-max-side", str(side)]
        result["runs"][label] = {"picture_max_side": side, **peak_of(command)}
        print(label, result["runs"][label], flush=True)
        time.sleep(1)
    result["parent_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    save_json({**result, "machine": describe_machine()},
              ROOT / "results" / f"{args.name}.json")


if __name__ == "__main__":
    main()

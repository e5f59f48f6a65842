"""Plain `anomap predict` against `--engine ray` with 1 and 2 actors on this machine.

Uses the generated 1024x768 JPEGs and the demo STPM of ``predict_folder.py``;
each configuration is a fresh ``anomap predict`` process, so Ray's start-up is
in its wall time; the per-image overhead is the difference of the steady rates.

    python benchmarks/ray_predict.py --name speed/ray_predict
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def run(argv: list[str], output: Path) -> dict[str, float]:
    output.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "anomap", "predict", *argv, "--output", str(output),
                    "--quiet", "--device", "cpu"], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    loop = json.loads(output.with_name(output.name + ".summary.json").read_text())
    return {"wall_seconds": round(seconds, 2), "rows": loop["scored"],
            "images_per_second_wall": round(loop["scored"] / seconds, 2),
            "images_per_second_inside": loop["images_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--name", default="speed/ray_predict")
    args = parser.parse_args()
    from predict_folder import demo_run, make_folder

    work = Path("/tmp/anomap_predict_folder")
    folder = make_folder(work / "photos_1024x768", args.n, 1024, 768)
    subset = work / f"subset_{args.n}"
    if not subset.exists():
        subset.mkdir()
        for path in sorted(folder.rglob("*.jpg"))[: args.n]:
            (subset / path.name).symlink_to(path)
    run_dir = demo_run(work, 256)
    common = ["--run", str(run_dir), str(subset)]
    result = {"n_images": args.n, "photo": "1024x768 JPEG", "command": " ".join(sys.argv),
              "plain": run([*common, "--workers", "2"], work / "plain.jsonl")}
    for actors in (1, 2):
        result[f"ray_{actors}_actors"] = run([*common, "--engine", "ray", "--workers",
                                              str(actors)], work / f"ray{actors}.jsonl")
        print(actors, result[f"ray_{actors}_actors"], flush=True)
    print(json.dumps(result, indent=2))
    out = ROOT / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["machine"] = describe_machine()
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Load on `anomap serve` over loopback: 1, 4 and 16 concurrent clients, a fixed
number of requests each, with batching on and off.

Starts the real server (uvicorn, in this process's thread) on a trained run
(default: a small demo STPM at 256 px), sends one image per request from each
client thread (httpx), and records requests/s, p50/p99 latency and errors.

    python benchmarks/serve_load.py --name speed/serve_load
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from anomap.machine import describe_machine

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def start(run: Path, window_ms: float, max_batch: int) -> tuple[object, str]:
    import uvicorn

    from anomap.serve import ServeSettings, create_app

    app = create_app({"model": run}, ServeSettings(batch_window_ms=window_ms,
                                                   max_batch=max_batch), device="cpu")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def load(url: str, image: bytes, clients: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = [0]

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            for _ in range(requests):
                started = time.perf_counter()
                response = http.post(f"{url}/v1/models/model/predict", content=image)
                latencies.append(time.perf_counter() - started)
                errors[0] += response.status_code != 200

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(latencies), "errors": errors[0],
            "requests_per_second": round(len(latencies) / seconds, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a demo STPM)")
    parser.add_argument("--requests", type=int, default=24, help="per client")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--name", default="speed/serve_load")
    args = parser.parse_args()
    from predict_folder import demo_run, make_folder

    work = Path("/tmp/anomap_predict_folder")
    run = args.run or demo_run(work, 256)
    image = sorted(make_folder(work / "photos_1024x768", 1, 1024, 768).rglob("*.jpg"))[0]
    payload = image.read_bytes()
    result = {"run": str(run), "photo": "1024x768 JPEG", "requests_per_client": args.requests,
              "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
              "command": " ".join(sys.argv), "batching": {}}
    for label, window, batch in (("on", 10.0, 8), ("off", 0.0, 1)):
        server, url = start(run, window, batch)
        load(url, payload, 2, 2)  # warm-up
        result["batching"][label] = [load(url, payload, c, args.requests) for c in args.clients]
        for row in result["batching"][label]:
            print(label, json.dumps(row), flush=True)
        server.should_exit = True
        time.sleep(1.0)
    out = ROOT / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["machine"] = describe_machine()
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

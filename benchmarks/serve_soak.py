"""Ten minutes of mixed, partly hostile traffic against a real `anomap serve` on
loopback, with its memory sampled: does the service stay inside its stated budget,
keep answering normal photos, and never answer 500?

The server is its own process (`python -m anomap serve --memory-budget ...`), so
its resident memory is its own. Traffic, all at once, in bounded loops:

* normal: two clients posting a 1024x768 JPEG (every other one with an overlay);
* hostile: a client cycling through small files that decode huge (4000x4000 and
  9000x9000 PNGs of a few KiB, with overlay and mask), four 4000x4000 in one
  request, a 40000x40000 bomb, garbage, a truncated PNG, an animated GIF, a
  non-ASCII key, unique long paths, a mixed-case multipart type;
* held uploads: every 60 s, 100 connections each sending 8 MiB and withholding
  the last byte;
* slow clients: two bodies at 1 byte per 100 ms, one head at 1 byte per 500 ms;
* bursts: every 30 s, 80 normal requests at once (past the cap on requests in
  flight).

Writes requests answered per kind and status, p50/p99 latency of the normal
requests, peak (VmHWM) and final RSS against the budget, the server's 5xx.

    python benchmarks/serve_soak.py                         # 10 min, ~12 min in all
    python benchmarks/serve_soak.py --seconds 30 --name robustness/serve_soak_short
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from anomap.machine import describe_machine, memory_bytes

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

MiB = 2**20
PREDICT = "/v1/models/model/predict"


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def hostile_requests(photo: bytes) -> list[tuple[str, dict]]:
    """(label, httpx request arguments) of every hostile kind, made once."""
    from conftest import png_claiming

    gif = io.BytesIO()
    frame = Image.open(io.BytesIO(photo)).convert("RGB")
    frame.save(gif, format="GIF", save_all=True, append_images=[frame.rotate(90)])
    big, huge = png(4000), png(9000)
    multipart = httpx.Request("POST", "http://x" + PREDICT, files=[("files", ("a.jpg", photo))])
    pictures = "?overlay=true&mask=true"
    return [
        ("png_4000_pictures", dict(method="POST", url=PREDICT + pictures, content=big)),
        ("png_9000_pictures", dict(method="POST", url=PREDICT + pictures, content=huge)),
        ("four_png_4000", dict(method="POST", url=PREDICT + pictures,
                               files=[("files", (f"{i}.png", big)) for i in range(4)])),
        ("bomb_40000", dict(method="POST", url=PREDICT, content=png_claiming(40000, 40000))),
        ("garbage", dict(method="POST", url=PREDICT, content=os.urandom(5000))),
        ("truncated_png", dict(method="POST", url=PREDICT, content=big[: len(big) // 2])),
        ("animated_gif", dict(method="POST", url=PREDICT, content=gif.getvalue())),
        ("non_ascii_key", dict(method="GET", url="/v1/models",
                               headers={"x-api-key": "clé".encode()})),
        ("unique_path", dict(method="GET", url="/nothing/" + "p" * 500)),
        ("mixed_case_multipart", dict(
            method="POST", url=PREDICT, content=multipart.read(),
            headers={"content-type": multipart.headers["content-type"].replace(
                "multipart/form-data", "Multipart/Form-Data")})),
    ]


class Soak:
    def __init__(self, url: str, pid: int, seconds: float, photo: bytes) -> None:
        self.url, self.pid, self.seconds, self.photo = url, pid, seconds, photo
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        self.statuses: Counter = Counter()
        self.normal_latency: list[float] = []
        self.rss: list[tuple[float, int]] = []
        self.metrics_bytes: list[int] = []
        self.started = time.monotonic()
        self.errors: Counter = Counter()

    def running(self) -> bool:
        return time.monotonic() - self.started < self.seconds

    def count(self, kind: str, status: int | str) -> None:
        self.statuses[f"{kind} {status}"] += 1

    async def sample_rss(self) -> None:
        while self.running():
            self.rss.append((round(time.monotonic() - self.started, 1), memory_bytes(pid=self.pid)))
            await asyncio.sleep(0.5)

    async def normal(self, client: httpx.AsyncClient, index: int) -> None:
        turn = 0
        while self.running():
            turn += 1
            url = PREDICT + ("?overlay=true" if (turn + index) % 2 else "")
            started = time.perf_counter()
            try:
                response = await client.post(url, content=self.photo)
            except httpx.HTTPError as error:
                self.errors[f"normal {type(error).__name__}"] += 1
                continue
            if response.status_code == 200:
                self.normal_latency.append(time.perf_counter() - started)
            self.count("normal", response.status_code)

    async def hostile(self, client: httpx.AsyncClient) -> None:
        requests = hostile_requests(self.photo)
        turn = 0
        while self.running():
            label, arguments = requests[turn % len(requests)]
            turn += 1
            try:
                response = await client.request(**arguments)
                self.count(label, response.status_code)
            except httpx.HTTPError as error:
                self.errors[f"{label} {type(error).__name__}"] += 1

    async def held_upload(self) -> None:
        """8 MiB announced and sent but for its last byte; then wait for the answer."""
        body = b"\0" * (8 * MiB)
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode())
            writer.write(body[:-1])
            await asyncio.wait_for(writer.drain(), 60)
            answer = await asyncio.wait_for(reader.read(200), 90)
            self.count("held_upload", answer[9:12].decode() or "closed")
            writer.close()
        except (OSError, TimeoutError) as error:
            self.count("held_upload", f"cut ({type(error).__name__})")

    async def held_uploads(self) -> None:
        while self.running():
            await asyncio.gather(*(self.held_upload() for _ in range(100)))
            await asyncio.sleep(max(0.0, 60 - (time.monotonic() - self.started) % 60))

    async def trickle(self, head: bool) -> None:
        """One byte at a time: a body every 100 ms, or a request head every 500 ms."""
        while self.running():
            kind = "slow_head" if head else "slow_body"
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                if head:
                    text = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 200
                else:
                    writer.write(f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 "Content-Length: 100000\r\n\r\n".encode())
                    text = b"\0" * 100000
                answer = b""
                for byte in text:
                    if reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    try:
                        answer = await asyncio.wait_for(reader.read(200), 0.5 if head else 0.1)
                    except TimeoutError:
                        continue
                    break
                self.count(kind, answer[9:12].decode() or "closed")
                writer.close()
            except OSError as error:
                self.count(kind, f"cut ({type(error).__name__})")

    async def bursts(self, client: httpx.AsyncClient) -> None:
        while self.running():
            await asyncio.sleep(30)

            async def one() -> None:
                try:
                    response = await client.post(PREDICT, content=self.photo)
                    self.count("burst", response.status_code)
                except httpx.HTTPError as error:
                    self.errors[f"burst {type(error).__name__}"] += 1

            await asyncio.gather(*(one() for _ in range(80)))

    async def metrics(self, client: httpx.AsyncClient) -> None:
        while self.running():
            response = await client.get("/metrics")
            self.metrics_bytes.append(len(response.content))
            await asyncio.sleep(5)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=20)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            await asyncio.gather(
                self.sample_rss(), self.normal(client, 0), self.normal(client, 1),
                self.hostile(client), self.held_uploads(), self.trickle(False),
                self.trickle(False), self.trickle(True), self.bursts(client),
                self.metrics(client))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a demo STPM)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--memory-budget", type=float, default=1536, help="MiB")
    parser.add_argument("--name", default="robustness/serve_soak")
    args = parser.parse_args()
    from predict_folder import demo_run, make_folder

    work = Path("/tmp/anomap_predict_folder")
    run = args.run or demo_run(work, 256)
    photo = sorted(make_folder(work / "photos_1024x768", 1, 1024, 768).rglob("*.jpg"))[0]
    port = free_port()
    command = [sys.executable, "-m", "anomap", "serve", "--run", f"model={run}", "--port",
               str(port), "--device", "cpu", "--memory-budget", str(args.memory_budget)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ready_rss = memory_bytes(pid=server.pid)
        soak = Soak(url, server.pid, args.seconds, photo.read_bytes())
        asyncio.run(soak.run())
        time.sleep(10)  # idle: freed memory goes back
        final_rss, peak_rss = memory_bytes(pid=server.pid), memory_bytes("VmHWM", server.pid)
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    latency = np.array(soak.normal_latency) * 1000
    statuses = dict(sorted(soak.statuses.items()))
    server_errors = {k: v for k, v in statuses.items()
                     if k.split()[-1].startswith("5") and not k.endswith(" 503")}
    budget = args.memory_budget * MiB
    result = {
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "server_command": " ".join(["anomap", *command[3:]]),
        "seconds": args.seconds, "run": str(run), "photo": "1024x768 JPEG",
        "memory_budget_mib": args.memory_budget,
        "rss_mib": {"ready": round(ready_rss / MiB, 1), "peak": round(peak_rss / MiB, 1),
                    "final_after_10s_idle": round(final_rss / MiB, 1),
                    "peak_within_budget": peak_rss <= budget},
        "requests_by_kind_and_status": statuses,
        "server_errors_5xx_other_than_503": server_errors,
        "refusals_503": sum(v for k, v in statuses.items() if k.endswith(" 503")),
        "client_side_errors": dict(soak.errors),
        "normal_latency_ms": {"n": int(latency.size),
                              "p50": round(float(np.percentile(latency, 50)), 1),
                              "p99": round(float(np.percentile(latency, 99)), 1)}
        if latency.size else None,
        "metrics_bytes_first_last": [soak.metrics_bytes[0], soak.metrics_bytes[-1]]
        if soak.metrics_bytes else None,
        "rss_samples_mib": [(t, round(b / MiB)) for t, b in soak.rss[::10]],
        "server_log_tail": log[-2000:],
        "server_log_tracebacks": log.count("Traceback"),
        "budget_line": next((line for line in log.splitlines() if "memory budget" in line),
                            None),
        "refused_metric": [line for line in metrics.splitlines()
                           if line.startswith("anomap_refused_total")],
        "machine": describe_machine(),
    }
    out = ROOT / "results" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("rss_mib", "server_errors_5xx_other_than_503",
                                             "normal_latency_ms", "refusals_503")}, indent=1))


if __name__ == "__main__":
    main()

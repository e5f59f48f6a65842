"""``anomap serve``: trained models behind an HTTP API and a web page.

FastAPI on uvicorn. Each model is loaded once at start, by name; no request
can name a file or a run on disk. Images arriving together are scored in one
forward pass: a per-model batcher waits up to ``batch_window_ms`` for up to
``max_batch`` images (a bounded queue; a full queue answers 503), and the
network runs in a worker thread, so the event loop keeps answering (health
checks, uploads, the page) while it computes. Decoding runs in threads too.

Every limit is checked before work is done: bytes per request (also when the
client sends no length), bytes per image, images per request, and pixels per
image, read from the header before decoding (the 40000 x 40000 PNG of a few
kilobytes is refused, not decoded). Content is sniffed by Pillow, never
trusted by extension. A bad image fails alone, with a reason; an exception in
the model fails its batch with a reason and the server goes on. Errors share
one JSON shape: ``{"error": {"code": ..., "message": ...}}``.

Memory is bounded by a budget (:mod:`anomap.admission`): uploads held, the work of
decoding and drawing, pictures kept, requests in flight; slow or held clients
meet deadlines. Metrics are labelled by route template, never by a client's path.
Without a key, only loopback host names are answered (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import logging
import secrets
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from anomap import report
from anomap.admission import (
    Budget,
    Pool,
    Refused,
    deadline_protocol,
    work_bytes,
)
from anomap.allocator import return_memory
from anomap.data import DEFAULT_MAX_PIXELS, ImageReadError, read_header
from anomap.inspection import FoundImage, decode
from anomap.machine import memory_bytes
from anomap.run import Detector, Prediction, PreparedImage
from anomap.runfolder import run_version
from anomap.runtimes import require
from anomap.version import __version__
from anomap.watch import Station, StationSettings, station_for

log = logging.getLogger(__name__)

API_KEY_ENV = "ANOMAP_API_KEY"


@dataclass(frozen=True)
class ServeSettings:
    """How the service listens and what it accepts (the defaults are the CLI's)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 64 * 2**20
    max_image_bytes: int = 16 * 2**20
    max_images: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 8
    batch_window_ms: float = 10.0
    queue_size: int = 256
    picture_url_seconds: float = 300.0
    #: pictures (overlays, masks) are drawn with their longer side at most this
    picture_max_side: int = 1024
    budget: Budget = field(default_factory=Budget)
    #: the whole process's memory (--memory-budget): when set, ``budget`` is split from it
    memory_budget_bytes: int | None = None
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    #: host names the service answers to besides loopback's (--allowed-hosts; "*": any)
    allowed_hosts: tuple[str, ...] = ()
    #: a station watched by the first model (--watch): its record, feedback and drift
    #: on the page and under /v1/station
    station: StationSettings | None = None
    #: runs and exports a model may be switched to (POST /v1/models/{name}/switch)
    model_store: Path | None = None

    def check(self) -> None:
        """Refuse to listen beyond this machine without a key."""
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"--host {self.host} reaches beyond this machine: give --api-key "
                             f"KEY (or set {API_KEY_ENV}), which every API call must send")

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request's ``Host`` may be answered. Without a key or a list,
        loopback names only: a web page on another site that rebinds its own name
        to 127.0.0.1 must not reach the API or the test report."""
        if "*" in self.allowed_hosts or (self.api_key and not self.allowed_hosts):
            return True
        name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
        name = name.strip("[]").lower()
        return is_loopback(name) or name in {h.lower() for h in self.allowed_hosts}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: seconds a client refused for load is told to wait (Retry-After)
RETRY_AFTER_S = 1


class ServiceError(Exception):
    """An error with an HTTP status and a stable code, answered as JSON; a 503
    carries Retry-After."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else None

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.code, self.message), status_code=self.status,
                            headers=self.headers)

    @classmethod
    def of(cls, refused: Refused) -> ServiceError:
        if refused.reason == "busy":
            return cls(503, "busy", refused.message)
        return cls(413, "over_budget", refused.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


# --------------------------------------------------------------------------- batching


@dataclass
class _Job:
    prepared: PreparedImage
    future: asyncio.Future


class Batcher:
    """Gathers images from concurrent requests into batches for one Detector."""

    def __init__(self, detector: Detector, max_batch: int, window_ms: float,
                 queue_size: int, on_batch: Any = None) -> None:
        self.detector = detector
        self.max_batch = max(1, max_batch)
        self.window = window_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomap-model")
        self.on_batch = on_batch  # hears each batch's size (the metrics)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, prepared: PreparedImage) -> Prediction:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(prepared, future))
        except asyncio.QueueFull:
            raise ServiceError(503, "busy", "the model's queue is full; retry shortly") from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(jobs) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            jobs = [job for job in jobs if not job.future.done()]  # clients gone
            if not jobs:
                continue
            if self.on_batch is not None:
                self.on_batch(len(jobs))
            try:
                predictions = await loop.run_in_executor(
                    self.executor, self.detector.predict_prepared, [j.prepared for j in jobs])
            except Exception as error:  # the model failed: this batch fails, the server goes on
                log.exception("model error")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(ServiceError(
                            500, "model_error", f"the model failed on this batch: {error}"))
                continue
            for job, prediction in zip(jobs, predictions, strict=True):
                if not job.future.done():
                    job.future.set_result(prediction)


# --------------------------------------------------------------------------- models


@dataclass
class ServedModel:
    name: str
    detector: Detector
    source: Path | None  # its folder (never shown to clients); None for a Detector given
    batcher: Batcher | None = None
    metrics: dict[str, Any] | None = None
    #: the version it replaced, kept loaded (and batching) for a rollback
    previous: ServedModel | None = None
    #: which model this is: the hash of its run's decisive files (run_version)
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            self.version = run_version(self.source) if self.source is not None else "in-memory"

    def snapshot(self) -> ServedModel:
        """This version as it is now: what one request uses from start to end, so a
        switch in the middle never mixes two models in one answer."""
        return replace(self, previous=None)

    @property
    def report(self) -> Path | None:
        page = self.source / "report.html" if self.source else None
        return page if page and page.is_file() else None

    def _private_folders(self) -> list[str]:
        """Absolute folders of this machine that the report and settings may name."""
        folders = [Path.home(), Path.cwd()]
        if self.source is not None:
            folders.append(self.source.resolve().parent)
        config = self.detector.config
        if config is not None:
            folders.append(Path(config.data.root).resolve())
            folders += [Path(v).resolve().parent for v in config.model.values()
                        if isinstance(v, str) and Path(v).is_absolute()]
        # the longest first, so a folder inside another is cut whole
        return sorted({str(f) for f in folders if str(f) != "/"}, key=len, reverse=True)

    def report_html(self) -> str | None:
        """The test report with this machine's folders cut from every path in it."""
        page = self.report
        if page is None:
            return None
        text = page.read_text(encoding="utf-8", errors="replace")
        for folder in self._private_folders():
            text = text.replace(folder + "/", "").replace(folder, ".")
        return text

    def describe(self) -> dict[str, Any]:
        config = self.detector.config
        info: dict[str, Any] = {
            "name": self.name, "method": config.method,
            "runtime": self.detector.runtime, "precision": self.detector.precision,
            "settings": _public(config.model), "geometry": asdict(config.geometry),
            "threshold": self.detector.threshold,
            "pixel_threshold": self.detector.pixel_threshold,
            "display_range": list(self.detector.display_range),
            "report": f"/v1/models/{self.name}/report" if self.report else None,
            "version": self.version,
            "previous_version": self.previous.version if self.previous else None,
        }
        if self.metrics:
            info["test_metrics"] = _public({k: self.metrics.get(k) for k in (
                "image_auroc", "pixel_auroc", "aupro", "n_images", "data")})
        return info


def _public(value: Any) -> Any:
    """Settings as a client may see them: an absolute path becomes its last name."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or Path(value).is_absolute()):
        return Path(value).name
    return value


class PictureStore:
    """Short-lived PNGs behind random tokens (``?images=url``): bounded in bytes and
    in count, the oldest dropped first; expired ones swept on a timer (:meth:`sweep`)."""

    def __init__(self, seconds: float, capacity_bytes: int, capacity: int = 512) -> None:
        self.seconds, self.capacity_bytes, self.capacity = seconds, capacity_bytes, capacity
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def _drop_oldest(self) -> None:
        _, (_, png) = self.items.popitem(last=False)
        self.bytes -= len(png)

    def put(self, png: bytes) -> str:
        if len(png) > self.capacity_bytes:
            raise ServiceError(413, "picture_too_large", f"a picture of {len(png):,} bytes "
                               "does not fit the picture store; ask for images=base64")
        token = secrets.token_urlsafe(18)
        self.items[token] = (time.monotonic() + self.seconds, png)
        self.bytes += len(png)
        while len(self.items) > self.capacity or self.bytes > self.capacity_bytes:
            self._drop_oldest()
        return token

    def get(self, token: str) -> bytes | None:
        item = self.items.get(token)
        return None if item is None or item[0] < time.monotonic() else item[1]

    def sweep(self) -> None:
        now = time.monotonic()
        while self.items and next(iter(self.items.values()))[0] < now:
            self._drop_oldest()  # entries are in expiry order: all live equally long


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the app


def load_models(models: dict[str, Detector | str | Path], runtime: str = "auto",
                device: str = "auto", probe: str = "refuse") -> dict[str, ServedModel]:
    """name -> Detector, run or export folder: each loaded once (exports replay their
    probe first; ``probe``: see :meth:`Detector.load`), with its test metrics if any."""
    served: dict[str, ServedModel] = {}
    for name, source in models.items():
        detector = source if isinstance(source, Detector) else Detector.load(
            source, device, runtime=runtime, probe=probe)
        folder = None if isinstance(source, Detector) else Path(source)
        metrics_file = folder / "metrics.json" if folder else None
        metrics = (json.loads(metrics_file.read_text())
                   if metrics_file and metrics_file.is_file() else None)
        served[name] = ServedModel(name, detector, folder, metrics=metrics)
    return served


@dataclass
class Meters:
    """The service's Prometheus metrics, in a registry of its own. Labels come from
    a fixed set (route templates, model names, stable codes): never a client's text."""

    registry: Any = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter("anomap_requests", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("anomap_request_seconds", "request latency", ["route"],
                                 registry=self.registry)
        self.images = Counter("anomap_images", "images answered", ["model", "outcome"],
                              registry=self.registry)
        self.batch_size = Histogram("anomap_batch_size", "images per forward pass", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.refused = Counter("anomap_refused", "requests refused for load",
                               ["reason"], registry=self.registry)
        self.in_use = Gauge("anomap_budget_bytes_in_use", "memory budget in use",
                            ["part"], registry=self.registry)
        self.drift = Gauge("anomap_station_drift", "1 while the station's scores drift from "
                           "the held-out normals'", ["station"], registry=self.registry)
        self.threshold = Gauge("anomap_station_threshold", "the station's threshold in force",
                               ["station"], registry=self.registry)


@dataclass
class Holding:
    """What one request holds of the budgets, given back when it is answered."""

    upload_bytes: int = 0
    work_bytes: int = 0


@dataclass
class Limits:
    """What a request may be: its host, its key, its size, its images, its share of
    the memory budget; refused with a clear error (:class:`ServiceError`) before any
    work is spent on it."""

    settings: ServeSettings
    budget: Budget

    def __post_init__(self) -> None:
        self.uploads_pool = Pool(self.budget.upload_bytes, "upload")
        self.work = Pool(self.budget.work_bytes, "decoding and drawing")

    def check_headers(self, request: Request) -> None:
        settings, path = self.settings, request.url.path
        if not settings.host_allowed(request.headers.get("host", "")):
            raise ServiceError(421, "host_not_allowed", "this server answers loopback host "
                               "names only; give --allowed-hosts or --api-key to serve others")
        if settings.api_key and needs_key(path) and not secrets.compare_digest(
                _given_key(request), settings.api_key.encode()):
            raise ServiceError(401, "unauthorized", "missing or wrong API key "
                                   "(send it as X-API-Key or Authorization: Bearer)")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            raise ServiceError(413, "request_too_large",
                               f"request of {int(length):,} bytes; the limit is "
                               f"{settings.max_request_bytes:,} (--max-request-bytes)")

    async def read_body(self, request: Request, holding: Holding) -> bytes:
        """The whole body, refused as soon as it passes the request limit or the
        server's upload budget, or when it takes longer than the body deadline. Each
        byte is charged twice: the body, and the parts parsed from it."""
        settings, chunks, size = self.settings, [], 0
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > settings.max_request_bytes:
                        raise ServiceError(413, "request_too_large", f"request over the limit "
                                           f"of {settings.max_request_bytes:,} bytes")
                    self.uploads_pool.try_take(2 * len(chunk))
                    holding.upload_bytes += 2 * len(chunk)
                    chunks.append(chunk)
        except TimeoutError:
            raise ServiceError(408, "upload_timeout", f"the request's body did not arrive "
                               f"within {settings.body_timeout_s:g} s") from None
        except Refused as refused:
            raise ServiceError.of(refused) from None
        except ClientDisconnect:
            raise ServiceError(400, "client_disconnected", "the client went away") from None
        return b"".join(chunks)

    async def uploads(self, request: Request, holding: Holding) -> list[tuple[str, bytes]]:
        """(filename, bytes) of each image: multipart files, or one image as the body."""
        settings = self.settings
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            body = await self.read_body(request, holding)

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            scope = {**request.scope, "headers": [  # the media type in any case, as the
                (k, _lower_media_type(v) if k == b"content-type" else v)  # RFC allows
                for k, v in request.scope["headers"]]}
            form = await Request(scope, replay).form(
                max_files=settings.max_images + 1, max_fields=settings.max_images + 16)
            files = [(getattr(v, "filename", None) or f"image{i}", await v.read())
                     for i, (_, v) in enumerate(form.multi_items()) if hasattr(v, "read")]
            await form.close()
        else:
            files = [(request.headers.get("x-filename", "image"),
                      await self.read_body(request, holding))]
        if not files or all(not data for _, data in files):
            raise ServiceError(400, "no_image", "send images as multipart files (field "
                               "'files') or one image as the raw body")
        if len(files) > settings.max_images:
            raise ServiceError(413, "too_many_images", f"{len(files)} images; the limit is "
                               f"{settings.max_images} per request (--max-images)")
        return files

    def measure(self, filename: str, data: bytes) -> tuple[int, int] | dict[str, str]:
        """An upload's (width, height) from its header, or the error to answer."""
        if len(data) > self.settings.max_image_bytes:
            return {"code": "image_too_large", "message": f"{filename}: {len(data):,} bytes; "
                    f"the limit is {self.settings.max_image_bytes:,} per image "
                    "(--max-image-bytes)"}
        try:
            return read_header(io.BytesIO(data), self.settings.max_pixels, name=filename)
        except ImageReadError as error:
            return _read_error(error)

    def decode(self, detector: Detector, filename: str, data: bytes, pictures: bool
               ) -> tuple[PreparedImage, np.ndarray | None] | dict[str, str]:
        """One upload -> the network's input (from the photo at full size, as
        ``predict`` reads it) and, when pictures are asked for, the photo reduced to
        the picture size; its maps come back at that size."""
        item = decode(detector, FoundImage(Path(filename), Path(filename)), pictures,
                      picture_max_side=self.settings.picture_max_side,
                      source=io.BytesIO(data), max_pixels=self.settings.max_pixels)
        return _read_error(item.error) if item.error is not None else (item.prepared,
                                                                        item.photo)

    async def give_back(self, holding: Holding) -> None:
        await self.uploads_pool.give(holding.upload_bytes)
        await self.work.give(holding.work_bytes)
        holding.upload_bytes = holding.work_bytes = 0


def _lower_media_type(value: bytes) -> bytes:
    """``Multipart/Form-Data; boundary=AbC`` -> ``multipart/form-data; boundary=AbC``
    (the boundary keeps its case)."""
    media_type, sep, parameters = value.partition(b";")
    return media_type.strip().lower() + sep + parameters


def _read_error(error: ImageReadError) -> dict[str, str]:
    code = {"over pixel limit": "too_many_pixels"}.get(error.reason, "not_an_image")
    return {"code": code, "message": str(error)}


def needs_key(path: str) -> bool:
    """Routes a key guards: the API, the metrics and the API's schema (the page and
    the health probes are open)."""
    return path.startswith("/v1/") or path in ("/metrics", "/openapi.json")


def _given_key(request: Request) -> bytes:
    """The key a request sent, as raw bytes (any header byte compares safely):
    X-API-Key, or Authorization with the Bearer scheme in any case."""
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    return given.encode("latin-1", errors="replace")  # headers arrive decoded as latin-1


def _add_error_handlers(app: Any) -> None:
    """Every error answers as ``{"error": {"code", "message"}}``."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(error_body(code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", str(error.errors())[:500]),
                            status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body("internal_error", "the server failed on this request "
                                       "(its log has the details)"), status_code=500)


#: routes not counted as in flight: the probes must answer while the server is busy
_ALWAYS_ANSWERED = ("/healthz", "/readyz", "/metrics")


class Guard:
    """ASGI middleware around every call: the host, the key and the request-size
    limit, the cap on requests in flight (503 with Retry-After past it), and the
    metrics, labelled by the route's template (``/v1/models/{name}/predict``), so
    that no client's path ever becomes a label."""

    def __init__(self, app: Any, limits: Limits, meters: Meters) -> None:
        self.app, self.limits, self.meters = app, limits, meters
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def send_noting_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        counted = scope["path"] not in _ALWAYS_ANSWERED
        try:
            self.limits.check_headers(Request(scope))
            if counted and self.in_flight >= self.limits.budget.max_in_flight:
                self.meters.refused.labels("in_flight").inc()
                raise ServiceError(503, "busy", f"{self.in_flight} requests in flight, the "
                                   "server's limit; retry shortly")
            self.in_flight += counted
            try:
                await self.app(scope, receive, send_noting_status)
            finally:
                self.in_flight -= counted
        except ServiceError as error:
            await error.response()(scope, receive, send_noting_status)
        route = getattr(scope.get("route"), "path", "unmatched")
        self.meters.requests.labels(route, str(status[0])).inc()
        self.meters.latency.labels(route).observe(time.perf_counter() - started)


@dataclass
class _Answering:
    """What one predict request asked for, and how to answer each of its images.
    Pictures are drawn one at a time (``drawing``): the request's work budget holds
    one picture's memory."""

    model: ServedModel
    meters: Meters
    pictures: PictureStore
    overlay: bool
    mask: bool
    as_url: bool
    drawing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def picture(self, png: bytes) -> str:
        return (f"/v1/pictures/{self.pictures.put(png)}" if self.as_url
                else base64.b64encode(png).decode("ascii"))

    async def answer(self, index: int, filename: str, item: Any) -> dict[str, Any]:
        name = self.model.name
        result: dict[str, Any] = {"index": index, "filename": filename}
        if isinstance(item, dict):
            self.meters.images.labels(name, "error").inc()
            return {**result, "ok": False, "error": item}
        prepared, photo = item
        try:
            assert self.model.batcher is not None
            prediction = await self.model.batcher.score(prepared)
        except ServiceError as error:
            self.meters.images.labels(name, "error").inc()
            return {**result, "ok": False, "error": {"code": error.code,
                                                     "message": error.message}}
        self.meters.images.labels(name, prediction.verdict).inc()
        result.update(ok=True, score=prediction.score, verdict=prediction.verdict,
                      model_version=self.model.version, threshold=prediction.threshold,
                      pixel_threshold=prediction.pixel_threshold)
        if photo is None:
            return result
        vmin, vmax = self.model.detector.display_range
        async with self.drawing:
            if self.overlay:
                drawn = await run_in_threadpool(report.overlay, photo, prediction.anomaly_map,
                                                vmin, vmax, pred_mask=prediction.mask)
                result["overlay_png"] = self.picture(await run_in_threadpool(_png, drawn))
                del drawn
            if self.mask:
                result["mask_png"] = self.picture(await run_in_threadpool(
                    _png, prediction.mask.astype(np.uint8) * 255))
        return result


def _add_station_routes(app: Any, station: Station, meters: Meters) -> None:
    """The station's recent inspections, an operator's marks, the threshold proposal
    (confirm, undo) and the drift state: what the page's station panel shows."""
    from anomap import feedback

    record, name = station.record, station.settings.station
    run = station.run_folder
    meters.drift.labels(name).set_function(
        lambda: 1.0 if station.drift is not None and station.drift.drifting else 0.0)
    meters.threshold.labels(name).set_function(lambda: station.detector.threshold)

    def inspection(inspection_id: int) -> dict[str, Any]:
        row = record.inspection(inspection_id)
        if row is None or row["station"] != name:
            raise ServiceError(404, "unknown_inspection", f"no inspection {inspection_id}")
        return row

    @app.get("/v1/station")
    async def describe_station(limit: int = 50) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            judged, rows = record.recent(name, max(1, min(limit, 500)))
            return {
                "station": name, "model": station.model_name,
                "model_version": station.model_version,
                "threshold": station.detector.threshold,
                "run_threshold": station.run_threshold, "judged": judged,
                "drift": {"watched": station.drift is not None,
                          "drifting": bool(station.drift and station.drift.drifting),
                          "evidence": station.last_drift},
                "threshold_changes": record.threshold_history(name, station.model_version),
                "recent": [{"id": r["id"], "file": Path(r["path"]).name, "score": r["score"],
                            "verdict": r["verdict"], "threshold": r["threshold"],
                            "feedback": r["feedback"], "judged_at": str(r["judged_at"]),
                            "overlay": f"/v1/station/inspections/{r['id']}/overlay"
                            if r["overlay"] else None} for r in rows]}
        return await run_in_threadpool(read)

    @app.get("/v1/station/inspections/{inspection_id}/overlay")
    async def station_overlay(inspection_id: int) -> Response:
        row = await run_in_threadpool(inspection, inspection_id)
        path = Path(row["overlay"] or "")
        pictures = station.settings.pictures
        if not row["overlay"] or pictures is None or not path.is_file() \
                or not path.resolve().is_relative_to(pictures.resolve()):
            raise ServiceError(404, "no_overlay", f"inspection {inspection_id} has no overlay")
        return Response(path.read_bytes(), media_type="image/png")

    @app.post("/v1/station/inspections/{inspection_id}/feedback")
    async def mark(inspection_id: int, request: Request) -> dict[str, Any]:
        body = await request.json()
        await run_in_threadpool(inspection, inspection_id)
        try:
            await run_in_threadpool(record.add_feedback, inspection_id, str(body.get("mark")),
                                    body.get("note"), body.get("who"))
        except ValueError as error:
            raise ServiceError(422, "invalid_feedback", str(error)) from None
        return {"id": inspection_id, "feedback": body.get("mark")}

    @app.get("/v1/station/proposal")
    async def proposal() -> dict[str, Any]:
        found = await run_in_threadpool(feedback.propose, record, name, run)
        return {**asdict(found), "changes": found.changes, "said": found.describe()}

    @app.post("/v1/station/threshold")
    async def confirm(request: Request) -> dict[str, Any]:
        """Apply the proposal the operator saw (``proposed`` must still be it)."""
        body = await request.json()
        found = await run_in_threadpool(feedback.propose, record, name, run)
        if not found.changes or abs(found.proposed - float(body.get("proposed", "nan"))) > \
                1e-9 * max(1.0, abs(found.proposed)):
            raise ServiceError(409, "stale_proposal", "the proposal changed since it was "
                               "shown (new marks or verdicts); look at it again")
        change = await run_in_threadpool(feedback.apply, record, found, body.get("who"),
                                         body.get("why"))
        station.follow_threshold()
        return {"change": change, "threshold": found.proposed}

    @app.post("/v1/station/threshold/undo")
    async def undo(request: Request) -> dict[str, Any]:
        body = await request.json() if await request.body() else {}
        try:
            undone = await run_in_threadpool(record.undo_threshold, name,
                                             station.model_version, body.get("who"))
        except ValueError as error:
            raise ServiceError(409, "nothing_to_undo", str(error)) from None
        station.follow_threshold()
        return {"undone": undone["id"], "threshold": station.detector.threshold}


@dataclass
class Deployment:
    """What switching a model's version needs: where runs may come from (the model
    store), how to load one, how to start its batcher, and the station to tell."""

    store: Path | None
    load: Any  # folder -> Detector
    start: Any  # ServedModel -> None (its batcher running)
    station: Station | None = None
    #: seconds a replaced-and-dropped version keeps batching for requests in flight
    grace_s: float = 30.0


def _add_version_routes(app: Any, served: dict[str, ServedModel], deploy: Deployment) -> None:
    """Switch a model to another run of the model store, atomically (each request uses
    one version from start to end), keeping the old one loaded for a rollback."""

    def model_named(name: str) -> ServedModel:
        if name not in served:
            raise ServiceError(404, "unknown_model", f"no model {name!r}")
        return served[name]

    async def retire(version: ServedModel | None) -> None:
        if version is not None and version.batcher is not None:
            await asyncio.sleep(deploy.grace_s)
            await version.batcher.stop()

    def install(model: ServedModel, incoming: ServedModel) -> None:
        """Make ``incoming`` the current version (one step of the event loop: no
        request sees half of it); the current one becomes the previous."""
        outgoing = model.snapshot()
        dropped = model.previous
        model.detector, model.source = incoming.detector, incoming.source
        model.batcher, model.metrics = incoming.batcher, incoming.metrics
        model.version, model.previous = incoming.version, outgoing
        if deploy.station is not None and deploy.station.detector is outgoing.detector:
            deploy.station.use(model.detector, model.source)
        if dropped is not None and dropped.detector is not incoming.detector:
            asyncio.get_running_loop().create_task(retire(dropped))

    @app.post("/v1/models/{name}/switch")
    async def switch(name: str, request: Request) -> dict[str, Any]:
        model = model_named(name)
        if deploy.store is None:
            raise ServiceError(404, "no_model_store", "start the server with --model-store "
                               "DIR to switch models")
        wanted = str((await request.json()).get("run", ""))
        target = (deploy.store / wanted).resolve()
        if not wanted or not target.is_relative_to(deploy.store.resolve()) \
                or not target.is_dir():
            raise ServiceError(404, "unknown_run", f"no run {wanted!r} in the model store")
        try:
            detector = await run_in_threadpool(deploy.load, target)
        except Exception as error:  # a broken run or a failed probe: the old one stays
            raise ServiceError(422, "cannot_load", f"{wanted}: {error}") from None
        metrics_file = target / "metrics.json"
        incoming = ServedModel(name, detector, target, metrics=json.loads(
            metrics_file.read_text()) if metrics_file.is_file() else None)
        deploy.start(incoming)
        install(model, incoming)
        return {"model": name, "version": model.version,
                "previous_version": model.previous.version if model.previous else None}

    @app.post("/v1/models/{name}/rollback")
    async def rollback(name: str) -> dict[str, Any]:
        model = model_named(name)
        if model.previous is None:
            raise ServiceError(409, "nothing_to_roll_back", f"{name} has no previous version")
        install(model, model.previous)
        return {"model": name, "version": model.version,
                "previous_version": model.previous.version}


def _answer_status(results: list[dict[str, Any]]) -> int:
    """The HTTP status when no image of a request could be answered."""
    code = results[0]["error"]["code"]
    if code in ("too_many_pixels", "image_too_large"):
        return 413
    return 503 if code == "busy" else 500 if code == "model_error" else 422


def _add_routes(app: Any, served: dict[str, ServedModel], limits: Limits, meters: Meters,
                pictures: PictureStore, decode_pool: ThreadPoolExecutor) -> None:
    def model_named(name: str) -> ServedModel:
        if name not in served:
            raise ServiceError(404, "unknown_model", f"no model {name!r}; served: "
                               f"{', '.join(sorted(served))}")
        return served[name]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = all(m.batcher is not None for m in served.values())
        return JSONResponse({"status": "ready" if ready else "loading",
                             "models": sorted(served)}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(meters.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [m.describe() for m in served.values()]}

    @app.get("/v1/models/{name}")
    async def describe_model(name: str) -> dict[str, Any]:
        return model_named(name).describe()

    @app.get("/v1/models/{name}/report")
    async def model_report(name: str) -> HTMLResponse:
        page = await run_in_threadpool(model_named(name).report_html)
        if page is None:
            raise ServiceError(404, "no_report", f"model {name!r} has no test report")
        return HTMLResponse(page)

    @app.get("/v1/pictures/{token}")
    async def get_picture(token: str) -> Response:
        png = pictures.get(token)
        if png is None:
            raise ServiceError(404, "expired", "no such picture, or its time has passed")
        return Response(png, media_type="image/png")

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request, overlay: bool = False, mask: bool = False,
                      images: str = "base64") -> JSONResponse:
        """One or several images -> per image: score, verdict, thresholds; with
        ``overlay``/``mask`` the heat-map overlay and the defect mask as PNG (at most
        ``picture_max_side`` pixels on a side), base64 in the JSON (``images=base64``)
        or short-lived URLs (``images=url``)."""
        model = model_named(name).snapshot()
        if images not in ("base64", "url"):
            raise ServiceError(422, "invalid_request", "images must be base64 or url")
        holding, loop = Holding(), asyncio.get_running_loop()
        try:
            files = await limits.uploads(request, holding)
            sizes = await asyncio.gather(*(loop.run_in_executor(
                decode_pool, limits.measure, filename, data) for filename, data in files))
            wants = overlay or mask
            side = limits.settings.picture_max_side
            cost = work_bytes([w * h for w, h in (s for s in sizes if isinstance(s, tuple))],
                              side * side if wants else 0)
            try:
                await limits.work.take(cost, limits.budget.wait_s)
            except Refused as refused:
                meters.refused.labels(f"work_{refused.reason}").inc()
                raise ServiceError.of(refused) from None
            holding.work_bytes = cost
            decoded = await asyncio.gather(*(
                loop.run_in_executor(decode_pool, limits.decode, model.detector, filename,
                                     data, wants) if isinstance(size, tuple)
                else _done(size) for (filename, data), size in zip(files, sizes, strict=True)))
            names = [filename for filename, _ in files]
            del files  # the uploads' bytes are no longer needed
            answering = _Answering(model, meters, pictures, overlay, mask, images == "url")
            results = list(await asyncio.gather(*(
                answering.answer(i, filename, item)
                for i, (filename, item) in enumerate(zip(names, decoded, strict=True)))))
        finally:
            await limits.give_back(holding)
        body = {"model": name, "results": results}
        if not any(r["ok"] for r in results):
            first = results[0]["error"]
            status = _answer_status(results)
            return JSONResponse({**error_body(first["code"], first["message"]), **body},
                                status_code=status,
                                headers={"Retry-After": str(RETRY_AFTER_S)}
                                if status == 503 else None)
        return JSONResponse(body)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("anomap").joinpath("web/index.html").read_text())


def _station(served: dict[str, ServedModel], settings: StationSettings | None
             ) -> Station | None:
    """The station the first served run watches, sharing its Detector."""
    if settings is None:
        return None
    model = next((m for m in served.values() if m.source is not None), None)
    if model is None:
        raise ValueError("--watch needs a model served from a run or export folder")
    return station_for(model.detector, model.source, settings)


async def _done(value: Any) -> Any:
    return value


def create_app(models: dict[str, Detector | str | Path], settings: ServeSettings | None = None,
               runtime: str = "auto", device: str = "auto", probe: str = "refuse") -> Any:
    """The ASGI app serving ``models`` (name -> Detector, run or export folder);
    exports replay their probe first (``probe``: see :meth:`Detector.load`)."""
    settings = settings or ServeSettings()
    served = load_models(models, runtime, device, probe)
    models_bytes = memory_bytes()
    budget = (settings.budget if settings.memory_budget_bytes is None else Budget.from_total(
        settings.memory_budget_bytes, models_bytes, max_in_flight=settings.budget.max_in_flight,
        wait_s=settings.budget.wait_s))
    meters = Meters()
    limits = Limits(settings, budget)
    pictures = PictureStore(settings.picture_url_seconds, budget.picture_store_bytes)
    meters.in_use.labels("upload").set_function(lambda: limits.uploads_pool.used)
    meters.in_use.labels("work").set_function(lambda: limits.work.used)
    meters.in_use.labels("pictures").set_function(lambda: pictures.bytes)
    decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anomap-decode")

    async def sweep() -> None:
        """Expired pictures out, and freed memory back to the system when idle."""
        trimmed = True
        while True:
            await asyncio.sleep(1.0)
            pictures.sweep()
            idle = limits.work.used == 0 and limits.uploads_pool.used == 0
            if idle and not trimmed:
                await run_in_threadpool(return_memory)
            trimmed = idle

    station = _station(served, settings.station)
    station_stop = threading.Event()

    def start_batcher(model: ServedModel) -> None:
        model.batcher = Batcher(model.detector, settings.max_batch, settings.batch_window_ms,
                                settings.queue_size,
                                on_batch=meters.batch_size.labels(model.name).observe)
        model.batcher.start()

    async def lifespan(app: Any):  # noqa: ANN202 - FastAPI's lifespan protocol
        watcher = None
        if station is not None:
            watcher = threading.Thread(target=station.run, args=(station_stop,),
                                       name="anomap-station", daemon=True)
            watcher.start()
        for model in served.values():
            start_batcher(model)
        sweeper = asyncio.get_running_loop().create_task(sweep())
        yield
        sweeper.cancel()
        for model in served.values():
            for version in (model, model.previous):
                if version is not None and version.batcher is not None:
                    await version.batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)
        station_stop.set()
        if watcher is not None:
            watcher.join(timeout=30)

    # no /docs page: it would load its scripts from a CDN (blank on an offline PC);
    # /openapi.json is served, behind the key
    app = FastAPI(title="anomap", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Anomaly scores, verdicts and heat maps from "
                                              "trained anomap models. API v1.")
    _add_error_handlers(app)
    app.add_middleware(Guard, limits=limits, meters=meters)
    _add_routes(app, served, limits, meters, pictures, decode_pool)
    if station is not None:
        _add_station_routes(app, station, meters)
    _add_version_routes(app, served, Deployment(
        settings.model_store, lambda folder: Detector.load(folder, device, runtime=runtime,
                                                           probe=probe),
        start_batcher, station))
    app.state.limits, app.state.pictures = limits, pictures
    app.state.budget_line = budget.describe(models_bytes)
    return app


def server_options(settings: ServeSettings, port: int | None = None,
                   log_level: str = "warning") -> dict[str, Any]:
    """uvicorn's options (``uvicorn.run(app, **options)``): the head deadline at the
    connection, and connections beyond four per request in flight answered by
    uvicorn's own 503."""
    return {"host": settings.host, "port": settings.port if port is None else port,
            "log_level": log_level, "timeout_keep_alive": 5,
            "http": deadline_protocol(settings.head_timeout_s),
            "limit_concurrency": 4 * settings.budget.max_in_flight + 16}


def serve(models: dict[str, str | Path], settings: ServeSettings, runtime: str = "auto",
          device: str = "auto", probe: str = "refuse") -> None:
    """Load the models and serve until interrupted."""
    uvicorn = require("uvicorn")
    settings.check()
    app = create_app(models, settings, runtime, device, probe)
    print(f"anomap serve: {app.state.budget_line}", file=sys.stderr, flush=True)
    uvicorn.run(app, **server_options(settings))

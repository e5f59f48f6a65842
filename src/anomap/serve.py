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
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import logging
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
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
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from anomap import report
from anomap.data import DEFAULT_MAX_PIXELS, ImageReadError, load_image
from anomap.run import Detector, Prediction, PreparedImage
from anomap.runtimes import require
from anomap.version import __version__

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

    def check(self) -> None:
        """Refuse to listen beyond this machine without a key."""
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"--host {self.host} reaches beyond this machine: give --api-key "
                             f"KEY (or set {API_KEY_ENV}), which every API call must send")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServiceError(Exception):
    """An error with an HTTP status and a stable code, answered as JSON."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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
                 queue_size: int) -> None:
        self.detector = detector
        self.max_batch = max(1, max_batch)
        self.window = window_ms / 1000.0
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomap-model")
        self.batches: list[int] = []  # sizes, for the metrics
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
            self.batches.append(len(jobs))
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

    @property
    def report(self) -> Path | None:
        page = self.source / "report.html" if self.source else None
        return page if page and page.is_file() else None

    def describe(self) -> dict[str, Any]:
        config = self.detector.config
        info: dict[str, Any] = {
            "name": self.name, "method": config.method,
            "runtime": self.detector.runtime, "precision": self.detector.precision,
            "settings": config.model, "geometry": asdict(config.geometry),
            "threshold": self.detector.threshold,
            "pixel_threshold": self.detector.pixel_threshold,
            "display_range": list(self.detector.display_range),
            "report": f"/v1/models/{self.name}/report" if self.report else None,
        }
        if self.metrics:
            info["test_metrics"] = {k: self.metrics.get(k) for k in (
                "image_auroc", "pixel_auroc", "aupro", "n_images", "data")}
        return info


class PictureStore:
    """Short-lived PNGs behind random tokens (``?images=url``); bounded in count."""

    def __init__(self, seconds: float, capacity: int = 512) -> None:
        self.seconds, self.capacity = seconds, capacity
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(18)
        self.items[token] = (time.monotonic() + self.seconds, png)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return token

    def get(self, token: str) -> bytes | None:
        now = time.monotonic()
        for key in [k for k, (expiry, _) in self.items.items() if expiry < now]:
            del self.items[key]
        item = self.items.get(token)
        return None if item is None else item[1]


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
    """The service's Prometheus metrics, in a registry of its own."""

    registry: Any = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter("anomap_requests", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("anomap_request_seconds", "request latency", ["endpoint"],
                                 registry=self.registry)
        self.images = Counter("anomap_images", "images answered", ["model", "outcome"],
                              registry=self.registry)


@dataclass
class Limits:
    """What a request may be: its key, its size, its images; refused with a clear
    error (:class:`ServiceError`) before any work is spent on it."""

    settings: ServeSettings

    def check_headers(self, request: Request) -> None:
        settings, path = self.settings, request.url.path
        if settings.api_key and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("x-api-key") or request.headers.get(
                "authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given or "", settings.api_key):
                raise ServiceError(401, "unauthorized", "missing or wrong API key "
                                   "(send it as X-API-Key or Authorization: Bearer)")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            raise ServiceError(413, "request_too_large",
                               f"request of {int(length):,} bytes; the limit is "
                               f"{settings.max_request_bytes:,} (--max-request-bytes)")

    async def read_body(self, request: Request) -> bytes:
        """The whole body, refused as soon as it passes the limit (chunked uploads too)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_request_bytes:
                raise ServiceError(413, "request_too_large", f"request over the limit of "
                                   f"{self.settings.max_request_bytes:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def uploads(self, request: Request) -> list[tuple[str, bytes]]:
        """(filename, bytes) of each image: multipart files, or one image as the body."""
        settings = self.settings
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            body = await self.read_body(request)

            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(request.scope, replay).form(
                max_files=settings.max_images + 1, max_fields=settings.max_images + 16)
            files = [(getattr(v, "filename", None) or f"image{i}", await v.read())
                     for i, (_, v) in enumerate(form.multi_items()) if hasattr(v, "read")]
        else:
            files = [(request.headers.get("x-filename", "image"), await self.read_body(request))]
        if not files or all(not data for _, data in files):
            raise ServiceError(400, "no_image", "send images as multipart files (field "
                               "'files') or one image as the raw body")
        if len(files) > settings.max_images:
            raise ServiceError(413, "too_many_images", f"{len(files)} images; the limit is "
                               f"{settings.max_images} per request (--max-images)")
        return files

    def decode(self, detector: Detector, filename: str, data: bytes
               ) -> tuple[PreparedImage, np.ndarray] | dict[str, str]:
        """One upload -> the network's input and the photo, or the error to answer."""
        if len(data) > self.settings.max_image_bytes:
            return {"code": "image_too_large", "message": f"{filename}: {len(data):,} bytes; "
                    f"the limit is {self.settings.max_image_bytes:,} per image "
                    "(--max-image-bytes)"}
        try:
            photo = load_image(io.BytesIO(data), self.settings.max_pixels, name=filename)
        except ImageReadError as error:
            code = {"over pixel limit": "too_many_pixels"}.get(error.reason, "not_an_image")
            return {"code": code, "message": str(error)}
        return detector.prepare(photo), np.asarray(photo)


def _add_error_handlers(app: Any) -> None:
    """Every error answers as ``{"error": {"code", "message"}}``."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(error.code, error.message), status_code=error.status)

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
        return JSONResponse(error_body("internal_error", f"{type(error).__name__}: {error}"),
                            status_code=500)


def _add_guard(app: Any, limits: Limits, meters: Meters) -> None:
    """The API key, the request-size limit and the metrics, for every call."""

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        endpoint = ("predict" if path.endswith("/predict") else path.split("/")[2]
                    if path.startswith("/v1/") and len(path.split("/")) > 2 else path)
        started = time.perf_counter()
        try:
            limits.check_headers(request)
            response = await call_next(request)
        except ServiceError as error:
            response = JSONResponse(error_body(error.code, error.message),
                                    status_code=error.status)
        meters.requests.labels(endpoint, str(response.status_code)).inc()
        meters.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response


@dataclass
class _Answering:
    """What one predict request asked for, and how to answer each of its images."""

    model: ServedModel
    meters: Meters
    pictures: PictureStore
    overlay: bool
    mask: bool
    as_url: bool

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
                      threshold=prediction.threshold,
                      pixel_threshold=prediction.pixel_threshold)
        vmin, vmax = self.model.detector.display_range
        if self.overlay:
            drawn = await run_in_threadpool(report.overlay, photo, prediction.anomaly_map,
                                            vmin, vmax, pred_mask=prediction.mask)
            result["overlay_png"] = self.picture(await run_in_threadpool(_png, drawn))
        if self.mask:
            result["mask_png"] = self.picture(_png(prediction.mask.astype(np.uint8) * 255))
        return result


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
        page = model_named(name).report
        if page is None:
            raise ServiceError(404, "no_report", f"model {name!r} has no test report")
        return HTMLResponse(page.read_text())

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
        ``overlay``/``mask`` the heat-map overlay and the defect mask as PNG,
        base64 in the JSON (``images=base64``) or short-lived URLs (``images=url``)."""
        model = model_named(name)
        if images not in ("base64", "url"):
            raise ServiceError(422, "invalid_request", "images must be base64 or url")
        files = await limits.uploads(request)
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(
            decode_pool, limits.decode, model.detector, filename, data)
            for filename, data in files))
        answering = _Answering(model, meters, pictures, overlay, mask, images == "url")
        results = list(await asyncio.gather(*(
            answering.answer(i, f, item)
            for i, ((f, _), item) in enumerate(zip(files, decoded, strict=True)))))
        body = {"model": name, "results": results}
        if not any(r["ok"] for r in results):
            first = results[0]["error"]
            return JSONResponse({**error_body(first["code"], first["message"]), **body},
                                status_code=_answer_status(results))
        return JSONResponse(body)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("anomap").joinpath("web/index.html").read_text())


def create_app(models: dict[str, Detector | str | Path], settings: ServeSettings | None = None,
               runtime: str = "auto", device: str = "auto", probe: str = "refuse") -> Any:
    """The ASGI app serving ``models`` (name -> Detector, run or export folder);
    exports replay their probe first (``probe``: see :meth:`Detector.load`)."""
    settings = settings or ServeSettings()
    served = load_models(models, runtime, device, probe)
    meters = Meters()
    decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anomap-decode")

    async def lifespan(app: Any):  # noqa: ANN202 - FastAPI's lifespan protocol
        for model in served.values():
            model.batcher = Batcher(model.detector, settings.max_batch,
                                    settings.batch_window_ms, settings.queue_size)
            model.batcher.start()
        yield
        for model in served.values():
            if model.batcher is not None:
                await model.batcher.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="anomap", version=__version__, lifespan=lifespan,
                  description="Anomaly scores, verdicts and heat maps from trained anomap "
                              "models. API v1.")
    limits = Limits(settings)
    _add_error_handlers(app)
    _add_guard(app, limits, meters)
    _add_routes(app, served, limits, meters, PictureStore(settings.picture_url_seconds),
                decode_pool)
    return app


def serve(models: dict[str, str | Path], settings: ServeSettings, runtime: str = "auto",
          device: str = "auto", probe: str = "refuse") -> None:
    """Load the models and serve until interrupted."""
    uvicorn = require("uvicorn")
    settings.check()
    app = create_app(models, settings, runtime, device, probe)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                timeout_keep_alive=5)

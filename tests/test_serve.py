"""`anomap serve` over real HTTP on a loopback port: the scores are Detector's,
every limit answers a 4xx with a reason, the key is checked, a bad image fails
alone, and the page works in a real browser (Debian's chromium via Playwright)."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import png_claiming
from PIL import Image

from anomap.run import Detector
from anomap.serve import ServeSettings, create_app, server_options

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def running(models: dict, settings: ServeSettings | None = None) -> Iterator[str]:
    """The real uvicorn server in a thread on a free loopback port; yields its URL."""
    with running_app(models, settings) as (url, _):
        yield url


@contextmanager
def running_app(models: dict, settings: ServeSettings | None = None
                ) -> Iterator[tuple[str, Any]]:
    """:func:`running`, yielding the app too (its budgets are ``app.state.limits``)."""
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(models, settings, device="cpu")
    server = uvicorn.Server(uvicorn.Config(app, **server_options(settings, port=0,
                                                                 log_level="error")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _bomb_png() -> bytes:
    return png_claiming(40000, 40000)


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[str]:
    settings = ServeSettings(max_request_bytes=3_000_000, max_image_bytes=1_000_000,
                             max_images=4)
    with running({"tiles": trained_run}, settings) as url:
        yield url


def test_predict_round_trip_gives_the_detectors_scores(server: str, trained_run: Path,
                                                       toy_data: Path) -> None:
    photos = [toy_data / "test" / "hole" / "000.png", toy_data / "test" / "good" / "000.png"]
    expected = Detector.load(trained_run, "cpu").predict(photos)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in photos]
    response = httpx.post(f"{server}/v1/models/tiles/predict?overlay=true&mask=true",
                          files=files, timeout=60)
    assert response.status_code == 200
    results = response.json()["results"]
    for result, prediction in zip(results, expected, strict=True):
        assert result["ok"] and result["verdict"] == prediction.verdict
        assert result["score"] == pytest.approx(prediction.score, rel=1e-5)
        overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
        assert overlay.size == (128, 128)
    raw = httpx.post(f"{server}/v1/models/tiles/predict", content=photos[0].read_bytes(),
                     headers={"content-type": "application/octet-stream"}, timeout=60)
    assert raw.json()["results"][0]["score"] == pytest.approx(expected[0].score, rel=1e-5)
    url = httpx.post(f"{server}/v1/models/tiles/predict?overlay=true&images=url",
                     content=photos[0].read_bytes(), timeout=60).json()["results"][0]
    picture = httpx.get(server + url["overlay_png"], timeout=10)
    assert picture.headers["content-type"] == "image/png"


def test_a_bad_image_fails_alone_with_a_reason(server: str, toy_data: Path) -> None:
    good = (toy_data / "test" / "good" / "000.png").read_bytes()
    files = [("files", ("good.png", good)), ("files", ("fake.png", b"<html>not a png")),
             ("files", ("bomb.png", _bomb_png()))]
    body = httpx.post(f"{server}/v1/models/tiles/predict", files=files, timeout=60).json()
    ok, fake, bomb = body["results"]
    assert ok["ok"] and ok["verdict"] in ("pass", "fail")
    assert not fake["ok"] and fake["error"]["code"] == "not_an_image"
    assert "fake.png" in fake["error"]["message"]
    assert bomb["error"]["code"] == "too_many_pixels"
    assert "1600000000 pixels" in bomb["error"]["message"]


@pytest.mark.parametrize("case", ["bomb", "request_bytes", "image_bytes", "count", "model"])
def test_limits_answer_4xx_with_a_stable_error(server: str, toy_data: Path, case: str) -> None:
    good = (toy_data / "test" / "good" / "000.png").read_bytes()
    big = b"\0" * 1_200_000
    request = {
        "bomb": dict(content=_bomb_png()),
        "request_bytes": dict(files=[("files", (f"{i}.png", big)) for i in range(3)]),
        "image_bytes": dict(files=[("files", ("big.png", big))]),
        "count": dict(files=[("files", (f"{i}.png", good)) for i in range(5)]),
        "model": dict(content=good),
    }[case]
    name = "nope" if case == "model" else "tiles"
    response = httpx.post(f"{server}/v1/models/{name}/predict", timeout=60, **request)
    code, expected_code = response.status_code, {
        "bomb": (413, "too_many_pixels"), "request_bytes": (413, "request_too_large"),
        "image_bytes": (413, "image_too_large"), "count": (413, "too_many_images"),
        "model": (404, "unknown_model")}[case]
    assert (code, response.json()["error"]["code"]) == expected_code
    assert response.json()["error"]["message"]


def test_models_health_and_metrics(server: str) -> None:
    models = httpx.get(f"{server}/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiles"] and models[0]["method"] == "stpm"
    assert httpx.get(f"{server}/v1/models/tiles").json()["threshold"] > 0
    assert httpx.get(f"{server}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{server}/readyz").json()["status"] == "ready"
    assert "anomap_requests_total" in httpx.get(f"{server}/metrics").text
    assert httpx.get(f"{server}/openapi.json").json()["info"]["title"] == "anomap"
    missing = httpx.get(f"{server}/v1/runs/../../etc/passwd")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_the_api_key_is_checked_and_required_off_loopback(trained_run: Path,
                                                          toy_data: Path) -> None:
    with pytest.raises(ValueError, match="--api-key"):
        ServeSettings(host="0.0.0.0").check()
    ServeSettings(host="0.0.0.0", api_key="k").check()
    image = (toy_data / "test" / "good" / "000.png").read_bytes()
    with running({"tiles": trained_run}, ServeSettings(api_key="sesame")) as url:
        denied = httpx.post(f"{url}/v1/models/tiles/predict", content=image, timeout=60)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{url}/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
        allowed = httpx.post(f"{url}/v1/models/tiles/predict", content=image, timeout=60,
                             headers={"authorization": "Bearer sesame"})
        assert allowed.status_code == 200
        assert httpx.get(f"{url}/healthz").status_code == 200  # probes need no key
        for guarded in ("/metrics", "/openapi.json", "/v1/models/tiles/report"):
            assert httpx.get(url + guarded).status_code == 401, guarded
        assert httpx.get(f"{url}/metrics", headers={"x-api-key": "sesame"}).status_code == 200


def test_concurrent_requests_are_batched_and_a_model_error_fails_only_its_batch(
        trained_run: Path, toy_data: Path) -> None:
    detector = Detector.load(trained_run, "cpu")
    image = (toy_data / "test" / "good" / "000.png").read_bytes()
    settings = ServeSettings(max_batch=8, batch_window_ms=200)
    app_models = {"tiles": detector}
    with running(app_models, settings) as url:
        def call() -> None:
            results.append(httpx.post(f"{url}/v1/models/tiles/predict", content=image,
                                      timeout=60).json()["results"][0]["score"])

        results: list[float] = []
        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 6 and max(results) - min(results) < 1e-4 * max(results)
        metrics = httpx.get(f"{url}/metrics").text
        batches = _metric(metrics, 'anomap_batch_size_count{model="tiles"}')
        singles = _metric(metrics, 'anomap_batch_size_bucket{le="1.0",model="tiles"}')
        assert batches < 6 and singles < batches, "concurrent requests must share a batch"
        original = detector.predict_prepared
        detector.predict_prepared = lambda *a, **k: 1 / 0  # the model breaks
        broken = httpx.post(f"{url}/v1/models/tiles/predict", content=image, timeout=60)
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "model_error"
        detector.predict_prepared = original
        assert httpx.post(f"{url}/v1/models/tiles/predict", content=image,
                          timeout=60).status_code == 200  # and the server goes on


def _metric(text: str, name: str) -> float:
    """One sample's value from Prometheus' text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_in_a_real_browser(server: str, toy_data: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    photos = [toy_data / "test" / "hole" / "000.png", toy_data / "test" / "good" / "000.png"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(),
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(server + "/")
        page.wait_for_selector("#model option", state="attached")
        page.set_input_files("#files", [str(p) for p in photos])
        page.wait_for_function("document.querySelectorAll('#rows tr img').length === 2",
                               timeout=60_000)
        verdicts = page.eval_on_selector_all("#rows .verdict", "els => els.map(e => e.textContent)")
        assert len(verdicts) == 2 and set(verdicts) <= {"pass", "fail"}
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        scores = page.eval_on_selector_all("#rows tr td:nth-child(4)",
                                           "els => els.map(e => Number(e.textContent))")
        # the slider above every score: all pass; below every score: all fail
        for value, verdict in ((max(scores) * 1.5 + 1, "pass"), (min(scores) * 0.5 - 1, "fail")):
            page.eval_on_selector("#threshold", f"""el => {{
                el.min = -1e9; el.max = 1e9; el.value = {value};
                el.dispatchEvent(new Event('input')); }}""")
            shown = page.eval_on_selector_all("#rows .verdict",
                                              "els => els.map(e => e.textContent)")
            assert shown == [verdict, verdict]
        page.screenshot(path=str(tmp_path / "page_slider.png"), full_page=True)
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 1000

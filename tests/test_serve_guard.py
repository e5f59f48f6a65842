"""The service under abuse, over real HTTP on loopback: a memory budget that
refuses before decoding, deadlines for held and slow clients, a cap on requests
in flight, metric labels no client can invent, a byte-bounded picture store,
host names checked, and the small faults that once answered 500 or said too much."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_serve import _chromium, running, running_app

from anomap.admission import Budget, MiB, Pool, Refused
from anomap.run import Detector
from anomap.serve import PictureStore, ServeSettings, ServiceError

pytestmark = pytest.mark.usefixtures("one_thread")

PREDICT = "/v1/models/tiles/predict"


def _png(side: int, colour: tuple[int, int, int] = (90, 110, 130)) -> bytes:
    """A PNG of side x side pixels that is only kilobytes on the wire."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="PNG")
    return buffer.getvalue()


SETTINGS = ServeSettings(picture_max_side=256, max_request_bytes=8 * MiB,
                         max_image_bytes=8 * MiB, body_timeout_s=1.5, head_timeout_s=1.5,
                         budget=Budget(upload_bytes=4 * MiB, work_bytes=200 * MiB,
                                       picture_store_bytes=2 * MiB, max_in_flight=2,
                                       wait_s=0.5))


@pytest.fixture(scope="module")
def guarded(trained_run: Path) -> tuple[str, object]:
    with running_app({"tiles": trained_run}, SETTINGS) as served:
        yield served


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=20)
    return connection


def _answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def test_pictures_are_drawn_at_a_bounded_size_and_scores_stay_the_detectors(
        guarded: tuple[str, object], trained_run: Path) -> None:
    url, _ = guarded
    photo = _png(2000)
    expected = Detector.load(trained_run, "cpu").predict(Image.open(io.BytesIO(photo)))[0]
    result = httpx.post(f"{url}{PREDICT}?overlay=true&mask=true", content=photo,
                        timeout=60).json()["results"][0]
    assert result["score"] == pytest.approx(expected.score, rel=1e-5)
    import base64

    for key in ("overlay_png", "mask_png"):
        picture = Image.open(io.BytesIO(base64.b64decode(result[key])))
        assert picture.size == (256, 256), key


def test_the_work_budget_refuses_before_decoding_413_alone_503_when_busy(
        guarded: tuple[str, object]) -> None:
    url, app = guarded
    work = app.state.limits.work
    # two 3000 x 3000 photos need 2 x 9 Mpx x 12 B: more than the whole 200 MiB
    files = [("files", (f"{i}.png", _png(3000))) for i in range(2)]
    over = httpx.post(url + PREDICT, files=files, timeout=60)
    assert over.status_code == 413 and over.json()["error"]["code"] == "over_budget"
    work.used = work.capacity - 1000  # the budget is taken by others, and stays so
    try:
        busy = httpx.post(url + PREDICT, content=_png(300), timeout=60)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy"
        assert busy.headers["retry-after"] == "1"
    finally:
        work.used = 0
    assert httpx.post(url + PREDICT, content=_png(300), timeout=60).status_code == 200
    assert work.used == 0 and work.peak <= work.capacity


def test_the_upload_budget_answers_503_and_is_given_back(guarded: tuple[str, object]) -> None:
    url, app = guarded
    body = _png(64) + b"\0" * (3 * MiB)  # under the request limit, over the upload budget
    refused = httpx.post(url + PREDICT, content=body, timeout=60)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert app.state.limits.uploads_pool.used == 0


def test_held_uploads_and_slow_heads_are_cut_at_their_deadlines(
        guarded: tuple[str, object]) -> None:
    url, app = guarded
    held = _raw(url)
    held.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 100)
    started = time.monotonic()
    answer = _answer(held)
    assert answer.startswith(b"HTTP/1.1 408") and b"upload_timeout" in answer
    assert time.monotonic() - started < 10
    slow = _raw(url)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and never the rest
    started = time.monotonic()
    assert _answer(slow) == b""  # closed without an answer
    assert 1.0 < time.monotonic() - started < 10
    assert app.state.limits.uploads_pool.used == 0


def test_requests_past_the_in_flight_cap_get_503_and_probes_still_answer(
        guarded: tuple[str, object]) -> None:
    url, _ = guarded
    holders = []
    for _ in range(2):  # the cap: two requests whose bodies never finish
        connection = _raw(url)
        connection.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Length: 1000\r\n\r\nxx")
        holders.append(connection)
    time.sleep(0.3)
    third = httpx.post(url + PREDICT, content=_png(64), timeout=60)
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert "in flight" in third.json()["error"]["message"]
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    for connection in holders:
        assert _answer(connection).startswith(b"HTTP/1.1 408")
    assert httpx.post(url + PREDICT, content=_png(64), timeout=60).status_code == 200


def test_metric_labels_are_route_templates_never_a_clients_path(
        guarded: tuple[str, object]) -> None:
    url, _ = guarded
    before = len(httpx.get(url + "/metrics").text)
    for i in range(40):
        httpx.get(f"{url}/{'x' * 300}{i}", timeout=10)
    text = httpx.get(url + "/metrics").text
    assert "x" * 300 not in text and len(text) - before < 4000
    assert 'route="unmatched"' in text and 'route="/v1/models/{name}/predict"' in text


def test_the_picture_store_is_bounded_in_bytes_and_swept_on_a_timer() -> None:
    store = PictureStore(seconds=0.2, capacity_bytes=1000)
    first = store.put(b"a" * 600)
    second = store.put(b"b" * 600)  # over 1000 bytes: the oldest goes
    assert store.get(first) is None and store.get(second) == b"b" * 600
    assert store.bytes == 600
    with pytest.raises(ServiceError, match="does not fit"):
        store.put(b"c" * 2000)
    time.sleep(0.3)
    store.sweep()  # nobody fetched anything, and still it is gone
    assert not store.items and store.bytes == 0


def test_a_pool_waits_for_room_then_refuses() -> None:
    async def scenario() -> list[str]:
        pool, said = Pool(10, "work"), []
        await pool.take(8, wait_s=0.1)
        with pytest.raises(Refused) as busy:
            await pool.take(5, wait_s=0.05)
        said.append(busy.value.reason)
        with pytest.raises(Refused) as never:
            await pool.take(11, wait_s=1)
        said.append(never.value.reason)
        waiting = asyncio.create_task(pool.take(5, wait_s=2))
        await asyncio.sleep(0.05)
        await pool.give(8)
        await waiting
        said.append(f"used {pool.used}")
        return said

    assert asyncio.run(scenario()) == ["busy", "too_large", "used 5"]


def test_only_loopback_host_names_without_a_key_or_a_list(guarded: tuple[str, object]) -> None:
    url, _ = guarded
    rebound = httpx.get(url + "/v1/models", headers={"host": "attacker.example:8000"})
    assert rebound.status_code == 421 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(url + "/v1/models", headers={"host": "localhost:8000"}).status_code == 200
    assert ServeSettings(allowed_hosts=("line3.local",)).host_allowed("LINE3.local:80")
    assert not ServeSettings(allowed_hosts=("line3.local",)).host_allowed("other:80")
    assert ServeSettings(api_key="k").host_allowed("anything.example")
    assert ServeSettings().host_allowed("[::1]:8000")


def test_a_client_leaving_mid_upload_logs_no_traceback(
        guarded: tuple[str, object], caplog: pytest.LogCaptureFixture) -> None:
    url, app = guarded
    with caplog.at_level(logging.DEBUG):
        connection = _raw(url)
        connection.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Length: 100000\r\n\r\n" + b"\0" * 5000)
        time.sleep(0.2)
        connection.close()
        time.sleep(0.5)
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert app.state.limits.uploads_pool.used == 0


def test_no_address_or_server_path_reaches_a_client(
        guarded: tuple[str, object], trained_run: Path, toy_data: Path, tmp_path: Path) -> None:
    url, _ = guarded
    garbage = httpx.post(url + PREDICT, content=b"\x00\x01 not an image", timeout=60).json()
    assert "0x" not in garbage["error"]["message"] and "image" in garbage["error"]["message"]
    run = tmp_path / "with_report"
    shutil.copytree(trained_run, run)
    photo = (toy_data / "test" / "good" / "000.png").resolve()
    (run / "report.html").write_text(f"<p>{photo}</p><p>{run.resolve()}/metrics.json</p>")
    with running({"tiles": run}) as served:
        listing = httpx.get(served + "/v1/models").text
        page = httpx.get(served + "/v1/models/tiles/report").text
    for text in (listing, page):
        assert str(toy_data.resolve()) not in text and str(tmp_path) not in text
    assert "test/good/000.png" in page


def test_keys_in_any_legal_spelling_and_no_500_for_odd_bytes(trained_run: Path,
                                                             toy_data: Path) -> None:
    image = (toy_data / "test" / "good" / "000.png").read_bytes()
    with running({"tiles": trained_run}, ServeSettings(api_key="sesame")) as url:
        odd = httpx.get(url + "/v1/models", headers={"x-api-key": "clé✓".encode()})
        assert odd.status_code == 401
        lower = httpx.post(url + PREDICT, content=image, timeout=60,
                           headers={"authorization": "bearer sesame"})
        assert lower.status_code == 200
        assert httpx.get(url + "/docs").status_code in (401, 404)  # no CDN page
        assert httpx.get(url + "/docs", headers={"x-api-key": "sesame"}).status_code == 404
        prepared = httpx.Request("POST", url + PREDICT, files=[
            ("files", ("a.png", image)), ("files", ("b.png", image))])
        content_type = prepared.headers["content-type"].replace(
            "multipart/form-data", "Multipart/Form-Data")
        mixed = httpx.post(url + PREDICT, content=prepared.read(), timeout=60,
                           headers={"content-type": content_type, "x-api-key": "sesame"})
        assert mixed.status_code == 200 and len(mixed.json()["results"]) == 2


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_pages_report_link_sends_the_key(trained_run: Path, tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    run = tmp_path / "with_report"
    shutil.copytree(trained_run, run)
    (run / "report.html").write_text("<h1>the test report of tiles</h1>")
    with running({"tiles": run}, ServeSettings(api_key="sesame")) as url, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(),
                                    args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#key", "sesame")
        page.dispatch_event("#key", "change")
        page.wait_for_selector("#report:not([hidden])", timeout=30_000)
        with page.context.expect_page(timeout=30_000) as opened:
            page.click("#report")
        report = opened.value
        report.wait_for_function("document.body && document.body.innerText.includes("
                                 "'the test report of tiles')", timeout=30_000)
        assert report.url.startswith("blob:")
        browser.close()


def test_a_model_switches_atomically_and_rolls_back(trained_run: Path, toy_data: Path,
                                                     tmp_path: Path) -> None:
    import json
    import threading

    store = tmp_path / "store"
    for name in ("v1", "v2"):
        shutil.copytree(trained_run, store / name)
    calibration = json.loads((store / "v2" / "calibration.json").read_text())
    calibration["threshold"] *= 0.5  # v2 answers differently: a stricter threshold
    (store / "v2" / "calibration.json").write_text(json.dumps(calibration))
    image = (toy_data / "test" / "good" / "000.png").read_bytes()
    with running({"tiles": store / "v1"}, ServeSettings(model_store=store)) as url:
        def result() -> dict:
            return httpx.post(url + PREDICT, content=image, timeout=60).json()["results"][0]

        first = result()
        seen: list[tuple[int, str, float]] = []
        stop = threading.Event()

        def keep_asking() -> None:
            while not stop.is_set():
                answer = httpx.post(url + PREDICT, content=image, timeout=60)
                row = answer.json()["results"][0]
                seen.append((answer.status_code, row.get("model_version"), row.get("threshold")))

        askers = [threading.Thread(target=keep_asking) for _ in range(3)]
        for asker in askers:
            asker.start()
        time.sleep(0.3)
        switched = httpx.post(f"{url}/v1/models/tiles/switch", json={"run": "v2"}, timeout=120)
        time.sleep(0.3)
        stop.set()
        for asker in askers:
            asker.join(timeout=60)
        assert switched.status_code == 200, switched.text
        assert switched.json()["previous_version"] == first["model_version"]
        second = result()
        assert second["model_version"] == switched.json()["version"] != first["model_version"]
        assert second["threshold"] == pytest.approx(first["threshold"] * 0.5)
        # every answer during the switch is wholly one version or the other
        pairs = {(v, round(t, 9)) for code, v, t in seen if code == 200}
        assert all(code == 200 for code, _, _ in seen) and pairs <= {
            (first["model_version"], round(first["threshold"], 9)),
            (second["model_version"], round(second["threshold"], 9))}
        for wanted in ("../", "nope", ""):
            refused = httpx.post(f"{url}/v1/models/tiles/switch", json={"run": wanted})
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_run"
        back = httpx.post(f"{url}/v1/models/tiles/rollback", timeout=60)
        assert back.json()["version"] == first["model_version"]
        assert result()["threshold"] == pytest.approx(first["threshold"])
        described = httpx.get(f"{url}/v1/models/tiles").json()
        assert described["previous_version"] == second["model_version"]

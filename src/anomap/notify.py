"""Telling other systems of each verdict without ever making the line wait.

A :class:`Notifier` sends each verdict from a thread of its own: the station
only puts the verdict on a queue. A receiver that is down, slow or refusing is
retried with a growing pause (1 s, doubling, at most 60 s) while newer
verdicts wait behind it, in arrival order. The queue is bounded: past
``max_queue`` waiting verdicts the oldest is dropped, and the count of dropped
ones is kept and logged (the record holds every verdict whatever happens here).
Two ways out: :class:`Webhook` (an HTTP POST of JSON, the standard library's
client) and :class:`Mqtt` (a message to a broker, paho-mqtt, QoS 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger(__name__)


class Notifier:
    """The queue, the order and the retries; :meth:`deliver` sends one payload or raises."""

    def __init__(self, url: str, timeout_s: float = 5.0, max_queue: int = 10_000,
                 max_pause_s: float = 60.0) -> None:
        self.url, self.timeout_s, self.max_pause_s = url, timeout_s, max_pause_s
        self.waiting: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self.sent = self.dropped = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"anomap-{type(self).__name__}",
                                        daemon=True)
        self._thread.start()

    def deliver(self, payload: dict[str, Any]) -> None:
        raise NotImplementedError

    def send(self, row: dict[str, Any]) -> None:
        """Queue one verdict; never blocks."""
        payload = {"event": "verdict", **{k: (v.isoformat() if hasattr(v, "isoformat") else v)
                                           for k, v in row.items()}}
        while True:
            try:
                self.waiting.put_nowait(payload)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.waiting.get_nowait()
                    self.dropped += 1
                    log.warning("%s: %d verdicts dropped (the receiver is behind)",
                                self.url, self.dropped)

    def _run(self) -> None:
        while True:
            payload = self.waiting.get()
            if payload is None:
                return
            pause = 1.0
            while True:
                try:
                    self.deliver(payload)
                    self.sent += 1
                    break
                except (OSError, ValueError, RuntimeError) as error:
                    self.failures += 1
                    log.warning("%s: %s; retrying in %.0f s", self.url, error, pause)
                    if self._stop.wait(pause):
                        return
                    pause = min(pause * 2, self.max_pause_s)

    def close(self, wait_s: float = 5.0) -> None:
        """Deliver what is queued for up to ``wait_s``, then stop."""
        deadline = time.monotonic() + wait_s
        while not self.waiting.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self.waiting.put_nowait(None)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1)


class Webhook(Notifier):
    """POST ``{"event": "verdict", ...row}`` to ``url`` for each verdict, in order."""

    def __init__(self, url: str, **options: Any) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook {url!r}: give an http:// or https:// URL")
        super().__init__(url, **options)

    def deliver(self, payload: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode("utf-8"), method="POST",
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
            if answer.status >= 300:
                raise urllib.error.HTTPError(self.url, answer.status, "not accepted",
                                             answer.headers, None)


class Mqtt(Notifier):
    """Publish each verdict as JSON to ``mqtt://HOST[:PORT]/TOPIC`` (QoS 1: the broker
    acknowledges it); the connection is made, and made again, by the sending thread."""

    def __init__(self, url: str, **options: Any) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"MQTT {url!r}: give mqtt://HOST[:PORT]/TOPIC")
        try:
            import paho.mqtt.client  # noqa: F401 - checked here, used by the thread
        except ImportError as error:
            raise RuntimeError('--mqtt needs paho-mqtt: pip install "anomap[mqtt]"') from error
        self.host, self.port = parts.hostname, parts.port or 1883
        self.topic = parts.path.lstrip("/") or "anomap/verdicts"
        self._client: Any = None
        super().__init__(url, **options)

    def _connected(self) -> Any:
        from paho.mqtt import client as mqtt

        if self._client is None or not self._client.is_connected():
            if self._client is not None:
                self._client.loop_stop()
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            client.connect(self.host, self.port, keepalive=30)
            client.loop_start()
            deadline = time.monotonic() + self.timeout_s
            while not client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not client.is_connected():
                client.loop_stop()
                raise OSError(f"no MQTT broker answered at {self.host}:{self.port}")
            self._client = client
        return self._client

    def deliver(self, payload: dict[str, Any]) -> None:
        message = self._connected().publish(self.topic, json.dumps(payload), qos=1)
        message.wait_for_publish(timeout=self.timeout_s)
        if not message.is_published():
            raise OSError(f"the broker at {self.host}:{self.port} did not acknowledge")

    def close(self, wait_s: float = 5.0) -> None:
        super().close(wait_s)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

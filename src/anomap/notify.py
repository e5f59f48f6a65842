"""Telling other systems of each verdict without ever making the line wait.

A :class:`Webhook` POSTs each verdict as JSON from a thread of its own. The
station only puts the verdict on a queue; a receiver that is down, slow or
answering errors is retried with a growing pause (1 s, doubling, at most
60 s) while newer verdicts wait behind it in arrival order. The queue is bounded: past
``max_queue`` waiting verdicts the oldest is dropped, and the count of dropped
ones is kept and logged (the record holds every verdict whatever happens here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger(__name__)


class Webhook:
    """POST ``{"event": "verdict", ...row}`` to ``url`` for each verdict, in order."""

    def __init__(self, url: str, timeout_s: float = 5.0, max_queue: int = 10_000,
                 max_pause_s: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"webhook {url!r}: give an http:// or https:// URL")
        self.url, self.timeout_s, self.max_pause_s = url, timeout_s, max_pause_s
        self.waiting: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self.sent = self.dropped = self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._deliver, name="anomap-webhook",
                                        daemon=True)
        self._thread.start()

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
                    log.warning("webhook %s: %d verdicts dropped (the receiver is behind)",
                                self.url, self.dropped)

    def _post(self, payload: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode("utf-8"), method="POST",
            headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
            if answer.status >= 300:
                raise urllib.error.HTTPError(self.url, answer.status, "not accepted",
                                             answer.headers, None)

    def _deliver(self) -> None:
        while True:
            payload = self.waiting.get()
            if payload is None:
                return
            pause = 1.0
            while True:
                try:
                    self._post(payload)
                    self.sent += 1
                    break
                except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
                    self.failures += 1
                    log.warning("webhook %s: %s; retrying in %.0f s", self.url, error, pause)
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

"""What the service admits, and for how long it waits: its memory budget.

A request's memory is bounded in parts, each checked before the work is done:

* **uploads**: the bytes of request bodies held at once, across the server
  (:class:`Pool`, taken chunk by chunk as they arrive; past it: 503);
* **work**: the memory that decoding photos and drawing pictures takes. A
  request's share is reckoned from the image headers (pixels x
  :data:`DECODE_BYTES_PER_PIXEL`, pictures at their bounded size x
  :data:`PICTURE_BYTES_PER_PIXEL`) before any pixel is decoded; it waits
  briefly for room, then gets 503 with Retry-After. One request alone over
  the whole budget is refused with 413: it could never fit;
* **pictures kept for their URLs**: a byte-bounded store (in :mod:`anomap.serve`);
* **requests in flight**: a cap, so that waiting requests cannot pile up.

Slow clients hold nothing for long: the request head must arrive within a
deadline (:class:`DeadlineProtocol`, at the connection) and a body within
another (the service's body reader). Freed memory goes back to the system
when the server is idle (:func:`anomap.allocator.return_memory`): glibc would
otherwise keep the freed blocks of decoded photos for itself, and the process
would look as big as its worst moment forever. (Fixing glibc's mmap threshold low instead
would map and unmap every large tensor of every forward pass: slower.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

MiB = 2**20

#: bytes one decoded pixel may take while a photo becomes the network's input: the
#: decoded RGB (3), and where the file has transparency, RGBA, its background and the
#: composite (4 + 4 + 4) before the RGB copy. Measured peaks: docs/deployment.md
DECODE_BYTES_PER_PIXEL = 12
#: bytes one pixel of a drawn picture may take: the photo as float, the colourised
#: map, the blend, the map at picture size, masks and contours, and the PNG encoder's
PICTURE_BYTES_PER_PIXEL = 64


class Refused(Exception):
    """A budget cannot take an amount: ``busy`` (try again soon) or ``too_large``
    (never: the amount is over the whole budget)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class Pool:
    """A budget of ``capacity`` units shared by concurrent requests.

    :meth:`take` waits (first come, first served) up to ``wait_s`` for room;
    :meth:`try_take` never waits. Units go back with :meth:`give`."""

    def __init__(self, capacity: int, name: str) -> None:
        self.capacity, self.name = int(capacity), name
        self.used = 0
        self.peak = 0
        self._room = asyncio.Condition()

    def _check(self, amount: int) -> None:
        if amount > self.capacity:
            raise Refused("too_large", f"needs {amount / MiB:,.0f} MiB of {self.name}; the "
                                       f"server's whole budget is {self.capacity / MiB:,.0f} MiB")

    def _add(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)

    def try_take(self, amount: int) -> None:
        self._check(amount)
        if self.used + amount > self.capacity:
            raise Refused("busy", f"the server's {self.name} budget is in use; retry shortly")
        self._add(amount)

    async def take(self, amount: int, wait_s: float) -> None:
        self._check(amount)
        async with self._room:
            try:
                async with asyncio.timeout(wait_s):
                    await self._room.wait_for(lambda: self.used + amount <= self.capacity)
            except TimeoutError:
                raise Refused("busy", f"the server's {self.name} budget stayed in use for "
                                      f"{wait_s:g} s; retry shortly") from None
            self._add(amount)

    async def give(self, amount: int) -> None:
        async with self._room:
            self.used = max(0, self.used - amount)
            self._room.notify_all()


@dataclass(frozen=True)
class Budget:
    """The service's memory beyond its models, in parts (bytes), and how long a
    request may wait for room. ``from_total`` splits a stated total."""

    upload_bytes: int = 128 * MiB
    work_bytes: int = 768 * MiB
    picture_store_bytes: int = 64 * MiB
    max_in_flight: int = 32
    wait_s: float = 2.0

    @classmethod
    def from_total(cls, total_bytes: int, models_bytes: int, **others: object) -> Budget:
        """``total_bytes`` for the whole process: what the loaded models (their
        measured resident size) leave is split 20% uploads, 70% work, 10% store."""
        spare = total_bytes - models_bytes
        if spare < 64 * MiB:
            raise ValueError(f"--memory-budget {total_bytes / MiB:,.0f} MiB leaves "
                             f"{max(spare, 0) / MiB:,.0f} MiB beside the models "
                             f"({models_bytes / MiB:,.0f} MiB); give at least 64 MiB more")
        return cls(upload_bytes=int(spare * 0.2), work_bytes=int(spare * 0.7),
                   picture_store_bytes=int(spare * 0.1), **others)  # type: ignore[arg-type]

    def total(self, models_bytes: int) -> int:
        return models_bytes + self.upload_bytes + self.work_bytes + self.picture_store_bytes

    def describe(self, models_bytes: int) -> str:
        return (f"memory budget {self.total(models_bytes) / MiB:,.0f} MiB: models "
                f"{models_bytes / MiB:,.0f} + uploads {self.upload_bytes / MiB:,.0f} + work "
                f"{self.work_bytes / MiB:,.0f} + pictures kept "
                f"{self.picture_store_bytes / MiB:,.0f}; at most {self.max_in_flight} "
                "requests in flight")


def work_bytes(decode_pixels: list[int], picture_pixels: int) -> int:
    """A request's work memory: every photo decoded (they may decode at once),
    the kept reduced photos, and one picture drawn at a time."""
    return (sum(decode_pixels) * DECODE_BYTES_PER_PIXEL
            + picture_pixels * len(decode_pixels) * 3
            + (picture_pixels * PICTURE_BYTES_PER_PIXEL if picture_pixels else 0))


class DeadlineProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on each request's head.

    From connecting, and again after each response, a client has
    ``head_timeout`` seconds to send a request line and its headers; otherwise
    the connection is closed. (uvicorn only times out idle keep-alive
    connections, so a client sending its headers a byte at a time held one
    forever.) Set ``head_timeout`` on a subclass: uvicorn builds the protocol."""

    head_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def deadline_protocol(head_timeout: float) -> type[DeadlineProtocol]:
    """A :class:`DeadlineProtocol` class with its head deadline set (uvicorn's ``http=``)."""
    return type("DeadlineProtocol", (DeadlineProtocol,), {"head_timeout": float(head_timeout)})

"""Admission for the ingress's image decoding, by the pixels each decode will produce.

Why: decoding a 16 Mpx image takes 0.3-2 s of CPU and ~150 MB. On a plain FIFO thread pool, a burst
of such images (a 49 KB PNG can declare 16 Mpx) held every request behind them, a cached 224² one
included, for ~10 s, past its deadline, and took the ingress from 1.2 to 4 GB. Here at most
``active_pixels`` decode at once, at most ``queued_pixels`` wait (beyond that: RESOURCE_EXHAUSTED at
once, as a full worker queue answers), the smallest waiting image goes first, and waiting counts
against the request's deadline.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import TypeVar

from ierf.serving.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


class DecodeGate:
    """At most ``active_pixels`` being decoded and ``queued_pixels`` waiting; smallest first.

    An image larger than ``active_pixels`` still runs when nothing else does, so no image under the
    pixel cap is refused for its size alone. An image of at most ``small_pixels`` may decode in a headroom
    of ``small_pixels`` past ``active_pixels``, and wait past ``queued_pixels``: it goes first and decodes
    in milliseconds, so a burst of large ones does not turn
    away a 224² photo (the ingress's own request bound limits how many wait). Used from one event loop
    (the ingress replica's)."""

    def __init__(self, active_pixels: int, queued_pixels: int, small_pixels: int = 0) -> None:
        if active_pixels < 1 or queued_pixels < 0 or small_pixels < 0:
            raise ValueError(
                "active_pixels must be >= 1, queued_pixels and small_pixels >= 0, got "
                f"{active_pixels}, {queued_pixels}, {small_pixels}"
            )
        self.active_limit = active_pixels
        self.queued_limit = queued_pixels
        self.small_limit = small_pixels
        self.active = 0  # pixels being decoded now
        self.queued = 0  # pixels waiting
        # heap: (pixels, arrival, admitted, pixels counted against queued_pixels: 0 for a small image)
        self._waiting: list[tuple[int, int, asyncio.Future[None], int]] = []
        self._arrivals = itertools.count()

    def _fits(self, pixels: int) -> bool:
        if self.active == 0 or self.active + pixels <= self.active_limit:
            return True
        # Small images also decode in a headroom of ``small_pixels`` past the budget: with the default budget
        # (twice the pixel cap) two max-size images filled it, and a 128² image waited a second behind them.
        return pixels <= self.small_limit and self.active + pixels <= self.active_limit + self.small_limit

    async def run(self, pixels: int, deadline: float, start: Callable[[], asyncio.Future[T]]) -> T:
        """Wait for ``pixels`` of decoding until ``deadline`` (time.time()), then ``start()`` the work and
        await it. The pixels are held until the work itself ends: a decoding thread cannot be stopped, so
        a caller that leaves (cancelled, out of time) does not hand them to the next image early."""
        await self._admit(pixels, deadline)
        try:
            work = start()
        except BaseException:
            self._release(pixels)
            raise

        def finished(done: asyncio.Future[T]) -> None:
            self._release(pixels)
            if not done.cancelled():
                done.exception()  # retrieved: a caller that left does not leave it unlogged-and-warned

        work.add_done_callback(finished)
        return await asyncio.shield(work)

    async def _admit(self, pixels: int, deadline: float) -> None:
        if self._fits(pixels):
            self.active += pixels
            return
        counted = pixels if pixels > self.small_limit else 0  # a small image waits outside the bound
        if counted and self.queued + counted > self.queued_limit:
            raise Overloaded(
                f"service overloaded, retry later: the ingress is decoding {_mpx(self.active)} of images with "
                f"{_mpx(self.queued)} waiting, and this {_mpx(pixels)} image would pass the "
                f"{_mpx(self.queued_limit)} it lets wait"
            )
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before the image could be decoded")
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (pixels, next(self._arrivals), admitted, counted))
        self.queued += counted
        start = time.time()
        try:
            # Not asyncio.wait_for: on Python 3.11 it returns normally when the future is resolved in the
            # same loop turn as the task is cancelled, swallowing the cancellation.
            async with asyncio.timeout(remaining):
                await admitted
        except BaseException as exc:
            if admitted.done() and not admitted.cancelled():
                self._release(pixels)  # admitted as the wait ended: give the slot to the next image
            else:
                admitted.cancel()  # left in the heap, skipped when reached
                self.queued -= counted
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"deadline exceeded after {time.time() - start:.3f} s waiting to decode the image (the ingress "
                    f"was decoding {_mpx(self.active)} of other images)"
                ) from None
            raise

    def _release(self, pixels: int) -> None:
        self.active -= pixels
        while self._waiting:
            size, _, admitted, counted = self._waiting[0]
            if admitted.done():  # its request gave up waiting
                heapq.heappop(self._waiting)
                continue
            if not self._fits(size):
                break
            heapq.heappop(self._waiting)
            self.queued -= counted
            self.active += size
            admitted.set_result(None)

"""Decode admission in the ingress: bounded pixels decoding and waiting, smallest first, deadlines."""

from __future__ import annotations

import asyncio
import time

import pytest
from ierf.serving.admission import DecodeGate
from ierf.serving.errors import DeadlineExceeded, ResourceExhausted

LATER = 3600.0


async def _settle() -> None:
    """Let every task that can run do so (a gated decode is a task started by another task)."""
    for _ in range(5):
        await asyncio.sleep(0)


def _deadline(seconds: float = LATER) -> float:
    return time.time() + seconds


async def _hold(gate: DecodeGate, pixels: int, release: asyncio.Event, order: list[int], deadline: float) -> None:
    """Decode ``pixels`` through the gate; the "decoding" runs until ``release`` is set."""

    async def decoding() -> None:
        order.append(pixels)
        await release.wait()

    await gate.run(pixels, deadline, lambda: asyncio.ensure_future(decoding()))


def test_images_decode_within_the_budget_and_the_smallest_waiting_goes_first() -> None:
    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)
        order: list[int] = []
        first, rest = asyncio.Event(), asyncio.Event()
        running = [asyncio.create_task(_hold(gate, p, first, order, _deadline())) for p in (60, 40)]
        await _settle()
        assert order == [60, 40] and gate.active == 100 and gate.queued == 0
        waiting = [asyncio.create_task(_hold(gate, p, rest, order, _deadline())) for p in (90, 30, 50)]
        await _settle()
        assert order == [60, 40] and gate.queued == 170  # nothing fits beside 100 busy pixels
        first.set()
        await asyncio.gather(*running)
        await _settle()
        assert order == [60, 40, 30, 50]  # smallest first, and as many as fit (30 + 50 <= 100)
        assert gate.active == 80 and gate.queued == 90
        rest.set()
        await asyncio.gather(*waiting)
        assert order[-1] == 90 and gate.active == 0 and gate.queued == 0

    asyncio.run(scenario())


def test_an_image_over_the_budget_runs_alone_rather_than_never() -> None:
    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)
        order: list[int] = []
        go = asyncio.Event()
        go.set()
        await _hold(gate, 500, go, order, _deadline())
        assert order == [500] and gate.active == 0

    asyncio.run(scenario())


def test_a_full_waiting_room_is_resource_exhausted_at_once() -> None:
    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=150)
        order: list[int] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(gate, p, release, order, _deadline())) for p in (100, 100)]
        await _settle()
        start = time.perf_counter()
        with pytest.raises(ResourceExhausted, match=r"decoding 0\.0 Mpx .* 0\.0 Mpx waiting, and this 0\.0 Mpx image"):
            await gate._admit(60, _deadline())  # 100 + 60 would pass the 150 let wait
        assert time.perf_counter() - start < 0.1
        assert gate.queued == 100
        release.set()
        await asyncio.gather(*tasks)
        assert gate.active == gate.queued == 0

    asyncio.run(scenario())


def test_a_small_image_waits_past_the_bound_and_goes_first() -> None:
    """A 0.2 Mpx photo was refused behind a burst of 16 Mpx images, though it decodes in milliseconds."""

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=150, small_pixels=10)
        order: list[int] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(gate, p, release, order, _deadline())) for p in (100, 100)]
        await _settle()
        with pytest.raises(ResourceExhausted):
            await gate._admit(60, _deadline())  # a large one is still refused
        tasks.append(asyncio.create_task(_hold(gate, 8, release, order, _deadline())))  # small: in the headroom
        await _settle()
        assert gate.queued == 100  # never counted against the bound (a waiting one: the test below)
        tasks.append(asyncio.create_task(_hold(gate, 50, release, order, _deadline())))  # 100 + 50 fits the 150
        await _settle()
        assert gate.queued == 150
        release.set()
        await asyncio.gather(*tasks)
        assert order == [100, 8, 50, 100] and gate.active == gate.queued == 0  # smallest first

    asyncio.run(scenario())


def test_a_request_cancelled_as_it_is_admitted_gives_its_pixels_back() -> None:
    """Admission and cancellation in one loop turn: the cancellation must not be swallowed (as
    asyncio.wait_for on Python 3.11 does), and the pixels just granted go to the next image."""

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)
        order: list[int] = []
        await gate._admit(100, _deadline())  # a decode in flight
        waiter = asyncio.create_task(_hold(gate, 50, asyncio.Event(), order, _deadline()))
        await _settle()
        assert gate.queued == 50
        gate._release(100)  # the decode ends and admits the waiter (its future resolved) ...
        waiter.cancel()  # ... and its caller leaves in the same turn
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5):  # a swallowed cancellation would decode, and wait forever
                await waiter
        assert order == [] and gate.active == 0 and gate.queued == 0

    asyncio.run(scenario())


def test_waiting_counts_against_the_deadline_and_gives_up_its_place() -> None:
    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)
        order: list[int] = []
        release = asyncio.Event()
        busy = asyncio.create_task(_hold(gate, 100, release, order, _deadline()))
        await _settle()
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="waiting to decode the image"):
            await _hold(gate, 10, release, order, _deadline(0.2))
        assert 0.15 < time.perf_counter() - start < 1.0
        assert gate.queued == 0
        with pytest.raises(DeadlineExceeded, match="deadline passed before the image could be decoded"):
            await gate._admit(10, time.time() - 1)
        release.set()
        await busy
        assert order == [100] and gate.active == 0  # the request that gave up never ran

    asyncio.run(scenario())


def test_a_cancelled_request_gives_back_its_place_at_once_and_its_pixels_when_its_decode_ends() -> None:
    """A decoding thread cannot be stopped: a caller that leaves mid-decode must not hand its pixels to
    the next image while the decode still holds its memory."""

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)
        order: list[int] = []
        release = asyncio.Event()
        busy = asyncio.create_task(_hold(gate, 100, release, order, _deadline()))
        await _settle()
        waiter = asyncio.create_task(_hold(gate, 30, release, order, _deadline()))
        await _settle()
        assert gate.queued == 30
        waiter.cancel()  # the caller went away while waiting
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.queued == 0
        decode_ends = asyncio.Event()
        admitted = asyncio.create_task(_hold(gate, 30, decode_ends, order, _deadline()))
        await _settle()
        release.set()
        await busy
        await _settle()
        assert order == [100, 30] and gate.active == 30
        admitted.cancel()  # the caller went away while its image was decoding
        with pytest.raises(asyncio.CancelledError):
            await admitted
        assert gate.active == 30  # still decoding
        decode_ends.set()
        await asyncio.sleep(0.01)
        assert gate.active == 0 and gate.queued == 0

    asyncio.run(scenario())


def test_work_that_fails_to_start_gives_its_pixels_back() -> None:
    """The ingress refuses a decode at its start when the decode-time estimate says it cannot finish in
    time: the pixels it was admitted with must return to the budget, or each such refusal shrinks it for
    good until no large image is ever admitted again."""

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)

        def refuse() -> asyncio.Future[None]:
            raise DeadlineExceeded("decoding this image needs about 9 s")

        with pytest.raises(DeadlineExceeded, match="needs about 9 s"):
            await gate.run(80, _deadline(), refuse)
        assert gate.active == 0 and gate.queued == 0
        order: list[int] = []
        release = asyncio.Event()
        release.set()
        await asyncio.wait_for(_hold(gate, 60, release, order, _deadline(5.0)), timeout=5.0)
        assert order == [60] and gate.active == 0

    asyncio.run(scenario())


def test_a_small_image_that_must_wait_is_not_refused_by_a_full_bound() -> None:
    """The decode budget and the small-image headroom both full, the waiting bound full of large images:
    a small image still waits (outside the bound, which it never counts against) and goes first. (Mutation
    round 17: counting small images against the bound went unseen, since the other test's small image
    decoded in the headroom at once.)"""

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=100, small_pixels=10)
        order: list[int] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(gate, p, release, order, _deadline())) for p in (100, 10, 100)]
        await _settle()
        assert (gate.active, gate.queued) == (110, 100)  # budget and headroom in use, the bound full
        tasks.append(asyncio.create_task(_hold(gate, 8, release, order, _deadline())))
        await _settle()
        assert gate.queued == 100 and order == [100, 10]  # waiting, not refused, and not counted
        release.set()
        await asyncio.gather(*tasks)
        assert order == [100, 10, 8, 100] and gate.active == gate.queued == 0

    asyncio.run(scenario())


def test_a_request_whose_deadline_has_passed_is_refused_before_it_waits() -> None:
    """A deadline already past (a request that spent its budget upstream) is refused as such at once, not
    queued and timed out as if it had waited."""

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=1000)
        await gate._admit(100, _deadline())  # a decode in flight: the next image would have to wait
        with pytest.raises(DeadlineExceeded, match="deadline passed before the image could be decoded"):
            await gate._admit(50, time.time() - 0.5)
        assert gate.queued == 0 and not gate._waiting

    asyncio.run(scenario())

"""SDK behaviour a service vendoring ``ierf-client`` relies on: image inputs as their files, closing under a
call, long timeouts, the caller's channel options and typed stubs.

No Ray, no torch: the SDK against the server's own image decoder, or against a small real gRPC server.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import grpc
import numpy as np
import pytest
from ierf.serving.convert import decode_image
from ierf.serving.images import ImageLimits
from ierf.serving.local import free_port
from ierf_client import AsyncClient, Client
from ierf_client._core import image_message
from PIL import Image


def _gradient(width: int = 24, height: int = 16) -> Image.Image:
    """Not square and not symmetric, so every orientation gives different pixels."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 10 % 256, y * 15 % 256, (x * y) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(rgb)


def _tiff(picture: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, format="TIFF", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
def test_an_opened_tiff_is_turned_once_as_its_file_is(orientation: int) -> None:
    """README: PIL images reach the server "upright by their EXIF orientation", as the same pixels as their
    file. Pillow (11.x and later) turns a TIFF by its orientation when it loads it; the SDK read the
    orientation of the still-unloaded image from ``Image.open`` and turned it a second time."""
    data = _tiff(_gradient(), orientation)
    limits = ImageLimits()
    from_file = decode_image(image_message(data), limits)
    from_pil = decode_image(image_message(Image.open(io.BytesIO(data))), limits)
    np.testing.assert_array_equal(from_pil.pixels, from_file.pixels)
    assert from_pil.content_hash == from_file.content_hash


def _call_then_close(flavour: str, address: str, close_after_s: float) -> BaseException | None:
    """Start ``health()`` on a client, close the client meanwhile, return what the call raised."""
    if flavour == "sync":
        client = Client(address, timeout=10)
        raised: list[BaseException] = []

        def call() -> None:
            try:
                client.health()
            except BaseException as exc:  # what the caller sees is the point
                raised.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(close_after_s)
        client.close()
        thread.join(15)
        assert not thread.is_alive()
        return raised[0] if raised else None

    async def run() -> BaseException | None:
        aclient = AsyncClient(address, timeout=10)
        task = asyncio.ensure_future(aclient.health())
        await asyncio.sleep(close_after_s)
        await aclient.close()
        try:
            await asyncio.wait_for(task, 15)
        except BaseException as exc:
            assert not isinstance(exc, asyncio.TimeoutError)
            return exc
        return None

    return asyncio.run(run())


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_closing_a_client_while_a_call_retries_an_outage_says_it_is_closed(flavour: str) -> None:
    """README: "A closed client raises RuntimeError". A call retrying UNAVAILABLE (server down) when the
    application closes its client made its next attempt on the closed channel: grpc's ValueError "Cannot
    invoke RPC on closed channel!" (which ``except ValueError``, documented to catch bad arguments, takes
    for one), or grpc.aio's UsageError."""
    exc = _call_then_close(flavour, f"127.0.0.1:{free_port()}", close_after_s=0.6)
    assert isinstance(exc, RuntimeError), f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert "closed" in str(exc)


def _hung_health_server() -> tuple[Any, int, threading.Event]:
    """A real loopback gRPC server whose health Check answers only once ``release`` is set (10 s at most)."""
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    release = threading.Event()

    class Hung(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            release.wait(10)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(Hung(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, release


def test_closing_an_async_client_under_a_call_does_not_cancel_the_callers_task() -> None:
    """An AsyncClient closed while a call is in flight made that call raise asyncio.CancelledError in a task
    nobody cancelled: ``except Exception`` misses it, gather() and TaskGroup take it for a cancellation of
    their own. Both clients raise RuntimeError ("... was closed during the call") in that situation."""
    server, port, release = _hung_health_server()
    try:
        exc = _call_then_close("asyncio", f"127.0.0.1:{port}", close_after_s=0.3)
    finally:
        release.set()
        server.stop(None)
    assert not isinstance(exc, asyncio.CancelledError)
    assert isinstance(exc, RuntimeError) and "closed during the call" in str(exc), repr(exc)


def _serving_health_server() -> tuple[Any, int]:
    """A real loopback gRPC server answering grpc.health.v1 Check with SERVING (and nothing else)."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.mark.parametrize("timeout", [1e10, 1e12])
def test_a_long_timeout_the_constructor_accepts_does_not_expire_at_once(timeout: float) -> None:
    """``timeout`` is documented as "a positive number of seconds" and checked only for being finite and
    positive; from 1e10 s grpc's deadline overflows and every call failed at once with DEADLINE_EXCEEDED
    ("Deadline Exceeded"), as if the server had been too slow."""
    server, port = _serving_health_server()
    try:
        with Client(f"127.0.0.1:{port}", timeout=timeout) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(None)


def test_channel_options_given_by_the_caller_win_over_the_sdks_defaults() -> None:
    """``options=`` were appended after the SDK's own channel options and grpc keeps the first value of a
    key, so a caller's keepalive, reconnect backoff or message size for a key the SDK also sets was
    silently ignored. Seen here with the send cap: a 1000-byte cap must stop the upload in the client."""
    from ierf_client import ResourceExhaustedError

    server, port = _serving_health_server()
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # 12 KiB raw tensor
    try:
        options = [("grpc.max_send_message_length", 1000)]
        with (
            Client(f"127.0.0.1:{port}", timeout=5, options=options) as client,
            pytest.raises(ResourceExhaustedError, match="larger than max"),
        ):
            client.predict(picture)
    finally:
        server.stop(None)


def test_the_stubs_package_is_marked_typed_so_its_shipped_pyi_is_used() -> None:
    """The wheel ships ``ierf_proto/v1/explainer_pb2.pyi`` but no ``py.typed`` in ``ierf_proto``: type
    checkers skip the package ("installed, but missing library stubs or py.typed marker") and every
    message is Any for a caller that uses the stubs directly."""
    from pathlib import Path

    import ierf_proto

    assert (Path(ierf_proto.__file__).parent / "py.typed").is_file()


def test_a_callers_own_cancel_stays_a_cancel_when_the_async_client_closes_too() -> None:
    """The caller cancels its task and then closes the client (an ``async with`` unwinding a cancelled
    task): the call must raise CancelledError, the cancellation the caller asked for, not the RuntimeError
    meant for a close nobody cancelled. Guards against ignoring ``Task.cancelling()`` in that handler."""
    server, port, release = _hung_health_server()

    async def run() -> BaseException | None:
        aclient = AsyncClient(f"127.0.0.1:{port}", timeout=10)
        task = asyncio.ensure_future(aclient.health())
        await asyncio.sleep(0.3)  # the call is in flight, held by the server
        task.cancel()
        await aclient.close()  # marks the client closed before the task sees its cancellation
        try:
            await asyncio.wait_for(task, 15)
        except BaseException as exc:
            return exc
        return None

    try:
        exc = asyncio.run(run())
    finally:
        release.set()
        server.stop(None)
    assert isinstance(exc, asyncio.CancelledError), repr(exc)

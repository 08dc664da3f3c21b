"""An asyncio microservice's use of the SDK: overload, deadlines, cancellation, loops (acceptance findings)."""

from __future__ import annotations

import asyncio
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

PROXY_BACKPRESSURE = "Request dropped due to backpressure (num_queued_requests=32, max_queued_requests=32)."


def _always_overloaded_server(refuse_after_s: float) -> tuple[Any, str, list[float]]:
    """A loopback ExplainService that answers every Predict, after ``refuse_after_s``, with the refusal
    Serve's proxy gives for a full ingress queue (an overload the SDK retries)."""
    calls: list[float] = []

    class Overloaded(pb_grpc.ExplainServiceServicer):
        def Predict(self, request, context):
            calls.append(time.monotonic())
            time.sleep(refuse_after_s)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, PROXY_BACKPRESSURE)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExplainServiceServicer_to_server(Overloaded(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    return server, address, calls


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_call_refused_as_overloaded_until_its_deadline_says_it_was_overloaded(flavour: str) -> None:
    """Under overload every attempt is refused (RESOURCE_EXHAUSTED, retried), and the SDK cuts its last pause
    so that one more attempt "fits": that attempt gets a sliver of the budget, runs out at the client, and
    the caller sees only ``DEADLINE_EXCEEDED: Deadline Exceeded``. Against the live service (resnet18, 100
    concurrent calls of one AsyncClient, timeout 10 s) 83 of 100 calls failed so, 2 with RESOURCE_EXHAUSTED,
    while the ingress had refused 490 attempts as overloaded and let 2 run out of time: dashboards of the
    callers blame short deadlines for what is a capacity problem. The error must still say the service was
    overloaded (a ResourceExhaustedError, or a deadline error naming the refusals before it)."""
    from ierf_client import AsyncClient, Client, IerfError

    server, address, calls = _always_overloaded_server(refuse_after_s=0.35)
    pixels = np.zeros((8, 8, 3), np.uint8)
    try:
        with pytest.raises(IerfError) as info:
            if flavour == "sync":
                with Client(address, timeout=1.0) as client:
                    client.predict(pixels)
            else:

                async def call() -> None:
                    async with AsyncClient(address, timeout=1.0) as client:
                        await client.predict(pixels)

                asyncio.run(call())
    finally:
        server.stop(None)
    assert len(calls) >= 2  # refused as overloaded at least once, and retried
    assert "overload" in str(info.value).lower() or "backpressure" in str(info.value).lower(), repr(info.value)


def test_the_async_client_does_not_stall_the_event_loop_while_it_encodes_a_large_image() -> None:
    """An asyncio service awaits ``AsyncClient.explain`` expecting the loop to stay free for its other
    requests; the SDK encodes a PIL image (or an array over 16 MiB) to PNG synchronously inside the
    coroutine, before its first await. A 12 MP photo stalled the caller's loop for 2.2 s on 2 cores (every
    other task, health probes and heartbeats included, frozen), the same work in a thread (asyncio.to_thread)
    for 0.13 s. The check: the loop's longest stall stays well under the encoding's own time."""
    from ierf.serving.local import free_port
    from ierf_client import AsyncClient, IerfError, _core
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8))
    start = time.monotonic()
    _core.explain_request(picture, None, "", "srd", "identity", "float32", True, False)
    encode_s = time.monotonic() - start
    assert encode_s > 0.2, "the machine encodes too fast for this check to mean anything"

    async def scenario() -> float:
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        gaps.clear()
        async with AsyncClient(f"127.0.0.1:{free_port()}", timeout=0.3) as client:
            with pytest.raises(IerfError):  # nothing listens: the call itself fails at once
                await client.explain(picture)
        beat.cancel()
        return max(gaps)

    stall = asyncio.run(scenario())
    assert stall < 0.5 * encode_s, f"event loop stalled {stall:.2f} s (encoding alone takes {encode_s:.2f} s)"


@pytest.mark.slow
def test_work_refused_by_the_servers_deadline_cap_does_not_ask_for_a_longer_deadline() -> None:
    """The ingress caps every call's budget at ``request_timeout_s`` (callers that send no
    ``ierf-timeout-ms`` — grpcurl, other languages — get the cap itself; an SDK timeout above it is cut to
    it). When the cap is what makes work impossible, the refusal still says "send a longer deadline",
    which the caller cannot do: here the caller sent no deadline at all. The message must name the
    server's cap (request_timeout_s) as the limit."""
    from ierf.serving.app import build_app
    from ierf.serving.errors import DeadlineExceeded
    from ray import serve

    args = {
        "models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 1}],
        "cache": {"redis_url": None},
        "ingress": {"request_timeout_s": 0.05},
    }
    ingress = serve.run(build_app(args), _local_testing_mode=True)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[64, 64, 3]))
    with pytest.raises(DeadlineExceeded) as info:  # no caller deadline: only the server's 0.05 s cap
        ingress.Explain.remote(pb.ExplainRequest(image=image, target=1)).result()
    message = str(info.value)
    assert "request_timeout_s" in message or "cap" in message, message


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailers


def test_only_a_deadline_after_overload_refusals_is_reported_as_overload() -> None:
    """``Attempts`` turns the final DEADLINE_EXCEEDED of a call refused as overloaded into the overload error
    (its pause kept, the refusals counted); a deadline after other failures (UNAVAILABLE), or a final error
    that is not a deadline, is reported as itself."""
    from ierf_client import _core

    overloaded = _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "service overloaded", ((_core.RETRY_AFTER_KEY, "250"),))
    deadline = _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    unavailable = _Failure(grpc.StatusCode.UNAVAILABLE, "connection refused")

    attempts = _core.Attempts()
    for failure in (overloaded, unavailable, overloaded, deadline):
        attempts.failed(failure)
    error = attempts.error(deadline)
    assert isinstance(error, _core.ResourceExhaustedError) and error.retry_after_s == 0.25
    assert "refused as overloaded on 2 of 4 attempts" in error.details

    attempts = _core.Attempts()
    for failure in (unavailable, unavailable, deadline):
        attempts.failed(failure)
    assert attempts.overloads == 0 and attempts.last_overload is None
    assert isinstance(attempts.error(deadline), _core.DeadlineExceededError)

    attempts = _core.Attempts()
    final = _Failure(grpc.StatusCode.INVALID_ARGUMENT, "image too large")
    for failure in (overloaded, final):
        attempts.failed(failure)
    error = attempts.error(final)
    assert isinstance(error, _core.InvalidArgumentError) and "overloaded" not in error.details


def test_only_building_that_may_block_the_loop_leaves_it() -> None:
    """AsyncClient builds a request off the event loop when that can take long: a file to read, a PNG to
    encode (a PIL image, bytes in a format the server does not read), a large array to copy; small arrays
    and bytes the server reads as they are stay on the loop (a thread hop costs more than they do)."""
    import io

    from ierf_client import _core
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    bmp = io.BytesIO()
    Image.new("RGB", (4, 4)).save(bmp, "BMP")
    assert not _core.building_may_block(np.zeros((8, 8, 3), np.uint8))
    assert not _core.building_may_block(png.getvalue())
    assert not _core.building_may_block(bytearray(png.getvalue()))
    assert _core.building_may_block(np.zeros(_core.INLINE_ARRAY_BYTES + 1, np.uint8))
    assert _core.building_may_block(bmp.getvalue())  # re-encoded as PNG
    assert _core.building_may_block(Image.new("RGB", (4, 4)))
    assert _core.building_may_block("photo.jpg")

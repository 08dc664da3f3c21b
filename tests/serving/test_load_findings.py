"""Findings of a load test of the real service (resnet18, 2 cores): what overload, retries and large
images cost other callers. The ingress alone over fake workers: no Ray runtime, no model."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

import numpy as np
import pytest

from serving.fakes import BackPressureError
from serving.fakes import Method as _Method


def _outcome() -> Any:
    from ierf.serving.worker import Outcome, Provenance, Score

    return Outcome(
        provenance=Provenance("m", "digest", "srd", "srd-1.0", "v1", "hash"),
        maps=np.zeros((8, 8), np.float32),
        target=Score(1, "one", 0.5, 2.0),
    )


class _Worker:
    """A worker handle that answers at once, or refuses every job with Serve's back-pressure."""

    def __init__(self, full: bool = False) -> None:
        self.full = full
        self.outcome = None if full else _outcome()  # built here: it imports torch, not in the event loop
        self.describe = _Method(self._describe)
        self.explain = _Method(self._explain)

    async def _describe(self) -> Any:
        await asyncio.sleep(3600.0)  # no description: requests are checked by the (fake) worker alone

    async def _explain(self, job: Any) -> Any:
        if self.full:
            raise BackPressureError(
                "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."
            )
        return self.outcome


def _request(side: int) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    pixels = np.zeros((side, side), np.uint8)
    return pb.ExplainRequest(
        image=pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[side, side]))
    )


def test_a_small_image_is_not_held_behind_two_max_size_decodes_with_the_default_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Live: two 60 KB PNGs declaring 4096x4096 (the shipped max_pixels) held a cached 128x128 Explain
    0.6 s in `admission` (0.8-1.0 s end to end instead of 0.035 s); a caller with a 300 ms deadline fails.
    The default decode budget is exactly twice max_pixels, so two max-size images leave no room at all
    and a small image, which decodes in microseconds (a raw tensor), waits for a whole large decode.
    test_ingress_answers_a_small_image_while_large_ones_fill_the_decoder passes only because its budget
    has slack beside the two large images."""
    from ierf.serving import images
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    gate_open = threading.Event()
    real_pixels = images._tensor_pixels

    def slow_when_large(data: bytes, dtype: str, np_dtype: Any, shape: list[int]) -> Any:
        if shape[0] * shape[1] >= 1_000_000:
            assert gate_open.wait(30)
        return real_pixels(data, dtype, np_dtype, shape)

    monkeypatch.setattr(images, "_tensor_pixels", slow_when_large)
    # max-size images of 1100x1100; decode_pixels and decode_queue_pixels left at their defaults
    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"max_pixels": 1_210_000}})
    ingress = Ingress.func_or_class({"m": _Worker()}, config)

    async def scenario() -> None:
        large = [asyncio.create_task(ingress.Explain(_request(1100))) for _ in range(2)]
        await asyncio.sleep(0.2)
        assert ingress._decode_gate.active == 2_420_000  # both decoding (held open)
        start = time.perf_counter()
        try:
            small = await asyncio.wait_for(ingress.Explain(_request(128)), timeout=2.0)
            waited = time.perf_counter() - start
        except TimeoutError:
            pytest.fail("a 128x128 image waited > 2 s for two max-size decodes to end (admission)")
        finally:
            gate_open.set()
            await asyncio.gather(*large)
        assert waited < 2.0 and small.map.shape == [8, 8]

    try:
        asyncio.run(scenario())
    finally:
        gate_open.set()


def test_an_overload_retry_does_not_decode_the_image_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Live: with the worker's queue full, a 4096x4096 PNG Explain was refused RESOURCE_EXHAUSTED only
    after 1.3-2.2 s of decoding and resizing in the ingress; three SDK callers with the default retry
    policy (12 s budget) made 20 attempts and burnt 16.7 s of decode + 5.8 s of preprocess CPU in 12 s of
    wall time on a 2-core host, all for refusals, while the worker they waited for needed the cores.
    The ingress decodes first and learns that the worker is full only when it dispatches, so every retry
    the refusal invites (ierf-retry-after-ms: 250) costs a full decode. A retry arriving within the
    pause the server asked for should be refused (or served) without decoding the same image again."""
    from ierf.serving import convert
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import ResourceExhausted
    from ierf.serving.settings import ServiceConfig

    decodes = []
    real_open = convert.open_image

    def counting_open(image: Any, limits: Any) -> Any:
        pending = real_open(image, limits)
        real_decode = pending.decode

        def decode() -> Any:
            decodes.append(pending.pixels)
            return real_decode()

        return dataclasses.replace(pending, _decode=decode)

    monkeypatch.setattr(convert, "open_image", counting_open)
    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"max_pixels": 1_210_000}})
    ingress = Ingress.func_or_class({"m": _Worker(full=True)}, config)

    async def scenario() -> None:
        for _ in range(3):  # the SDK's retries of the same call, well within the 250 ms pause asked for
            with pytest.raises(ResourceExhausted, match="overloaded"):
                await ingress.Explain(_request(1100))

    asyncio.run(scenario())
    assert len(decodes) == 1, f"{len(decodes)} decodes of one 1.2 Mpx image for 3 refusals of a full worker"


class _RayLikeResponse:
    """A Serve DeploymentResponse as Ray 2.60 behaves when its router refused the call: awaiting it raises
    the refusal, and so does ``cancel()``, which fetches the assignment's result to cancel the replica
    call and catches only RequestCancelledError (ray/serve/handle.py, _DeploymentResponseBase.cancel)."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def __await__(self):
        async def refused() -> Any:
            raise self._exc

        return refused().__await__()

    def cancel(self) -> None:
        raise self._exc


class _FullQueueDescribe:
    def __init__(self) -> None:
        self.full = False
        self.calls = 0

    def remote(self) -> Any:
        self.calls += 1
        if self.full:
            return _RayLikeResponse(
                BackPressureError("Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4).")
            )

        async def described() -> Any:
            return "description"

        return _Awaitable(described())


class _Awaitable:
    def __init__(self, coroutine: Any) -> None:
        self._coroutine = coroutine

    def __await__(self):
        return self._coroutine.__await__()

    def cancel(self) -> None:
        pass


def test_health_check_under_a_full_worker_queue_is_serving_not_resource_exhausted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Live (resnet18, worker max_ongoing 2 + max_queued 4, six integrated-gradients Explains running):
    every grpc.health.v1.Health/Check answered RESOURCE_EXHAUSTED "service overloaded, retry later:
    Request dropped due to backpressure" with retry trailers, for as long as the queue stayed full, so a
    Kubernetes gRPC probe or a load balancer's health check fails exactly under load, which README
    promises it will not ("a load balancer must not drain capacity under load"). Cause: Ingress._probe
    calls response.cancel() on the refused probe, and Ray 2.60's DeploymentResponse.cancel() re-raises
    the router's BackPressureError from inside the except block; test_health_under_overload's fake
    response has a cancel() that cannot raise."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.1, raising=False)

    class _Worker:
        describe = _FullQueueDescribe()

    worker = _Worker()
    ingress = Ingress.func_or_class({"m": worker}, ServiceConfig.from_args({"models": ["m"]}))

    async def check() -> Any:
        return await ingress.Check(health_pb2.HealthCheckRequest())

    async def scenario() -> list[Any]:
        assert (await check()).status == health_pb2.HealthCheckResponse.SERVING  # answered just now
        worker.describe.full = True  # load arrives: the worker's queue fills up
        await asyncio.sleep(0.15)  # past the cache of the last answer: the next check probes
        answers = []
        for _ in range(2):
            try:
                answers.append((await check()).status)
            except Exception as exc:  # a handle call raises the precise error the gRPC caller would get
                answers.append(f"{type(exc).__name__}: {exc}")
        return answers

    answers = asyncio.run(scenario())
    assert worker.describe.calls >= 2
    assert answers == [health_pb2.HealthCheckResponse.SERVING] * 2, answers

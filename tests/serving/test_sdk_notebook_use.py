"""The SDK as a notebook user meets it: results printed in a cell, and a call that waits through a service
restart. No Ray, no torch in the SDK: results parsed from the server's own rendered overlays, and a small
real gRPC server answering as Serve's proxy does while the application is not yet deployed.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from ierf.serving.overlay import ierf_png, saliency_png
from ierf_client import Client
from ierf_client._core import parse_explanation, parse_ierf
from ierf_proto.v1 import explainer_pb2 as pb

# What a repr printed in a notebook cell may reasonably take: numpy's summary of one 224² map is ~1 KB.
READABLE_REPR_CHARS = 10_000


def _tensor(array: np.ndarray) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=data.tobytes(), dtype=pb.DATA_TYPE_FLOAT32, shape=list(array.shape))


def _photo_and_map(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    view = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return view, rng.standard_normal((224, 224)).astype(np.float32)


def test_a_printed_explanation_is_a_summary_not_the_overlays_png_bytes() -> None:
    """``result`` as the last line of a notebook cell prints its repr: the dataclass repr spelled out the
    server-rendered overlay PNG byte by byte (~250,000 characters for one 224² SRD result, with overlay=True,
    the default), burying the map summary, target and provenance it was printed for."""
    view, saliency = _photo_and_map()
    response = pb.ExplainResponse(
        map=_tensor(saliency),
        target=pb.ClassScore(index=967, name="espresso", probability=0.95, logit=11.5),
        overlay_png=saliency_png(view, saliency, "SRD 967 espresso"),
    )
    result = parse_explanation(response)
    text = repr(result)
    assert "espresso" in text and "map=" in text
    assert len(text) < READABLE_REPR_CHARS, f"repr(Explanation) is {len(text):,} characters"


def test_a_printed_ierf_result_is_a_summary_not_megabytes_of_overlay_bytes() -> None:
    """An IERFResult with overlays (one PNG per position: 49 positions of a 7x7 layer gave a 10.7 MB repr
    on the live service) floods a notebook's output, which stalls or drops it ("IOPub data rate exceeded")."""
    view, saliency = _photo_and_map(1)
    positions = [(0, 0), (3, 4), (6, 6)]
    maps = np.abs(np.stack([saliency] * len(positions)))
    response = pb.ComputeIERFResponse(
        maps=_tensor(maps / maps.sum(axis=(1, 2), keepdims=True)),
        layer=pb.LayerInfo(name="_swish:1", channels=1280, height=7, width=7),
        overlay_png=[ierf_png(view, maps[i], p, (7, 7), f"iERF _swish:1 @ {p}") for i, p in enumerate(positions)],
    )
    result = parse_ierf(response)
    assert result.overlay(2).size[0] == 224
    text = repr(result)
    assert len(text) < READABLE_REPR_CHARS, f"repr(IERFResult) is {len(text):,} characters"


# Serve's gRPC proxy, started before the application's routes reach it (``python -m ierf.serving`` calls
# serve.start, then serve.run), answers every call with this (ray/serve/_private/proxy.py not_found_response).
SERVE_NO_ROUTES = (
    "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications for available applications."
)


def _server_deploying_for(seconds: float) -> tuple[Any, int, list[grpc.StatusCode]]:
    """A real loopback gRPC server answering health Check as a starting Serve proxy does for ``seconds``
    (NOT_FOUND, the message above), then SERVING; returns it, its port and the codes it answered."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ready_at = time.monotonic() + seconds
    answered: list[grpc.StatusCode] = []
    lock = threading.Lock()

    class Starting(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            if time.monotonic() < ready_at:
                with lock:
                    answered.append(grpc.StatusCode.NOT_FOUND)
                context.abort(grpc.StatusCode.NOT_FOUND, SERVE_NO_ROUTES)
            with lock:
                answered.append(grpc.StatusCode.OK)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Starting(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, answered


def test_a_call_retrying_through_a_restart_gets_through_serves_no_routes_window() -> None:
    """README: retries continue "until the call's deadline, so a call gets through a server restart". During
    a restart Serve's gRPC port opens (serve.start) a moment before the application is deployed (serve.run);
    a call that lands then, a retry after UNAVAILABLE included, got NOT_FOUND "Application metadata not set"
    (seen by polling a restart of ``python -m ierf.serving``: UNAVAILABLE, then NOT_FOUND, then OK) and
    raised NotFoundError at once, as if the caller had misconfigured something, with most of its budget left."""
    server, port, answered = _server_deploying_for(1.0)
    try:
        with Client(f"127.0.0.1:{port}", timeout=20) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(None)
    assert answered[0] == grpc.StatusCode.NOT_FOUND and answered[-1] == grpc.StatusCode.OK


def test_serves_no_routes_answer_that_lasts_fails_after_bounded_attempts_with_a_hint() -> None:
    """On a cluster serving several applications the same NOT_FOUND lasts for a call naming none: it is
    retried a bounded number of times, not for the call's whole budget, and the error says what to do."""
    from ierf_client import NotFoundError, RetryPolicy
    from ierf_client._core import SERVE_NO_ROUTES_ATTEMPTS

    server, port, answered = _server_deploying_for(3600.0)
    quick = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002)
    try:
        with Client(f"127.0.0.1:{port}", timeout=60, retry=quick) as client:
            start = time.monotonic()
            try:
                client.health()
            except NotFoundError as exc:
                assert "application=" in str(exc)
            else:
                raise AssertionError("a lasting NOT_FOUND was taken for SERVING")
            assert time.monotonic() - start < 30
    finally:
        server.stop(None)
    assert len(answered) == SERVE_NO_ROUTES_ATTEMPTS


def test_printed_model_info_leaves_out_the_class_names() -> None:
    """``client.model()`` printed 16.5 KB: all 1000 class names."""
    from ierf_client._core import InputSpec, LayerInfo, ModelInfo

    spec = InputSpec(224, 224, 3, "RGB", "v1", ["png"], ["uint8"], 1 << 20, 1 << 24)
    info = ModelInfo("m", "d", spec, 1000, [f"class {i}" for i in range(1000)], [LayerInfo("l", 4, 7, 7)], [], "srd")
    assert len(repr(info)) < 1000 and "num_classes=1000" in repr(info)


# -- mutation round 9 --------------------------------------------------------------------------------------------
def test_the_async_client_also_retries_through_serves_no_routes_window() -> None:
    """Guards ``AsyncClient._call`` using ``retry_pause_after`` like the sync client: with the plain retry rule it
    raised NotFoundError at once during a restart's no-routes window (the README's promise that a call gets
    through a server restart is made for both clients)."""
    import asyncio

    from ierf_client import AsyncClient

    server, port, answered = _server_deploying_for(1.0)

    async def call() -> str:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=20) as client:
            return await client.health()

    try:
        assert asyncio.run(call()) == "SERVING"
    finally:
        server.stop(None)
    assert answered[0] == grpc.StatusCode.NOT_FOUND and answered[-1] == grpc.StatusCode.OK


def test_another_not_found_is_raised_at_once_without_the_no_routes_hint() -> None:
    """Guards ``_serve_has_no_routes`` needing both NOT_FOUND *and* Serve's words: any other NOT_FOUND (an
    unknown model or service, the caller's mistake) is final. Taken for Serve's, it was retried 12 times (~6 s)
    and its message told the caller to look at ``application=``."""
    from grpc_health.v1 import health_pb2_grpc
    from ierf_client import NotFoundError, RetryPolicy

    answered: list[grpc.StatusCode] = []

    class Unknown(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            answered.append(grpc.StatusCode.NOT_FOUND)
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service 'ierf.v1.Nope'")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Unknown(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    quick = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002)
    try:
        with Client(f"127.0.0.1:{port}", timeout=20, retry=quick) as client:
            try:
                client.health("ierf.v1.Nope")
            except NotFoundError as exc:
                assert "unknown service" in str(exc) and "application=" not in str(exc)
            else:
                raise AssertionError("a NOT_FOUND was taken for SERVING")
    finally:
        server.stop(None)
    assert answered == [grpc.StatusCode.NOT_FOUND]

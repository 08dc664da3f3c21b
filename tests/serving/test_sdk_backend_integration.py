"""The SDK as a backend service and a batch job integrate it: one long outage of the service, channel options
set from configuration, and arguments checked before the call.

No Ray, no torch: small real gRPC servers on loopback (one that opens its port late, answering as Serve's proxy
does while the application is not yet deployed) or no server at all.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from ierf.serving.local import free_port
from ierf_client import AsyncClient, Client, RetryPolicy

# Serve's gRPC proxy, up before the application's routes reach it (ray/serve/_private/proxy.py).
SERVE_NO_ROUTES = (
    "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications for available applications."
)


def _serve_coming_back(port: int, after_s: float, no_routes_answers: int) -> tuple[list[Any], list[str]]:
    """A restart as a caller meets it: nothing listens on ``port`` for ``after_s`` seconds (UNAVAILABLE), then
    Serve's proxy answers health Check with its no-routes NOT_FOUND ``no_routes_answers`` times, then SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    servers: list[Any] = []
    answered: list[str] = []
    lock = threading.Lock()

    class Deploying(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            with lock:
                deploying = answered.count("NOT_FOUND") < no_routes_answers
                answered.append("NOT_FOUND" if deploying else "OK")
            if deploying:
                context.abort(grpc.StatusCode.NOT_FOUND, SERVE_NO_ROUTES)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def start() -> None:
        time.sleep(after_s)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(Deploying(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        servers.append(server)

    threading.Thread(target=start, daemon=True).start()
    return servers, answered


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_call_retrying_a_long_outage_still_gets_through_serves_no_routes_window(flavour: str) -> None:
    """README: UNAVAILABLE is retried "until the call's deadline, so a call gets through a server restart", and
    Serve's "Application metadata not set" NOT_FOUND of a restarting service is retried too. But the bound on
    that NOT_FOUND (SERVE_NO_ROUTES_ATTEMPTS = 12) counts every failed attempt of the call, the UNAVAILABLE ones
    of the outage included: a call that had retried a restart for ~10 s or more (polling a real restart of the
    service: 15 s of UNAVAILABLE, then NOT_FOUND "Application metadata not set", then SERVING at 27 s) raised
    NotFoundError at the first no-routes answer, with most of its 60 s budget left. The bound should count
    the no-routes answers only (here 2, then SERVING)."""
    port = free_port()
    servers, answered = _serve_coming_back(port, after_s=2.5, no_routes_answers=2)
    # backoff capped at 0.2 s: the outage costs the call well over 12 UNAVAILABLE attempts in 2.5 s
    retry = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.2)
    try:
        if flavour == "sync":
            with Client(f"127.0.0.1:{port}", timeout=30, retry=retry) as client:
                status = client.health()
        else:

            async def call() -> str:
                async with AsyncClient(f"127.0.0.1:{port}", timeout=30, retry=retry) as client:
                    return await client.health()

            status = asyncio.run(call())
    finally:
        for server in servers:
            server.stop(None)
    assert status == "SERVING", answered
    assert answered[:2] == ["NOT_FOUND", "NOT_FOUND"] and answered[-1] == "OK"


@pytest.mark.parametrize("cls", [Client, AsyncClient])
@pytest.mark.parametrize("value", [64e6, "64MB", 0, None, True, 2**40])
def test_max_message_bytes_is_checked_in_the_constructor(cls: type, value: object) -> None:
    """README: "Message limits are 64 MiB both ways"; ``max_message_bytes`` raises them. It was handed to grpc
    unchecked, as every other constructor option is not: ``max_message_bytes=64e6`` (a float) or ``"64MB"`` was
    silently dropped by grpc, which then kept its own 4 MiB default, so a 40-position ComputeIERF did all its
    work on the server and failed on receipt with RESOURCE_EXHAUSTED "CLIENT: Received message larger than max
    (8028566 vs. 4194304)"; 0 or True failed every call, None raised grpc's "Expected int, bytes, or behavior",
    2**40 an OverflowError. Expected: a ValueError/TypeError naming max_message_bytes, before any call."""
    with pytest.raises((TypeError, ValueError), match="max_message_bytes"):
        cls("127.0.0.1:1", max_message_bytes=value)


@pytest.mark.parametrize("service", [None, b"ierf.v1.ExplainService", 3])
def test_health_refuses_a_service_that_is_not_a_string_before_any_call(service: object) -> None:
    """README: "arguments ... the SDK checks itself raise ValueError/TypeError ... before any call". Every other
    name (model, method, layer, model_id, application) is checked, but ``health(service)`` handed anything to the
    request serializer, and grpc reported its failure as the server's: IerfError INTERNAL "Exception
    serializing request!" (exit status 1 in a CLI, "the server is failing")."""
    with (
        Client("127.0.0.1:1", timeout=2, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(TypeError, match="service"),
    ):
        client.health(service)  # type: ignore[arg-type]

    async def call() -> None:
        async with AsyncClient("127.0.0.1:1", timeout=2, retry=RetryPolicy(max_attempts=1)) as aclient:
            await aclient.health(service)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="service"):
        asyncio.run(call())


@pytest.mark.parametrize("timeout", [np.float32(5.0), np.int64(5)])
def test_a_numpy_number_is_a_timeout_as_it_is_a_target(timeout: object) -> None:
    """README: targets and positions may be "integers (Python or numpy)"; ``timeout`` is "a positive number of
    seconds". A batch job computing its budget with numpy (``np.float32``, ``np.int64``: np.float64 passes, being
    a float) was refused with "timeout must be a positive number of seconds, got np.float32(5.0)", a message that
    contradicts the value it names. Expected: accepted, as float(timeout)."""
    client = Client("127.0.0.1:1", timeout=timeout)  # type: ignore[arg-type]
    try:
        assert client.timeout == 5.0
    finally:
        client.close()
    assert AsyncClient("127.0.0.1:1", timeout=timeout).timeout == 5.0  # type: ignore[arg-type]

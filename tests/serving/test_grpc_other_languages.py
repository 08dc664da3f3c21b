"""What a caller outside Python (grpc-js, grpc-go, grpc-java, grpc-core) meets at the wire.

These run Serve's own gRPC proxy code path (``gRPCGenericServer`` and ``gRPCProxy.service_handler_factory``)
on a plain local server, without a cluster: the proxy's handler is fed the reply an ingress replica makes
for an ierf refusal (code, details and trailers on Serve's context, an empty response message).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

RETRY_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "ierf.v1.ExplainService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
)


def _serve_proxy_server(refusal: Exception, code: grpc.StatusCode, attempts: list[float]) -> Any:
    """Serve's gRPC proxy server, with ierf's services registered as ``local.yaml`` registers them, whose
    replica answers every call with ``refusal`` the way ``Ingress._serve`` does (code, details, the
    retry trailers on Serve's context; the empty response message)."""
    from ierf.serving.errors import retry_trailers
    from ierf.serving.protocol import add_explain_service
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc
    from ray.serve._private.grpc_util import gRPCGenericServer
    from ray.serve._private.proxy import gRPCProxy
    from ray.serve._private.proxy_request_response import ResponseStatus
    from ray.serve.grpc_util import RayServegRPCContext

    async def proxy_request(proxy_request: Any) -> AsyncIterator[Any]:
        # ray/serve/_private/proxy.py, gRPCProxy.send_request_to_replica: the replica's context is copied
        # onto the real one, its result yielded, then an OK ResponseStatus
        attempts.append(time.monotonic())
        replica_context = RayServegRPCContext(proxy_request.context)
        replica_context.set_code(code)
        replica_context.set_details(str(refusal))
        replica_context.set_trailing_metadata(retry_trailers(refusal, code))
        replica_context._set_on_grpc_context(proxy_request.context)
        yield pb.ExplainResponse().SerializeToString()
        yield ResponseStatus(code=grpc.StatusCode.OK)

    fake_proxy = SimpleNamespace(proxy_request=proxy_request)

    def factory(service_method: str, streaming_type: Any) -> Any:
        return gRPCProxy.service_handler_factory(fake_proxy, service_method, streaming_type)

    server = gRPCGenericServer(factory)
    add_explain_service(pb_grpc.ExplainServiceServicer(), server)
    return server


async def _explain_with_retry_policy(refusal: Exception, code: grpc.StatusCode, attempts: list[float]) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    server = _serve_proxy_server(refusal, code, attempts)  # on the running loop, as grpc.aio needs
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        options = [("grpc.service_config", RETRY_CONFIG), ("grpc.enable_retries", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.ExplainServiceStub(channel).Explain(pb.ExplainRequest(), timeout=10)
            return info.value
    finally:
        await server.stop(None)


def test_a_builtin_retry_policy_retries_an_overload_after_the_pushback() -> None:
    """README (Errors) and the .proto header: an overload carries ``grpc-retry-pushback-ms: 250``, "so the SDK,
    and a gRPC retry policy in any language that lists RESOURCE_EXHAUSTED (grpc-java, grpc-go, grpc-js,
    grpc-core), retry overloads only, after the pause". They never retry it: Serve's proxy returns the
    replica's (empty) response message after setting the code, so every error goes out as response headers,
    a zero-length message and then the status, not as a Trailers-Only response, and gRFC A6 commits a call
    once response headers arrive. Seen live from Node (grpc-js 1.14 with that service config, 6 concurrent
    integrated_gradients Explains on a one-slot worker: 4 refused in ~150 ms, each after one attempt, trace
    "Received metadata from child ... Committing call") and from grpcio (5 attempts allowed, refused in 0.1 s
    with the 250 ms pushback). Here the same reply through Serve's proxy handler reaches a grpcio channel
    with that policy once, where it should come three times, 250 ms apart."""
    from ierf.serving.errors import Overloaded

    attempts: list[float] = []
    error = asyncio.run(
        _explain_with_retry_policy(
            Overloaded("service overloaded, retry later"), grpc.StatusCode.RESOURCE_EXHAUSTED, attempts
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("grpc-retry-pushback-ms", "250") in tuple(error.trailing_metadata() or ())
    assert len(attempts) == 3, f"{len(attempts)} attempt(s): the overload was not retried by the channel's policy"
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert min(gaps) >= 0.2, gaps  # after the server's pause, not the policy's 50 ms backoff


def test_a_builtin_retry_policy_leaves_a_cap_refusal_alone() -> None:
    """The other half of the same claim (holds today, and must keep holding once overloads are sent so
    that policies can retry them): a cap's RESOURCE_EXHAUSTED carries ``grpc-retry-pushback-ms: -1`` and is
    tried once."""
    from ierf.serving.errors import ResourceExhausted

    attempts: list[float] = []
    error = asyncio.run(
        _explain_with_retry_policy(
            ResourceExhausted("encoded image is 2103041 bytes, over the cap of 2000000"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            attempts,
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the cap" in error.details()
    assert len(attempts) == 1

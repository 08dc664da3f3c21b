"""The gRPC services as the Serve proxy registers them, with request parsing that cannot fail.

Why: the proxy parses each request with the generated ``FromString`` before any of our code runs. A body
that is not a valid message (corrupt wire format, a string field with bad UTF-8) then raised inside
grpcio, which answered ``UNKNOWN`` with "Unexpected <class 'google.protobuf.message.DecodeError'>",
outside every log and metric of ours. Registered through these functions, such a body parses to an
:class:`UnparsedRequest`, and the ingress answers it ``INVALID_ARGUMENT`` like any other bad input.

Kept light (grpc and the generated stubs only): the Serve proxy imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from ierf_proto.v1 import explainer_pb2_grpc


@dataclass(frozen=True)
class UnparsedRequest:
    """What a request body that is not a valid ``message_type`` parses to."""

    message_type: str
    error: str

    def describe(self) -> str:
        return f"the request is not a valid {self.message_type} message ({self.error})"


def _parse_or_report(parse: Callable[[bytes], Any], rpc: str) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else f"request of {rpc}"

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError; anything else a parser raises is the same bad body
            error = str(exc).removeprefix(f"Error parsing message with type '{name}': ")
            return UnparsedRequest(name, error or type(exc).__name__)

    return tolerant


class _Registrations:
    """Stands in for the server while a generated ``add_*_to_server`` runs, to collect its handlers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Every generated function also registers the same handlers by name, below."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services.append((service, handlers))


def _tolerant(add_to_server: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def add(servicer: Any, server: Any) -> None:
        collected = _Registrations()
        add_to_server(servicer, collected)
        if not collected.services:
            raise RuntimeError(f"{add_to_server.__qualname__} registered no service by name (grpcio < 1.63 stubs?)")
        for service, handlers in collected.services:
            handlers = {
                method: handler._replace(
                    request_deserializer=_parse_or_report(handler.request_deserializer, f"/{service}/{method}")
                )
                for method, handler in handlers.items()
            }
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
            server.add_registered_method_handlers(service, handlers)

    add.__doc__ = f"{add_to_server.__qualname__}, with request parsing that reports instead of raising."
    return add


add_explain_service = _tolerant(explainer_pb2_grpc.add_ExplainServiceServicer_to_server)
add_health_service = _tolerant(health_pb2_grpc.add_HealthServicer_to_server)

"""The gRPC services as the Serve proxy registers them, with request parsing that cannot fail.

Why: the proxy parses each request with the generated ``FromString`` before any of our code runs. A body
that is not a valid message (corrupt wire format, a string field with bad UTF-8) then raised inside
grpcio, which answered ``UNKNOWN`` with "Unexpected <class 'google.protobuf.message.DecodeError'>",
outside every log and metric of ours. Registered through these functions, such a body parses to an
:class:`UnparsedRequest`, and the ingress answers it ``INVALID_ARGUMENT`` like any other bad input.

Kept light (grpc and the generated stubs only): the Serve proxy imports this module.

A large body is also walked (field tags and lengths, no values) before it is parsed: a 36 MiB body of 19 M
empty ``positions`` (or unknown fields, or a packed ``Tensor.shape`` of millions of dims) grew ~20x when
parsed, in the proxy and again in the ingress, only to be refused for its count. Past
``MAX_REPEATED_ENTRIES`` entries of one field, or ``MAX_FIELDS`` fields in one message, the body is refused
unparsed, at the cost of the cap, not of the body.
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


# Entries of one repeated field, and fields of one message, a request may hold (ComputeIERF serves 64
# positions by default; settings refuse a max_positions above the first). Bodies under WALK_FROM_BYTES
# cannot hold enough to matter and are parsed at once.
MAX_REPEATED_ENTRIES = 65_536
MAX_FIELDS = 2 * MAX_REPEATED_ENTRIES
WALK_FROM_BYTES = 64 << 10
_MAX_DEPTH = 8
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def oversized(data: bytes | memoryview, descriptor: Any, depth: int = 0) -> str | None:
    """Why ``data`` holds more entries than a request may (see the module docstring), or None. Only tags
    and lengths are read; a sub-message is walked when it is large itself. A body the walk cannot follow
    (groups, a truncated field) is left to the parser, which reports it."""
    counts: dict[int, int] = {}
    fields = pos = 0
    view = memoryview(data)
    try:
        while pos < len(view):
            key, pos = _varint(view, pos)
            number, wire = key >> 3, key & 7
            field = descriptor.fields_by_number.get(number)
            entries = 1
            if wire == _VARINT:
                _, pos = _varint(view, pos)
            elif wire == _FIXED64:
                pos += 8
            elif wire == _FIXED32:
                pos += 4
            elif wire == _LENGTH_DELIMITED:
                length, start = _varint(view, pos)
                pos = start + length
                if field is not None and field.message_type is None and field.is_repeated and field.is_packed:
                    entries = length  # each packed entry takes at least one byte
                elif (
                    field is not None
                    and field.message_type is not None
                    and length >= WALK_FROM_BYTES
                    and depth < _MAX_DEPTH
                    and (why := oversized(view[start:pos], field.message_type, depth + 1))
                ):
                    return why
            else:
                return None  # groups (or a bad wire type): the parser's to report
            fields += 1
            if fields > MAX_FIELDS:
                return f"{descriptor.full_name} holds over {MAX_FIELDS} fields"
            if field is not None and field.is_repeated:
                counts[number] = counts.get(number, 0) + entries
                if counts[number] > MAX_REPEATED_ENTRIES:
                    return f"{field.full_name} holds over {MAX_REPEATED_ENTRIES} entries"
    except ValueError:
        return None
    return None


def _parse_or_report(parse: Callable[[bytes], Any], rpc: str) -> Callable[[bytes], Any]:
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else f"request of {rpc}"

    def tolerant(data: bytes) -> Any:
        if message_type is not None and len(data) >= WALK_FROM_BYTES and (why := oversized(data, message_type)):
            return UnparsedRequest(name, why)
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


def _trailers_only(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Serve's proxy handler factory, its unary handlers ending an error with ``context.abort``.

    Why: Serve's proxy sets the replica's status on the context and then returns the (empty) response,
    so every refusal went out as response headers, a zero-length message and the status. A gRPC retry
    policy (gRFC A6: grpc-java, grpc-go, grpc-js, grpc-core) commits a call once response headers
    arrive, so it never retried an overload whatever its ``grpc-retry-pushback-ms`` said. An abort sends
    the status alone (Trailers-Only), keeping the trailers already set. Applies to Serve's own refusals
    (its back-pressure) as well.
    """
    if getattr(factory, "ierf_trailers_only", False):
        return factory

    def factory_with_abort(service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if getattr(streaming_type, "name", "") != "UNARY_UNARY":
            return handler

        async def unary_unary(request: Any, context: Any) -> Any:
            response = await handler(request, context)
            code = _status_code(context.code())
            if code is not None and code != grpc.StatusCode.OK:
                await context.abort(code, context.details() or "")
            return response

        return unary_unary

    factory_with_abort.ierf_trailers_only = True  # type: ignore[attr-defined]
    return factory_with_abort


def _status_code(code: Any) -> grpc.StatusCode | None:
    """``context.code()`` as a StatusCode (grpc.aio may hold it as the enum or as its integer)."""
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def _tolerant(add_to_server: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    def add(servicer: Any, server: Any) -> None:
        if hasattr(server, "service_handler_factory"):  # Serve's gRPCGenericServer (the proxy)
            server.service_handler_factory = _trailers_only(server.service_handler_factory)
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

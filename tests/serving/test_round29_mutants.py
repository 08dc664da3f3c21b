"""Mutation round 29 on ``ierf.serving.errors``, ``ierf.serving.protocol`` and ``ierf.serving.settings``.

Each test fails on a plausible slip that the suite let through: a caller's string of exactly the echo length
cut, or a long one cut at another length; a refusal code (UNAUTHENTICATED, ...) losing its "never retry"
pushback, or a transient one gaining it; a StaleView mapped to the caller's fault; an error wrapped twice by
Ray, or a cycle of causes, unwrapped wrongly or forever; one of Ray's "worker gone" errors taken for a server
bug; a bare TimeoutError or engine error answered with an empty message; the proxy's body walk misreading
a varint, a wire type or a fixed-size payload, judging a body it cannot follow, raising on a truncated one,
skipping a large nested message, counting a singular field as entries or moving its caps; the proxy handler
aborting an OK answer; and settings refusing a proxy cap of exactly what images need or a blank one, taking
``cuda:``, an empty non-mapping section or ``true`` seconds, showing part of a password (``?Password=``, an
unencoded ``@``, a bare token, redis-py's parse error), mixing up the image caps, resolving ``redis_url: ""`` to
"", or refusing any pixel cap when Pillow's guard is off.
It also pins a fix made in this round: a handle caller (local testing mode) got Serve's back-pressure as a plain
ResourceExhausted, the size cap's "never retry", where a gRPC caller's trailers say "retry later" (E17).
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from ierf.serving.errors import (
    ECHO_CHARS,
    PUSHBACK_KEY,
    InvalidArgument,
    NotFound,
    ServiceError,
    StaleView,
    echo,
    retry_trailers,
    to_status,
)
from ierf.serving.protocol import (
    MAX_FIELDS,
    MAX_REPEATED_ENTRIES,
    WALK_FROM_BYTES,
    UnparsedRequest,
    add_explain_service,
    oversized,
)
from ierf.serving.settings import (
    GRPC_MAX_MESSAGE_BYTES,
    GRPC_MAX_MESSAGE_ENV,
    GRPC_REQUEST_OVERHEAD_BYTES,
    CacheConfig,
    IngressConfig,
    ServiceConfig,
    grpc_max_message_bytes,
)
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import DeploymentUnavailableError

from serving.test_request_images import _varint


def _registered_parsers() -> dict[str, object]:
    """The request parsers ``add_explain_service`` registers on the Serve proxy, collected by name."""

    class Collect:
        def __init__(self) -> None:
            self.handlers: dict[str, grpc.RpcMethodHandler] = {}

        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            self.handlers.update(handlers)

    server = Collect()
    add_explain_service(pb_grpc.ExplainServiceServicer(), server)
    return {name: handler.request_deserializer for name, handler in server.handlers.items()}


# ------------------------------------------------------------------------------------------------ errors
def test_a_string_of_exactly_the_echo_length_is_echoed_whole() -> None:
    """E01: a caller's 64-character model id is shown as it is, with no "… (64 characters)" marker."""
    value = "m" * ECHO_CHARS
    assert echo(value) == repr(value)


def test_a_long_string_is_echoed_as_its_first_echo_chars_and_its_length() -> None:
    """E02: the cut keeps ECHO_CHARS characters, then says the full length."""
    value = "abcdefgh" * 20
    assert echo(value) == f"{value[:ECHO_CHARS]!r}… ({len(value)} characters)"


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    ],
)
def test_a_refusal_of_the_request_itself_tells_retry_policies_never_to_retry(code: grpc.StatusCode) -> None:
    """E09: every code that refuses the request itself (a missing token included) carries pushback -1, so a
    gRPC retry policy listing it does not resend the same refused request."""
    assert retry_trailers(ServiceError("refused"), code) == [(PUSHBACK_KEY, "-1")]


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
    ],
)
def test_a_transient_failure_leaves_the_retry_policy_to_decide(code: grpc.StatusCode) -> None:
    """E10: a worker restart (UNAVAILABLE) or a late answer may pass on a retry: no "never retry" pushback."""
    assert retry_trailers(ServiceError("transient"), code) == []


def test_a_refused_view_that_escapes_maps_to_failed_precondition() -> None:
    """E07: a StaleView (the worker's preprocessing changed under the ingress) is the server's state, not the
    caller's input: should one escape the ingress's retry it is FAILED_PRECONDITION, never INVALID_ARGUMENT."""
    exc = RayTaskError("explain", "traceback", StaleView("view made by preprocessing v1-x; this replica uses v2-y"))
    assert to_status(exc)[0] == grpc.StatusCode.FAILED_PRECONDITION


def test_an_error_wrapped_twice_by_ray_keeps_its_code() -> None:
    """E18: an actor call made from inside another actor call reaches the ingress as a RayTaskError around a
    RayTaskError: the code is read through both wrappers."""
    inner = RayTaskError("explain", "traceback", NotFound("unknown model 'x'"))
    outer = RayTaskError("call", "traceback", inner).as_instanceof_cause()
    assert to_status(outer) == (grpc.StatusCode.NOT_FOUND, "unknown model 'x'")


def test_a_cycle_of_causes_is_unwrapped_in_bounded_steps() -> None:
    """E20: two exceptions naming each other as ``cause`` must not keep the ingress's event loop spinning;
    the walk stops after a bounded number of hops and answers with one of the two codes."""
    first, second = NotFound("a"), InvalidArgument("b")
    first.cause, second.cause = second, first  # type: ignore[attr-defined]
    result: list[tuple[grpc.StatusCode, str]] = []
    thread = threading.Thread(target=lambda: result.append(to_status(first)), daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert result and result[0][0] in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.mark.parametrize(
    "exc",
    [
        DeploymentUnavailableError(DeploymentID(name="Worker_x", app_name="ierf")),
        ActorUnavailableError("the actor is restarting", None),
        ActorDiedError(),
        RayActorError(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_each_of_rays_unavailable_worker_errors_is_unavailable(exc: Exception) -> None:
    """E23, E24, E31: every Ray error that means "the worker is gone for now" is UNAVAILABLE (retry with backoff),
    named by its type, not INTERNAL (which pages someone) with Ray's text."""
    code, message = to_status(exc)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert message == f"worker unavailable, retry later: {type(exc).__name__}"


def test_a_timeout_without_a_message_still_says_what_happened() -> None:
    """E25: ``asyncio.wait_for`` raises a bare TimeoutError: the caller reads "deadline exceeded", not an
    empty status message."""
    assert to_status(TimeoutError()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def test_an_engine_error_without_a_message_is_named_by_its_type() -> None:
    """E29: a bare ``IndexError()`` from the engine reaches the caller as its type name, not as an empty
    INVALID_ARGUMENT message."""
    assert to_status(IndexError()) == (grpc.StatusCode.INVALID_ARGUMENT, "IndexError")


# ------------------------------------------------------------------------------------------------ protocol
def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _compute_ierf_body(positions: int) -> bytes:
    """A ComputeIERF body with every wire type before its positions (as unknown fields 100-104, which a newer
    client may send): multi-byte keys, a multi-byte varint value, a 300-byte length (two length bytes), and
    fixed64/fixed32 payloads of 0x07 bytes, which read as a key are the invalid wire type 7."""
    header = pb.ComputeIERFRequest(layer="x", image=pb.Image(encoded=b"\x89PNG")).SerializeToString()
    extras = (
        _field(100, 1, b"\x07" * 8)
        + _field(101, 0, _varint(300_000))
        + _field(102, 2, _varint(300) + b"\x07" * 300)
        + _field(103, 5, b"\x07" * 4)
    )
    return header + extras + b"\x22\x00" * positions  # field 4 (positions), an empty Position


def test_the_walk_skips_every_wire_type_by_its_size_and_still_counts_the_positions() -> None:
    """P03, P04, P05, P06, P07: the walk reads varints 7 bits a byte (without the continuation bit), the wire type
    from the key's low 3 bits, and skips 8 bytes of a fixed64 and 4 of a fixed32. A slip in any desyncs the walk
    before the positions, and a body one position over the cap reached the ingress (or one at the cap was
    refused)."""
    assert len(_compute_ierf_body(MAX_REPEATED_ENTRIES)) >= WALK_FROM_BYTES
    descriptor = pb.ComputeIERFRequest.DESCRIPTOR
    assert oversized(_compute_ierf_body(MAX_REPEATED_ENTRIES), descriptor) is None
    assert oversized(_compute_ierf_body(MAX_REPEATED_ENTRIES + 1), descriptor) == (
        f"ierf.v1.ComputeIERFRequest.positions holds over {MAX_REPEATED_ENTRIES} entries"
    )
    parsed = pb.ComputeIERFRequest.FromString(_compute_ierf_body(MAX_REPEATED_ENTRIES))
    assert len(parsed.positions) == MAX_REPEATED_ENTRIES and parsed.layer == "x"  # the body is a valid message


@pytest.mark.parametrize(
    "prefix",
    [b"\xa2" + b"\x80" * 9 + b"\x00" + b"\x00", b"\xa3\x06"],
    ids=["overlong-varint-key", "group-start"],
)
def test_a_body_the_walk_cannot_follow_is_left_to_the_parser(prefix: bytes) -> None:
    """P01, P13: a key of more than ten varint bytes (here an empty position's, padded) is no protobuf varint,
    and a group (wire type 3) has no length to skip: the walk stops there (the parser judges the body) rather
    than read on from a misaligned position and count what follows."""
    body = prefix + b"\x22\x00" * (MAX_REPEATED_ENTRIES + 10)
    assert oversized(body, pb.ComputeIERFRequest.DESCRIPTOR) is None
    parsed = _registered_parsers()["ComputeIERF"](body)
    assert isinstance(parsed, UnparsedRequest) and parsed.message_type == "ierf.v1.ComputeIERFRequest"


def test_a_large_body_cut_inside_a_key_is_reported_not_raised() -> None:
    """P02: a large body that ends inside a varint makes the walk stop with "truncated" (left to the parser),
    not an IndexError out of the proxy's deserializer, which grpcio answers UNKNOWN outside our logs."""
    body = _compute_ierf_body(100) + b"\x22\x00" * 40_000 + b"\xa0"  # a key's first byte, its second missing
    assert oversized(body, pb.ComputeIERFRequest.DESCRIPTOR) is None
    parsed = _registered_parsers()["ComputeIERF"](body)
    assert isinstance(parsed, UnparsedRequest) and parsed.message_type == "ierf.v1.ComputeIERFRequest"


def test_a_nested_message_is_walked_from_the_walk_threshold() -> None:
    """P10: a packed Tensor.shape of 70,000 dims nested in Image (a ~70 KB sub-message, just over
    WALK_FROM_BYTES) is counted like a top-level field: refused, not parsed into 70,000 dims."""
    tensor = b"\x0a\x03abc\x10\x01" + _field(3, 2, _varint(70_000) + b"\x07" * 70_000)
    image = _field(2, 2, _varint(len(tensor)) + tensor)  # Image.tensor
    body = _field(2, 2, _varint(len(image)) + image)  # PredictRequest.image
    assert oversized(body, pb.PredictRequest.DESCRIPTOR) == (
        f"ierf.v1.Tensor.shape holds over {MAX_REPEATED_ENTRIES} entries"
    )


def test_the_walk_lets_exactly_the_field_cap_through() -> None:
    """P14: ``MAX_FIELDS`` fields in one message pass the walk (the cap is "over", as for repeated entries); one
    more is refused."""
    field = b"\xf8\x07\x00"  # field 127, varint 0: an unknown field the parser keeps
    assert oversized(field * MAX_FIELDS, pb.ExplainRequest.DESCRIPTOR) is None
    assert oversized(field * (MAX_FIELDS + 1), pb.ExplainRequest.DESCRIPTOR) == (
        f"ierf.v1.ExplainRequest holds over {MAX_FIELDS} fields"
    )


def test_a_singular_field_sent_many_times_is_not_counted_as_entries() -> None:
    """P17: a singular field repeated on the wire parses to one value (the last wins), so only the field cap
    applies to it: 70,000 copies of ``target`` are not refused as "entries"."""
    body = pb.ExplainRequest(image=pb.Image(encoded=b"\x89PNG")).SerializeToString() + b"\x18\x05" * 70_000
    assert oversized(body, pb.ExplainRequest.DESCRIPTOR) is None
    parsed = _registered_parsers()["Explain"](body)
    assert isinstance(parsed, pb.ExplainRequest) and parsed.target == 5


def test_the_walk_refuses_a_flood_of_140_000_unknown_fields() -> None:
    """P18: the field cap is twice the entry cap (131,072), so ~420 KB of unknown fields (which the parser
    keeps, at ~20x their size) is refused unparsed."""
    assert MAX_FIELDS < 140_000
    body = b"\xf8\x07\x00" * 140_000  # field 127, varint 0
    assert oversized(body, pb.ExplainRequest.DESCRIPTOR) == f"ierf.v1.ExplainRequest holds over {MAX_FIELDS} fields"


def test_an_unparsable_body_is_described_without_the_parsers_prefix() -> None:
    """P21: the parser's "Error parsing message with type '...': " is cut, so the caller reads the type once."""
    parsed = _registered_parsers()["Explain"](b"\xa3\x06")  # a group start: corrupt for this message
    assert parsed == UnparsedRequest("ierf.v1.ExplainRequest", "Wire format was corrupt")
    assert parsed.describe() == "the request is not a valid ierf.v1.ExplainRequest message (Wire format was corrupt)"


def test_an_answer_with_status_ok_goes_through_the_serve_proxy_handler() -> None:
    """P23: the proxy handler aborts only on a non-OK status; an OK answer reaches the caller as its message."""
    from tests.serving.test_grpc_other_languages import _serve_proxy_server

    async def call() -> pb.ExplainResponse:
        attempts: list[float] = []
        server = _serve_proxy_server(ServiceError(""), grpc.StatusCode.OK, attempts)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await pb_grpc.ExplainServiceStub(channel).Explain(pb.ExplainRequest(), timeout=10)
        finally:
            await server.stop(None)

    assert asyncio.run(call()) == pb.ExplainResponse()


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "url",
    ["redis://h:1/abc?Password=hunter2", "redis://h:1/0?PASSWORD=hunter2&bogus=1"],
)
def test_a_password_query_option_in_any_case_is_redacted(url: str) -> None:
    """S28: a ``?Password=`` (any case) is still a password in a config file: the refusal must not print it."""
    with pytest.raises(ValueError, match=r"redis_url") as info:
        CacheConfig(redis_url=url)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_a_password_holding_an_at_sign_is_redacted_whole() -> None:
    """S29: the user information ends at the last ``@`` before the host, so a password holding ``@`` (unencoded)
    is hidden whole, not cut at its own ``@`` and half shown."""
    with pytest.raises(ValueError) as info:
        CacheConfig(redis_url="redis://user:hunter@2secret@h:1/abc")
    assert "2secret" not in str(info.value) and "hunter" not in str(info.value)
    assert "'redis://user:***@h:1/abc'" in str(info.value)


def test_user_information_without_a_colon_is_redacted_as_a_password() -> None:
    """S30: ``redis://TOKEN@host`` is a password alone (redis-py reads it so): nothing of it is shown."""
    with pytest.raises(ValueError) as info:
        CacheConfig(redis_url="redis://sekrit-token@h:1/abc")
    assert "sekrit" not in str(info.value) and "'redis://:***@h:1/abc'" in str(info.value)


def test_a_proxy_message_cap_of_exactly_the_image_cap_plus_overhead_is_accepted() -> None:
    """S02: the proxy cap may be exactly what the largest accepted image needs (image cap + request overhead)."""
    needed = 30 * 1024 * 1024 + GRPC_REQUEST_OVERHEAD_BYTES
    assert grpc_max_message_bytes(30 * 1024 * 1024, {GRPC_MAX_MESSAGE_ENV: str(needed)}) == needed
    with pytest.raises(ValueError, match="would refuse images the ingress accepts"):
        grpc_max_message_bytes(30 * 1024 * 1024, {GRPC_MAX_MESSAGE_ENV: str(needed - 1)})


def test_a_blank_proxy_message_cap_means_the_default() -> None:
    """S03: a variable set to spaces (a template that left it empty) is unset, not a refused number."""
    assert grpc_max_message_bytes(1024, {GRPC_MAX_MESSAGE_ENV: "   "}) == GRPC_MAX_MESSAGE_BYTES


def test_a_device_of_cuda_and_a_colon_without_an_index_is_refused() -> None:
    """S04: ``cuda:`` (an index left out) is no device torch accepts: refused at deploy, naming the key."""
    with pytest.raises(ValueError, match=r"models\[0\]\.device must be"):
        ServiceConfig.from_args({"models": [{"id": "m", "device": "cuda:"}]})
    assert ServiceConfig.from_args({"models": [{"id": "m", "device": "cuda:1"}]}).models[0].device == "cuda:1"


@pytest.mark.parametrize("value", [[], "", 0, False])
def test_a_section_that_is_an_empty_non_mapping_is_refused(value: object) -> None:
    """S06: ``cache: []`` or ``ingress: ""`` is a mistake in the file, not "all defaults" (null or {} are)."""
    with pytest.raises(ValueError, match=r"cache must be a mapping of settings"):
        ServiceConfig.from_args({"cache": value})
    assert ServiceConfig.from_args({"cache": None}).cache == CacheConfig()


def test_a_boolean_is_not_a_number_of_seconds() -> None:
    """S11: ``timeout_s: true`` is a mistake, not 1 second."""
    with pytest.raises(ValueError, match=r"cache\.timeout_s must be a finite number of seconds > 0, got True"):
        ServiceConfig.from_args({"cache": {"timeout_s": True}})


def test_the_image_limits_carry_each_cap_from_its_own_key() -> None:
    """S43: ``ingress.limits`` takes the side cap from ``max_side``, the pixel cap from ``max_pixels``."""
    limits = IngressConfig(max_image_bytes=1000, max_pixels=5000, max_side=70).limits
    assert (limits.max_bytes, limits.max_pixels, limits.max_side) == (1000, 5000, 70)


def test_a_url_whose_password_breaks_the_parse_is_refused_without_the_parsers_reason() -> None:
    """S44: redis-py's reason would quote part of the password ("... as 'Zm9v'"): the message says what to do
    instead, and shows nothing of the password."""
    with pytest.raises(ValueError) as info:
        CacheConfig(redis_url="redis://u:Zm9vsecret/x@h:1/0")
    message = str(info.value)
    assert "Zm9v" not in message and "secret" not in message
    assert "percent-encode" in message


def test_an_empty_redis_url_resolves_to_no_redis() -> None:
    """S24: ``redis_url: ""`` (an overlay that blanked it) means L2 off, resolved as None, never as a URL "" that
    the Redis tier would try to connect to."""
    assert CacheConfig(redis_url="").resolved_redis_url() is None


def test_with_pillows_pixel_guard_off_any_pixel_cap_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """S50: a host that turned Pillow's decompression guard off (``MAX_IMAGE_PIXELS = None``) has no decoder
    bound for ``max_pixels`` to stay under."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert IngressConfig(max_pixels=400_000_000).max_pixels == 400_000_000


def test_a_full_worker_queue_is_an_overload_for_a_handle_caller_too() -> None:
    """E17: Serve's back-pressure reaches a handle caller (local testing mode, notebooks, tests) as
    ``Overloaded``, whose retry hint says "try again later", as a gRPC caller's trailers do; a plain
    ``ResourceExhausted`` is the size cap's "never retry". A cap is still the plain class."""
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import Overloaded, ResourceExhausted, retry_after_ms
    from ierf.serving.settings import ServiceConfig

    from serving.test_load_findings import _request, _Worker

    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"max_pixels": 4096}})
    ingress = Ingress.func_or_class({"m": _Worker(full=True)}, config)  # refuses with back-pressure

    async def scenario() -> None:
        with pytest.raises(Overloaded, match="overloaded, retry later: Request dropped due to backpressure") as info:
            await ingress.Explain(_request(8))
        assert retry_after_ms(info.value) is not None
        with pytest.raises(ResourceExhausted) as cap:
            await ingress.Explain(_request(65))  # 4225 pixels: over the cap, refused before the worker
        assert not isinstance(cap.value, Overloaded) and retry_after_ms(cap.value) is None
        await asyncio.sleep(0.05)  # the background describe call starts (and is cancelled at the end)

    asyncio.run(scenario())

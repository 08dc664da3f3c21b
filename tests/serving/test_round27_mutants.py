"""Mutation round 27 on the Python SDK ``ierf_client`` (``_core``, ``client``, ``aio``).

Each test fails on a plausible slip that the suite let through: Serve's no-routes words taken as such under any
status code; the overload note dropped after two refusals; RetryPolicy taking ``max_attempts=True`` or
``retry_overload="no"``, or refusing a multiplier of 1; addresses with inner white space, a ``grpcs://`` scheme or
full-width port digits accepted, and a vsock target or port 65535 refused; " Mean ", "-3" and True misread as
contrasts; the clear-text token warning pointing into the SDK, or given for ``dns:`` loopback names and local
sockets; a non-printable token accepted; a retry-after trailer of inf taken for a pause; the proxy's backpressure
words read under any status; the first pause drawn one step too steep and the last one not cut to the budget;
channel options repeated, the send limit left at 4 MiB, the reconnect cap lost; a spent budget announced as "0"
or negative; WebP re-encoded; float pixels just past 1.0 rounded instead of refused; a non-integer EXIF
orientation applied; empty maps, float model inputs and a wide map's overlay misjudged; cache tiers, input
limits, a target of 0, unknown health fields and statuses, layer names and a pickled error's pause lost; int32
bounds off by one; the clients' defaults and argument order, TLS, ``with`` close, a close under a call in flight,
the async channel reused in its loop, the application checked and wait_until_serving stopping at NOT_SERVING.
It also pins a defect fixed in this round: a clear-text token to an ``ipv4:`` address list reaching a remote host
passed without the warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_client import AsyncClient, Client, PlaintextTokenWarning, _core
from ierf_client._core import RetryPolicy
from ierf_proto.v1 import explainer_pb2 as pb
from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc
from PIL import Image

PIXELS = np.zeros((8, 8, 3), np.uint8)


@contextlib.contextmanager
def _loopback(add: Any, workers: int = 4, options: list[tuple[str, Any]] | None = None) -> Iterator[str]:
    """A real loopback gRPC server with the servicer that ``add(server)`` registers; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def _serving(servicer: pb_grpc.ExplainServiceServicer, options: list[tuple[str, Any]] | None = None) -> Any:
    """``servicer`` as ierf.v1.ExplainService on loopback (a context manager yielding the address)."""
    return _loopback(lambda server: pb_grpc.add_ExplainServiceServicer_to_server(servicer, server), 4, options)


def _health_serving(servicer: Any) -> Any:
    """``servicer`` as grpc.health.v1.Health on loopback (a context manager yielding the address)."""
    from grpc_health.v1 import health_pb2_grpc

    return _loopback(lambda server: health_pb2_grpc.add_HealthServicer_to_server(servicer, server), 2)


def _call(flavour: str, address: str, use: str, *args: Any, client_kwargs: dict | None = None, **kwargs: Any) -> Any:
    """``Client(address).use(*args, **kwargs)`` or the same through ``AsyncClient`` in a fresh loop."""
    options = {"timeout": 10.0, **(client_kwargs or {})}
    if flavour == "sync":
        with Client(address, **options) as client:
            return getattr(client, use)(*args, **kwargs)

    async def run() -> Any:
        async with AsyncClient(address, **options) as client:
            return await getattr(client, use)(*args, **kwargs)

    return asyncio.run(run())


class _Refusing(pb_grpc.ExplainServiceServicer):
    """Answers every Predict with ``code``/``details`` (and ``trailers``), counting the calls."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self.code, self.details, self.trailers, self.calls = code, details, trailers, 0

    def Predict(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.trailers:
            context.set_trailing_metadata(self.trailers)
        context.abort(self.code, self.details)


class _Recorder(pb_grpc.ExplainServiceServicer):
    """Keeps every request it gets and answers with the smallest valid response."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def Explain(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return pb.ExplainResponse(map=pb.Tensor(data=bytes(4), dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1]))

    def ComputeIERF(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return pb.ComputeIERFResponse(maps=pb.Tensor(data=bytes(4), dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1, 1]))

    def Predict(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return pb.PredictResponse(top_classes=[pb.ClassScore(index=len(request.image.tensor.data))])


# ------------------------------------------------------------------------------------ errors and retries
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_servers_no_routes_words_under_another_code_are_neither_retried_nor_hinted(flavour: str) -> None:
    """S02: only Serve's NOT_FOUND saying "Application metadata not set" is its no-routes answer; the same words
    in an INVALID_ARGUMENT (an application's own message quoting them) are the caller's error, raised at once."""
    from ierf_client import InvalidArgumentError

    servicer = _Refusing(grpc.StatusCode.INVALID_ARGUMENT, "field quotes 'Application metadata not set'")
    with _serving(servicer) as address, pytest.raises(InvalidArgumentError) as info:
        _call(flavour, address, "predict", PIXELS)
    assert servicer.calls == 1
    assert info.value.details == "field quotes 'Application metadata not set'"


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_an_overload_whose_last_attempt_ran_out_of_attempts_says_how_often_it_was_refused(flavour: str) -> None:
    """S08: two attempts, both refused as overloaded, and the policy allows no third: the error counts the
    refusals ("2 of 2") rather than passing for a single refusal."""
    from ierf_client import ResourceExhaustedError

    servicer = _Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, "queues full", ((_core.RETRY_AFTER_KEY, "10"),))
    policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
    with _serving(servicer) as address, pytest.raises(ResourceExhaustedError) as info:
        _call(flavour, address, "predict", PIXELS, client_kwargs={"retry": policy})
    assert servicer.calls == 2
    assert "refused as overloaded on 2 of 2 attempts" in info.value.details
    assert info.value.retry_after_s == pytest.approx(0.01)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
@pytest.mark.parametrize("pause", ["inf", "nan", "-5"])
def test_a_refusal_with_a_pause_that_is_no_number_of_seconds_is_a_cap(flavour: str, pause: str) -> None:
    """S58: an ``ierf-retry-after-ms`` trailer of inf, NaN or a negative number suggests no pause: the refusal
    is a cap (retry_after_s None), raised after one call, not an overload with an endless pause."""
    from ierf_client import ResourceExhaustedError

    servicer = _Refusing(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many positions", ((_core.RETRY_AFTER_KEY, pause),))
    with _serving(servicer) as address, pytest.raises(ResourceExhaustedError) as info:
        _call(flavour, address, "predict", PIXELS)
    assert servicer.calls == 1
    assert info.value.retry_after_s is None and info.value.details == "too many positions"


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_only_a_resource_exhausted_refusal_reads_as_the_proxys_backpressure(flavour: str) -> None:
    """S61: the proxy's "dropped due to backpressure" is an overload only under RESOURCE_EXHAUSTED; an
    INTERNAL quoting it is a server error with no suggested pause, raised after one call."""
    from ierf_client import IerfError

    servicer = _Refusing(grpc.StatusCode.INTERNAL, "Request dropped due to backpressure upstream")
    with _serving(servicer) as address, pytest.raises(IerfError) as info:
        _call(flavour, address, "predict", PIXELS)
    assert servicer.calls == 1
    assert info.value.code == grpc.StatusCode.INTERNAL and info.value.retry_after_s is None


def test_retry_policy_refuses_a_boolean_attempt_count_and_a_non_boolean_overload_flag() -> None:
    """S14, S17: ``max_attempts=True`` would mean one attempt and ``retry_overload="no"`` would retry: both
    refused by name; S16: a multiplier of exactly 1 (constant backoff) is allowed."""
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=True)
    with pytest.raises(ValueError, match="retry_overload"):
        RetryPolicy(retry_overload="no")  # type: ignore[arg-type]
    policy = RetryPolicy(multiplier=1, initial_backoff_s=0.2, max_backoff_s=5.0)
    assert policy.multiplier == 1


def test_the_first_pause_is_bounded_by_the_initial_backoff_and_the_last_by_the_budget_left() -> None:
    """S67: the pause after the first failed attempt is drawn below ``initial_backoff_s`` (one step further
    would draw below ten times that here); S70: a pause is cut to the budget left less one attempt's minimum,
    never slept past the deadline. Fifty draws each: a slip passes all of them with odds below 1e-4."""
    steep = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=10.0, multiplier=10.0)
    far = time.monotonic() + 100.0
    first = [_core.retry_pause(steep, grpc.StatusCode.UNAVAILABLE, 1, far) for _ in range(50)]
    assert all(p is not None and 0 <= p <= 0.1 for p in first), max(first)
    slow = RetryPolicy(initial_backoff_s=50.0, max_backoff_s=50.0)
    near = time.monotonic() + 1.0
    last = [_core.retry_pause(slow, grpc.StatusCode.UNAVAILABLE, 1, near) for _ in range(50)]
    assert all(p is not None and 0 <= p <= 1.0 - _core.MIN_ATTEMPT_S for p in last), max(last)


def test_an_overload_error_keeps_its_pause_across_pickling() -> None:
    """S117: an error sent back from a process pool keeps the server's suggested pause, which tells an
    overload (wait and retry) from a cap."""
    import pickle

    from ierf_client import ResourceExhaustedError

    error = ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queues full", 0.25)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ResourceExhaustedError and copy.retry_after_s == 0.25 and copy.details == "queues full"


# --------------------------------------------------------------------------------------------- addresses
@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("my host:9000", "white space"),  # S23
        ("grpcs://example.com:443", "URL scheme"),  # S24
        ("127.0.0.1:\uff19\uff10\uff10\uff10", "numeric port"),  # S31: full-width digits
    ],
)
def test_addresses_grpc_cannot_dial_are_refused_by_what_is_wrong(address: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _core.check_address(address)


@pytest.mark.parametrize("address", ["vsock:2:9000", "127.0.0.1:65535"])
def test_a_vsock_target_and_the_highest_port_are_accepted(address: str) -> None:
    """S28, S33: vsock:CID:PORT is a grpc target of its own (not a host with a colon); 65535 is a port."""
    assert _core.check_address(address) == address


# ------------------------------------------------------------------------------------- arguments and tokens
def test_contrast_modes_are_read_with_surrounding_space_and_a_class_never_as_a_string_or_boolean() -> None:
    """S38: " Mean " is the mean contrast (case and space ignored); S39: "-3" is a class given as a string
    (TypeError, as "3" is), not an unknown mode; S40: True is neither a mode nor a class (ValueError, not the
    class check's TypeError)."""

    def explain(contrast: object) -> pb.ExplainRequest:
        return _core.explain_request(PIXELS, None, "", "srd", contrast, "float32", False, False)  # type: ignore[arg-type]

    assert explain(" Mean ").contrast == "mean"
    with pytest.raises(TypeError, match="as an integer, not a string"):
        explain("-3")
    with pytest.raises(ValueError, match="contrast must be"):
        explain(True)


def test_target_class_0_is_sent_as_a_target() -> None:
    """S108: class 0 (ImageNet's tench) is a target: a falsy check would leave the field unset and the server
    would explain the predicted class instead."""
    request = _core.explain_request(PIXELS, 0, "", "srd", "identity", "float32", False, False)
    assert request.HasField("target") and request.target == 0
    assert not _core.explain_request(PIXELS, None, "", "srd", "identity", "float32", False, False).HasField("target")


def test_the_int32_bounds_are_inclusive() -> None:
    """S35, S36: an int32 field takes -2**31 and 2**31 - 1 exactly; one past each is named here."""
    request = _core.explain_request(PIXELS, -(2**31), "", "srd", 2**31 - 1, "float32", False, False)
    assert request.target == -(2**31) and request.contrast_class == 2**31 - 1
    for outside in (-(2**31) - 1, 2**31):
        with pytest.raises(ValueError, match="out of range"):
            _core.check_int32(outside, "target")


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_a_token_warning_names_the_line_that_made_the_client(client_class: type) -> None:
    """S44: the clear-text warning points at the caller's line (its stacklevel), from both clients, so that
    a filter or a log names the code to fix rather than the SDK."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = client_class("10.20.30.40:9000", token="s3cret")
    if isinstance(client, Client):  # an AsyncClient opens no channel before its first call
        client.close()
    tokens = [w for w in caught if issubclass(w.category, PlaintextTokenWarning)]
    assert len(tokens) == 1 and tokens[0].filename == __file__


@pytest.mark.parametrize("address", ["dns:///localhost:9000", "unix-abstract:ierf", "vsock:2:9000"])
def test_a_token_to_this_machine_travels_without_a_warning(address: str) -> None:
    """S47, S48: a ``dns:`` loopback name and local sockets (abstract unix, vsock) keep clear text on this
    machine: warning there would teach users to filter the warning that matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlaintextTokenWarning)
        assert _core.check_token("s3cret", address, secure=False) == "s3cret"


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_a_token_that_is_not_printable_ascii_is_refused(client_class: type) -> None:
    """S42: metadata values are printable ASCII: DEL or a non-ASCII letter would be refused by grpc at
    every call (or mangled), so the constructor names it."""
    for token in ("tok\x7fen", "tøken"):
        with pytest.raises(ValueError, match="printable ASCII"):
            client_class("127.0.0.1:9", token=token)


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
def test_an_application_name_that_is_not_a_string_is_refused_by_each_client(client_class: type) -> None:
    """C22, A25: ``application`` travels as metadata on every call; a number would fail each call inside grpc
    rather than once, by name, in the constructor."""
    with pytest.raises(TypeError, match="application must be a string"):
        client_class("127.0.0.1:9", application=7)


# -------------------------------------------------------------------------------------- channel and metadata
def test_channel_options_hold_each_key_once_with_the_documented_reconnect_and_keepalive() -> None:
    """S73: the caller's options, then only the defaults for keys it did not set (each key once, so which
    value wins does not rest on grpc's handling of repeats); S77: the channel's reconnect backoff is capped
    at ~2 s (gRPC's own cap of 120 s left a restarted server unnoticed) and keepalive pings stay at the
    server's 5-minute minimum."""
    given = [("grpc.max_reconnect_backoff_ms", 500), ("grpc.lb_policy_name", "x")]
    options = _core.channel_options_with(8 << 20, given)
    keys = [key for key, _ in options]
    assert len(keys) == len(set(keys))
    assert dict(options)["grpc.max_reconnect_backoff_ms"] == 500
    assert dict(options)["grpc.max_send_message_length"] == 8 << 20
    defaults = dict(_core.channel_options(8 << 20))
    assert defaults["grpc.initial_reconnect_backoff_ms"] <= 1000 and defaults["grpc.max_reconnect_backoff_ms"] <= 2000
    assert defaults["grpc.keepalive_time_ms"] >= 300_000


@pytest.mark.parametrize("remaining_s", [0.0004, 0.0, -0.02])
def test_a_budget_spent_to_under_a_millisecond_is_announced_as_one_millisecond(remaining_s: float) -> None:
    """S78: a retry that overslept its pause starts with (almost) nothing or less than nothing left; the
    server reads ``ierf-timeout-ms`` as digits, so "-20" would be refused as a bad argument, and "0"
    announces no time at all: the SDK sends at least 1 ms."""
    assert _core.call_metadata(None, remaining_s) == [(_core.TIMEOUT_METADATA_KEY, "1")]


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_request_past_grpcs_4_mib_default_is_sent(flavour: str) -> None:
    """S76: a 5 MB uint8 array travels raw (under the 16 MiB raw limit); gRPC's default send cap of 4 MiB
    would refuse it at the client, so the SDK raises the send limit as it raises the receive one."""
    pixels = np.full((1000, 1700, 3), 7, np.uint8)
    servicer = _Recorder()
    with _serving(servicer, options=[("grpc.max_receive_message_length", 64 << 20)]) as address:
        prediction = _call(flavour, address, "predict", pixels)
    assert prediction.top_classes[0].index == pixels.nbytes


# ------------------------------------------------------------------------------------------------ images
def test_a_webp_file_travels_as_its_own_bytes() -> None:
    """S87: the server decodes WebP itself, so a WebP file goes as it is (not re-encoded to PNG on the
    caller's thread), and AsyncClient builds it on the loop."""
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (10, 20, 30)).save(buffer, "WEBP", lossless=True)
    webp = buffer.getvalue()
    assert _core.image_message(webp).encoded == webp
    assert not _core.building_may_block(webp)


def test_float_pixels_just_above_one_are_refused_as_the_server_refuses_them() -> None:
    """S90: the SDK rounds large float arrays to uint8 by the server's rule, refusal of values past 1.0
    included: 1.0005 is outside [0, 1] (the server says so of the float tensor), 1.0 is white."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import ImageLimits, decode_tensor

    over = np.full((2, 2, 3), 1.0005, np.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        _core._float_to_uint8(over)
    with pytest.raises(InvalidArgument, match=r"\[0, 1\]"):
        decode_tensor(over.tobytes(), "float32", list(over.shape), ImageLimits())
    assert (_core._float_to_uint8(np.ones((2, 2, 3), np.float32)) == 255).all()


def test_an_orientation_tag_that_is_no_integer_turns_nothing_as_on_the_server() -> None:
    """S91: an EXIF Orientation written as a RATIONAL 6/1 (Pillow reads 6.0) is no orientation to the server,
    which keeps the file as stored; the SDK's PNG of the opened image must keep it so too."""
    from ierf.images import load_image

    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x05\x00\x00\x00\x01\x00\x00\x00\x1a"
    exif = b"Exif\x00\x00" + tiff + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x06\x00\x00\x00\x01"
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2)).save(buffer, "JPEG", exif=exif)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert opened.getexif().get(0x0112) == 6
    assert load_image(buffer.getvalue()).shape[:2] == (2, 3)
    assert Image.open(io.BytesIO(_core.image_message(opened).encoded)).size == (3, 2)


# --------------------------------------------------------------------------------------------- responses
def test_an_empty_map_or_a_float_model_input_is_a_broken_response() -> None:
    """S96: a map of shape (0, 4) with no bytes "fits" its shape but is no map; S120: the model input is the
    server's canonical uint8 pixels, so float32 bytes that fill (H, W, 3) are still not what it sends."""
    from ierf_client import DataLossError

    empty = pb.ExplainResponse(map=pb.Tensor(data=b"", dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 4]))
    with pytest.raises(DataLossError, match="response field map has shape"):
        _core.parse_explanation(empty)
    floats = pb.ExplainResponse(
        map=pb.Tensor(data=bytes(64), dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 4]),
        model_input=pb.Tensor(data=bytes(4 * 48), dtype=pb.DATA_TYPE_FLOAT32, shape=[4, 4, 3]),
    )
    with pytest.raises(DataLossError, match="response field model_input has dtype"):
        _core.parse_explanation(floats)


def test_an_overlay_of_a_wide_map_is_bounded_by_the_maps_width_not_its_height() -> None:
    """S100, S101: the overlay's width is checked against twice the map's width (plus margin) and its height
    against the height: a 700-pixel-wide overlay of a 10x300 map is fine, though 700 > 2 * 10 + 512."""
    buffer = io.BytesIO()
    Image.new("RGB", (700, 40), (200, 10, 10)).save(buffer, "PNG")
    response = pb.ExplainResponse(
        map=pb.Tensor(data=bytes(4 * 10 * 300), dtype=pb.DATA_TYPE_FLOAT32, shape=[10, 300]),
        overlay_png=buffer.getvalue(),
    )
    assert _core.parse_explanation(response).overlay().size == (700, 40)


def test_cache_tiers_are_named_each_by_its_own_value() -> None:
    """S104, S123: L1 and L2 keep their names, and a tier this SDK does not know reads "unknown", never
    as a miss (a newer server's tier is not evidence of work redone)."""
    provenance = pb.Provenance(
        cache=[
            pb.CacheLookup(artifact="decomposition", tier=pb.CACHE_TIER_L1),
            pb.CacheLookup(artifact="map", tier=pb.CACHE_TIER_L2),
            pb.CacheLookup(artifact="overlay", tier=99),
        ]
    )
    assert _core.parse_provenance(provenance).cache == {"decomposition": "l1", "map": "l2", "overlay": "unknown"}


def test_every_input_limit_of_a_model_description_is_read_from_its_own_field() -> None:
    """S105: the input spec's caps (bytes, pixels, side, positions, top-k, message, deadline) each differ
    here, so a limit read from a neighbour's field shows."""
    spec = pb.InputSpec(
        max_image_bytes=1,
        max_pixels=2,
        max_side=3,
        max_positions=4,
        max_top_k=5,
        max_message_bytes=6,
        max_deadline_s=7.5,
    )
    parsed = _core.parse_model(pb.ModelInfo(id="m", input=spec)).input
    limits = (parsed.max_image_bytes, parsed.max_pixels, parsed.max_side, parsed.max_positions, parsed.max_top_k)
    assert limits == (1, 2, 3, 4, 5) and (parsed.max_message_bytes, parsed.max_deadline_s) == (6, 7.5)


def test_a_layer_is_looked_up_by_its_exact_name() -> None:
    """S116: ``layer("conv")`` on a model with ``conv1`` is a KeyError, not conv1's shape."""
    model = _core.parse_model(pb.ModelInfo(id="m", layers=[pb.LayerInfo(name="conv1", channels=8, height=4, width=4)]))
    assert model.layer("conv1").channels == 8
    with pytest.raises(KeyError, match="no layer 'conv'"):
        model.layer("conv")


def test_a_health_answer_with_a_field_or_status_this_sdk_does_not_know_still_reads() -> None:
    """S113: an unknown length-delimited field (a newer grpc.health.v1) is skipped by its length exactly, so
    the status after it still reads; S114: a newer status 7 reads "UNKNOWN(7)", which a log can tell from the
    protocol's own UNKNOWN."""
    unknown = b"\x12\x03abc"  # field 2, wire type 2, 3 bytes
    assert _core.decode_health_response(unknown + b"\x08\x01") == "SERVING"
    assert _core.decode_health_response(unknown + b"\x08\x02" + unknown) == "NOT_SERVING"
    assert _core.decode_health_response(b"\x08\x07") == "UNKNOWN(7)"
    assert _core.decode_health_response(b"") == "UNKNOWN"


# ------------------------------------------------------------------------------------------------ clients
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_the_documented_defaults_reach_the_server(flavour: str) -> None:
    """C09-C12, C27, A13, A14, A28: explain renders an overlay by default, ierf does not (one PNG per
    position), predict asks for five classes; overlay and return_input reach the fields of their names."""
    servicer = _Recorder()
    with _serving(servicer) as address:
        _call(flavour, address, "explain", PIXELS)
        _call(flavour, address, "ierf", PIXELS, "layer1", [(0, 0)])
        _call(flavour, address, "predict", PIXELS)
        _call(flavour, address, "explain", PIXELS, overlay=False, return_input=True)
        _call(flavour, address, "ierf", PIXELS, "layer1", [(0, 0)], overlay=True, return_input=False)
    explain, ierf, predict, explain_input, ierf_overlay = servicer.requests
    assert explain.overlay is True and explain.return_input is False
    assert ierf.overlay is False and ierf.return_input is False
    assert predict.top_k == 5
    assert explain_input.overlay is False and explain_input.return_input is True
    assert ierf_overlay.overlay is True and ierf_overlay.return_input is False


def test_an_async_client_serves_many_calls_in_its_loop() -> None:
    """A02: the channel is bound to the loop of the first call; the second call in that same loop uses it
    (forgetting the loop refused every call after the first)."""
    servicer = _Recorder()

    async def calls(address: str) -> None:
        async with AsyncClient(address, timeout=10) as client:
            await client.predict(PIXELS, top_k=1)
            await client.predict(PIXELS, top_k=2)
            await asyncio.gather(client.predict(PIXELS, top_k=3), client.predict(PIXELS, top_k=3))

    with _serving(servicer) as address:
        asyncio.run(calls(address))
    assert sorted(r.top_k for r in servicer.requests) == [1, 2, 3, 3]


def test_closing_a_client_under_a_call_in_flight_says_it_was_closed() -> None:
    """C05: ``close()`` from another thread while a call waits on the server cancels it; the caller learns
    the client was closed, not a CANCELLED error it would take for the server's."""
    arrived, release = threading.Event(), threading.Event()

    class Hung(pb_grpc.ExplainServiceServicer):
        def Predict(self, request: Any, context: Any) -> Any:
            arrived.set()
            release.wait(5)
            return pb.PredictResponse()

    with _serving(Hung()) as address:
        client = Client(address, timeout=10)
        closer = threading.Thread(target=lambda: (arrived.wait(5), client.close()))
        closer.start()
        try:
            with pytest.raises(RuntimeError, match="closed during the call"):
                client.predict(PIXELS)
        finally:
            release.set()
            closer.join()


def test_leaving_a_with_block_closes_the_client() -> None:
    """C19: ``with Client(...) as client:`` closes the channel on the way out; a later call says so."""
    with Client("127.0.0.1:9", timeout=1) as client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        client.predict(PIXELS)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_wait_until_serving_waits_through_not_serving(flavour: str) -> None:
    """C15, A18: NOT_SERVING (a replica still warming up) is an answer but not the one awaited: polling
    goes on until SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    answers: list[str] = []

    class Warming(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            serving = len(answers) >= 2
            answers.append("SERVING" if serving else "NOT_SERVING")
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            return health_pb2.HealthCheckResponse(status=status)

    with _health_serving(Warming()) as address:
        _call(flavour, address, "wait_until_serving", timeout=8.0, interval_s=0.02)
    assert answers == ["NOT_SERVING", "NOT_SERVING", "SERVING"]


def _self_signed_localhost() -> tuple[bytes, bytes]:
    """A fresh key and self-signed certificate for ``localhost`` / 127.0.0.1 (PEM)."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_credentials_make_the_channel_tls(flavour: str) -> None:
    """C24, A24: with ``credentials`` the client speaks TLS (a plaintext channel to a TLS port never gets an
    answer); the token then draws no clear-text warning."""
    key_pem, cert_pem = _self_signed_localhost()
    servicer = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    server.start()
    options = {
        "timeout": 5.0,
        "credentials": grpc.ssl_channel_credentials(root_certificates=cert_pem),
        "token": "s3cret",
        "retry": RetryPolicy(max_attempts=2),
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PlaintextTokenWarning)
            _call(flavour, f"localhost:{port}", "predict", PIXELS, top_k=2, client_kwargs=options)
    finally:
        server.stop(None)
    assert [r.top_k for r in servicer.requests] == [2]


# ------------------------------------------------------------------------------------------ defect fixed
def test_a_token_to_an_address_list_reaching_another_host_is_warned_about() -> None:
    """Defect found in round 27: an ``ipv4:`` target may list several addresses, and grpc dials past the
    first one it cannot reach (shown below with a real server behind a dead first entry). The clear-text
    token check read only the first host, so ``ipv4:127.0.0.1:9000,10.20.30.40:9000`` sent the token in
    clear to a remote host without the warning; every listed address must be local for silence."""
    import socket

    for remote in ("ipv4:127.0.0.1:9000,10.20.30.40:9000", "ipv6:[::1]:9000,[2001:db8::1]:9000"):
        with pytest.warns(PlaintextTokenWarning, match="clear text"):
            Client(remote, token="s3cret").close()
    with socket.socket() as probe:  # a port nothing listens on: the list's first entry is dead
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    servicer = _Recorder()
    with _serving(servicer) as address, warnings.catch_warnings():
        warnings.simplefilter("error", PlaintextTokenWarning)
        listed = f"ipv4:127.0.0.1:{dead},{address}"
        _call("sync", listed, "predict", PIXELS, top_k=4, client_kwargs={"token": "s3cret"})
    assert [r.top_k for r in servicer.requests] == [4]

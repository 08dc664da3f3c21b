"""SDK pieces that need no server, plus the generated stubs' freshness and the SDK's dependencies."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from ierf.serving.errors import InvalidArgument
from ierf.serving.jobs import LayerShape, ModelDescription, check_ierf_args, check_top_k
from ierf_client import _core
from ierf_client._core import RetryPolicy, image_message
from ierf_proto.v1 import explainer_pb2 as pb
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sdk_imports_no_server_side_packages() -> None:
    code = (
        "import sys, ierf_client, ierf_client.aio\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'redis', 'ierf', 'safetensors') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_sdk_declares_only_its_four_dependencies() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"])
    assert names == ["grpcio", "numpy", "pillow", "protobuf"]


def test_images_travel_as_file_bytes_raw_tensors_or_png(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    assert image_message(path).encoded == path.read_bytes()
    assert image_message(str(path)).encoded == path.read_bytes()
    assert image_message(b"abc").encoded == b"abc"
    tensor = image_message(pixels).tensor
    assert (tensor.dtype, list(tensor.shape), tensor.data) == (pb.DATA_TYPE_UINT8, [5, 7, 3], pixels.tobytes())
    assert image_message(pixels.astype(np.float32) / 255).tensor.dtype == pb.DATA_TYPE_FLOAT32
    png = image_message(Image.fromarray(pixels)).encoded
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    with pytest.raises(TypeError, match="dtype"):
        image_message(pixels.astype(np.int32))
    with pytest.raises(TypeError, match="unsupported image type"):
        image_message([1, 2, 3])  # type: ignore[arg-type]


def test_large_arrays_go_as_lossless_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", 100)
    pixels = np.random.default_rng(1).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    encoded = image_message(pixels).encoded
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), pixels)


@pytest.mark.parametrize("shape", [(10, 10, 3), (10, 10, 1), (10, 10)])
def test_an_array_reaches_the_same_pixels_whatever_its_size(monkeypatch: pytest.MonkeyPatch, shape) -> None:
    """Small arrays travel raw, large ones as PNG: the server must see the same canonical image."""
    from ierf.serving.convert import decode_image
    from ierf.serving.images import ImageLimits

    pixels = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    raw = image_message(pixels)
    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", 10)
    png = image_message(pixels)
    assert raw.WhichOneof("source") == "tensor" and png.WhichOneof("source") == "encoded"
    limits = ImageLimits()
    assert decode_image(raw, limits).content_hash == decode_image(png, limits).content_hash


@pytest.mark.parametrize("shape", [(8, 8, 5), (8, 8, 2), (3, 8, 8, 3), (8,)])
def test_an_array_of_the_wrong_shape_fails_before_upload_whatever_its_size(
    monkeypatch: pytest.MonkeyPatch, shape
) -> None:
    pixels = np.zeros(shape, np.uint8)
    with pytest.raises(ValueError, match=r"not \(H, W, 3\)"):
        image_message(pixels)
    monkeypatch.setattr(_core, "RAW_TENSOR_LIMIT_BYTES", 10)
    with pytest.raises(ValueError, match=r"not \(H, W, 3\)"):
        image_message(pixels)


def test_big_endian_float_arrays_travel_little_endian() -> None:
    values = np.linspace(0, 1, 12, dtype=">f4").reshape(2, 2, 3)
    tensor = image_message(values).tensor
    assert tensor.dtype == pb.DATA_TYPE_FLOAT32
    np.testing.assert_array_equal(np.frombuffer(tensor.data, "<f4").reshape(2, 2, 3), values)


def test_retry_policy_and_timeouts_are_validated() -> None:
    from ierf_client import AsyncClient, Client

    for bad in ({"max_attempts": 0}, {"max_attempts": 1.5}, {"initial_backoff_s": -1}, {"multiplier": 0.5}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    for timeout in (None, 0, -1, float("inf"), "5"):
        for client_class in (Client, AsyncClient):
            with pytest.raises(ValueError, match="timeout must be a positive number"):
                client_class("127.0.0.1:1", timeout=timeout)  # type: ignore[arg-type]


def test_sync_and_async_clients_offer_the_same_calls() -> None:
    from ierf_client import AsyncClient, Client

    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    assert public(Client) == public(AsyncClient)


@pytest.mark.parametrize("service", ["", "ierf.v1.ExplainService", "x" * 200])
def test_health_codec_matches_the_official_messages(service: str) -> None:
    from grpc_health.v1 import health_pb2

    assert _core.encode_health_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    for status in (0, 1, 2, 3):
        data = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert _core.decode_health_response(data) == health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_retry_policy_retries_unavailable_only_with_capped_backoff() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5)
    assert policy.retryable(grpc.StatusCode.UNAVAILABLE)
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    ):
        assert not policy.retryable(code)
    assert all(0 <= policy.backoff(a) <= 0.5 for a in range(10) for _ in range(20))


def test_explain_request_carries_target_and_contrast() -> None:
    pixels = np.zeros((4, 4, 3), np.uint8)
    request = _core.explain_request(pixels, 7, "m", "srd", 3, "float16", False, True)
    assert request.HasField("target") and request.target == 7 and request.contrast_class == 3
    assert request.map_dtype == pb.DATA_TYPE_FLOAT16 and request.return_input
    request = _core.explain_request(pixels, None, "", "srd", "mean", "float32", True, False)
    assert not request.HasField("target") and request.contrast == "mean"
    with pytest.raises(ValueError, match="map_dtype"):
        _core.explain_request(pixels, None, "", "srd", "identity", "uint8", True, False)
    with pytest.raises(ValueError, match="pairs"):
        _core.ierf_request(pixels, "l", [(1, 2, 3)], "", "float32", False, False)


def test_tensor_round_trip_little_endian() -> None:
    from ierf.serving.convert import tensor_message

    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(
        _core.tensor_array(tensor_message(values, np.float32), "map", _core.MAP_DTYPES, 2), values
    )
    half = _core.tensor_array(tensor_message(values, np.float16), "map", _core.MAP_DTYPES, 2)
    assert half.dtype == np.float16 and np.allclose(half, values, atol=1e-3)


def test_application_and_token_travel_as_metadata() -> None:
    """Against a real loopback gRPC server: Serve's proxy routes by ``application`` when a cluster runs
    several apps; the bearer token goes with every call."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ierf_client import AsyncClient, Client

    seen: list[dict[str, str]] = []

    class Recorder(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            seen.append(dict(context.invocation_metadata()))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server, port = _started_health_server(Recorder())
    try:
        with Client(f"127.0.0.1:{port}", timeout=5, token="t0k", application="ierf-blue") as client:
            assert client.health() == "SERVING"
        with Client(f"127.0.0.1:{port}", timeout=5) as client:
            assert client.health() == "SERVING"

        async def probe() -> str:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=5, application="ierf-green") as client:
                return await client.health()

        assert asyncio.run(probe()) == "SERVING"
    finally:
        server.stop(None)
    assert [m.get("application") for m in seen] == ["ierf-blue", None, "ierf-green"]
    # The token goes with health probes too: a gateway that checks it must let them through.
    assert [m.get("authorization") for m in seen] == ["Bearer t0k", None, None]
    assert all(0 < int(m["ierf-timeout-ms"]) <= 5000 for m in seen)
    assert _core.call_metadata("t0k", 1.0, "ierf-blue") == [
        ("ierf-timeout-ms", "1000"),
        ("authorization", "Bearer t0k"),
        ("application", "ierf-blue"),
    ]


def _health_server_after(port: int, delay_s: float):
    """A real gRPC health server that starts listening on ``port`` only after ``delay_s``."""
    import threading
    from concurrent import futures

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    class Serving(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Serving(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    timer = threading.Timer(delay_s, server.start)
    timer.start()
    return server, timer


def _started_health_server(servicer: Any, workers: int = 2) -> tuple[Any, int]:
    """A real loopback gRPC server running ``servicer`` as grpc.health.v1.Health; returns it and its port."""
    from concurrent import futures

    from grpc_health.v1 import health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_the_default_policy_retries_through_a_server_restart() -> None:
    """The server comes (back) up 1.5 s into the call: retrying UNAVAILABLE until the call's deadline
    gets through; a fixed small number of attempts would have given up in well under a second."""
    import asyncio
    import time

    from ierf.serving.local import free_port
    from ierf_client import AsyncClient, Client, UnavailableError

    port = free_port()
    with Client(f"127.0.0.1:{port}", timeout=1, retry=RetryPolicy(max_attempts=2)) as client:
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            client.health()
        assert time.monotonic() - start < 0.9

    server, timer = _health_server_after(port, 1.5)
    try:
        with Client(f"127.0.0.1:{port}", timeout=20) as client:
            start = time.monotonic()
            assert client.health() == "SERVING"
            assert time.monotonic() - start >= 1.4
    finally:
        timer.cancel()
        server.stop(None)

    port = free_port()
    server, timer = _health_server_after(port, 1.5)

    async def wait() -> str:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=20) as client:
            return await client.health()

    try:
        assert asyncio.run(wait()) == "SERVING"
    finally:
        timer.cancel()
        server.stop(None)


def test_a_dead_address_fails_within_the_budget() -> None:
    """Retries stop once the next backoff would pass the deadline: never later than the budget."""
    import time

    from ierf.serving.local import free_port
    from ierf_client import Client, IerfError

    with Client(f"127.0.0.1:{free_port()}", timeout=1.0) as client:
        start = time.monotonic()
        with pytest.raises(IerfError) as info:
            client.health()
        elapsed = time.monotonic() - start
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # ... and it uses the budget: the last pause is shortened so one more attempt fits, rather than
    # giving up as soon as a full random backoff would not.
    assert 0.9 <= elapsed < 1.5


def test_the_channel_keeps_reconnecting_every_few_seconds() -> None:
    """gRPC's own reconnect backoff (1 s growing by 1.6x to 120 s) fails every call at once while it
    waits, so a server back after a long outage went unnoticed for tens of seconds. Count the
    connection attempts a dead-on-arrival server sees in 6 s: gRPC's defaults make at most 5."""
    import socket
    import threading

    from ierf_client import Client, IerfError

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    accepted = 0
    stop = threading.Event()

    def accept_and_hang_up() -> None:
        nonlocal accepted
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted += 1
            conn.close()

    thread = threading.Thread(target=accept_and_hang_up, daemon=True)
    thread.start()
    try:
        with Client(f"127.0.0.1:{listener.getsockname()[1]}", timeout=6.0) as client, pytest.raises(IerfError):
            client.health()
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert accepted >= 6, accepted


def test_an_async_client_made_outside_the_loop_works_inside_it() -> None:
    """grpc.aio channels belong to the loop that made them: the client opens its channel on first use."""
    import asyncio

    from ierf.serving.local import free_port
    from ierf_client import AsyncClient

    port = free_port()
    server, timer = _health_server_after(port, 0.0)
    client = AsyncClient(f"127.0.0.1:{port}", timeout=10)  # no running loop here

    async def use() -> str:
        try:
            return await client.health()
        finally:
            await client.close()

    async def after_close() -> str:
        return await client.health()

    try:
        timer.join()
        assert asyncio.run(use()) == "SERVING"
        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(after_close())
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:9000",
        "[::1]:9000",
        "dns:///svc:9000",
        "dns://8.8.8.8:53/svc:9000",
        "dns:///[::1]:9000",
        "unix:/tmp/s",
    ],
)
def test_addresses_grpc_reads_are_accepted(address: str) -> None:
    from ierf_client import AsyncClient, Client

    Client(address).close()
    assert AsyncClient(address).address == address


@pytest.mark.parametrize(
    "address", ["localhost", "ierf.example.com", "::1", "dns:///svc", "dns://8.8.8.8:53/svc", "dns:///[::1]", "dns:svc"]
)
def test_an_address_without_a_port_needs_credentials(address: str) -> None:
    """grpc dials 443 without a port: right for TLS, never the plaintext service (9000), where it only
    timed out."""
    import grpc
    from ierf_client import AsyncClient, Client

    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError, match=r"has no port: grpc would dial 443 \(TLS\) without credentials"):
            cls(address)
    credentials = grpc.ssl_channel_credentials()
    Client(address, credentials=credentials).close()
    assert AsyncClient(address, credentials=credentials).address == address


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("http://127.0.0.1:9000", r"URL scheme \(http://\)"),
        ("grpc://svc:9000", r"URL scheme \(grpc://\)"),
        ("localhost:abc", "no numeric port"),
        ("127.0.0.1:", "no numeric port"),
        ("", "must be 'host:port'"),
        ("  ", "must be 'host:port'"),
        ("127.0.0.1:99999", "outside 1..65535"),  # grpc dialled 99999 modulo 65536
        (":9000", "has no host"),  # grpc retried an empty host until the timeout
        ("127.0.0.1:0", "outside 1..65535"),
        (" 127.0.0.1:9000", "white space"),
    ],
)
def test_addresses_that_can_never_connect_are_refused_at_once(address: str, message: str) -> None:
    """They were retried as an unreachable server until the whole budget (60 s by default) was spent."""
    from ierf_client import AsyncClient, Client

    for cls in (Client, AsyncClient):
        with pytest.raises(ValueError, match=message):
            cls(address)


def test_targets_and_positions_are_integers_not_truncated_floats() -> None:
    """3.7 explained class 3 and True class 1; (1.9, 2.2) became the PFV (1, 2)."""
    pixels = np.zeros((4, 4, 3), np.uint8)

    def explain(target: object) -> pb.ExplainRequest:
        return _core.explain_request(pixels, target, "", "srd", "identity", "float32", False, False)

    def ierf(positions: object) -> pb.ComputeIERFRequest:
        return _core.ierf_request(pixels, "layer", positions, "", "float32", False, False)

    assert explain(np.int64(967)).target == 967
    for bad in (3.7, True, np.float32(3), "967"):
        with pytest.raises(TypeError, match="target must be an integer"):
            explain(bad)
    requested = ierf(np.array([[1, 2], [3, 4]]))
    assert [(p.row, p.col) for p in requested.positions] == [(1, 2), (3, 4)]
    for bad, message in [
        ([(1.9, 2.2)], "row must be an integer"),
        ([(True, False)], "row must be an integer"),
        ((3, 4), "one pair alone"),
        ("3,4", "list of \\(row, col\\) integer pairs"),
        (None, "list of \\(row, col\\) integer pairs"),
    ]:
        with pytest.raises(TypeError, match=message):
            ierf(bad)
    with pytest.raises(ValueError, match="of length 3"):
        ierf([(1, 2, 3)])


def test_arguments_are_checked_by_name_before_the_image_is_encoded() -> None:
    """protobuf's own errors ("Value out of range: 2147483648", "bad argument type for built-in operation")
    named no argument; a contrast class given as a string reached the server as a contrast mode."""
    pixels = np.zeros((4, 4, 3), np.uint8)

    def explain(**kwargs: object) -> pb.ExplainRequest:
        args = {"target": None, "model": "", "method": "srd", "contrast": "identity"} | kwargs
        return _core.explain_request(
            pixels, args["target"], args["model"], args["method"], args["contrast"], "float32", False, False
        )

    with pytest.raises(ValueError, match="target 2147483648 is out of range"):
        explain(target=2**31)
    with pytest.raises(ValueError, match="a position's row 1099511627776 is out of range"):
        _core.ierf_request(pixels, "layer", [(2**40, 0)], "", "float32", False, False)
    with pytest.raises(TypeError, match="layer must be a string"):
        _core.ierf_request(pixels, 5, [(0, 0)], "", "float32", False, False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a string"):
        explain(model=5)
    for top_k, error, message in [(1.5, TypeError, "top_k must be an integer"), (0, ValueError, "top_k must be >= 1")]:
        with pytest.raises(error, match=message):
            _core.predict_request(pixels, top_k, "")  # type: ignore[arg-type]
    assert explain(contrast="MEAN").contrast == "mean" and explain(contrast=np.int64(5)).contrast_class == 5
    with pytest.raises(TypeError, match="as an integer, not a string"):
        explain(contrast="5")
    for bad in (None, "median", 2.0):
        with pytest.raises(ValueError, match="contrast must be 'identity', 'mean' or a class index"):
            explain(contrast=bad)
    with pytest.raises(TypeError, match="contrast"):  # checked before the image: a bad image is not read
        _core.explain_request(object(), None, "", "srd", "5", "float32", False, False)  # type: ignore[arg-type]


def test_client_options_are_checked_in_the_constructor() -> None:
    """retry=3 was accepted and failed with AttributeError at the first outage; a token with a newline
    failed every call with INTERNAL "Invalid metadata"."""
    from ierf_client import AsyncClient, Client

    for cls in (Client, AsyncClient):
        with pytest.raises(TypeError, match="retry must be a RetryPolicy"):
            cls("127.0.0.1:1", retry=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="printable ASCII"):
            cls("127.0.0.1:1", token="abc\n")


def test_model_info_parses_dtype_names_and_limits() -> None:
    spec = pb.InputSpec(tensor_dtypes=[pb.DATA_TYPE_UINT8, pb.DATA_TYPE_FLOAT32], max_positions=64, max_deadline_s=120)
    info = _core.parse_model(pb.ModelInfo(id="m", input=spec))
    assert info.input.tensor_dtypes == ["uint8", "float32"]  # the names a caller passes, not the enum's
    assert info.input.max_positions == 64 and info.input.max_deadline_s == 120.0


def test_an_overload_is_retried_after_the_servers_pause_and_a_cap_is_not() -> None:
    """RESOURCE_EXHAUSTED means "too big" as well as "overloaded": only the server's trailer tells them apart."""

    class Refusal(grpc.RpcError):
        def __init__(self, trailers: list[tuple[str, str]], text: str = "service overloaded, retry later") -> None:
            self.trailers, self.text = trailers, text

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return self.text

        def trailing_metadata(self) -> list[tuple[str, str]]:
            return self.trailers

    overloaded = Refusal([("request_id", "x"), (_core.RETRY_AFTER_KEY, "250")])
    assert _core.server_pause_s(overloaded) == 0.25
    for bad in ([], [(_core.RETRY_AFTER_KEY, "-1")], [(_core.RETRY_AFTER_KEY, "soon")]):
        assert _core.server_pause_s(Refusal(bad)) is None
    exhausted, later = grpc.StatusCode.RESOURCE_EXHAUSTED, time.monotonic() + 10
    policy = RetryPolicy(initial_backoff_s=0.0)
    assert _core.retry_pause(policy, exhausted, 1, later, 0.25) == 0.25  # at least the server's pause
    assert _core.retry_pause(policy, exhausted, 1, later, None) is None  # a cap: the same refusal again
    assert _core.retry_pause(RetryPolicy(retry_overload=False), exhausted, 1, later, 0.25) is None
    assert _core.retry_pause(policy, exhausted, 1, time.monotonic() + 0.2, 0.25) is None  # no time to wait it
    error = _core.error_from_rpc(overloaded)
    assert isinstance(error, _core.ResourceExhaustedError) and error.retry_after_s == 0.25
    # Serve's proxy refuses for a full ingress queue itself, without the trailer: an overload all the same
    proxy = Refusal([], "Request dropped due to backpressure (num_queued_requests=8, max_queued_requests=8).")
    assert _core.server_pause_s(proxy) == 0.0 and _core.error_from_rpc(proxy).retry_after_s == 0.0
    assert _core.retry_pause(RetryPolicy(initial_backoff_s=0.1), exhausted, 1, later, 0.0) is not None


def test_a_closed_client_says_so() -> None:
    from ierf_client import Client

    client = Client("127.0.0.1:1")
    client.close()
    with pytest.raises(RuntimeError, match="this Client is closed"):
        client.health()


def test_errors_survive_pickling_so_they_cross_a_process_pool() -> None:
    """They could not be unpickled: a server error in a ProcessPoolExecutor job broke the whole pool."""
    import pickle

    import grpc
    from ierf_client import IerfError, InvalidArgumentError

    for error in (
        InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, "target 5000 is out of range"),
        IerfError(grpc.StatusCode.INTERNAL, "boom"),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.code == error.code and copy.details == error.details
        assert str(copy) == str(error)


def test_results_holding_arrays_compare_by_identity() -> None:
    """== raised "truth value of an array is ambiguous" and hash() a TypeError."""
    result = _core.IERFResult(np.zeros((1, 2, 2), np.float32), None, None)  # type: ignore[arg-type]
    assert result == result and result != _core.IERFResult(result.maps, None, None)  # type: ignore[arg-type]
    assert hash(result) == hash(result)


def test_an_ierf_overlay_index_out_of_range_is_an_index_error() -> None:
    """It said "call with overlay=True" to a caller who had."""
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, "PNG")
    result = _core.IERFResult(np.zeros((1, 2, 2), np.float32), None, None, overlay_pngs=[buffer.getvalue()])  # type: ignore[arg-type]
    assert result.overlay(0).size == (2, 2) and result.overlay(-1).size == (2, 2)
    with pytest.raises(IndexError, match="overlay index 5 is out of range: 1 overlays"):
        result.overlay(5)
    with pytest.raises(ValueError, match="call with overlay=True"):
        _core.IERFResult(np.zeros((1, 2, 2), np.float32), None, None).overlay()  # type: ignore[arg-type]


def test_a_reused_activation_is_named_by_its_runs_at_the_ingress_as_in_the_engine() -> None:
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.jobs import LayerShape, ModelDescription, check_ierf_args

    layers = [LayerShape(f"layer1.0.relu:{i}", 64, 56, 56) for i in range(3)]
    desc = ModelDescription("m", "d", 224, 224, "v1", ["a"], layers, ["srd"], "srd", "cpu")
    with pytest.raises(InvalidArgument, match=r"runs 3 times .* name one run, layer1.0.relu:0, layer1.0.relu:1, "):
        check_ierf_args(desc, "layer1.0.relu", np.array([[0, 0]]))
    with pytest.raises(InvalidArgument, match="unknown layer 'layer9'"):
        check_ierf_args(desc, "layer9", np.array([[0, 0]]))


def test_only_unavailable_is_retried_by_code() -> None:
    """A DEADLINE_EXCEEDED ("needs about N s") or any other refusal repeats identically: only UNAVAILABLE is
    retried by its code (overloads are retried by their server-sent pause, tested above)."""
    policy = RetryPolicy()
    for code in grpc.StatusCode:
        assert policy.retryable(code) == (code is grpc.StatusCode.UNAVAILABLE), code
    assert _core.retry_pause(policy, grpc.StatusCode.DEADLINE_EXCEEDED, 1, time.monotonic() + 60) is None


def test_backoff_grows_exponentially_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarting server is not hammered at the first pause: the jitter's ceiling doubles up to its cap."""
    monkeypatch.setattr(_core.random, "uniform", lambda low, high: high)
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2.0)
    assert [round(policy.backoff(attempt), 6) for attempt in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]


def _explain_server(first_s: float = 0.0, map_bytes: int = 0) -> tuple[Any, str, list[float | None]]:
    """A loopback server whose Explain answers a ``map_bytes`` float32 map, or else refuses its first call
    with UNAVAILABLE after ``first_s`` and hangs on later ones. Returns the server, its address and, per
    call, the time the server saw left before the caller's deadline."""
    import threading
    from concurrent import futures

    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    remaining: list[float | None] = []

    class Explainer(pb_grpc.ExplainServiceServicer):
        def Explain(self, request, context):
            remaining.append(context.time_remaining())
            if map_bytes:
                n = map_bytes // 4
                return pb.ExplainResponse(map=pb.Tensor(data=bytes(4 * n), dtype=pb.DATA_TYPE_FLOAT32, shape=[1, n]))
            if len(remaining) == 1:
                time.sleep(first_s)
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            threading.Event().wait(5)  # past every budget below: the caller's deadline ends the call
            context.abort(grpc.StatusCode.INTERNAL, "should have been cancelled")

    send_limit = [("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=send_limit)
    pb_grpc.add_ExplainServiceServicer_to_server(Explainer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", remaining


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_retry_gets_only_the_budget_that_is_left(flavour: str) -> None:
    """``timeout`` bounds the whole call: after an UNAVAILABLE at 0.7 s of 1 s, the retry gets the 0.3 s
    left, not a fresh second."""
    import asyncio

    from ierf_client import AsyncClient, Client, DeadlineExceededError

    pixels = np.zeros((4, 4, 3), np.uint8)
    server, address, remaining = _explain_server(first_s=0.7)
    try:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            if flavour == "sync":
                with Client(address, timeout=1.0) as client:
                    client.explain(pixels, overlay=False)
            else:

                async def call() -> None:
                    async with AsyncClient(address, timeout=1.0) as client:
                        await client.explain(pixels, overlay=False)

                asyncio.run(call())
        elapsed = time.monotonic() - start
    finally:
        server.stop(None)
    assert len(remaining) == 2
    assert remaining[1] is not None and remaining[1] < 0.5
    assert elapsed < 1.5


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_retry_tells_the_server_only_the_budget_that_is_left(flavour: str) -> None:
    """Guards against the ``ierf-timeout-ms`` metadata of a retry carrying the whole budget instead of what
    is left: Serve does not forward grpc-timeout, so the server would keep computing for a caller that has
    already given up. After an UNAVAILABLE at 0.6 s of 1.5 s, the retry must announce under 0.9 s."""
    import asyncio
    from concurrent import futures

    from ierf_client import AsyncClient, Client
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    announced: list[int] = []

    class Explainer(pb_grpc.ExplainServiceServicer):
        def Explain(self, request, context):
            announced.append(int(dict(context.invocation_metadata())[_core.TIMEOUT_METADATA_KEY]))
            if len(announced) == 1:
                time.sleep(0.6)
                context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            return pb.ExplainResponse(map=pb.Tensor(data=bytes(4), dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 1]))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(Explainer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    pixels = np.zeros((4, 4, 3), np.uint8)
    try:
        if flavour == "sync":
            with Client(address, timeout=1.5) as client:
                result = client.explain(pixels, overlay=False)
        else:

            async def call() -> Any:
                async with AsyncClient(address, timeout=1.5) as client:
                    return await client.explain(pixels, overlay=False)

            result = asyncio.run(call())
    finally:
        server.stop(None)
    assert result.map.shape == (1, 1)
    assert len(announced) == 2
    assert 1200 < announced[0] <= 1500 and 0 < announced[1] < 900


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_max_attempts_is_the_number_of_calls_made(flavour: str) -> None:
    """Guards against an off-by-one in ``RetryPolicy.gives_up``: ``max_attempts=3`` against a server that
    always answers UNAVAILABLE makes exactly three calls, not four, well inside the call's budget."""
    import asyncio

    from grpc_health.v1 import health_pb2_grpc
    from ierf_client import AsyncClient, Client, UnavailableError

    calls: list[float] = []

    class Down(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            calls.append(time.monotonic())
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    server, port = _started_health_server(Down())
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.01)
    try:
        with pytest.raises(UnavailableError):
            if flavour == "sync":
                with Client(f"127.0.0.1:{port}", timeout=10, retry=policy) as client:
                    client.health()
            else:

                async def probe() -> None:
                    async with AsyncClient(f"127.0.0.1:{port}", timeout=10, retry=policy) as client:
                        await client.health()

                asyncio.run(probe())
    finally:
        server.stop(None)
    assert len(calls) == 3
    assert _core.retry_pause(policy, grpc.StatusCode.UNAVAILABLE, 2, time.monotonic() + 10) is not None
    assert _core.retry_pause(policy, grpc.StatusCode.UNAVAILABLE, 3, time.monotonic() + 10) is None


def test_responses_past_grpcs_4_mib_default_are_received() -> None:
    """gRPC refuses messages over 4 MiB by default; a 64-position float32 ComputeIERF is 12 MiB, so the SDK
    raises its receive limit."""
    from ierf_client import Client

    server, address, _ = _explain_server(map_bytes=6 << 20)
    try:
        with Client(address, timeout=10) as client:
            result = client.explain(np.zeros((4, 4, 3), np.uint8), overlay=False)
    finally:
        server.stop(None)
    assert result.map.nbytes == 6 << 20


def _description(layers: list[LayerShape], classes: int = 3) -> ModelDescription:
    return ModelDescription("m", "d", 224, 160, "v1", [f"c{i}" for i in range(classes)], layers, ["srd"], "srd", "cpu")


def test_ierf_positions_are_checked_against_the_rows_and_columns_of_a_non_square_grid() -> None:
    """A non-square input gives a non-square PFV grid: rows run to its height and columns to its width,
    so a valid column past the height must pass and a column past the width must not."""
    desc = _description([LayerShape("layer4", 512, 2, 5)])
    assert check_ierf_args(desc, "layer4", np.array([[1, 4], [0, 2]])).name == "layer4"
    with pytest.raises(InvalidArgument, match=r"position \(0, 5\) is outside the 2x5 PFV grid .* cols 0\.\.4"):
        check_ierf_args(desc, "layer4", np.array([[0, 5]]))
    with pytest.raises(InvalidArgument, match=r"position \(2, 0\) is outside the 2x5 PFV grid .*rows 0\.\.1"):
        check_ierf_args(desc, "layer4", np.array([[2, 0]]))


def test_top_k_0_asks_for_the_documented_five() -> None:
    """PredictRequest.top_k 0 (unset) means 5 classes: a default of one class would silently answer less."""
    assert check_top_k(_description([], classes=10), 0) == 5


def test_an_ierf_request_without_positions_is_refused_before_any_work() -> None:
    """An empty position list asks for nothing: refused by the checks the ingress and the worker run first,
    not after a decomposition is computed for it."""
    with pytest.raises(InvalidArgument, match="no positions given"):
        check_ierf_args(_description([LayerShape("layer4", 512, 2, 5)]), "layer4", np.zeros((0, 2), np.int64))


def test_a_baseline_refuses_a_contrast_class_it_would_ignore() -> None:
    """Contrasts are an SRD option: a baseline asked to subtract a class would answer the plain map, which
    the caller would take for the contrast it asked for."""
    from ierf.serving.jobs import check_explain_args

    desc = ModelDescription("m", "d", 224, 224, "v1", ["a", "b", "c"], [], ["srd", "gradcam"], "srd", "cpu")
    check_explain_args(desc, "srd", 1, 2)
    for contrast in (2, "mean"):
        with pytest.raises(InvalidArgument, match="contrast is an SRD option; method 'gradcam'"):
            check_explain_args(desc, "gradcam", 1, contrast)


def test_top_k_may_ask_for_every_class() -> None:
    """top_k runs 1..classes inclusive: asking for the whole ranking is a valid request."""
    desc = _description([], classes=3)
    assert check_top_k(desc, 3) == 3
    with pytest.raises(InvalidArgument, match=r"top_k 4 is out of range: 1\.\.3"):
        check_top_k(desc, 4)


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_wait_until_serving_gives_up_at_its_own_timeout_against_a_hung_server(flavour: str) -> None:
    """Each health probe gets at most what is left of ``wait_until_serving``'s timeout: a fixed 5 s probe
    made ``wait_until_serving(timeout=1)`` against a server that accepts calls but never answers take 5 s."""
    import asyncio
    import threading

    from grpc_health.v1 import health_pb2_grpc
    from ierf_client import AsyncClient, Client

    release = threading.Event()

    class Hung(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            release.wait(30)
            context.abort(grpc.StatusCode.UNAVAILABLE, "released")

    server, port = _started_health_server(Hung(), workers=8)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"not SERVING after 1\.0 s"):
            if flavour == "sync":
                with Client(f"127.0.0.1:{port}", timeout=30) as client:
                    client.wait_until_serving(timeout=1.0, interval_s=0.05)
            else:

                async def wait() -> None:
                    async with AsyncClient(f"127.0.0.1:{port}", timeout=30) as client:
                        await client.wait_until_serving(timeout=1.0, interval_s=0.05)

                asyncio.run(wait())
        elapsed = time.monotonic() - start
    finally:
        release.set()
        server.stop(None)
    assert elapsed < 3.0


def test_an_async_client_refuses_a_second_event_loop_by_name() -> None:
    """A grpc.aio channel belongs to the loop that made it: used from another loop it fails obscurely (or
    hangs), so the client says what to do instead."""
    import asyncio

    from ierf.serving.local import free_port
    from ierf_client import AsyncClient

    port = free_port()
    server, timer = _health_server_after(port, 0.0)
    client = AsyncClient(f"127.0.0.1:{port}", timeout=5)

    async def probe() -> str:
        return await client.health()

    try:
        timer.join()
        assert asyncio.run(probe()) == "SERVING"
        with pytest.raises(RuntimeError, match="use one AsyncClient per event loop"):
            asyncio.run(probe())
    finally:
        server.stop(None)


def test_timings_of_a_stage_met_twice_are_summed() -> None:
    """The proto sends one entry per run of a stage (preprocess: crop then normalise; encode: worker then
    ingress); the SDK documents their sum, and keeping only the last run under-reports the stage."""
    provenance = pb.Provenance(
        timings=[
            pb.StageTiming(stage="preprocess", seconds=0.25),
            pb.StageTiming(stage="forward", seconds=1.0),
            pb.StageTiming(stage="preprocess", seconds=0.5),
        ]
    )
    assert _core.parse_provenance(provenance).timings == {"preprocess": 0.75, "forward": 1.0}


def test_result_maps_are_writable_arrays() -> None:
    """Maps are parsed from the response's immutable bytes: without a copy, ``result.map[mask] = 0`` raised
    "assignment destination is read-only" in the caller's code."""
    from ierf.serving.convert import tensor_message

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = pb.ExplainResponse(map=tensor_message(values, np.float32))
    result = _core.parse_explanation(response)
    result.map[0, 0] = -1.0
    assert result.map.flags.writeable and result.map[0, 0] == -1.0


def test_health_asks_about_the_service_it_is_given() -> None:
    """``health("ierf.v1.ExplainService")`` must ask about that service, not the server as a whole: a
    service marked NOT_SERVING while the server is up read as SERVING."""

    from grpc_health.v1 import health, health_pb2
    from ierf_client import Client

    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(_core.SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    server, port = _started_health_server(servicer)
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client:
            assert client.health() == "SERVING"
            assert client.health(_core.SERVICE) == "NOT_SERVING"
    finally:
        server.stop(None)

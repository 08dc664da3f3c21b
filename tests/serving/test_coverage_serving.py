"""Refusals and branches of the serving package and the Python SDK that no other test reached.

A line-coverage run of the suite found them never executed: an untested refusal can itself be broken (a
NameError in its f-string, a wrong gRPC status, a message naming the wrong thing, a branch shadowed by an
earlier check), and a public SDK method no test calls (``AsyncClient.model``) may not work at all. Each test
reaches one of them through real parts (loopback gRPC servers, real protobuf bytes, real Redis, Serve's local
testing mode with a randomly initialised ResNet18, the real decoders) and checks the exception type or status
and the key words of what it says. Where a worker that hangs is needed, the ingress is given the fake Serve
handles the ingress tests use (``serving.fakes``): a real worker answers ``describe`` at once.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from serving.fakes import Method

# ----------------------------------------------------------------------------- SDK: health parser


def _health_bytes(status: int) -> bytes:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckResponse(status=status).SerializeToString()


def _with_unknown_fields(status: int, extra: bytes) -> bytes:
    """A HealthCheckResponse carrying fields of a newer schema: parsed and written again by real protobuf,
    which keeps unknown fields, so the bytes are what a real server of that schema would send."""
    from grpc_health.v1 import health_pb2

    message = health_pb2.HealthCheckResponse.FromString(extra + _health_bytes(status))
    return message.SerializeToString()


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        (b"\x10\xac\x02", "an unknown varint field, two bytes long"),
        (b"\x1a\x03abc", "an unknown length-delimited field"),
        (b"\x21" + bytes(range(8)), "an unknown fixed64 field"),
        (b"\x2d" + bytes(range(4)), "an unknown fixed32 field"),
    ],
)
def test_the_health_parser_skips_the_fields_a_newer_schema_adds_as_protobuf_does(extra: bytes, what: str) -> None:
    """The SDK decodes grpc.health.v1 by hand; protobuf's rule is that unknown fields of any wire type are
    skipped. Fixed32/fixed64 fields (wire types 5 and 1) were refused ("unexpected wire type"), so a health
    server sending one would have made every ``health()`` fail."""
    from grpc_health.v1 import health_pb2
    from ierf_client._core import decode_health_response

    for status, name in [(1, "SERVING"), (2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN")]:
        data = _with_unknown_fields(status, extra)
        assert health_pb2.HealthCheckResponse.FromString(data).status == status  # real protobuf reads it
        assert decode_health_response(data) == name, what


def test_the_health_parser_reads_a_status_it_does_not_know_by_its_number() -> None:
    from ierf_client._core import decode_health_response

    assert decode_health_response(b"\x08\xac\x02") == "UNKNOWN(300)"  # a two-byte varint: 300
    assert decode_health_response(b"") == "UNKNOWN"  # status 0 is not written on the wire


def test_the_health_parser_refuses_a_group_which_proto3_cannot_send() -> None:
    """Groups (wire types 3/4) exist only in proto2; grpc.health.v1 is proto3, so a group is refused (real
    protobuf would skip it: the one case where the two differ)."""
    from ierf_client._core import decode_health_response

    with pytest.raises(ValueError, match=r"^unexpected wire type in HealthCheckResponse$"):
        decode_health_response(b"\x1b\x1c" + _health_bytes(1))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_health_bytes(1) + b"\x08\x80", "truncated varint"),  # a continuation bit, then nothing
        (b"\x08" + b"\xff" * 10 + b"\x01", "truncated varint"),  # longer than 64 bits
        (b"\x1f" + _health_bytes(1), "unexpected wire type"),  # wire type 7 does not exist
        (_health_bytes(1) + b"\x1a\x09ab", "truncated field"),  # 9 bytes announced, 2 there
        (_health_bytes(1) + b"\x21\x00\x00", "truncated field"),  # a fixed64 cut short
    ],
)
def test_malformed_health_bytes_are_refused_with_what_is_wrong(data: bytes, message: str) -> None:
    """Each of these is refused by real protobuf too; a truncated length-delimited field used to be taken
    as a whole message."""
    from google.protobuf.message import DecodeError
    from grpc_health.v1 import health_pb2
    from ierf_client._core import decode_health_response

    with pytest.raises(DecodeError):
        health_pb2.HealthCheckResponse.FromString(data)
    with pytest.raises(ValueError, match=f"^{message} in HealthCheckResponse$"):
        decode_health_response(data)


def _raw_health_server(answer: bytes) -> tuple[grpc.Server, int]:
    """A real gRPC server whose grpc.health.v1 Check answers ``answer`` as the response bytes, whatever they are."""

    def check(request: bytes, context: Any) -> bytes:
        return answer

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(check)},  # no (de)serializers: bytes as they are
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_a_health_answer_the_sdk_cannot_read_reaches_the_caller_as_an_internal_error() -> None:
    """Over the wire: the parser's ValueError becomes grpc's INTERNAL "Exception deserializing response!",
    raised as the SDK's IerfError with that code (not retried, not a bare grpc exception); a readable answer with an
    unknown fixed32 field reads as its status."""
    from ierf_client import AsyncClient, Client, IerfError

    bad, bad_port = _raw_health_server(b"\x1f\x01")
    good, good_port = _raw_health_server(_with_unknown_fields(1, b"\x2d\x00\x00\x00\x00"))
    try:
        with (
            Client(f"127.0.0.1:{bad_port}", timeout=5) as client,
            pytest.raises(IerfError, match="deserializing") as raised,
        ):
            client.health()
        assert raised.value.code == grpc.StatusCode.INTERNAL and type(raised.value) is IerfError
        with Client(f"127.0.0.1:{good_port}", timeout=5) as client:
            assert client.health() == "SERVING"

        async def run() -> str:
            async with AsyncClient(f"127.0.0.1:{good_port}", timeout=5) as aclient:
                return await aclient.health()

        assert asyncio.run(run()) == "SERVING"
    finally:
        bad.stop(None)
        good.stop(None)


# ----------------------------------------------------------------------------- SDK: arguments and images


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_token_that_is_not_a_string_is_refused_with_its_type(flavour: str) -> None:
    from ierf_client import AsyncClient, Client

    cls = Client if flavour == "sync" else AsyncClient
    with pytest.raises(TypeError, match=r"^token must be a string, got bytes$"):
        cls("127.0.0.1:1", token=b"secret")


def test_an_error_without_trailers_or_a_code_suggests_no_pause() -> None:
    """``grpc.RpcError`` itself has no methods (an interceptor may raise it bare): no pause, and the SDK's
    error for it is UNKNOWN, not an AttributeError out of the error path."""
    from ierf_client._core import error_from_rpc, server_pause_s

    class TrailersOnly(grpc.RpcError):
        def trailing_metadata(self) -> tuple[()]:
            return ()

    assert server_pause_s(grpc.RpcError()) is None
    assert server_pause_s(TrailersOnly()) is None
    error = error_from_rpc(grpc.RpcError())
    assert error.code == grpc.StatusCode.UNKNOWN and error.retry_after_s is None


def _png_with_exif(exif: bytes) -> bytes:
    y, x = np.mgrid[0:6, 0:9]
    picture = Image.fromarray(np.stack([x * 20, y * 30, x * y], axis=2).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_a_pil_image_with_unreadable_exif_is_sent_as_the_server_reads_its_file() -> None:
    """Pillow raises on EXIF that is not a TIFF structure; the SDK takes the orientation as 1 then, as the
    server does for the file itself: same pixels, same content hash."""
    from ierf.serving.convert import decode_image
    from ierf.serving.images import ImageLimits
    from ierf_client._core import image_message

    data = _png_with_exif(b"Exif\x00\x00not a tiff header at all")
    opened = Image.open(io.BytesIO(data))
    with pytest.raises(SyntaxError):  # what the SDK's guard is for
        opened.getexif()
    from_file = decode_image(image_message(data), ImageLimits())
    from_pil = decode_image(image_message(Image.open(io.BytesIO(data))), ImageLimits())
    np.testing.assert_array_equal(from_pil.pixels, from_file.pixels)
    assert from_pil.content_hash == from_file.content_hash


def test_a_pil_image_whose_pixel_data_is_truncated_is_refused_in_the_client() -> None:
    from ierf_client._core import image_message

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    data = buffer.getvalue()
    with pytest.raises(ValueError, match=r"^image cannot be read: .*truncated"):
        image_message(Image.open(io.BytesIO(data[: len(data) // 2])))


# ----------------------------------------------------------------------------- Serve's local testing mode


@pytest.fixture(scope="module")
def local_ingress() -> Any:
    """The real ingress and worker in this process (a random ResNet18 on one thread, no Redis)."""
    from ierf.serving.app import build_app
    from ray import serve

    args = {
        "models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 1}],
        "cache": {"redis_url": None},
    }
    return serve.run(build_app(args), _local_testing_mode=True)


def _tensor_image(height: int = 40, width: int = 50, seed: int = 0) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[height, width, 3]))


def test_a_request_without_an_image_is_refused_as_empty(local_ingress: Any) -> None:
    from ierf.serving.errors import InvalidArgument
    from ierf_proto.v1 import explainer_pb2 as pb

    with pytest.raises(InvalidArgument, match=r"^image is empty: set image\.encoded .* or image\.tensor$"):
        local_ingress.Explain.remote(pb.ExplainRequest(target=1)).result()
    assert InvalidArgument.code == grpc.StatusCode.INVALID_ARGUMENT


def test_explain_and_ierf_return_the_models_input_when_asked(local_ingress: Any) -> None:
    """``return_input``: the 224x224 uint8 crop the model saw, in both responses (ComputeIERF's was reached
    by no other test)."""
    from ierf_proto.v1 import explainer_pb2 as pb

    image = _tensor_image()
    explained = local_ingress.Explain.remote(pb.ExplainRequest(image=image, target=1, return_input=True)).result()
    layer = local_ingress.GetModel.remote(pb.GetModelRequest(model_id="r18")).result().layers[-1].name
    request = pb.ComputeIERFRequest(image=image, layer=layer, positions=[pb.Position(row=0, col=0)], return_input=True)
    erf = local_ingress.ComputeIERF.remote(request).result()
    for response in (explained, erf):
        model_input = response.model_input
        assert list(model_input.shape) == [224, 224, 3] and model_input.dtype == pb.DATA_TYPE_UINT8
        assert len(model_input.data) == 224 * 224 * 3
    assert erf.model_input.data == explained.model_input.data  # the same crop of the same image
    without = local_ingress.ComputeIERF.remote(
        pb.ComputeIERFRequest(image=image, layer=layer, positions=[pb.Position(row=0, col=0)])
    ).result()
    assert not without.HasField("model_input")


def _model_server(local_ingress: Any) -> tuple[grpc.Server, int, list[str]]:
    """A real gRPC server whose GetModel answers what the local ingress answers (its errors as their status)."""
    from ierf.serving.errors import ServiceError
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    asked: list[str] = []

    class Models(pb_grpc.ExplainServiceServicer):
        def GetModel(self, request: Any, context: Any) -> Any:
            asked.append(request.model_id)
            try:
                return local_ingress.GetModel.remote(request).result()
            except ServiceError as exc:
                context.abort(exc.code, str(exc))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(Models(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, asked


def test_the_async_clients_model_returns_what_the_sync_client_returns(local_ingress: Any) -> None:
    """``AsyncClient.model`` was called by no test at all."""
    from ierf_client import AsyncClient, Client, NotFoundError

    server, port, asked = _model_server(local_ingress)
    address = f"127.0.0.1:{port}"

    async def run() -> tuple[Any, Any]:
        async with AsyncClient(address, timeout=10) as aclient:
            info = await aclient.model("r18")
            with pytest.raises(NotFoundError, match="nope"):
                await aclient.model("nope")
            return info, await aclient.model()

    try:
        ((info, default),) = [asyncio.run(run())]
        with Client(address, timeout=10) as client:
            assert info == client.model("r18") == default
    finally:
        server.stop(None)
    assert asked == ["r18", "nope", "", "r18"]
    assert info.id == "r18" and info.num_classes == 1000 and info.input.height == 224
    assert info.layer(info.layers[-1].name) == info.layers[-1]


# ----------------------------------------------------------------------------- the worker and the ingress


def test_a_worker_whose_model_cannot_load_fails_and_leaves_no_compute_thread() -> None:
    """The constructor's load fails (a weights file that is not there): the error reaches Serve as raised,
    and the compute thread is shut down rather than left behind in a replica that never started. With
    ``num_threads`` 0 in local testing mode the replica counts one CPU, whether or not this process is also a
    Ray driver (the integration session's, when the suite runs whole)."""
    import torch
    from ierf.serving.deployments import ExplainerWorker, _assigned_cpus
    from ierf.serving.settings import CacheConfig, ModelConfig

    assert _assigned_cpus() == 1.0
    threads = torch.get_num_threads()
    model = ModelConfig(id="gone", name="resnet18", weights="/nonexistent/ierf-weights.pth")
    try:
        # kept, as Serve keeps a constructor's traceback: its frames hold the half-made worker and its executor
        with pytest.raises(Exception, match=r"ierf-weights\.pth") as raised:
            ExplainerWorker.func_or_class(model, CacheConfig(redis_url=None))
    finally:
        torch.set_num_threads(threads)
    assert raised.traceback is not None
    deadline = time.monotonic() + 5
    while any(t.name.startswith("ierf-compute-gone") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("ierf-compute-gone")]


def test_deferred_cache_writes_after_the_replica_shut_down_are_dropped_quietly() -> None:
    """A request answered just before Serve shuts the replica down queues its Redis copy 50 ms later, on an
    executor that is gone by then: ``_write_deferred`` returns (``__del__`` wrote them) instead of raising
    in an event-loop callback."""
    import torch
    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.settings import CacheConfig, ModelConfig

    threads = torch.get_num_threads()
    model = ModelConfig(id="r18shut", name="resnet18", random_init=True, num_threads=1)
    try:
        worker = ExplainerWorker.func_or_class(model, CacheConfig(redis_url=None))
    finally:
        torch.set_num_threads(threads)
    worker._write_deferred()  # alive: queued on the compute thread
    worker.__del__()  # what Serve calls at shutdown
    assert worker._write_deferred() is None


def test_a_failed_deferred_write_is_logged_with_its_exception(caplog: pytest.LogCaptureFixture) -> None:
    from ierf.serving.deployments import _log_failure, logger

    failed: futures.Future[None] = futures.Future()
    failed.set_exception(ConnectionError("redis went away"))
    cancelled: futures.Future[None] = futures.Future()
    cancelled.cancel()
    done: futures.Future[None] = futures.Future()
    done.set_result(None)
    with caplog.at_level(logging.ERROR, logger=logger.name):
        for future in (failed, cancelled, done):
            _log_failure(future)
    records = [r for r in caplog.records if r.name == logger.name]
    assert [r.getMessage() for r in records] == ["writing deferred cache values failed"]
    assert records[0].exc_info is not None and isinstance(records[0].exc_info[1], ConnectionError)


class _Silent:
    """A worker handle whose replica never answers ``describe`` (busy, or wedged)."""

    def __init__(self) -> None:
        async def never() -> None:
            await asyncio.sleep(3600.0)

        self.describe = Method(never)


def test_a_model_that_does_not_describe_itself_in_time_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from ierf.serving import deployments
    from ierf.serving.errors import Unavailable
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    monkeypatch.setattr(deployments, "DESCRIBE_TIMEOUT_S", 0.2)
    ingress = deployments.Ingress.func_or_class({"m": _Silent()}, ServiceConfig.from_args({"models": [{"id": "m"}]}))
    with pytest.raises(Unavailable, match=r"^model 'm' did not describe itself within 0\.2 s$"):
        asyncio.run(ingress.GetModel(pb.GetModelRequest(model_id="m")))
    assert Unavailable.code == grpc.StatusCode.UNAVAILABLE


def test_resolve_device_takes_a_named_device_as_it_is() -> None:
    import torch
    from ierf.serving.worker import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named, not checked here
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_stub_that_registers_no_service_by_name_is_refused_by_its_name() -> None:
    """grpcio < 1.63's generated ``add_*_to_server`` registers only a generic handler; the service's handler
    wrapping needs the per-service registration, and says which function did not make it."""
    from ierf.serving.protocol import _tolerant

    def add_OldServicer_to_server(servicer: Any, server: Any) -> None:
        handler = grpc.method_handlers_generic_handler(
            "old.Service", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
        )
        server.add_generic_rpc_handlers((handler,))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    with pytest.raises(RuntimeError, match=r"add_OldServicer_to_server registered no service by name \(grpcio"):
        _tolerant(add_OldServicer_to_server)(object(), server)


def test_an_exception_with_an_errors_method_of_another_shape_is_said_whole() -> None:
    from ierf.serving.app import first_error

    class Odd(ValueError):
        def errors(self) -> list[Any]:
            return []  # not pydantic's list of dicts

    assert first_error(Odd("bad   value\n here")) == "bad value here"


# ----------------------------------------------------------------------------- request images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int = 8, height: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_png_whose_header_chunk_is_cut_short_is_corrupt_not_a_server_error() -> None:
    """Pillow raises ValueError("Truncated gAMA chunk") for it: INVALID_ARGUMENT, with Pillow's words."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import ImageLimits, decode_encoded

    png = _png()
    after_ihdr = 8 + 25
    broken = png[:after_ihdr] + _chunk(b"gAMA", b"\x00\x01") + png[after_ihdr:]
    with pytest.raises(InvalidArgument, match=r"^image bytes are truncated or corrupt: Truncated gAMA chunk$"):
        decode_encoded(broken, ImageLimits())


def test_a_jpeg_with_a_second_start_marker_or_ending_at_a_marker_is_walked_and_refused() -> None:
    """The structure walk counts on past a second SOI (no length field) and stops where the bytes end
    after a marker; Pillow then says what is wrong, as INVALID_ARGUMENT."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import ImageLimits, decode_encoded

    jpeg = _jpeg()
    with pytest.raises(InvalidArgument, match=r"^image bytes are truncated or corrupt: "):
        decode_encoded(jpeg[:2] + b"\xff\xd8" + jpeg[2:], ImageLimits())
    with pytest.raises(InvalidArgument, match=r"^image bytes are not a readable PNG/JPEG/WEBP file \(4 bytes"):
        decode_encoded(b"\xff\xd8\xff\xe0", ImageLimits())


def test_a_pixel_cap_past_pillows_bomb_limit_still_refuses_what_pillow_will_not_decode() -> None:
    """The service refuses such a cap at deploy (test_claims_audit); ``ImageLimits`` used directly (the CLI,
    a library caller) still gets RESOURCE_EXHAUSTED naming the decoder's limit, not a crash."""
    from ierf.serving.errors import ResourceExhausted
    from ierf.serving.images import ImageLimits, decode_encoded

    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IEND", b"")
    with pytest.raises(ResourceExhausted, match=r"decompression bomb: the image declares more pixels than the decoder"):
        decode_encoded(bomb, ImageLimits(max_pixels=10**9, max_side=10**6))
    with pytest.raises(ResourceExhausted, match=r"declares 400000000 pixels, over the cap of 16777216"):
        decode_encoded(bomb, ImageLimits())


# ----------------------------------------------------------------------------- local runner and CLI


def test_the_node_ip_for_a_host_name_follows_what_it_resolves_to() -> None:
    """A name that does not resolve keeps the node on loopback, as does one that resolves to a loopback
    address; "0" resolves to 0.0.0.0 (a wildcard that
    ``is_wildcard`` cannot tell from its text) and is treated as 0.0.0.0 is."""
    from ierf.serving.local import LOOPBACK, choose_node_ip

    assert choose_node_ip("no-such-host.invalid") == LOOPBACK
    assert choose_node_ip("127.1") == LOOPBACK  # not an address to ipaddress; resolves to 127.0.0.1
    assert choose_node_ip("0") == choose_node_ip("0.0.0.0")


def test_a_missing_redis_binary_is_named_with_the_package_to_install() -> None:
    from ierf.serving.local import RedisProcess

    with pytest.raises(FileNotFoundError, match=r"^no-such-redis-server not found on PATH; install"):
        RedisProcess(executable="no-such-redis-server").start()


def test_a_redis_that_ignores_sigterm_is_killed_after_the_timeout() -> None:
    """A stopped (SIGSTOP) redis-server cannot act on SIGTERM: ``stop`` waits its timeout, then kills it."""
    import shutil

    from ierf.serving.local import RedisProcess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(maxmemory="16mb").start()
    try:
        os.kill(server.pid, signal.SIGSTOP)
        start = time.monotonic()
        server.stop(timeout_s=0.5)
        assert time.monotonic() - start >= 0.5
        assert server.process is None or server.process.returncode == -signal.SIGKILL
    finally:
        server.cleanup()


def _shipped_config() -> dict[str, Any]:
    from ierf.serving.local import load_serve_config

    return load_serve_config()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"applications": []}, r"^applications must be a non-empty list of mappings, got \[\]$"),
        ({"applications": ["ierf"]}, r"^applications must be a non-empty list of mappings, got \['ierf'\]$"),
        ({"grpc_options": [9000]}, r"^grpc_options must be a mapping, got \[9000\]$"),
        ({"http_options": "8000"}, r"^http_options must be a mapping, got '8000'$"),
    ],
)
def test_a_malformed_serve_config_is_refused_before_anything_starts(change: dict[str, Any], message: str) -> None:
    import ray
    from ierf.serving.local import start_service

    config = {**_shipped_config(), **change}
    ray_was_up = ray.is_initialized()  # the integration session's cluster may be up already
    with pytest.raises(ValueError, match=message):
        start_service(config, num_cpus=64, redis_url="")
    assert ray.is_initialized() == ray_was_up


def test_gpus_the_host_lacks_are_found_by_asking_ray() -> None:
    """``num_gpus`` None: Ray's accelerator manager counts them (the other GPU tests pass a number)."""
    from ierf.serving.app import configured_deployments
    from ierf.serving.local import check_replicas_fit, local_gpus
    from ierf.serving.settings import ServiceConfig

    have = local_gpus()
    assert have >= 0 and have == int(have)
    asks = {"Worker_efficientnet_lite0": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1000}}}
    deployments = configured_deployments(ServiceConfig.from_args({}), asks)
    with pytest.raises(ValueError, match=rf"ask for 1000 GPUs .* but Ray finds {have:g} on this host"):
        check_replicas_fit(deployments, num_cpus=4)


def test_attribute_leaves_an_owner_without_the_attribute_as_it_was() -> None:
    """Another Ray version may lack the attribute patched for the start: nothing is set, nothing left."""
    import types

    from ierf.serving.local import _attribute

    owner = types.SimpleNamespace(present=1)
    with _attribute(owner, "absent", 2):
        assert not hasattr(owner, "absent")
    with _attribute(owner, "present", 3):
        assert owner.present == 3
    assert vars(owner) == {"present": 1}


@pytest.fixture
def unwritable_directory(tmp_path: Any) -> Iterator[str]:
    """A directory this process cannot create files in (root passes permission bits: a read-only mount)."""
    if os.geteuid() != 0:
        directory = tmp_path / "locked"
        directory.mkdir()
        directory.chmod(0o555)
        yield str(directory)
        directory.chmod(0o755)
        return
    for candidate in ("/proc/sys", "/sys"):
        if os.path.isdir(candidate) and not os.access(candidate, os.W_OK | os.X_OK):
            yield candidate
            return
    pytest.skip("running as root with no read-only directory to point at")


def test_a_ready_file_in_a_directory_that_cannot_be_written_is_refused_before_anything_starts(
    unwritable_directory: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from ierf.serving.__main__ import main

    ready = os.path.join(unwritable_directory, "ierf-ready")
    ray_was_up = ray.is_initialized()  # the integration session's cluster may be up already
    assert main(["serve", "--ready-file", ready]) == 2
    err = capsys.readouterr().err
    assert err == f"ierf.serving: error: --ready-file {ready}: directory {unwritable_directory} is not writable\n"
    assert ray.is_initialized() == ray_was_up


def test_the_module_entry_point_exits_with_mains_status(tmp_path: Any) -> None:
    """``python -m ierf.serving``: main's status 2 (a refusal before anything starts) is the process's."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = [os.path.join(root, "service"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    ready = tmp_path / "missing" / "ready"
    done = subprocess.run(
        [sys.executable, "-m", "ierf.serving", "serve", "--ready-file", str(ready)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(f"--ready-file {ready}: directory {ready.parent} does not exist\n"), done.stderr


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
@pytest.mark.parametrize("application", ["café", "ierf\n", "tab\tbed", "x\x7f"])
def test_an_application_name_grpc_cannot_send_is_refused_when_the_client_is_made(
    flavour: str, application: str
) -> None:
    """``application=`` travels as gRPC metadata, like the token: anything but printable ASCII (a name read
    from a file with its newline, say) was accepted, and then every call failed with INTERNAL "Invalid
    metadata", as if the server were broken."""
    from ierf_client import AsyncClient, Client

    cls = Client if flavour == "sync" else AsyncClient
    with pytest.raises(ValueError, match=r"^application must be printable ASCII \(it travels as gRPC metadata\)"):
        cls("127.0.0.1:1", application=application)
    cls("127.0.0.1:1", application="ierf-v2 (blue)")  # printable ASCII, spaces included: gRPC sends it


@pytest.mark.integration
def test_a_local_testing_replica_in_a_ray_driver_counts_one_cpu(live_service: object) -> None:
    """Serve's local testing mode in a process that is also a Ray driver (a notebook that called ``ray.init()``;
    here the integration session's): the replica is no actor, and Ray asserts when a driver asks for its
    assigned resources, so a worker without ``num_threads`` failed to construct. It counts one CPU."""
    import ray
    from ierf.serving.deployments import _assigned_cpus

    assert ray.is_initialized() and ray.get_runtime_context().get_actor_id() is None
    assert _assigned_cpus() == 1.0

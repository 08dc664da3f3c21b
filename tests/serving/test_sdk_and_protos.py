"""SDK pieces that need no server, plus the generated stubs' freshness and the SDK's dependencies."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
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
    assert (tensor.dtype, list(tensor.shape), tensor.data) == (pb.UINT8, [5, 7, 3], pixels.tobytes())
    assert image_message(pixels.astype(np.float32) / 255).tensor.dtype == pb.FLOAT32
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
    assert request.map_dtype == pb.FLOAT16 and request.return_input
    request = _core.explain_request(pixels, None, "", "srd", "mean", "float32", True, False)
    assert not request.HasField("target") and request.contrast == "mean"
    with pytest.raises(ValueError, match="map_dtype"):
        _core.explain_request(pixels, None, "", "srd", "identity", "uint8", True, False)
    with pytest.raises(ValueError, match="pairs"):
        _core.ierf_request(pixels, "l", [(1, 2, 3)], "", "float32", False, False)


def test_tensor_round_trip_little_endian() -> None:
    from ierf.serving.convert import tensor_message

    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_core.tensor_array(tensor_message(values, np.float32)), values)
    half = _core.tensor_array(tensor_message(values, np.float16))
    assert half.dtype == np.float16 and np.allclose(half, values, atol=1e-3)


def test_application_and_token_travel_as_metadata() -> None:
    """Against a real loopback gRPC server: Serve's proxy routes by ``application`` when a cluster runs
    several apps; the bearer token goes with API calls (not with health probes)."""
    import asyncio
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ierf_client import AsyncClient, Client

    seen: list[dict[str, str]] = []

    class Recorder(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            seen.append(dict(context.invocation_metadata()))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Recorder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
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
    assert all("authorization" not in m and 0 < int(m["ierf-timeout-ms"]) <= 5000 for m in seen)
    assert _core.call_metadata("t0k", 1.0, "ierf-blue") == [
        ("ierf-timeout-ms", "1000"),
        ("authorization", "Bearer t0k"),
        ("application", "ierf-blue"),
    ]

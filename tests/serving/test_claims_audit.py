"""README and proto claims about the service's limits, checked against what it does (documentation audit).

No Ray cluster: the image header path and the local runner's up-front config checks only.
"""

from __future__ import annotations

import struct
import zlib

import pytest
from ierf.serving.images import open_encoded
from ierf.serving.settings import IngressConfig


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit grey) with an empty IDAT: enough for the header path."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_ingress_pixel_cap_past_pillows_bomb_limit_is_honoured_or_refused_at_deploy() -> None:
    """README: caps are positive integers checked at deploy, "a server takes up to its max_pixels", and
    GetModel's InputSpec.max_pixels is "the limits a request meets". A config with max_pixels 400 Mpx (a
    pathology or satellite deployment) is accepted and advertised, but any PNG/JPEG/WebP over 179 Mpx (twice
    Pillow's MAX_IMAGE_PIXELS) is refused from its header with RESOURCE_EXHAUSTED "declares more pixels than the
    decoder reads" — a cap refusal, which clients never retry — although it is under every configured cap
    (raw tensors of the same size pass). Either the ingress raises Pillow's limit to its own cap, or the
    settings refuse a max_pixels the decoder cannot reach."""
    try:
        config = IngressConfig(max_pixels=400_000_000, max_side=20_000)
    except ValueError:
        return  # refused at deploy, naming the key: fine
    open_encoded(_png_header(14_000, 14_000), config.limits)  # 196 Mpx: under max_pixels and max_side


def test_the_runner_refuses_an_ingress_deadline_cap_the_serve_proxy_cuts_short(tmp_path) -> None:
    """InputSpec.max_deadline_s: "the longest budget a call gets, and what one without ierf-timeout-ms gets";
    README: ingress.request_timeout_s is "the cap on a call's deadline", and a start that cannot succeed
    exits with the key named. With grpc_options.request_timeout_s: 3 and ingress.request_timeout_s: 60 the
    runner started, GetModel advertised max_deadline_s 60.0 and the ingress planned work for 60 s, but Serve's
    proxy cut every call at 3 s: an SDK call with timeout=40 got DEADLINE_EXCEEDED "Request timed out after
    3.0s." (integrated gradients on ResNet18). The two caps must agree (or the advertised one follow the
    proxy's). A missing weights file stops this start before Ray whatever happens, so no cluster starts."""
    from ierf.serving.local import free_port, load_serve_config, start_service

    config = load_serve_config()
    config["grpc_options"]["request_timeout_s"] = 3
    app = config["applications"][0]
    app["deployments"] = []
    app["args"]["models"] = [{"id": "r18", "name": "resnet18", "weights": str(tmp_path / "missing.pth")}]
    app["args"]["default_model"] = "r18"
    app["args"]["ingress"]["request_timeout_s"] = 60
    with pytest.raises((ValueError, FileNotFoundError)) as refused:
        start_service(
            config,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            redis_url="",
            num_cpus=4,
        )
    assert "request_timeout_s" in str(refused.value), f"the mismatch went unnoticed; stopped only by: {refused.value}"


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_call_whose_overload_retries_use_up_its_budget_says_how_many_attempts_were_refused(flavour: str) -> None:
    """README (SDK): "A call whose retries of overload refusals run into its deadline raises
    ResourceExhaustedError naming how many attempts were refused, not a bare 'Deadline Exceeded'". Against a
    server that answers every attempt at once with an overload refusal (ierf-retry-after-ms: 250), a call with
    timeout=2 made 7 attempts over 1.95 s and raised the last refusal's plain message ("RESOURCE_EXHAUSTED:
    service overloaded, retry later: ..."), naming no attempts: the count is added only when the final attempt
    itself runs out of time (Attempts.error), not when the next pause no longer fits (retry_pause gives up)."""
    import asyncio
    import time
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health_pb2_grpc
    from ierf.serving.local import free_port
    from ierf_client import AsyncClient, Client, ResourceExhaustedError

    calls: list[float] = []

    class AlwaysOverloaded(health_pb2_grpc.HealthServicer):
        def Check(self, request, context):
            calls.append(time.monotonic())
            context.set_trailing_metadata((("ierf-retry-after-ms", "250"), ("grpc-retry-pushback-ms", "250")))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "service overloaded, retry later: worker queue full")

    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(AlwaysOverloaded(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with pytest.raises(ResourceExhaustedError) as info:
            if flavour == "sync":
                with Client(f"127.0.0.1:{port}", timeout=1.5) as client:
                    client.health()
            else:

                async def call() -> None:
                    async with AsyncClient(f"127.0.0.1:{port}", timeout=1.5) as client:
                        await client.health()

                asyncio.run(call())
    finally:
        server.stop(None)
    assert len(calls) >= 3, calls  # retried after each pause
    assert f"{len(calls)} of {len(calls)} attempts" in info.value.details, info.value.details


def test_the_shipped_configs_give_the_proxy_at_least_the_ingress_deadline_cap() -> None:
    """The RayService cannot be checked by the runner (build_app never sees grpc_options): its two caps are
    kept consistent here, as the local config's are."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    local = yaml.safe_load((root / "service/ierf/serving/configs/local.yaml").read_text())
    documents = yaml.safe_load_all((root / "deploy/k8s/rayservice.yaml").read_text())
    ray_service = next(d for d in documents if d and d.get("kind") == "RayService")
    serve = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
    for config in (local, serve):
        ingress = config["applications"][0]["args"]["ingress"]["request_timeout_s"]
        assert config["grpc_options"]["request_timeout_s"] >= ingress

"""The real stack end to end: Ray Serve + gRPC on 127.0.0.1 + Redis, through the SDK and raw stubs.

One session-scoped fixture (``live_service``) starts everything once; every test here shares it.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import time
import urllib.request
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.integration

MODEL = "efficientnet_lite0"


@pytest.fixture(scope="module")
def client(live_service):
    from ierf_client import Client

    with Client(live_service.grpc_address, timeout=180) as c:
        c.wait_until_serving(timeout=120)
        yield c


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    from ierf.images import demo_image

    return demo_image("coffee")


@pytest.fixture(scope="module")
def reference():
    """The same model and engine in this process: what the service must reproduce."""
    import ierf
    from ierf.models import load_model

    model = load_model(MODEL)
    return model, ierf.SRD(model.module)


@pytest.fixture(scope="module")
def coffee_decomposition(reference, coffee):
    model, srd = reference
    return srd.decompose(_model_input(model, coffee))


def _model_input(model, image: np.ndarray) -> torch.Tensor:
    view = model.resize_crop(image)
    return model.normalize(torch.from_numpy(view).permute(2, 0, 1)[None])


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(seed: int, size: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_health_serving_and_reflection_lists_the_service(live_service, client) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert client.health() == "SERVING"
    with grpc.insecure_channel(live_service.grpc_address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=30)
        assert listed.statuses["ierf.v1.ExplainService"].status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"ierf.v1.ExplainService", "grpc.health.v1.Health"} <= names


def _descendants(root: int) -> list[int]:
    """Processes started, directly or not, by ``root`` (from /proc: the raylet and the workers it forks)."""
    import os

    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # exited meanwhile
                continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def test_serve_proxy_and_replicas_run_with_the_process_settings(live_service) -> None:
    import os

    from ierf.serving.settings import PROCESS_ENV

    expected = {key: os.environ.get(key, value) for key, value in PROCESS_ENV.items()}  # a caller's choice wins
    checked = set()
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if title.startswith(("ray::ProxyActor", "ray::ServeReplica")):
            got = {key: environ.get(key.encode(), b"").decode() for key in PROCESS_ENV}
            assert got == expected, (title, got)
            checked.add("proxy" if title.startswith("ray::ProxyActor") else title.split(":")[-1].split(".")[0])
    assert {"proxy", "Ingress", f"Worker_{MODEL}"} <= checked, checked


def test_models_describe_input_classes_and_layers(client, reference) -> None:
    model, srd = reference
    (info,) = client.models()
    assert info == client.model(MODEL) == client.model("")
    assert info.id == MODEL and info.weights_digest == model.weights_digest
    assert (info.input.height, info.input.width, info.input.channels) == (224, 224, 3)
    assert info.input.preprocess_version == model.preprocess_version
    assert info.class_names == model.class_names and info.num_classes == 1000
    assert [layer.name for layer in info.layers] == list(srd.layers)
    last = info.layers[-1]
    assert (last.channels, last.height, last.width) == tuple(srd.layer_shape(last.name, (224, 224)))
    assert "srd" in info.methods and info.default_method == "srd"


def test_explain_round_trip_equals_the_in_process_map(client, reference, coffee, coffee_decomposition) -> None:
    model, _ = reference
    decomposition = coffee_decomposition
    target = int(decomposition.logits.argmax())
    expected = decomposition.saliency(target)[0].numpy()

    result = client.explain(coffee, overlay=True, return_input=True)
    assert result.target.index == target == 967  # espresso
    assert result.map.dtype == np.float32 and result.map.shape == expected.shape
    np.testing.assert_allclose(result.map, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))
    np.testing.assert_array_equal(result.model_input, model.resize_crop(coffee))
    assert result.overlay().size[0] == 224
    prov = result.provenance
    assert (prov.model_id, prov.weights_digest, prov.method) == (MODEL, model.weights_digest, "srd")
    assert prov.method_version and prov.preprocess_version == model.preprocess_version
    assert len(prov.content_hash) == 64 and prov.request_id
    assert {"decode", "preprocess", "explain", "render", "encode", "total"} <= set(prov.timings)

    # Another class on the same image reuses the decomposition (here from Redis: the worker has no L1).
    other = client.explain(_png(coffee), target=3, map_dtype="float16", overlay=False)
    assert other.provenance.content_hash == prov.content_hash  # PNG bytes and raw pixels hash alike
    assert other.provenance.cache["decomposition"] == "l2"
    assert "forward" not in other.provenance.timings and "render" not in other.provenance.timings
    np.testing.assert_allclose(
        other.map.astype(np.float32),
        decomposition.saliency(3)[0].numpy(),
        rtol=1e-2,
        atol=1e-3 * float(np.abs(other.map).max()),
    )


def test_ierf_and_predict_reuse_the_image_work(client, coffee, coffee_decomposition) -> None:
    layer = client.model().layers[-1]
    positions = [(0, 0), (layer.height - 1, layer.width - 1)]
    result = client.ierf(coffee, layer.name, positions, overlay=True)
    assert result.maps.shape == (2, 224, 224) and result.layer == layer
    np.testing.assert_allclose(result.maps.sum(axis=(1, 2)), 1.0, rtol=1e-3)
    assert result.provenance.cache["decomposition"] in ("l1", "l2")
    expected = coffee_decomposition.ierf(layer.name, torch.tensor(positions))[0].numpy()
    np.testing.assert_allclose(result.maps, expected, rtol=1e-4, atol=1e-6)
    assert result.overlay(1).size[0] == 224

    prediction = client.predict(coffee, top_k=3)
    assert prediction.top_classes[0].index == 967
    assert prediction.provenance.cache["logits"] in ("l1", "l2")


def test_a_repeat_names_its_image_by_content_hash_and_gets_the_same_answer(live_service, client, coffee) -> None:
    """The SDK sends an image it sent before by its content hash: no upload, no decoding in the ingress; the map
    is the one the pixels get, and a refusal of the reference (the image evicted) is answered with the pixels."""
    from ierf_client import Client

    client.explain(coffee, target=5, overlay=False)
    again = client.explain(coffee, target=6, overlay=False)
    assert "decode" not in again.provenance.timings and "dispatch" in again.provenance.timings
    with Client(live_service.grpc_address, timeout=180, remembered_images=0) as plain:
        with_pixels = plain.explain(coffee, target=6, overlay=False)
    assert "decode" in with_pixels.provenance.timings
    assert again.provenance.content_hash == with_pixels.provenance.content_hash
    np.testing.assert_array_equal(again.map, with_pixels.map)

    # explain's default overlay too: rendered on the view the workers kept (here in Redis), byte for byte
    overlaid = client.explain(coffee, target=7)
    assert "decode" not in overlaid.provenance.timings and overlaid.provenance.cache["view"] in ("l1", "l2")
    with Client(live_service.grpc_address, timeout=180, remembered_images=0) as plain:
        assert overlaid.overlay_png == plain.explain(coffee, target=7).overlay_png


def _png_claiming(width: int, height: int) -> bytes:
    data = bytearray(_png(np.zeros((1, 1, 3), np.uint8)))
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", width, height)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])) & 0xFFFFFFFF)
    return bytes(data)


def test_every_bad_input_gets_a_precise_code_and_the_service_keeps_answering(live_service, coffee) -> None:
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    good_png = _png(_noise(1, 64))

    def raw(array: np.ndarray, **fields: object) -> pb.Image:
        return pb.Image(tensor=pb.Tensor(**{"data": array.tobytes(), "shape": list(array.shape), **fields}))

    INVALID, NOT_FOUND, EXHAUSTED = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    image = pb.Image(encoded=good_png)

    def explain(**fields: object) -> tuple[str, object]:
        return "Explain", pb.ExplainRequest(**fields)

    def explain_good(**fields: object) -> tuple[str, object]:
        return "Explain", pb.ExplainRequest(image=image, **fields)

    def predict(**fields: object) -> tuple[str, object]:
        return "Predict", pb.PredictRequest(**fields)

    def ierf(**fields: object) -> tuple[str, object]:
        return "ComputeIERF", pb.ComputeIERFRequest(image=image, **fields)

    def at(row: int, col: int) -> list[object]:
        return [pb.Position(row=row, col=col)]

    zeros = np.zeros((4, 4, 3), np.uint8)
    cases = [
        (*explain(image=pb.Image(encoded=good_png[: len(good_png) // 2])), INVALID, "truncated or corrupt"),
        (
            *explain(image=pb.Image(encoded=b"\x89PNG\r\n\x1a\n" + b"\x13" * 300)),
            INVALID,
            "corrupt|not a readable",
        ),
        (*explain(image=pb.Image(encoded=b"garbage" * 20)), INVALID, "not a readable"),
        (*explain(), INVALID, "image is empty"),
        (*explain(image=pb.Image(encoded=b"")), INVALID, "image is empty"),
        (*explain(image=pb.Image(encoded=b"\x00" * 2_100_000)), EXHAUSTED, "over the cap"),
        (*predict(image=pb.Image(encoded=_png_claiming(60_000, 60_000))), EXHAUSTED, "bomb|pixels"),
        (*predict(image=pb.Image(encoded=_png_claiming(4000, 4000))), EXHAUSTED, "pixels"),
        (*explain(image=raw(np.zeros((4, 4, 3), np.int32))), INVALID, "dtype"),
        (*explain(image=raw(zeros, dtype=pb.DATA_TYPE_UINT8, shape=[4, 5, 3])), INVALID, "needs 60 bytes"),
        (*explain(image=raw(np.zeros((4, 4, 2), np.uint8), dtype=pb.DATA_TYPE_UINT8)), INVALID, "shape"),
        (*explain(image=raw(np.full((4, 4, 3), 3.0, np.float32), dtype=pb.DATA_TYPE_FLOAT32)), INVALID, r"\[0, 1\]"),
        (*explain_good(model_id="resnet9000"), NOT_FOUND, "unknown model 'resnet9000'"),
        (*explain_good(model_id="m" * 10_000), NOT_FOUND, r"unknown model 'm+'… \(10000 characters\)"),
        ("GetModel", pb.GetModelRequest(model_id="resnet9000"), NOT_FOUND, "unknown model"),
        (*explain_good(target=1000), INVALID, "target 1000 is out of range"),
        (*explain_good(target=-1), INVALID, "out of range"),
        (*explain_good(contrast_class=5000), INVALID, "contrast class"),
        (*explain_good(contrast="median"), INVALID, "contrast"),
        (*explain_good(method="magic"), INVALID, "unknown method 'magic'"),
        (*explain_good(map_dtype=pb.DATA_TYPE_UINT8), INVALID, "map_dtype"),
        (*predict(image=image, top_k=-3), INVALID, "top_k"),
        (*ierf(layer="no.such.layer", positions=at(0, 0)), INVALID, "unknown layer 'no.such.layer'"),
        (*ierf(layer=""), INVALID, "layer is empty"),
        (*ierf(layer="LAST", positions=at(99, 0)), INVALID, r"position \(99, 0\) is outside"),
        (*ierf(layer="LAST", positions=at(-1, 0)), INVALID, "outside"),
        (*ierf(layer="LAST"), INVALID, "no positions"),
        (*ierf(layer="LAST", positions=at(0, 0) * 65), INVALID, "at most 64"),
        (*explain(image=pb.Image(content_hash="0" * 64)), grpc.StatusCode.FAILED_PRECONDITION, "is not held by"),
        (*explain(image=pb.Image(content_hash="xyz")), INVALID, "not a content hash"),
        (*predict(image=pb.Image(content_hash="0" * 64), top_k=2), grpc.StatusCode.FAILED_PRECONDITION, "send its"),
    ]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(live_service.grpc_address, options=options) as channel:
        stub = pb_grpc.ExplainServiceStub(channel)
        last_layer = stub.GetModel(pb.GetModelRequest(), timeout=60).layers[-1].name
        for rpc, request, code, message in cases:
            if getattr(request, "layer", None) == "LAST":
                request.layer = last_layer
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, rpc)(request, timeout=120)
            assert info.value.code() == code, (rpc, request.ListFields()[:1], info.value.details())
            assert re.search(message, info.value.details()), (message, info.value.details())
            assert len(info.value.details()) < 600
            # gRPC's "do not retry" pushback, through Serve's proxy: retry policies leave refusals alone
            assert ("grpc-retry-pushback-ms", "-1") in info.value.trailing_metadata(), rpc
        # A body that is not a message at all is answered by the ingress too (through Serve's proxy).
        for body in (b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28"):
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary("/ierf.v1.ExplainService/Explain")(body, timeout=60)
            assert info.value.code() == INVALID, info.value.details()
            assert info.value.details().startswith("the request is not a valid ierf.v1.ExplainRequest message")
        # ...and the service is still fine.
        assert (
            stub.Predict(pb.PredictRequest(image=pb.Image(encoded=_png(coffee))), timeout=120).top_classes[0].index
            == 967
        )


def test_a_new_decomposition_reaches_redis_after_its_answer(redis_server, client) -> None:
    """The worker defers a new decomposition's Redis copy until its answer has left; it still lands."""
    import redis

    result = client.explain(_noise(41), overlay=False)
    assert result.provenance.cache["decomposition"] == "miss"
    connection = redis.Redis.from_url(redis_server.url, socket_timeout=5)  # type: ignore[attr-defined]
    pattern = f"*:decomposition:*{result.provenance.content_hash}*"
    deadline = time.monotonic() + 10
    while not connection.keys(pattern) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connection.keys(pattern), pattern
    again = client.explain(_noise(41), target=7, overlay=False)
    assert again.provenance.cache["decomposition"] == "l2"  # this worker keeps no L1 here


def test_redis_stopped_mid_run_changes_nothing_but_latency(live_service, redis_server, client, coffee) -> None:
    before = client.explain(coffee, target=282, overlay=False)
    assert before.provenance.cache["decomposition"] == "l2"
    redis_server.stop()
    try:
        during = client.explain(coffee, target=282, overlay=False)  # was in Redis: recomputed now
        # computed, and kept nowhere once the breaker is open (this worker has no L1): "disabled"; "miss" while
        # the breaker still counts failures
        assert during.provenance.cache["decomposition"] in ("miss", "disabled")
        np.testing.assert_allclose(during.map, before.map, rtol=1e-4, atol=1e-6)
        assert during.target == before.target
        assert client.health() == "SERVING"
    finally:
        redis_server.start()  # empty: no persistence
    time.sleep(2.5)  # the breaker (open_seconds=2 here) lets a trial call through again
    client.explain(coffee, target=5, overlay=False)  # recomputed and written back
    assert client.explain(coffee, target=6, overlay=False).provenance.cache["decomposition"] == "l2"


def test_overload_gets_resource_exhausted_not_a_hang(live_service) -> None:
    """Refused at once, marked as an overload (a pause to wait in the trailers, which a cap has not), and
    the SDK's default policy gets the same burst through by waiting it."""
    from ierf_client import AsyncClient, ResourceExhaustedError, RetryPolicy

    async def burst(retry: RetryPolicy, offset: int) -> list[object]:
        async with AsyncClient(live_service.grpc_address, timeout=240, retry=retry) as aclient:
            calls = [aclient.explain(_noise(offset + i), overlay=False) for i in range(6)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(burst(RetryPolicy(retry_overload=False), 100))
    rejected = [r for r in results if isinstance(r, ResourceExhaustedError)]
    served = [r for r in results if not isinstance(r, Exception)]
    # all six may be refused: a fresh ingress's own calls for the model's description can fill the worker's
    # one-deep queue (run alone, this test saw that); the point is that none waits
    assert rejected, results
    assert all("overloaded" in r.details and r.retry_after_s == 0.25 for r in rejected)
    assert len(rejected) + len(served) == len(results), [r for r in results if isinstance(r, Exception)]
    retried = asyncio.run(burst(RetryPolicy(), 200))
    assert not any(isinstance(r, Exception) for r in retried), retried


def test_deadline_is_honoured(live_service, client) -> None:
    from ierf_client import Client, DeadlineExceededError

    with Client(live_service.grpc_address, timeout=0.05) as hurried:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            hurried.explain(_noise(999), overlay=False)
        assert time.monotonic() - start < 2
    assert client.health() == "SERVING"


def _scrape(live_service) -> str:
    try:
        with urllib.request.urlopen(live_service.metrics_url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def _stopped_jobs(text: str, reason: str) -> float:
    """The value of ray_explainer_jobs_stopped_total for ``reason``, summed over its series."""
    series = rf'^ray_explainer_jobs_stopped_total\{{[^}}]*reason="{reason}"[^}}]*\}} ([0-9.e+]+)$'
    return sum(float(value) for value in re.findall(series, text, flags=re.MULTILINE))


def test_a_plain_grpc_deadline_stops_the_work_on_the_worker(live_service, client) -> None:
    """Serve does not forward a gRPC deadline, but the proxy cancels the call when it passes: the cancel
    reaches the worker, whose job stops at its next checkpoint instead of running on for nobody (counted
    in ray_explainer_jobs_stopped_total: the count must go up by this call)."""
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    time.sleep(12)  # Ray exports every ~10 s: earlier tests' stops are in the scrape before this call
    before = _stopped_jobs(_scrape(live_service), "cancelled")
    pixels = _noise(4242)
    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(pixels.shape)))
    request = pb.ExplainRequest(image=image, method="integrated_gradients")  # seconds of work, 4 forward passes
    with grpc.insecure_channel(live_service.grpc_address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.ExplainServiceStub(channel).Explain(request, timeout=0.5)  # no ierf-timeout-ms metadata
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline, after = time.monotonic() + 90, before
    while time.monotonic() < deadline and after <= before:
        time.sleep(2)
        after = _stopped_jobs(_scrape(live_service), "cancelled")
    assert after > before, f"the abandoned job was not stopped (or not counted) within 90 s: {before} -> {after}"
    assert client.health() == "SERVING"


def test_cli_server_mode_uses_the_service(live_service, tmp_path, capsys) -> None:
    from ierf.cli import main

    image = tmp_path / "coffee.png"
    assert main(["demo-image", "coffee", "-o", str(image)]) == 0
    out = tmp_path / "srd.png"
    assert main(["--server", live_service.grpc_address, "explain", str(image), "-o", str(out)]) == 0
    assert Image.open(out).size[0] == 224
    printed = capsys.readouterr().out
    assert "espresso" in printed and f"served by {live_service.grpc_address}" in printed
    assert main(["--server", live_service.grpc_address, "explain", str(image), "-o", str(out), "--model", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["--server", live_service.grpc_address, "models"]) == 0
    served = re.escape(f"served by {live_service.grpc_address}")
    from ierf.models.preprocessing import PIPELINE_VERSION

    assert re.search(rf"efficientnet_lite0 \(default\)\s+v{PIPELINE_VERSION}-\S+\s+{served}", capsys.readouterr().out)
    assert main(["--server", live_service.grpc_address, "layers"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    listed = [(name, int(channels), int(height), int(width)) for name, channels, height, _, width in rows]
    served = [(x.name, x.channels, x.height, x.width) for x in client_layers(live_service)]
    assert len(listed) > 10 and listed == served


def client_layers(live_service) -> list:
    from ierf_client import Client

    with Client(live_service.grpc_address, timeout=60) as c:
        return c.model().layers


def test_metrics_are_exported_through_ray(live_service, client, coffee) -> None:
    from ierf_client import InvalidArgumentError

    client.predict(coffee)
    with pytest.raises(InvalidArgumentError):
        client.predict(b"not an image")  # an error series of its own, whatever ran before
    wanted = [
        "ray_explainer_request_duration_seconds_bucket",
        "ray_explainer_stage_duration_seconds_bucket",
        "ray_explainer_stage_seconds_total",
        "ray_explainer_cache_requests_total",
        "ray_explainer_errors_total",
        "ray_explainer_inflight_requests",
        "ray_explainer_model_info",
        "ray_serve_num_grpc_requests_total",
    ]
    patterns = [
        r'ray_explainer_request_duration_seconds_bucket\{[^}]*rpc="Predict"',
        r'ray_explainer_errors_total\{[^}]*code="INVALID_ARGUMENT"',
        r'ray_explainer_cache_requests_total\{[^}]*tier="l2"',
        r'ray_explainer_model_info\{[^}]*model="efficientnet_lite0"',
    ]

    def complete(text: str) -> bool:
        return all(name in text for name in wanted) and all(re.search(p, text) for p in patterns)

    # Ray exports about every 10 s and each replica's samples arrive on their own schedule: wait for all of them.
    deadline = time.monotonic() + 90
    text = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(live_service.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            text = ""
        if complete(text):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported after 90 s: {missing}"
    unmatched = [p for p in patterns if not re.search(p, text)]
    assert not unmatched, f"series not exported after 90 s: {unmatched}"

"""The ingress alone, over fake worker handles: no Ray runtime, no model."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from ierf.images import PIPELINE_VERSION

from serving.fakes import BackPressureError
from serving.fakes import GrpcContext as _GrpcContext
from serving.fakes import Method as _Method
from serving.fakes import Response as _Response

# a preprocessing version of this build (the ingress cuts views only for its own pipeline version)
PREP = f"v{PIPELINE_VERSION}-test"


class ActorDiedError(Exception):
    """Named like Ray's: the ingress maps it to UNAVAILABLE by name."""


class _Worker:
    """A worker handle whose replica is up ("ok"), gone ("dead": calls fail) or hung (calls never return)."""

    def __init__(self, outcome: Any = None) -> None:
        self.state = "ok"
        self.outcome = outcome
        self.describe = _Method(self._describe)
        self.explain = _Method(self._explain)

    async def _answer(self, value: Any) -> Any:
        if self.state == "dead":
            raise ActorDiedError("the replica died")
        if self.state == "hung":
            await asyncio.sleep(3600)
        return value

    async def _describe(self) -> Any:
        return await self._answer("description")

    async def _explain(self, job: Any) -> Any:
        return await self._answer(self.outcome)


def _ingress(workers: dict[str, Any], **ingress: Any) -> Any:
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": m} for m in workers], "ingress": ingress})
    return Ingress.func_or_class(workers, config)


def test_health_follows_a_worker_outage_and_probes_cheaply(monkeypatch: pytest.MonkeyPatch) -> None:
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.2, raising=False)
    monkeypatch.setattr(deployments, "HEALTH_PROBE_TIMEOUT_S", 0.3, raising=False)
    monkeypatch.setattr(deployments, "HEALTH_BUSY_GRACE_S", 2.5, raising=False)  # wide: CI's loaded cores
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    worker = _Worker()
    ingress = _ingress({"m": worker})

    async def check() -> int:
        return (await ingress.Check(health_pb2.HealthCheckRequest())).status

    async def scenario() -> None:
        assert await check() == serving
        # probes are cached and shared: a burst of checks does not reach the worker again
        assert await asyncio.gather(*(check() for _ in range(20))) == [serving] * 20
        assert worker.describe.calls == 1

        worker.state = "dead"  # was: SERVING forever once the first describe had succeeded
        await asyncio.sleep(0.25)
        assert await check() == not_serving

        worker.state = "hung"  # a worker that never answers reads NOT_SERVING, and the check does not hang
        await asyncio.sleep(0.25)
        start = time.perf_counter()
        assert await asyncio.gather(check(), check()) == [not_serving] * 2
        assert time.perf_counter() - start < 10.0  # one 0.3 s probe; without its timeout it never ends

        worker.state = "ok"
        await asyncio.sleep(0.25)
        assert await check() == serving

        # busy, not dead: a probe that only times out (it queues behind requests filling the worker's
        # slots) reads SERVING while the worker answered within the grace window, NOT_SERVING after it
        worker.state = "hung"
        await asyncio.sleep(0.25)
        assert await check() == serving
        await asyncio.sleep(2.5)
        assert await check() == not_serving

    asyncio.run(scenario())


def test_health_counts_requests_as_answers_and_a_replica_dying_under_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker busy with requests is not probed (its answers to them are fresh evidence), and one whose
    replica died under a request is NOT_SERVING without waiting for the next probe."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 60.0, raising=False)
    worker = _Worker(outcome=_outcome())
    ingress = _ingress({"m": worker})

    async def scenario() -> None:
        assert await ingress._call("m", worker.explain, object(), time.time() + 5, []) is worker.outcome
        status = (await ingress.Check(health_pb2.HealthCheckRequest())).status
        assert status == health_pb2.HealthCheckResponse.SERVING and worker.describe.calls == 0
        worker.state = "dead"
        with pytest.raises(ActorDiedError):
            await ingress._call("m", worker.explain, object(), time.time() + 5, [])
        status = (await ingress.Check(health_pb2.HealthCheckRequest())).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING and worker.describe.calls == 0

    asyncio.run(scenario())


def test_ingress_stages_reach_the_stage_metric_as_well_as_provenance() -> None:
    """README lists decode and encode among ``explainer_stage_duration_seconds``'s stages: the ingress's
    own encode (packing the response) was only in provenance."""
    import numpy as np
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(outcome=_outcome())
    ingress = _ingress({"m": worker})
    observed: list[tuple[str, str]] = []
    ingress.metrics.stage = lambda stage, model, seconds: observed.append((stage, model))
    pixels = np.zeros((4, 4, 3), np.uint8)
    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))

    response = asyncio.run(ingress.Explain(pb.ExplainRequest(image=image)))
    # in the order a request meets them; "dispatch" is the wait for the worker beyond its own stages
    stages = [t.stage for t in response.provenance.timings]
    assert stages == ["admission", "decode", "dispatch", "explain", "encode", "total"]
    assert observed == [
        ("admission", "m"),
        ("decode", "m"),
        ("dispatch", "m"),
        ("encode", "m"),
    ]  # the worker observes its own


def test_an_ierf_response_that_could_pass_the_grpc_cap_is_refused_before_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's cap bounds responses too: 200 overlaid 224x224 maps (~38 MiB) would be computed and then
    dropped by a 32 MiB proxy; the ingress says so up front, with how many positions fit."""
    from types import SimpleNamespace

    from ierf.serving.errors import ResourceExhausted
    from ierf.serving.jobs import GRPC_MAX_MESSAGE_ENV
    from ierf.serving.jobs import check_response_fits as _check_response_fits
    from ierf.serving.local import GRPC_MAX_MESSAGE_ENV as LOCAL_ENV

    assert GRPC_MAX_MESSAGE_ENV == LOCAL_ENV
    desc = SimpleNamespace(input_height=224, input_width=224)
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(32 * 2**20))
    _check_response_fits(desc, 64, 4, True, True)  # ~25 MiB: fits
    with pytest.raises(ResourceExhausted, match=r"at most 83 positions"):
        _check_response_fits(desc, 200, 4, True, False)
    _check_response_fits(desc, 200, 2, False, False)  # float16 maps without overlays: ~19 MiB
    monkeypatch.delenv(GRPC_MAX_MESSAGE_ENV)
    _check_response_fits(desc, 10_000, 4, True, True)  # no cap known: nothing to check


def test_ingress_answers_a_small_image_while_large_ones_fill_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure this replaced: a burst of 16 Mpx images held a 224² request for ~10 s on a FIFO pool.
    Here large decodes are held open; the small request is admitted beside them, and an image that would
    pass the waiting room is refused at once."""
    import threading

    import numpy as np
    from ierf.serving import images
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import ResourceExhausted
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import Outcome, Provenance, Score
    from ierf_proto.v1 import explainer_pb2 as pb

    gate_open = threading.Event()
    real_pixels = images._tensor_pixels

    def slow_when_large(data: bytes, dtype: str, np_dtype: Any, shape: list[int]) -> Any:
        if shape[0] * shape[1] >= 1_000_000:
            assert gate_open.wait(30)
        return real_pixels(data, dtype, np_dtype, shape)

    monkeypatch.setattr(images, "_tensor_pixels", slow_when_large)
    outcome = Outcome(
        provenance=Provenance("m", "digest", "srd", "srd-1.0", PREP, "hash"),
        maps=np.zeros((8, 8), np.float32),
        target=Score(1, "one", 0.5, 2.0),
    )
    # large images over 1 Mpx: up to that an image may wait past the bound (it decodes in milliseconds)
    budget = {"max_pixels": 1_210_000, "decode_pixels": 2_500_000, "decode_queue_pixels": 1_210_000}
    config = ServiceConfig.from_args({"models": ["m"], "ingress": budget})
    worker = _Worker(outcome=outcome)

    async def no_description() -> None:  # requests are then checked by the (fake) worker alone
        await asyncio.sleep(3600.0)

    worker.describe = _Method(no_description)
    ingress = Ingress.func_or_class({"m": worker}, config)

    def request(side: int) -> Any:
        pixels = np.zeros((side, side), np.uint8)
        return pb.ExplainRequest(
            image=pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[side, side]))
        )

    async def scenario() -> None:
        large = [asyncio.create_task(ingress.Explain(request(1100))) for _ in range(3)]  # 2 decode, 1 waits
        for _ in range(3000):  # polled, not slept: under load the tasks take a while to reach the gate
            if ingress._decode_gate.active == 2_420_000 and ingress._decode_gate.queued == 1_210_000:
                break
            await asyncio.sleep(0.01)
        assert ingress._decode_gate.active == 2_420_000 and ingress._decode_gate.queued == 1_210_000
        start = time.perf_counter()
        small = await ingress.Explain(request(224))
        # admitted beside the held decodes: behind them it would wait for the gate, which opens only below
        assert time.perf_counter() - start < 10.0 and small.map.shape == [8, 8]
        with pytest.raises(ResourceExhausted, match="service overloaded, retry later: the ingress is decoding"):
            await ingress.Explain(request(1100))  # the waiting room holds one large image
        await asyncio.sleep(1.0)
        gate_open.set()
        answers = await asyncio.gather(*large)
        assert all(r.map.shape == [8, 8] for r in answers)
        # provenance tells the wait for the gate from the decoding: the first two decoded (held open) for
        # the whole time, the third waited for their pixels and then decoded at once
        stages = [{t.stage: t.seconds for t in r.provenance.timings} for r in answers]
        # (held >= 1 s: 0.8 s tells held from not, with room for a loaded machine)
        assert all(s["decode"] > 0.8 and s["admission"] < 0.8 for s in stages[:2]), stages
        assert stages[2]["admission"] > 0.8 and stages[2]["decode"] < 0.8, stages
        assert ingress._decode_gate.active == ingress._decode_gate.queued == 0

    try:
        asyncio.run(scenario())
    finally:
        gate_open.set()


def test_undecodable_bodies_and_long_names_get_precise_codes_over_grpc() -> None:
    """Registered as the Serve proxy registers them (``ierf.serving.protocol``), on a plain gRPC server:
    a body that is not a valid message was UNKNOWN from grpcio with a Python class name in it, and a
    10 KB model id echoed whole overflowed the caller's trailer limit (RESOURCE_EXHAUSTED from its own
    transport instead of NOT_FOUND)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ierf.serving.protocol import add_explain_service, add_health_service
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    worker = _Worker()

    async def no_description() -> None:
        await asyncio.sleep(3600.0)

    worker.describe = _Method(no_description)
    ingress = _ingress({"m": worker})
    corrupt = {
        "/ierf.v1.ExplainService/Explain": [b"\xff\xff\xff\xff", b"\x0a\x02\xc3\x28", b"\x12\xff\xff\xff\x0f"],
        "/ierf.v1.ExplainService/ListModels": [b"\xff\xff"],
        "/grpc.health.v1.Health/Check": [b"\x0a\x01\xff"],
    }

    async def scenario() -> None:
        server = grpc.aio.server()
        add_explain_service(ingress, server)
        add_health_service(ingress, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                for path, bodies in corrupt.items():
                    call = channel.unary_unary(path)  # bytes in, bytes out
                    message_type = "grpc.health.v1.HealthCheckRequest" if "Health" in path else "ierf.v1."
                    for body in bodies:
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await call(body, timeout=10)
                        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, body, info.value.details())
                        assert info.value.details().startswith(f"the request is not a valid {message_type}")
                        assert "class" not in info.value.details()
                stub = pb_grpc.ExplainServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetModel(pb.GetModelRequest(model_id="m" * 10_000), timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                assert "… (10000 characters); served: m" in info.value.details()
                assert len(info.value.details()) < 200
                health = health_pb2_grpc.HealthStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health.Check(health_pb2.HealthCheckRequest(service="x" * 100_000), timeout=10)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_the_services_are_registered_where_serves_reflection_lists_them() -> None:
    """Guards against registering the tolerant handlers by name only: Serve's proxy builds its server
    reflection list (documented as on) from the generic handlers, so without them reflection would not
    list ierf.v1.ExplainService, and grpcurl/Postman users could not discover the API. Uses Serve's own
    proxy server class, without a cluster."""
    from grpc_health.v1 import health_pb2_grpc
    from ierf.serving.protocol import add_explain_service, add_health_service
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc
    from ray.serve._private.grpc_util import get_service_names, gRPCGenericServer

    async def names() -> set[str]:
        server = gRPCGenericServer(lambda **kwargs: None)
        try:
            add_explain_service(pb_grpc.ExplainServiceServicer(), server)
            add_health_service(health_pb2_grpc.HealthServicer(), server)
            return get_service_names(server.generic_rpc_handlers)
        finally:
            await server.stop(None)

    assert {"ierf.v1.ExplainService", "grpc.health.v1.Health"} <= asyncio.run(names())


def _outcome() -> Any:
    import numpy as np
    from ierf.serving.jobs import Outcome, Provenance, Score

    return Outcome(
        provenance=Provenance("m", "digest", "srd", "srd-1.0", PREP, "hash", timings=[("explain", 0.01)]),
        maps=np.zeros((8, 8), np.float32),
        target=Score(1, "one", 0.5, 2.0),
    )


def test_a_large_decode_that_would_outlast_the_deadline_is_refused_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 16 Mpx PNG with a 10 ms budget was decoded (0.2 s) and only then refused. Once the ingress has
    timed a large decode of that kind, it refuses one that cannot finish in the time left, undecoded."""
    import io

    import numpy as np
    from ierf.serving import images
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb
    from PIL import Image

    decoded: list[tuple[int, int]] = []
    real_canonicalise = images.canonicalise

    def counting(pixels: np.ndarray) -> images.CanonicalImage:
        decoded.append(pixels.shape[:2])
        return real_canonicalise(pixels)

    monkeypatch.setattr(images, "canonicalise", counting)
    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"request_timeout_s": 0.002}})
    worker = _Worker(outcome=_outcome())

    async def no_description() -> None:
        await asyncio.sleep(3600.0)

    worker.describe = _Method(no_description)
    ingress = Ingress.func_or_class({"m": worker}, config)

    def png(height: int, width: int) -> pb.ExplainRequest:
        buffer = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
        Image.fromarray(noise).save(buffer, "PNG", compress_level=1)
        return pb.ExplainRequest(image=pb.Image(encoded=buffer.getvalue()))

    async def scenario() -> None:
        large = png(1000, 1200)
        with pytest.raises(DeadlineExceeded, match="before the request reached a worker"):
            await ingress.Explain(large)  # no estimate yet: decoded (and timed), then out of time
        assert decoded == [(1000, 1200)]
        with pytest.raises(DeadlineExceeded, match=r"but decoding this 1\.2 Mpx PNG image needs about"):
            await ingress.Explain(large)
        assert decoded == [(1000, 1200)]  # refused undecoded
        with contextlib.suppress(DeadlineExceeded):  # answered or out of time, as the machine goes
            await ingress.Explain(png(100, 100))
        assert decoded[-1] == (100, 100)  # small images are not estimated: decoded

    asyncio.run(scenario())


INGRESS_WITHOUT_TORCH = """
import asyncio, sys
import numpy as np
from ierf.serving.deployments import Ingress
from ierf.serving.jobs import Outcome, Provenance, Score
from ierf.serving.settings import ServiceConfig
from ierf_proto.v1 import explainer_pb2 as pb

class Worker:
    class explain:
        @staticmethod
        def remote(job):
            async def answer():
                return Outcome(Provenance("m", "d", "srd", "1", "v1", job.content_hash),
                               maps=np.zeros((8, 8), np.float32), target=Score(1, "one", 0.5, 2.0))
            return answer()
    describe = explain

ingress = Ingress.func_or_class({"m": Worker()}, ServiceConfig.from_args({"models": ["m"]}))
pixels = np.zeros((32, 32, 3), np.uint8)
image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[32, 32, 3]))
response = asyncio.run(ingress.Explain(pb.ExplainRequest(image=image)))
assert list(response.map.shape) == [8, 8], response
print(sorted(m for m in ("torch", "torchvision") if m in sys.modules))
"""


def test_the_ingress_serves_without_loading_torch() -> None:
    """The ingress validates, decodes and forwards: it had imported torch through the worker module (~1 s
    and ~450 MB per replica) for a few dataclasses and checks, now in ``ierf.serving.jobs``."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", INGRESS_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_metrics_name_built_in_methods_before_the_model_description_arrives() -> None:
    """The first baseline requests after an ingress start were labelled method="other"."""
    ingress = _ingress({"m": _Worker()})
    assert {"srd", "gradcam", "lrp", "integrated_gradients"} <= set(ingress._known_methods("m"))
    assert "my_plugin" not in ingress._known_methods("m")  # unknown names stay "other": bounded labels


def test_an_overload_refusal_says_when_to_retry_and_a_cap_does_not() -> None:
    """RESOURCE_EXHAUSTED also means "over a cap": the trailer is what lets a client retry only overloads."""
    import grpc
    import numpy as np
    from ierf.serving.errors import PUSHBACK_KEY, RETRY_AFTER_KEY
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(outcome=_outcome())

    async def overloaded(job: Any) -> Any:
        raise BackPressureError("Request dropped due to backpressure")

    worker.explain = _Method(overloaded)
    ingress = _ingress({"m": worker})
    pixels = np.zeros((4, 4, 3), np.uint8)
    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))
    context = _GrpcContext()
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=image), context))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "overloaded" in context.details
    # ours for the SDK, and gRPC's standard pushback for other languages' built-in retry policies
    assert context.trailers == [(RETRY_AFTER_KEY, "250"), (PUSHBACK_KEY, "250")]

    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    too_big = pb.Image(encoded=b"\x89PNG" + bytes(ingress.limits.max_bytes))
    context = _GrpcContext()
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=too_big), context))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "over the cap" in context.details
    assert context.trailers == [(PUSHBACK_KEY, "-1")]  # a cap: a retry policy must not retry it


def test_contrast_names_are_read_in_any_case_and_a_class_in_the_string_is_pointed_to_contrast_class() -> None:
    """The SDK lower-cases "MEAN"; callers of the stubs got INVALID_ARGUMENT for it. A class index in the
    string field was answered "is not 'identity', 'mean' or a class index", which the field cannot carry."""
    import numpy as np
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.jobs import ModelDescription, check_explain_args
    from ierf_proto.v1 import explainer_pb2 as pb

    jobs: list[Any] = []
    worker = _Worker(outcome=_outcome())

    async def explain(job: Any) -> Any:
        jobs.append(job)
        return _outcome()

    async def no_description() -> None:  # requests are then checked by the (fake) worker alone
        await asyncio.sleep(3600.0)

    worker.explain, worker.describe = _Method(explain), _Method(no_description)
    ingress = _ingress({"m": worker})
    pixels = np.zeros((4, 4, 3), np.uint8)
    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=image, contrast="MEAN")))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=image, contrast="Identity", contrast_class=3)))
    assert [job.contrast for job in jobs] == ["mean", 3]
    with pytest.raises(InvalidArgument, match="set either contrast"):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=image, contrast="Mean", contrast_class=3)))
    desc = ModelDescription("m", "d", 224, 224, PREP, ["c"] * 1000, [], ["srd"], "srd", "cpu")
    with pytest.raises(InvalidArgument, match=r"contrast '281' is not 'identity' or 'mean'; .* set contrast_class"):
        check_explain_args(desc, "srd", None, "281")


def _tiny_image() -> Any:
    import numpy as np
    from ierf_proto.v1 import explainer_pb2 as pb

    pixels = np.zeros((4, 4, 3), np.uint8)
    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))


def test_a_callers_method_name_never_becomes_a_metric_label() -> None:
    """Metric labels stay bounded: a method string the service does not know is counted as "other", so no
    caller can grow the series without limit."""
    from ierf_proto.v1 import explainer_pb2 as pb

    seen: list[tuple[str, str, str, str]] = []
    for method in ("x" * 300, "gradcam"):
        ingress = _ingress({"m": _Worker(outcome=_outcome())})
        ingress.metrics.request = lambda rpc, method, model, code, seconds, reason="none": seen.append(
            (rpc, method, model, code)
        )
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), method=method), _GrpcContext()))
    assert seen == [("Explain", "other", "m", "OK"), ("Explain", "gradcam", "m", "OK")]


def test_stage_metric_observes_the_seconds_provenance_reports() -> None:
    """The stage histogram's buckets are seconds: it must be fed the same seconds provenance reports."""
    from ierf_proto.v1 import explainer_pb2 as pb

    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    observed: dict[str, float] = {}
    ingress.metrics.stage = lambda stage, model, seconds: observed.__setitem__(stage, seconds)
    response = asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image())))
    reported = {t.stage: t.seconds for t in response.provenance.timings}
    assert observed
    assert all(observed[stage] == pytest.approx(reported[stage], abs=1e-9) for stage in observed)
    assert all(seconds <= reported["total"] for seconds in observed.values())


def test_model_info_reports_the_configured_limits() -> None:
    """Clients size their requests from ModelInfo: every cap it advertises is the ingress's own value."""
    from ierf.serving.convert import model_message
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf.serving.settings import IngressConfig

    desc = ModelDescription("m", "d", 224, 224, "p", ["a", "b"], [LayerShape("l", 8, 7, 7)], ["srd"], "srd", "cpu")
    limits = IngressConfig(
        max_image_bytes=1234, max_pixels=5678, max_side=99, max_positions=3, max_top_k=2, request_timeout_s=7.5
    )
    spec = model_message(desc, limits).input
    advertised = (spec.max_image_bytes, spec.max_pixels, spec.max_side, spec.max_positions, spec.max_top_k)
    assert advertised == (1234, 5678, 99, 3, 2)
    assert spec.max_deadline_s == pytest.approx(7.5)


def test_model_info_reports_the_proxys_message_cap(monkeypatch) -> None:
    """A client sizes a ComputeIERF response (P maps at input resolution) from max_message_bytes: it is the
    Serve proxy's cap from this process's environment, and 0 where none is set. (Mutation round 17: the
    field could be dropped from ModelInfo unseen.)"""
    from ierf.serving.convert import model_message
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV, IngressConfig

    desc = ModelDescription("m", "d", 224, 224, "p", ["a", "b"], [LayerShape("l", 8, 7, 7)], ["srd"], "srd", "cpu")
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(48 * 2**20))
    assert model_message(desc, IngressConfig()).input.max_message_bytes == 48 * 2**20
    monkeypatch.delenv(GRPC_MAX_MESSAGE_ENV)
    assert model_message(desc, IngressConfig()).input.max_message_bytes == 0


class _TimedContext(_GrpcContext):
    """A caller that sent its budget in ``ierf-timeout-ms``, as the SDK does."""

    def __init__(self, millis: str | None) -> None:
        super().__init__()
        self.millis = millis

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [] if self.millis is None else [("ierf-timeout-ms", self.millis)]


@pytest.mark.parametrize(
    ("millis", "cancel_after_s", "expected"),
    [
        ("1000", 0.6, "DEADLINE_EXCEEDED"),  # the proxy's cancel as the caller's deadline expires (slack 0.5 s)
        ("5000", 0.05, "CANCELLED"),  # the caller gave up long before its deadline
        (None, 0.05, "CANCELLED"),  # no budget sent: a cancel is all the service knows
        ("soon", 0.05, "INVALID_ARGUMENT"),  # a malformed budget is refused at once, never read as expired
    ],
)
def test_a_cancel_at_the_callers_deadline_is_counted_as_deadline_exceeded(
    millis: str | None, cancel_after_s: float, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serve's proxy turns an expired gRPC deadline into a cancel: the metrics count it as the caller saw it
    (DEADLINE_EXCEEDED) when the caller's budget has run out, so dashboards and alerts tell slow answers
    from callers that hang up."""
    from ierf.serving import deployments
    from ierf_proto.v1 import explainer_pb2 as pb

    # wide margins either side of the cancel, so a slow test machine cannot reorder it with the ingress's
    # own deadline (1 s) or the slack's start (0.5 s)
    monkeypatch.setattr(deployments, "DEADLINE_SLACK_S", 0.5)
    worker = _Worker(outcome=_outcome())
    worker.state = "hung"
    ingress = _ingress({"m": worker})
    seen: list[str] = []
    ingress.metrics.request = lambda rpc, method, model, code, seconds, reason="none": seen.append(code)
    request = pb.ExplainRequest(image=_tiny_image())

    async def scenario() -> None:
        call = asyncio.ensure_future(ingress.Explain(request, _TimedContext(millis)))
        await asyncio.sleep(cancel_after_s)
        if millis == "soon":  # refused at once, before any cancel
            assert call.done()
            return
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert seen == [expected]


class _Capture:
    """A worker handle that records the jobs it is sent and answers each with ``outcome``; it never
    describes itself, so the ingress forwards requests with only its own checks."""

    def __init__(self, outcome: Any) -> None:
        self.jobs: list[Any] = []

        async def answer(job: Any) -> Any:
            self.jobs.append(job)
            return outcome

        async def never() -> None:
            await asyncio.sleep(3600.0)

        self.explain = self.ierf = self.predict = _Method(answer)
        self.describe = _Method(never)


def _full_outcome() -> Any:
    import numpy as np
    from ierf.serving.jobs import LayerShape, Outcome, Provenance, Score

    return Outcome(
        provenance=Provenance("m", "digest", "srd", "srd-1.0", PREP, "hash", timings=[("explain", 0.01)]),
        maps=np.zeros((1, 8, 8), np.float32),
        target=Score(1, "one", 0.5, 2.0),
        top_classes=[Score(1, "one", 0.5, 2.0)],
        layer=LayerShape("l", 4, 8, 8),
    )


def test_target_class_0_reaches_the_worker_as_class_0_not_as_auto() -> None:
    """``target`` is an optional field: a caller asking for class 0 set it, and must get class 0's map, not
    the predicted class's (reading the value instead of its presence turns 0 into "auto")."""
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), target=0)))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image())))
    assert [job.target for job in worker.jobs] == [0, None]


def test_the_advertised_position_and_top_k_limits_are_inclusive() -> None:
    """ModelInfo advertises max_positions and max_top_k as what a request may ask for: exactly the limit is
    served, one more is refused."""
    from ierf.serving.errors import InvalidArgument
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    limits = ingress.config.ingress
    for count in (limits.max_positions, limits.max_positions + 1):
        request = pb.ComputeIERFRequest(image=_tiny_image(), layer="l", positions=[pb.Position()] * count)
        if count > limits.max_positions:
            with pytest.raises(InvalidArgument, match=f"{count} positions requested; at most {limits.max_positions}"):
                asyncio.run(ingress.ComputeIERF(request))
        else:
            asyncio.run(ingress.ComputeIERF(request))
    asyncio.run(ingress.Predict(pb.PredictRequest(image=_tiny_image(), top_k=limits.max_top_k)))
    with pytest.raises(InvalidArgument, match="out of range"):
        asyncio.run(ingress.Predict(pb.PredictRequest(image=_tiny_image(), top_k=limits.max_top_k + 1)))
    assert len(worker.jobs) == 2 and len(worker.jobs[0].positions) == limits.max_positions
    assert worker.jobs[1].top_k == limits.max_top_k


def test_an_ierf_job_carries_the_size_of_the_map_values_the_caller_asked_for() -> None:
    """The worker sizes a ComputeIERF response by the bytes per map value: float16 maps are half the size,
    so a request that fits only as float16 must not be refused as if it asked for float32."""
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    for dtype in (pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UNSPECIFIED):
        request = pb.ComputeIERFRequest(image=_tiny_image(), layer="l", positions=[pb.Position()], map_dtype=dtype)
        asyncio.run(ingress.ComputeIERF(request))
    assert [job.map_itemsize for job in worker.jobs] == [2, 4, 4]


def test_a_budget_of_zero_ms_is_a_deadline_that_has_passed_not_a_malformed_one() -> None:
    """``ierf-timeout-ms`` takes any number of milliseconds >= 0: a caller whose budget ran out sends 0 and
    must hear DEADLINE_EXCEEDED (retry with more time), not INVALID_ARGUMENT (fix the request)."""
    import grpc
    from ierf.serving.deployments import _caller_budget_s
    from ierf_proto.v1 import explainer_pb2 as pb

    assert _caller_budget_s(_TimedContext("0")) == 0.0
    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    context = _TimedContext("0")
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), context))
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED, context.details


@pytest.mark.parametrize("value", [" 500 ", "1_000", "1e3", "inf", "-5", "0x10", "", "9" * 400])
def test_a_budget_is_plain_digits_and_finite(value: str) -> None:
    """Python's float() reads " 500 ", "1_000", "1e3" and "inf", which a Go or Java server refuses, and a
    400-digit budget overflowed to inf and was refused as "not a number": each is refused as malformed, saying
    what the header must hold."""
    from ierf.serving.deployments import _caller_budget_s
    from ierf.serving.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"finite number of milliseconds >= 0 \(digits"):
        _caller_budget_s(_TimedContext(value))
    assert _caller_budget_s(_TimedContext("1500.5")) == pytest.approx(1.5005)


def test_a_request_that_times_out_waiting_for_the_worker_cancels_the_workers_job() -> None:
    """Serve does not forward the deadline: unless the ingress cancels the call, the job stays queued (or
    running) on the worker's one compute thread for a caller that has already been answered."""
    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(outcome=_outcome())
    worker.state = "hung"
    responses: list[_Response] = []
    remote = worker.explain.remote
    worker.explain.remote = lambda job: responses.append(remote(job)) or responses[-1]
    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"request_timeout_s": 0.3}})
    ingress = Ingress.func_or_class({"m": worker}, config)
    with pytest.raises(DeadlineExceeded, match="waiting for the worker"):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image())))
    assert len(responses) == 1 and responses[0].cancelled


def test_a_long_error_message_is_clipped_before_it_reaches_the_trailers() -> None:
    """The status message travels in the trailers, which clients cap at 8 KB: a long engine message must be
    cut (saying its length), or the caller gets a transport error instead of the real status."""
    import grpc
    from ierf.serving.errors import MAX_MESSAGE_CHARS, InvalidArgument
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(outcome=_outcome())

    async def refuse(job: Any) -> Any:
        raise InvalidArgument("x" * 10_000)

    worker.explain = _Method(refuse)
    context = _GrpcContext()
    asyncio.run(_ingress({"m": worker}).Explain(pb.ExplainRequest(image=_tiny_image()), context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(context.details) <= MAX_MESSAGE_CHARS and context.details.endswith("[10000 chars]")


def test_a_handle_call_gets_a_typed_service_error_for_any_worker_failure() -> None:
    """Without a gRPC context (local mode, tests) the ingress raises the error the caller would see: an
    engine ValueError as InvalidArgument, anything else as an INTERNAL ServiceError that leaks nothing."""
    import grpc
    from ierf.serving.errors import InvalidArgument, ServiceError
    from ierf_proto.v1 import explainer_pb2 as pb

    for failure, expected, code in (
        (ValueError("engine: bad layer"), InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("secret path /etc/x"), ServiceError, grpc.StatusCode.INTERNAL),
    ):
        worker = _Worker(outcome=_outcome())

        async def fail(job: Any, failure: Exception = failure) -> Any:
            raise failure

        worker.explain = _Method(fail)
        with pytest.raises(expected) as info:
            asyncio.run(_ingress({"m": worker}).Explain(pb.ExplainRequest(image=_tiny_image())))
        assert info.value.code == code and "secret" not in info.value.message


def test_the_decode_estimate_covers_images_from_exactly_one_megapixel_and_spares_smaller_ones() -> None:
    """Decodes of at least DECODE_ESTIMATE_MIN_PIXELS teach the per-pixel rate and are refused by it; smaller
    images (fixed costs dominate) are neither timed nor refused, however slow the large ones were."""
    import numpy as np
    from ierf.serving.deployments import DECODE_ESTIMATE_MIN_PIXELS
    from ierf.serving.errors import DeadlineExceeded
    from ierf_proto.v1 import explainer_pb2 as pb

    assert DECODE_ESTIMATE_MIN_PIXELS == 1000 * 1000
    pixels = np.zeros((1000, 1000, 3), np.uint8)
    large = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[1000, 1000, 3]))
    ingress = _ingress({"m": _Capture(_full_outcome())})
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=large)))
    assert set(ingress._decode_rates) == {"tensor"}  # timed: exactly 1 Mpx is large
    ingress._decode_rates["tensor"] = 1000.0  # seconds per pixel: no deadline fits even 16 pixels
    with pytest.raises(DeadlineExceeded, match=r"decoding this 1\.0 Mpx tensor image needs about"):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=large)))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image())))  # small: decoded regardless


def test_a_description_that_failed_to_arrive_is_fetched_again_by_the_next_request() -> None:
    """The background fetch of a model's description may fail (a worker restarting): the next request must
    try again, or the ingress never checks requests itself and every mistake waits behind the queue."""
    worker = _Worker()
    answers = iter([RuntimeError("replica restarting"), "description"])

    async def describe() -> Any:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    worker.describe = _Method(describe)
    ingress = _ingress({"m": worker})

    async def scenario() -> None:
        assert ingress._description_if_known("m") is None
        await asyncio.sleep(0.05)  # the first fetch fails
        assert ingress._description_if_known("m") is None
        await asyncio.sleep(0.05)
        assert ingress._description_if_known("m") == "description"

    asyncio.run(scenario())
    assert worker.describe.calls == 2


def test_health_is_serving_only_when_every_models_worker_answers() -> None:
    """One server, several models: a load balancer sending traffic for a model whose worker is gone would
    see only failures, so one dead worker makes the whole server NOT_SERVING."""
    from grpc_health.v1 import health_pb2

    alive, dead = _Worker(), _Worker()
    dead.state = "dead"
    ingress = _ingress({"a": alive, "b": dead})
    status = asyncio.run(ingress.Check(health_pb2.HealthCheckRequest())).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    dead.state = "ok"
    assert asyncio.run(_ingress({"a": alive, "b": dead}).Check(health_pb2.HealthCheckRequest())).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_provenance_sums_a_stage_met_twice_and_keeps_the_positions_order() -> None:
    """Provenance timings are read as a mapping: a stage met twice (the overlay's and the response's
    encode) reports the sum; positions travel as (row, col), the order the engine reads them in."""
    from ierf.serving.convert import positions_array, provenance_message
    from ierf.serving.jobs import Provenance
    from ierf_proto.v1 import explainer_pb2 as pb

    prov = Provenance("m", "d", "srd", "v", "p", "h", timings=[("encode", 0.25), ("explain", 1.0)])
    message = provenance_message(prov, [("encode", 0.5), ("total", 2.0)], "r", "1.0")
    assert [(t.stage, t.seconds) for t in message.timings] == [("explain", 1.0), ("encode", 0.75), ("total", 2.0)]
    positions = positions_array([pb.Position(row=1, col=5), pb.Position(row=2, col=0)])
    assert positions.tolist() == [[1, 5], [2, 0]] and positions.dtype.name == "int64"
    assert positions_array([]).shape == (0, 2)


class _Contexts(_GrpcContext):
    """A caller whose metadata carries ``ierf-timeout-ms`` more than once (a proxy or interceptor adding its own)."""

    def __init__(self, *millis: str) -> None:
        super().__init__()
        self.millis = millis

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("ierf-timeout-ms", m) for m in self.millis]


def test_the_shortest_of_several_timeout_budgets_is_the_one_that_counts() -> None:
    """Guards against taking the longest of repeated ``ierf-timeout-ms`` entries: the caller stops waiting at
    its shortest budget, so a longer one would keep the worker busy for an answer nobody reads."""
    from ierf.serving.deployments import _caller_budget_s

    assert _caller_budget_s(_Contexts("5000", "200")) == pytest.approx(0.2)
    assert _caller_budget_s(_Contexts("200", "5000")) == pytest.approx(0.2)


def test_a_replica_that_died_under_a_request_gets_no_busy_grace_from_its_earlier_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards against keeping a worker's last-answer time after its replica died under a request: once the 2 s
    of NOT_SERVING have passed, a probe that only times out would read SERVING for the rest of the 30 s busy
    grace on the strength of answers the dead replica gave, as a probe that fails does not."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.2)
    monkeypatch.setattr(deployments, "HEALTH_PROBE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(deployments, "HEALTH_BUSY_GRACE_S", 60.0)
    worker = _Worker(outcome=_outcome())
    ingress = _ingress({"m": worker})

    async def scenario() -> int:
        await ingress._call("m", worker.explain, object(), time.time() + 5, [])  # an answer: fresh evidence
        worker.state = "dead"
        with pytest.raises(ActorDiedError):
            await ingress._call("m", worker.explain, object(), time.time() + 5, [])
        worker.state = "hung"  # the replacement does not answer its probe
        await asyncio.sleep(0.3)  # past HEALTH_CACHE_S: a fresh probe decides
        return (await ingress.Check(health_pb2.HealthCheckRequest())).status

    assert asyncio.run(scenario()) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_health_probe_that_times_out_is_cancelled_at_the_worker() -> None:
    """Guards against leaving a timed-out ``describe`` probe queued: it waits in Serve's router behind a busy
    worker's requests, and every later probe would add another to the same queue."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments

    worker = _Worker()
    worker.state = "hung"
    responses: list[_Response] = []
    remote = worker.describe.remote
    worker.describe.remote = lambda: responses.append(remote()) or responses[-1]
    ingress = _ingress({"m": worker})
    saved = deployments.HEALTH_PROBE_TIMEOUT_S
    deployments.HEALTH_PROBE_TIMEOUT_S = 0.1
    try:
        status = asyncio.run(ingress.Check(health_pb2.HealthCheckRequest())).status
    finally:
        deployments.HEALTH_PROBE_TIMEOUT_S = saved
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert len(responses) == 1 and responses[0].cancelled


def test_the_inflight_gauge_returns_to_zero_after_refused_requests() -> None:
    """Guards against the in-flight decrement running only on success: every refusal (over gRPC or through a
    handle) would leave ``explainer_inflight_requests`` one higher for good, and the dashboard's load panel
    would climb with the error count."""
    from ierf.serving.errors import NotFound
    from ierf_proto.v1 import explainer_pb2 as pb

    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), model_id="nope"), _GrpcContext()))
    with pytest.raises(NotFound):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), model_id="nope")))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image())))
    gauges = ingress.metrics._gauges
    assert gauges[("explainer_inflight_requests", (("rpc", "Explain"),))] == 0


def test_an_unknown_model_is_marked_never_retry() -> None:
    """Guards against NOT_FOUND losing ``grpc-retry-pushback-ms: -1``: the README lists it among the refusals
    of the request itself, which a gRPC retry policy must not retry (the same model id fails every time)."""
    import grpc
    from ierf.serving.errors import PUSHBACK_KEY
    from ierf_proto.v1 import explainer_pb2 as pb

    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    context = _GrpcContext()
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), model_id="nope"), context))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert context.trailers == [(PUSHBACK_KEY, "-1")]


def test_the_ingress_sizes_a_float16_ierf_response_as_float16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards against the ingress's own response-size check assuming float32 maps: with the model's description
    at hand, a ComputeIERF that fits the proxy's cap only as float16 would be refused with RESOURCE_EXHAUSTED
    although the worker (which sizes by the job's itemsize) would serve it."""
    from ierf.serving.errors import ResourceExhausted
    from ierf.serving.jobs import GRPC_MAX_MESSAGE_ENV, LayerShape, ModelDescription
    from ierf_proto.v1 import explainer_pb2 as pb

    positions = 64
    pixels = 224 * 224
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(positions * pixels * 3 + (1 << 16)))  # 2 bytes fit, 4 do not
    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    layer = LayerShape("l", 4, 8, 8)
    # the digest the worker's answers carry: another one would make the ingress drop the description as stale
    ingress._descriptions["m"] = ModelDescription(
        "m", "digest", 224, 224, PREP, ["c"] * 10, [layer], ["srd"], "srd", "cpu"
    )

    def request(dtype: int) -> Any:
        return pb.ComputeIERFRequest(
            image=_tiny_image(), layer="l", positions=[pb.Position()] * positions, map_dtype=dtype
        )

    asyncio.run(ingress.ComputeIERF(request(pb.DATA_TYPE_FLOAT16)))
    with pytest.raises(ResourceExhausted):
        asyncio.run(ingress.ComputeIERF(request(pb.DATA_TYPE_FLOAT32)))
    assert [job.map_itemsize for job in worker.jobs] == [2]


def test_get_model_reports_the_weights_a_restarted_worker_serves() -> None:
    """Serve restarts a worker replica that died (or adds one when scaling), and the new replica reads its weights
    file again: replaced meanwhile, the answers' provenance carries the new digest. GetModel/ListModels kept the
    first description for good (the health probe's ``setdefault`` too), so they named weights no replica served."""
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf_proto.v1 import explainer_pb2 as pb

    served = {"digest": "old"}

    async def describe() -> Any:
        layer = LayerShape("l", 4, 8, 8)
        return ModelDescription("m", served["digest"], 224, 224, PREP, ["c"] * 10, [layer], ["srd"], "srd", "cpu")

    async def explain(job: Any) -> Any:
        outcome = _full_outcome()
        outcome.provenance.weights_digest = served["digest"]
        return outcome

    worker = _Worker()
    worker.describe, worker.explain = _Method(describe), _Method(explain)
    ingress = _ingress({"m": worker})
    assert asyncio.run(ingress.GetModel(pb.GetModelRequest(model_id="m"))).weights_digest == "old"

    served["digest"] = "new"  # the replica was restarted on a replaced weights file
    answer = asyncio.run(ingress.Explain(pb.ExplainRequest(model_id="m", image=_tiny_image())))
    assert answer.provenance.weights_digest == "new"
    assert asyncio.run(ingress.GetModel(pb.GetModelRequest(model_id="m"))).weights_digest == "new"
    listed = asyncio.run(ingress.ListModels(pb.ListModelsRequest()))
    assert [m.weights_digest for m in listed.models] == ["new"]


def test_the_proxys_parser_does_not_build_millions_of_positions_for_the_ingress() -> None:
    """A 36 MiB ComputeIERF body (under the 40 MiB message cap) of 19 M empty positions took the Serve
    proxy from ~0.3 to 1.05 GB and the ingress to 1.05 GB for one call, only for the ingress to count them
    and refuse (at most 64); three at once took the proxy to 2.7 GB (README sizes it at ~290 MB under load).
    The proxy parses bodies with ``ierf.serving.protocol``'s deserializers, the one place that can refuse
    such a body before it is expanded ~20x and shipped: it must not hand the ingress a million positions."""
    from ierf.serving.protocol import UnparsedRequest, add_explain_service
    from ierf_proto.v1 import explainer_pb2 as pb
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    class Collect:
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            self.handlers.update(handlers)

    server = Collect()
    add_explain_service(pb_grpc.ExplainServiceServicer(), server)
    parse = server.handlers["ComputeIERF"].request_deserializer
    header = pb.ComputeIERFRequest(layer="x", image=pb.Image(encoded=b"\x89PNG")).SerializeToString()
    parsed = parse(header + b"\x22\x00" * 1_000_000)  # field 4 (positions), an empty Position, 1 M times
    assert isinstance(parsed, UnparsedRequest) or len(parsed.positions) < 1_000_000


def test_the_proxys_walk_refuses_unknown_field_floods_and_packed_shapes_and_passes_large_real_bodies() -> None:
    """The walk before parsing counts fields of one message and entries of packed fields too (a Tensor.shape
    of 2 M dims nested in Image, 5 M unknown fields), and leaves a large ordinary body to the parser."""
    import os

    from ierf.serving.protocol import MAX_FIELDS, MAX_REPEATED_ENTRIES, UnparsedRequest, oversized
    from ierf_proto.v1 import explainer_pb2 as pb

    def length_delimited(number: int, payload: bytes) -> bytes:
        size, out = len(payload), bytearray()
        while True:
            byte, size = size & 0x7F, size >> 7
            out.append(byte | (0x80 if size else 0))
            if not size:
                break
        return bytes([number << 3 | 2]) + bytes(out) + payload

    tensor = b"\x0a\x03abc\x10\x01" + length_delimited(3, b"\x07" * 2_000_000)
    shape_flood = length_delimited(2, length_delimited(2, tensor))  # PredictRequest.image.tensor.shape
    assert oversized(shape_flood, pb.PredictRequest.DESCRIPTOR) == (
        f"ierf.v1.Tensor.shape holds over {MAX_REPEATED_ENTRIES} entries"
    )
    unknown_flood = b"\xf8\x07\x00" * (MAX_FIELDS + 10)  # field 127, varint 0: kept by the parser as unknown
    assert oversized(unknown_flood, pb.ExplainRequest.DESCRIPTOR) == (
        f"ierf.v1.ExplainRequest holds over {MAX_FIELDS} fields"
    )
    real = pb.ExplainRequest(image=pb.Image(encoded=os.urandom(3_000_000)), target=5).SerializeToString()
    assert oversized(real, pb.ExplainRequest.DESCRIPTOR) is None
    parsed = pb.ExplainRequest.FromString(real)
    assert isinstance(parsed, pb.ExplainRequest) and not isinstance(parsed, UnparsedRequest)


def test_a_health_probe_stores_the_replicas_latest_description(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the health probe storing what the worker answers now (not ``setdefault``): with no Explain to
    carry the new digest, a replica restarted on a replaced weights file is seen only by the probe, and
    GetModel/ListModels kept naming the first weights for good."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf_proto.v1 import explainer_pb2 as pb

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.0, raising=False)  # every Check probes
    served = {"digest": "old"}

    async def describe() -> Any:
        layer = LayerShape("l", 4, 8, 8)
        return ModelDescription("m", served["digest"], 224, 224, PREP, ["c"] * 10, [layer], ["srd"], "srd", "cpu")

    worker = _Worker()
    worker.describe = _Method(describe)
    ingress = _ingress({"m": worker})

    async def scenario() -> None:
        assert (await ingress.GetModel(pb.GetModelRequest(model_id="m"))).weights_digest == "old"
        served["digest"] = "new"  # the replica was restarted on a replaced weights file
        status = (await ingress.Check(health_pb2.HealthCheckRequest())).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert (await ingress.GetModel(pb.GetModelRequest(model_id="m"))).weights_digest == "new"

    asyncio.run(scenario())


def test_the_proxys_walk_lets_exactly_the_cap_of_positions_through() -> None:
    """Guards the walk's ``> MAX_REPEATED_ENTRIES``: settings accept ``max_positions`` up to that cap ("at most
    65536"), so a request with exactly that many positions must reach the ingress, and one more is refused."""
    from ierf.serving.protocol import MAX_REPEATED_ENTRIES, oversized
    from ierf_proto.v1 import explainer_pb2 as pb

    header = pb.ComputeIERFRequest(layer="x", image=pb.Image(encoded=b"\x89PNG")).SerializeToString()
    at_cap = header + b"\x22\x00" * MAX_REPEATED_ENTRIES  # field 4 (positions), an empty Position
    assert oversized(at_cap, pb.ComputeIERFRequest.DESCRIPTOR) is None
    assert oversized(at_cap + b"\x22\x00", pb.ComputeIERFRequest.DESCRIPTOR) == (
        f"ierf.v1.ComputeIERFRequest.positions holds over {MAX_REPEATED_ENTRIES} entries"
    )


def _described(ingress: Any, resize: int = 36, crop: int = 32) -> None:
    from ierf.serving.jobs import LayerShape, ModelDescription

    ingress._descriptions["m"] = ModelDescription(
        id="m",
        weights_digest="digest",
        input_height=crop,
        input_width=crop,
        preprocess_version=PREP,  # as _full_outcome's provenance says
        class_names=[str(i) for i in range(10)],
        layers=[LayerShape("l", 4, 8, 8)],
        methods=["srd"],
        default_method="srd",
        device="cpu",
        resize=resize,
    )


def _pixels_message(pixels: Any) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(pixels.shape)))


def test_a_large_image_travels_to_the_worker_as_the_models_view_and_a_small_one_whole() -> None:
    """The hop to the worker costs by the byte: a decoded photo is cut to the model's view here (the very
    pixels the worker's preprocessing makes) once the model's description is known; a small image, or
    one sent before the description arrived, travels whole. (Repeats by content hash alone are off here:
    this fake worker would answer them all.)"""
    import numpy as np
    from ierf.images import resize_crop
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker}, remembered_images=0)
    photo = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_pixels_message(photo))))  # no description yet
    _described(ingress)
    response = asyncio.run(ingress.Explain(pb.ExplainRequest(image=_pixels_message(photo))))
    asyncio.run(ingress.Predict(pb.PredictRequest(image=_pixels_message(photo))))
    asyncio.run(
        ingress.ComputeIERF(pb.ComputeIERFRequest(image=_pixels_message(photo), layer="l", positions=[pb.Position()]))
    )
    small = photo[:40, :40].copy()  # 4800 bytes: under twice the view's 3072
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_pixels_message(small))))
    whole, *viewed, last = worker.jobs
    assert whole.view_version == "" and whole.pixels.shape == photo.shape
    for job in viewed:
        assert job.view_version == PREP and np.array_equal(job.pixels, resize_crop(photo, 36, 32))
        assert job.content_hash == whole.content_hash  # the key names the decoded image, not the view
    assert last.view_version == "" and last.pixels.shape == small.shape
    assert "preprocess" in {t.stage for t in response.provenance.timings}


def test_a_view_the_worker_refuses_as_stale_is_sent_again_whole_and_the_description_dropped() -> None:
    """After a redeploy with other preprocessing, a replica refuses a view cut by the old description: the
    caller still gets its answer, from the decoded image, and the ingress stops cutting by that description."""
    import numpy as np
    from ierf.serving.errors import StaleView
    from ierf_proto.v1 import explainer_pb2 as pb

    jobs: list[Any] = []

    async def answer(job: Any) -> Any:
        jobs.append(job)
        return StaleView("view made by preprocessing v1") if job.view_version else _full_outcome()

    worker = _Capture(_full_outcome())
    worker.explain = _Method(answer)
    ingress = _ingress({"m": worker})
    _described(ingress)
    photo = np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    response = asyncio.run(ingress.Explain(pb.ExplainRequest(image=_pixels_message(photo))))
    assert response.map.shape == [1, 8, 8]
    assert [job.view_version for job in jobs] == [PREP, ""] and jobs[1].pixels.shape == photo.shape
    assert "m" not in ingress._descriptions


def _answers_with(preprocess_version: str) -> Any:
    import dataclasses

    outcome = _full_outcome()
    outcome.provenance = dataclasses.replace(
        outcome.provenance, weights_digest="digest", preprocess_version=preprocess_version
    )
    return outcome


def test_an_answer_made_with_other_preprocessing_than_the_description_refreshes_getmodel() -> None:
    """A redeploy that changes only a model's resize (same weights): the new ingress replica comes up first
    and describes an old worker replica still serving, then the new replicas take over. Their answers carry
    the new preprocess_version, but the ingress dropped its description only on another weights digest (or
    a StaleView, which small images never meet), so GetModel/ListModels kept reporting the old resize while
    every answer was made with the new one. Seen live: serve.run redeploy of resnet18 resize 256 -> 320 under
    a stream of small-image requests; GetModel said v1-r256 for the whole run, provenance v1-r320."""
    import dataclasses

    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_answers_with(f"v{PIPELINE_VERSION}-r40-c32"))
    ingress = _ingress({"m": worker})
    _described(ingress)  # fetched from an old replica: v1-r36-c32, resize 36
    new = dataclasses.replace(ingress._descriptions["m"], preprocess_version=f"v{PIPELINE_VERSION}-r40-c32", resize=40)

    async def describe() -> Any:
        return new

    worker.describe = _Method(describe)
    answer = asyncio.run(ingress.Predict(pb.PredictRequest(image=_tiny_image())))  # small: travels whole
    assert answer.provenance.preprocess_version == f"v{PIPELINE_VERSION}-r40-c32"
    info = asyncio.run(ingress.GetModel(pb.GetModelRequest(model_id="m")))
    assert info.input.preprocess_version == answer.provenance.preprocess_version
    listed = asyncio.run(ingress.ListModels(pb.ListModelsRequest()))
    assert [m.input.preprocess_version for m in listed.models] == [f"v{PIPELINE_VERSION}-r40-c32"]


def test_a_model_with_a_non_square_input_gets_the_decoded_image_not_a_square_cut() -> None:
    """resize_crop cuts a square (crop x crop): a model whose input is not square cannot be given it, and the
    worker would refuse it as stale (the ingress then drops the description and cuts no more). Such a model's
    images travel whole, with the description kept."""
    import dataclasses

    import numpy as np
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    _described(ingress)
    ingress._descriptions["m"] = dataclasses.replace(ingress._descriptions["m"], input_width=40)
    photo = np.random.default_rng(2).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_pixels_message(photo))))
    (job,) = worker.jobs
    assert job.view_version == "" and job.pixels.shape == photo.shape
    assert "m" in ingress._descriptions


def test_only_a_deadline_the_servers_cap_bound_names_the_cap_when_time_runs_out() -> None:
    """A refusal for time names ``request_timeout_s`` only when the server's cap bound the deadline (no caller
    budget, or one above the cap): a caller whose own shorter budget ran out is told about its deadline, which
    it can raise, not sent to the operator."""
    import grpc
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    def refusal(context: Any) -> str:
        worker = _Worker(outcome=_outcome())
        worker.state = "hung"
        config = ServiceConfig.from_args({"models": ["m"], "ingress": {"request_timeout_s": 0.2}})
        ingress = Ingress.func_or_class({"m": worker}, config)
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), context))
        assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED, context.details
        return context.details

    assert "request_timeout_s = 0.2 s" in refusal(_GrpcContext())  # no budget sent: the cap is the deadline
    assert "request_timeout_s = 0.2 s" in refusal(_TimedContext("5000"))  # a budget over the cap, cut to it
    assert "request_timeout_s" not in refusal(_TimedContext("100"))  # the caller's own shorter budget

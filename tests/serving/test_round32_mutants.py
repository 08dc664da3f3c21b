"""Mutation round 32 on the ingress (``ierf.serving.deployments``), ``ierf.serving.metrics`` and
``ierf.serving.remote_backend``.

Each test fails on a plausible slip that the suite let through: a caller budget above ``request_timeout_s`` taken
as the deadline instead of the cap; a cancelled call with a malformed budget counted as its deadline passing;
shedding after a worker's refusal that outlives a job going through, or lasts RETRY_AFTER_MS seconds; the dispatch
stage counting the worker's own seconds; overload and cap swapped in the errors' reason; an empty layer, both
contrasts, or top_k 0 handled wrongly; ComputeIERF labelled without its method; a description fetched once per
request; the health service deaf to its own name, List missing it, Watch answering other than UNIMPLEMENTED; the
wait for a worker sleeping past the deadline; an image of exactly twice the view's size sent whole; a deployment
with a replica running taken for down, the caller's request id lost from provenance, or a failed one's reason read
off the traceback's first line. In the metrics wrapper: the "none" of an empty label lost, OK answers counted as
errors or an error's reason dropped, the in-flight gauge not summed per RPC, a zero-second stage reaching Ray's
counter (which raises), stage seconds counted as observations, an L1 value sized as a Redis one, swapped labels, a
gauge left unset, byte buckets replaced by seconds. In the ``--server`` backend: exit 2 or 1 for the wrong codes,
the server's message dropped, a model list cut or without its default marked, ``--weights``/``--random-init``/a
missing ``--position`` taken, other than 5 classes asked for, the alias or a transposed grid reported for an iERF,
no model view asked for, a probability reported as the logit, ``MEAN`` read as a class name, an unreachable server
retried for the whole budget, ``--timeout`` ignored.
The ingress tests use the fake Serve handles of ``serving.fakes`` as test_ingress.py does; the backend talks to
a real gRPC server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from ierf_proto.v1 import explainer_pb2 as pb

from serving.fakes import BackPressureError, GrpcContext, Method
from serving.test_ingress import (
    PREP,
    _Capture,
    _described,
    _full_outcome,
    _ingress,
    _outcome,
    _pixels_message,
    _tiny_image,
    _Worker,
)


class _Budget(GrpcContext):
    """A caller that sent ``ierf-timeout-ms`` as ``millis``."""

    def __init__(self, millis: str) -> None:
        super().__init__()
        self.millis = millis

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("ierf-timeout-ms", self.millis)]


# ------------------------------------------------------------------------------------------------ ingress
def test_a_caller_budget_above_the_servers_cap_is_cut_to_the_cap() -> None:
    """D07: ``request_timeout_s`` caps every call: a caller sending ten minutes must get a job whose deadline
    is the cap's (the worker stops at it), not its own ten minutes."""
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    worker = _Capture(_full_outcome())
    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"request_timeout_s": 30}})
    ingress = Ingress.func_or_class({"m": worker}, config)
    sent = time.time()
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), _Budget("600000")))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), _Budget("10000")))
    capped, own = [job.deadline - sent for job in worker.jobs]
    assert 25 < capped <= 30 + (time.time() - sent), capped
    assert 5 < own <= 10 + (time.time() - sent), own


def test_a_cancelled_health_check_with_a_malformed_budget_is_counted_as_cancelled() -> None:
    """D05: a cancel is DEADLINE_EXCEEDED in the metrics only when the caller's budget says it ran out; a budget
    that cannot be read says nothing (Check reads no budget, so it is not refused for it), so the cancel is
    CANCELLED."""
    worker = _Worker(outcome=_outcome())
    worker.state = "hung"  # the health probe waits: the call is cancelled while it does
    ingress = _ingress({"m": worker})
    seen: list[str] = []
    ingress.metrics.request = lambda rpc, method, model, code, seconds, reason="none": seen.append(code)

    async def scenario() -> None:
        from grpc_health.v1 import health_pb2

        call = asyncio.ensure_future(ingress.Check(health_pb2.HealthCheckRequest(), _Budget("soon")))
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())
    assert seen == ["CANCELLED"]


class _Gated:
    """A worker handle whose jobs wait for ``release`` (set) and answer ``outcome``, or are refused with
    Serve's back-pressure while ``full``."""

    def __init__(self, outcome: Any) -> None:
        self.release = asyncio.Event()
        self.full = False
        self.reached = 0

        async def answer(job: Any) -> Any:
            self.reached += 1
            if self.full:
                raise BackPressureError("Request dropped due to backpressure")
            await self.release.wait()
            return outcome

        async def never() -> None:
            await asyncio.sleep(3600.0)

        self.explain = self.ierf = self.predict = Method(answer)
        self.describe = Method(never)


def test_a_job_answered_after_a_refusal_reopens_the_workers_queue_at_once() -> None:
    """D18: a refusal sheds the next requests for RETRY_AFTER_MS without decoding them; a job that then goes
    through proves the queue has room, so the shedding stops there (a request right after it reaches the
    worker)."""
    from ierf.serving.errors import Overloaded

    worker = _Gated(_full_outcome())
    ingress = _ingress({"m": worker})
    request = pb.ExplainRequest(image=_tiny_image())

    async def scenario() -> None:
        admitted = asyncio.ensure_future(ingress.Explain(request))  # in the worker's queue, not answered
        while worker.reached < 1:
            await asyncio.sleep(0.01)
        worker.full = True
        with pytest.raises(Overloaded):  # refused by the worker: the ingress sheds from now on
            await ingress.Explain(request)
        worker.full = False
        worker.release.set()
        await admitted  # answered: the queue has room again
        await ingress.Explain(request)  # well within RETRY_AFTER_MS of the refusal

    asyncio.run(scenario())
    assert worker.reached == 3


def test_shedding_after_a_refusal_lasts_the_retry_pause_in_seconds() -> None:
    """D32: RETRY_AFTER_MS is milliseconds: a request a little after the pause reaches the worker again (read as
    seconds, the ingress shed every request for four minutes after one refusal)."""
    from ierf.serving.errors import RETRY_AFTER_MS, Overloaded

    worker = _Gated(_full_outcome())
    worker.full = True
    ingress = _ingress({"m": worker})
    request = pb.ExplainRequest(image=_tiny_image())

    async def scenario() -> None:
        with pytest.raises(Overloaded):
            await ingress.Explain(request)  # the worker's refusal
        with pytest.raises(Overloaded, match="refused a job"):
            await ingress.Explain(request)  # shed in the ingress
        assert worker.reached == 1
        await asyncio.sleep(RETRY_AFTER_MS / 1000 + 0.1)
        worker.full = False
        worker.release.set()
        await ingress.Explain(request)

    asyncio.run(scenario())
    assert worker.reached == 2


def test_the_dispatch_stage_leaves_out_the_seconds_the_worker_reported() -> None:
    """D20: "dispatch" is the wait the worker's own stages do not cover; a worker that reports more time than
    the call took (its clock, a long explain) leaves a dispatch of 0, not the whole call."""
    outcome = _full_outcome()
    outcome.provenance.timings[:] = [("explain", 3600.0)]
    ingress = _ingress({"m": _Capture(outcome)})
    observed: dict[str, float] = {}
    ingress.metrics.stage = lambda stage, model, seconds: observed.__setitem__(stage, seconds)
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image())))
    assert observed["dispatch"] == 0.0


def test_refusals_are_counted_as_overload_or_cap_by_whether_a_retry_can_help() -> None:
    """D25: explainer_errors_total's reason: a full worker queue is "overload", an image over the size cap is
    "cap" (the alert on overloads must not fire for callers sending too large images)."""
    worker = _Gated(_full_outcome())
    worker.full = True
    ingress = _ingress({"m": worker})
    seen: list[tuple[str, str]] = []
    ingress.metrics.request = lambda rpc, method, model, code, seconds, reason="none": seen.append((code, reason))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), GrpcContext()))
    too_big = pb.Image(encoded=b"\x89PNG" + bytes(ingress.limits.max_bytes))
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=too_big), GrpcContext()))
    assert seen == [("RESOURCE_EXHAUSTED", "overload"), ("RESOURCE_EXHAUSTED", "cap")]


def test_caller_mistakes_in_ierf_and_predict_are_refused_and_top_k_0_means_the_default() -> None:
    """D40, D43, D44: an empty layer and a contrast given both ways are refused before any work; top_k 0 is
    the documented "5", not out of range."""
    from ierf.serving.errors import InvalidArgument

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    with pytest.raises(InvalidArgument, match="layer is empty"):
        asyncio.run(ingress.ComputeIERF(pb.ComputeIERFRequest(image=_tiny_image(), positions=[pb.Position()])))
    with pytest.raises(InvalidArgument, match="not both"):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), contrast="mean", contrast_class=2)))
    asyncio.run(ingress.Predict(pb.PredictRequest(image=_tiny_image(), top_k=0)))
    assert [job.top_k for job in worker.jobs] == [0]


def test_an_ierf_request_is_labelled_with_its_model_and_method_srd() -> None:
    """D45: ComputeIERF is SRD's: its latency series carries method="srd", not "none"."""
    ingress = _ingress({"m": _Capture(_full_outcome())})
    seen: list[tuple[str, str]] = []
    ingress.metrics.request = lambda rpc, method, model, code, seconds, reason="none": seen.append((method, model))
    request = pb.ComputeIERFRequest(image=_tiny_image(), layer="l", positions=[pb.Position()])
    asyncio.run(ingress.ComputeIERF(request))
    assert seen == [("srd", "m")]


def test_concurrent_requests_fetch_a_models_description_once() -> None:
    """D46: the description is fetched in the background once per model, however many requests arrive
    before it does (each fetch is a call queued on the busy worker)."""
    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})

    async def scenario() -> None:
        await asyncio.gather(*(ingress.Explain(pb.ExplainRequest(image=_tiny_image())) for _ in range(5)))

    asyncio.run(scenario())
    assert worker.describe.calls == 1 and len(worker.jobs) == 5


def test_health_answers_for_the_service_by_name_in_check_and_list() -> None:
    """D48, D68: Check accepts the service's own name besides "" (what grpc-health-probe -service sends), and
    List reports both."""
    from grpc_health.v1 import health_pb2
    from ierf.serving.deployments import SERVICE_NAME

    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    checked = asyncio.run(ingress.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), GrpcContext()))
    assert checked.status == health_pb2.HealthCheckResponse.SERVING
    listed = asyncio.run(ingress.List(health_pb2.HealthListRequest(), GrpcContext()))
    assert sorted(listed.statuses) == ["", SERVICE_NAME]
    assert {s.status for s in listed.statuses.values()} == {health_pb2.HealthCheckResponse.SERVING}


def test_health_watch_answers_unimplemented() -> None:
    """D55: Watch is not offered; the code must say so (UNIMPLEMENTED), so a client falls back to polling
    Check instead of retrying an outage."""
    from grpc_health.v1 import health_pb2

    ingress = _ingress({"m": _Worker(outcome=_outcome())})
    context = GrpcContext()

    async def scenario() -> None:
        with pytest.raises(NotImplementedError):
            await ingress.Watch(health_pb2.HealthCheckRequest(), context).__anext__()

    asyncio.run(scenario())
    assert context.code == grpc.StatusCode.UNIMPLEMENTED


def test_the_worker_wait_ends_at_the_deadline_not_at_the_next_replica_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """D69: the wait for the worker is cut at the deadline; between its checks for a running replica it must
    not sleep past it (here the checks are 60 s apart, the budget 0.2 s)."""
    from ierf.serving import deployments

    monkeypatch.setattr(deployments, "NO_REPLICA_CHECK_S", 60.0)
    worker = _Worker(outcome=_outcome())
    worker.state = "hung"
    ingress = _ingress({"m": worker})

    context = _Budget("200")

    async def scenario() -> None:
        await asyncio.wait_for(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), context), timeout=30)

    asyncio.run(scenario())
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED and "waiting for the worker" in context.details


def test_an_image_of_exactly_twice_the_views_size_travels_as_the_view() -> None:
    """D57: VIEW_MIN_FACTOR is "at least": an image of exactly twice the view's bytes is cut here."""
    from ierf.serving.deployments import VIEW_MIN_FACTOR

    worker = _Capture(_full_outcome())
    ingress = _ingress({"m": worker})
    _described(ingress, resize=32, crop=32)
    pixels = np.zeros((32, 32 * VIEW_MIN_FACTOR, 3), np.uint8)  # exactly VIEW_MIN_FACTOR x 32x32x3 bytes
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=_pixels_message(pixels))))
    (job,) = worker.jobs
    assert job.view_version == PREP and job.pixels.shape == (32, 32, 3)


def test_the_provenance_carries_the_callers_request_id() -> None:
    """D72: the caller's ``request_id`` (Serve's gRPC context) comes back in provenance, to match a response
    to the proxy's and the replica's logs; outside a Serve request there is no other id to fall back on."""
    ingress = _ingress({"m": _Capture(_full_outcome())})
    response = asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), GrpcContext()))
    assert response.provenance.request_id == "r"  # what serving.fakes.GrpcContext.request_id() answers


def _controller_says(monkeypatch: pytest.MonkeyPatch, status: str, replicas: dict[str, int], message: str) -> Any:
    """A worker handle of deployment Worker_m whose state Serve's controller reports as given, in a replica
    (``ray.is_initialized()``), as test_operator_findings.py stands in for ``serve.status``."""
    from types import SimpleNamespace

    from ierf.serving import deployments

    overview = SimpleNamespace(replica_states=replicas, status=status, message=message)
    answer = SimpleNamespace(applications={"ierf": SimpleNamespace(deployments={"Worker_m": overview})})
    monkeypatch.setattr(deployments.serve, "status", lambda: answer)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    return SimpleNamespace(app_name="ierf", deployment_name="Worker_m")


def test_a_deployment_with_a_running_replica_is_not_down_and_a_failed_one_says_its_last_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """D09, D10, D11: calls fail fast UNAVAILABLE only when no replica runs and the deployment is failing; one
    replica still RUNNING beside an unhealthy one keeps answering. The reason is the traceback's last line
    (the exception), not "Traceback (most recent call last):"."""
    from ierf.serving import deployments

    handle = _controller_says(monkeypatch, "UNHEALTHY", {"RUNNING": 1, "STARTING": 1}, "one replica failed")
    assert asyncio.run(deployments._deployment_down(handle)) is None
    assert asyncio.run(deployments._running_replicas(handle)) == 1
    traceback = 'Traceback (most recent call last):\n  File "worker.py", line 9\nValueError: no weights at /m.pth\n'
    handle = _controller_says(monkeypatch, "DEPLOY_FAILED", {"STARTING": 2}, traceback)
    assert asyncio.run(deployments._deployment_down(handle)) == "ValueError: no weights at /m.pth"
    assert asyncio.run(deployments._running_replicas(handle)) == 0


# ------------------------------------------------------------------------------------------------ metrics
class _Recorder:
    """Takes the place of one Ray metric object in a ServiceMetrics: keeps what it is given."""

    def __init__(self) -> None:
        self.counted: list[tuple[float, dict]] = []
        self.observed: list[tuple[float, dict]] = []
        self.set_to: list[tuple[float, dict]] = []

    def inc(self, value: float, tags: dict) -> None:
        self.counted.append((value, tags))

    def observe(self, value: float, tags: dict) -> None:
        self.observed.append((value, tags))

    def set(self, value: float, tags: dict) -> None:
        self.set_to.append((value, tags))


@pytest.fixture
def recorded() -> Iterator[tuple[Any, dict[str, _Recorder]]]:
    """A ServiceMetrics whose every metric records instead of exporting."""
    from ierf.serving.metrics import METRICS, ServiceMetrics

    metrics = ServiceMetrics()
    recorders = {name: _Recorder() for name in METRICS}
    metrics._metrics.update(recorders)
    yield metrics, recorders


def test_request_metrics_name_empty_labels_none_and_count_only_errors_with_their_reason(recorded) -> None:
    """R05, R06, R07, R17: an RPC with no method or model (ListModels, Check) is labelled "none" (Ray drops an
    empty tag value and the dashboards select on "none"); only a non-OK code counts in explainer_errors_total,
    with the reason that tells an overload from a cap."""
    metrics, r = recorded
    metrics.request("Check", "", "", "OK", 0.01)
    metrics.request("Explain", "srd", "m", "RESOURCE_EXHAUSTED", 0.02, "overload")
    durations = r["explainer_request_duration_seconds"].observed
    assert durations == [
        (0.01, {"rpc": "Check", "method": "none", "model": "none", "code": "OK"}),
        (0.02, {"rpc": "Explain", "method": "srd", "model": "m", "code": "RESOURCE_EXHAUSTED"}),
    ]
    assert r["explainer_errors_total"].counted == [
        (1, {"rpc": "Explain", "code": "RESOURCE_EXHAUSTED", "reason": "overload"})
    ]


def test_the_inflight_gauge_sums_each_rpcs_calls_separately(recorded) -> None:
    """R08, R19: the gauge is the running count per RPC, set on the metric (not only remembered for the refresh)."""
    metrics, r = recorded
    for rpc, delta in [("Explain", 1), ("Explain", 1), ("Predict", 1), ("Explain", -1)]:
        metrics.inflight(rpc, delta)
    assert [(value, tags["rpc"]) for value, tags in r["explainer_inflight_requests"].set_to] == [
        (1, "Explain"),
        (2, "Explain"),
        (1, "Predict"),
        (1, "Explain"),
    ]


def test_the_gauge_refresh_sets_every_remembered_gauge_again(recorded) -> None:
    """R13: Ray drops a gauge series ~20 s after its last set(), so the refresh loop sets each remembered
    gauge again with its value and labels (run here on its own thread with a 10 ms period)."""
    import threading

    metrics, r = recorded
    metrics.inflight("Explain", 1)
    metrics.model_info("m", "digest", "cpu")
    threading.Thread(target=metrics._refresh_gauges, args=(0.01,), daemon=True).start()
    inflight, info = r["explainer_inflight_requests"].set_to, r["explainer_model_info"].set_to
    for _ in range(1000):
        if len(inflight) >= 3 and len(info) >= 3:
            break
        time.sleep(0.01)
    assert inflight[:3] == [(1, {"rpc": "Explain"})] * 3
    assert info[:3] == [(1, {"model": "m", "weights_digest": "digest", "device": "cpu"})] * 3


def test_a_zero_second_stage_is_observed_but_not_counted_because_rays_counter_refuses_it() -> None:
    """R09: an ingress stage may last 0.0 s (admission with nothing to wait for); Ray's Counter.inc raises on a
    value that is not > 0, which would fail the request that timed it. With Ray's real metric objects."""
    from ierf.serving.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.stage("admission", "m", 0.0)  # raises ValueError if it reaches the counter
    metrics.stage("decode", "m", 0.25)


def test_the_stage_counter_sums_seconds_not_observations(recorded) -> None:
    """R18: explainer_stage_seconds_total is the exact busy-seconds counter: it grows by each stage's seconds."""
    metrics, r = recorded
    metrics.stage("forward", "m", 0.25)
    metrics.stage("forward", "m", 1.5)
    assert r["explainer_stage_seconds_total"].counted == [
        (0.25, {"stage": "forward", "model": "m"}),
        (1.5, {"stage": "forward", "model": "m"}),
    ]


def test_cache_metrics_keep_tier_op_and_result_apart_and_size_only_redis_values(recorded) -> None:
    """R10, R20: an L1 operation moves no bytes through Redis (its size stays out of the value-size histogram),
    and the tier/op/result labels keep their own values."""
    metrics, r = recorded
    metrics.cache("l1", "put", "stored", 0.001, 4000)
    metrics.cache("l2", "get", "hit", 0.002, 5000)
    assert r["explainer_cache_requests_total"].counted == [
        (1, {"tier": "l1", "op": "put", "result": "stored"}),
        (1, {"tier": "l2", "op": "get", "result": "hit"}),
    ]
    assert r["explainer_cache_value_bytes"].observed == [(5000, {"op": "get"})]


def test_stopped_jobs_and_model_info_carry_their_own_labels(recorded) -> None:
    """R11, R12: a stopped job is counted under its model and reason; a loaded model reads 1 in model_info."""
    metrics, r = recorded
    metrics.stopped("m", "deadline")
    metrics.model_info("m", "abc", "cpu")
    assert r["explainer_jobs_stopped_total"].counted == [(1, {"model": "m", "reason": "deadline"})]
    assert r["explainer_model_info"].set_to == [(1, {"model": "m", "weights_digest": "abc", "device": "cpu"})]


def test_the_redis_value_size_histogram_has_byte_buckets() -> None:
    """R16: values are bytes (1 kB to 256 MB); the request histogram's seconds would put every value in +Inf."""
    from ierf.serving.metrics import VALUE_BUCKETS_BYTES, ServiceMetrics

    histogram = ServiceMetrics()._metrics["explainer_cache_value_bytes"]
    assert histogram.boundaries == VALUE_BUCKETS_BYTES and histogram.boundaries[-1] >= 64 * 2**20


# ------------------------------------------------------------------------------------------ remote backend
@pytest.mark.parametrize(
    ("code", "refusal"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, True),
        (grpc.StatusCode.OUT_OF_RANGE, True),
        (grpc.StatusCode.UNAUTHENTICATED, True),
        (grpc.StatusCode.NOT_FOUND, True),
        (grpc.StatusCode.UNAVAILABLE, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
)
def test_the_server_backend_exits_2_for_a_refused_request_and_keeps_the_servers_message(
    code: grpc.StatusCode, refusal: bool
) -> None:
    """B01-B04, B07: a token refused or a value out of range is the command's fault (exit 2, as NOT_FOUND); the
    server's own words reach the user after the code."""
    from ierf.cli import BackendFailure
    from ierf.serving.remote_backend import ServerRefusal, _server_errors
    from ierf_client import IerfError

    class Backend:
        address = "svc:9000"

        @_server_errors
        def call(self) -> None:
            raise IerfError(code, "the server's reason")

    with pytest.raises(ServerRefusal if refusal else BackendFailure) as raised:
        Backend().call()
    assert str(raised.value) == f"server svc:9000: {code.name}: the server's reason"
    assert isinstance(raised.value, BackendFailure) != refusal


class _Served:
    """What a loopback ExplainService answers: two models (the default second), a layer grid of 3x5 named
    "layer4.1", and a record of what the backend asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []
        self.score = pb.ClassScore(index=1, name="one", probability=0.25, logit=3.5)

    def servicer(self) -> Any:
        from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

        served = self

        def model(model_id: str) -> Any:
            spec = pb.InputSpec(height=8, width=8, channels=3, color_space="RGB", preprocess_version="v1-x")
            layer = pb.LayerInfo(name="layer4.1", channels=2, height=3, width=5)
            names = ["zero", "one", "two"]
            return pb.ModelInfo(
                id=model_id, weights_digest="abc", input=spec, num_classes=3, class_names=names, layers=[layer]
            )

        def view() -> Any:
            return pb.Tensor(data=bytes(8 * 8 * 3), dtype=pb.DATA_TYPE_UINT8, shape=[8, 8, 3])

        class Service(pb_grpc.ExplainServiceServicer):
            def ListModels(self, request: Any, context: Any) -> Any:
                return pb.ListModelsResponse(models=[model("a"), model("b")], default_model_id="b")

            def GetModel(self, request: Any, context: Any) -> Any:
                return model(request.model_id or "b")

            def Predict(self, request: Any, context: Any) -> Any:
                served.asked.append(("top_k", request.top_k))
                return pb.PredictResponse(top_classes=[served.score])

            def Explain(self, request: Any, context: Any) -> Any:
                contrast = request.contrast_class if request.HasField("contrast_class") else request.contrast
                target = request.target if request.HasField("target") else None
                served.asked.append(("explain", (target, contrast)))
                saliency = pb.Tensor(data=bytes(4 * 64), dtype=pb.DATA_TYPE_FLOAT32, shape=[8, 8])
                return pb.ExplainResponse(map=saliency, target=served.score, model_input=view())

            def ComputeIERF(self, request: Any, context: Any) -> Any:
                served.asked.append(("ierf", (request.layer, request.return_input)))
                maps = pb.Tensor(data=bytes(4 * 64), dtype=pb.DATA_TYPE_FLOAT32, shape=[1, 8, 8])
                layer = pb.LayerInfo(name="layer4.1", channels=2, height=3, width=5)
                model_input = view() if request.return_input else None
                return pb.ComputeIERFResponse(maps=maps, layer=layer, model_input=model_input)

        return Service()


@pytest.fixture
def served() -> Iterator[tuple[_Served, Any]]:
    """A RemoteBackend talking to a real gRPC server on loopback."""
    from concurrent import futures

    from ierf.serving.remote_backend import RemoteBackend
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    state = _Served()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(state.servicer(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    backend = RemoteBackend(address, timeout=10)
    try:
        yield state, backend
    finally:
        backend.close()
        server.stop(None)


def test_the_server_backend_lists_every_model_and_marks_the_servers_default(served) -> None:
    """B11, B27: ``ierf models --server`` shows each served model, the one a call naming none gets marked."""
    _, backend = served
    assert backend.model_names() == ["a", "b"]
    rows = backend.model_rows()
    assert [row[0] for row in rows] == ["a", "b (default)"]
    assert rows[0][1] == "v1-x" and "sha256 abc" in rows[0][2]


def test_the_server_backend_refuses_local_weight_options_and_an_ierf_without_a_position(served) -> None:
    """B12, B13, B15: the server decides its weights, so ``--weights`` and ``--random-init`` are usage errors
    with ``--server`` (ignoring them would explain other weights than the user named); ``--layer`` without
    ``--position`` is one too."""
    from ierf.cli import ExplainRequest, UsageError

    state, backend = served
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(UsageError, match="--weights does not apply"):
        backend.layers("a", weights="w.pt")
    with pytest.raises(UsageError, match="--weights/--random-init"):
        backend.explain(ExplainRequest(image=image, model="a", random_init=True))
    with pytest.raises(UsageError, match="--position"):
        backend.explain(ExplainRequest(image=image, model="a", layer="layer4"))
    assert ("ierf", ("layer4", True)) not in state.asked


def test_the_server_backends_ierf_reports_the_servers_layer_grid_and_input(served) -> None:
    """B14, B16, B20, B23: the report names the canonical layer the server answered, marks the cell on its
    (height, width) grid, draws on the model's view (asked for), and lists the top 5 classes."""
    from ierf.cli import ExplainRequest

    state, backend = served
    image = np.zeros((8, 8, 3), np.uint8)
    result = backend.explain(ExplainRequest(image=image, model="a", layer="layer4", position=(1, 2)))
    assert result.layer == "layer4.1" and result.feature_hw == (3, 5)
    assert result.pixels is not None and result.pixels.shape == (8, 8, 3)
    assert ("top_k", 5) in state.asked and ("ierf", ("layer4", True)) in state.asked


def test_the_server_backends_saliency_reads_auto_mean_in_any_case_and_the_logit(served) -> None:
    """B17, B18, B21, B26: target "auto" asks for no class; "MEAN" is the mean contrast, as in-process (not
    a class name to look up); the report's logit is the logit."""
    from ierf.cli import ExplainRequest

    state, backend = served
    image = np.zeros((8, 8, 3), np.uint8)
    result = backend.explain(ExplainRequest(image=image, model="a", target="auto", contrast="MEAN"))
    assert ("explain", (None, "mean")) in state.asked
    assert result.contrast == "mean"
    assert result.target_logit == pytest.approx(3.5) and result.target is not None
    assert result.target.probability == pytest.approx(0.25)


def test_the_server_backend_gives_up_on_an_unreachable_server_after_a_few_quick_retries() -> None:
    """B08: a person at a terminal who mistyped the address hears UNAVAILABLE after ~1.5 s of retries; the
    SDK's default policy retries UNAVAILABLE for the whole budget (600 s here)."""
    import socket
    import threading

    from ierf.serving.remote_backend import RemoteBackend, ServerFailure

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    backend = RemoteBackend(f"127.0.0.1:{port}", timeout=600)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            backend.model_names()
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(60)  # generous: the retries take ~1.5 s
    backend.close()
    assert not caller.is_alive(), "still retrying an unreachable server after 60 s"
    assert len(raised) == 1 and isinstance(raised[0], ServerFailure) and "UNAVAILABLE" in str(raised[0])


def test_the_server_backend_keeps_to_the_timeout_it_was_given() -> None:
    """B22: ``--timeout`` bounds each call; a server that does not answer within it is DEADLINE_EXCEEDED
    (exit 1), not waited for up to the default 600 s."""
    import threading
    from concurrent import futures

    from ierf.serving.remote_backend import RemoteBackend, ServerFailure
    from ierf_proto.v1 import explainer_pb2_grpc as pb_grpc

    release = threading.Event()

    class Hung(pb_grpc.ExplainServiceServicer):
        def ListModels(self, request: Any, context: Any) -> Any:
            release.wait(30)
            return pb.ListModelsResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ExplainServiceServicer_to_server(Hung(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    backend = RemoteBackend(address, timeout=0.5)
    try:
        with pytest.raises(ServerFailure, match="DEADLINE_EXCEEDED"):
            backend.model_names()
    finally:
        release.set()
        backend.close()
        server.stop(None)


# ---- the decode stages and the decode-rate estimate (D35 D36 D37) ---------------------------------------------
def test_decode_stages_split_the_time_and_the_rate_is_a_moving_average(monkeypatch: pytest.MonkeyPatch) -> None:
    """D35 D36 D37: "decode" is the header's time plus the pixels' (timed on their thread), "admission" the
    rest, so the two add up to no more than the whole call; the seconds-per-pixel estimate of a kind of
    image moves 30 % of the way to each new large decode. The header and the pixels are slowed by a
    recording wrapper around the real calls, so each part is known to take at least 0.3 s."""
    import dataclasses

    from ierf.serving import convert, deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    opened: list[float] = []
    decoded: list[float] = []
    real_open, real_timed = convert.open_image, deployments._timed

    def slow_open(image: Any, limits: Any) -> Any:
        start = time.perf_counter()
        time.sleep(0.3)
        pending = real_open(image, limits)
        real_decode = pending.decode

        def slow_decode() -> Any:
            time.sleep(0.3 * (len(decoded) + 1))  # the second decode is slower: the average must move
            return real_decode()

        opened.append(time.perf_counter() - start)
        return dataclasses.replace(pending, _decode=slow_decode)

    def recorded_timed(fn: Any) -> Any:
        seconds, result = real_timed(fn)
        decoded.append(seconds)
        return seconds, result

    monkeypatch.setattr(convert, "open_image", slow_open)
    monkeypatch.setattr(deployments, "_timed", recorded_timed)
    config = ServiceConfig.from_args({"models": ["m"], "ingress": {"max_pixels": 1_210_000}})
    ingress = Ingress.func_or_class({"m": Method(lambda: None)}, config)
    side = 1100  # 1.21 Mpx: at least DECODE_ESTIMATE_MIN_PIXELS, so the rate is learnt
    image = pb.Image(tensor=pb.Tensor(data=bytes(side * side), dtype=pb.DATA_TYPE_UINT8, shape=[side, side]))

    async def decode_once() -> tuple[dict[str, float], float]:
        timings: list[tuple[str, float]] = []
        start = time.perf_counter()
        await ingress._decode(image, "m", timings, time.time() + 60)
        return dict(timings), time.perf_counter() - start

    first, whole = asyncio.run(decode_once())
    assert first["decode"] >= opened[0] + decoded[0]
    assert first["admission"] + first["decode"] <= whole
    kind = next(iter(ingress._decode_rates))
    assert ingress._decode_rates[kind] == pytest.approx(decoded[0] / side**2, rel=1e-12)
    asyncio.run(decode_once())
    expected = 0.7 * decoded[0] / side**2 + 0.3 * decoded[1] / side**2
    assert ingress._decode_rates[kind] == pytest.approx(expected, rel=1e-12)


def test_an_internal_error_is_logged_with_its_traceback_and_a_callers_mistake_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """D26: the caller of an INTERNAL answer sees only the exception's type ("see server logs"), so the
    server's log must hold the traceback; a caller's own mistake (INVALID_ARGUMENT) is not logged as a
    failure (a client's bad requests would flood the log)."""
    import logging

    worker = _Capture(_full_outcome())

    async def broken(job: Any) -> Any:
        raise RuntimeError("a bug in the worker")

    worker.explain = Method(broken)
    ingress = _ingress({"m": worker})
    serve_log = logging.getLogger("ray.serve")  # Ray's logger does not propagate to the root's handlers
    serve_log.addHandler(caplog.handler)
    try:
        _check_the_log(ingress, caplog)
    finally:
        serve_log.removeHandler(caplog.handler)


def _check_the_log(ingress: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        context = GrpcContext()
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image()), context))
        assert context.code == grpc.StatusCode.INTERNAL
        failed = [r for r in caplog.records if r.getMessage() == "Explain failed"]
        assert len(failed) == 1 and failed[0].exc_info is not None
        assert "a bug in the worker" in caplog.text
        caplog.clear()
        context = GrpcContext()
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_tiny_image(), model_id="nope"), context))
        assert context.code == grpc.StatusCode.NOT_FOUND
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

"""The PrometheusRule's alerts against the series a real service exports in the situation each alert is for.

Each test takes the series a running service (Ray 2.60, `ierf.serving.local.start_service`) was seen to
export, or the tags the ingress records, and checks that the alert's selectors can (or cannot) pick them:
PromQL can only return a series for a deployment, or count a refusal, that one of its selectors matches.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import yaml

from serving.fakes import BackPressureError, GrpcContext, Method

ROOT = Path(__file__).resolve().parents[2]
# Prometheus's own labels plus the PodMonitor's; Ray's always-present ones as a live scrape showed them
SCRAPE = {"namespace": "prod", "pod": "ierf-raycluster-abc-worker-cpu-xyz", "application": "ierf"}
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _alert(name: str) -> str:
    (rule,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "alerts.yaml").read_text()) if d]
    (expr,) = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == name]
    return expr


def _selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Every ``metric{matchers}`` of a PromQL expression (the rules name no bare metrics)."""
    return [(m.group(1), _MATCHER.findall(m.group(2))) for m in _SELECTOR.finditer(expr)]


def _matches(selector: tuple[str, list[tuple[str, str, str]]], metric: str, labels: dict[str, str]) -> bool:
    name, matchers = selector
    if name != metric:
        return False
    for label, op, value in matchers:
        have = labels.get(label, "")
        hit = have == value if op in ("=", "!=") else re.fullmatch(value, have) is not None  # PromQL anchors
        if hit != (op in ("=", "=~")):
            return False
    return True


def _selected(expr: str, metric: str, labels: dict[str, str]) -> bool:
    return any(_matches(s, metric, {**SCRAPE, **labels}) for s in _selectors(expr))


# ---------------------------------------------------------------------------------------- IerfNoHealthyWorker

# What /metrics held for the application while its only worker replica was gone and the replacement could not
# be placed (no free CPUs: on Kubernetes, a lost node while the worker group is at maxReplicas, a quota, a
# GPU node that does not come), 40-100 s after the replica died: the controller sets a replica's
# ray_serve_deployment_replica_healthy series to 0 when it stops it and never again, and Ray's exporter drops
# a gauge series not set for 2 export intervals, so the deployment has no replica series at all, while its
# deployment-level series stay (status 2 = UNHEALTHY). gRPC health said NOT_SERVING throughout.
WORKER_OUTAGE_SCRAPE = [
    ("ray_serve_deployment_replica_healthy", {"deployment": "Ingress", "replica": "g8ccjwnh"}, 1.0),
    ("ray_serve_deployment_status", {"deployment": "Ingress"}, 6.0),
    ("ray_serve_deployment_status", {"deployment": "Worker_efficientnet_lite0"}, 2.0),
    ("ray_serve_autoscaling_target_replicas", {"deployment": "Ingress"}, 1.0),
    ("ray_serve_autoscaling_target_replicas", {"deployment": "Worker_efficientnet_lite0"}, 1.0),
]


def test_no_healthy_worker_alert_sees_a_deployment_whose_replica_series_are_gone() -> None:
    """IerfNoHealthyWorker is ``sum by (namespace, deployment) (ray_serve_deployment_replica_healthy) < 1``:
    it can only name a deployment that still has a replica series. Once a worker's replicas are gone and the
    replacement waits for resources, that series ages out (~20-40 s after the stop, observed on Ray 2.60),
    the sum has no element for the worker, and the critical alert stays silent for the whole outage;
    IerfNotReporting does not fire either, because the Ingress still reports in that namespace. The rule
    needs a deployment-level series that outlives the replicas (``ray_serve_autoscaling_target_replicas``,
    ``ray_serve_deployment_status``) to compare the healthy count against."""
    expr = _alert("IerfNoHealthyWorker")
    worker_series = [
        (metric, labels)
        for metric, labels, _ in WORKER_OUTAGE_SCRAPE
        if labels["deployment"].startswith("Worker_") and _selected(expr, metric, labels)
    ]
    assert worker_series, (
        f"during a worker outage no series the alert reads carries the worker's deployment, so it cannot fire: {expr}"
    )


# -------------------------------------------------------------------------------------------- IerfOverloaded


class _Worker:
    def __init__(self, overloaded: bool) -> None:
        self.overloaded = overloaded
        self.describe = Method(self._describe)
        self.explain = Method(self._explain)

    async def _describe(self) -> Any:
        return "description"

    async def _explain(self, job: Any) -> Any:
        if self.overloaded:
            raise BackPressureError("Request dropped due to backpressure")
        raise AssertionError("a refused request must not reach the worker")


def _error_tags(overloaded: bool, image: Any) -> list[dict[str, str]]:
    """The tags ``explainer_errors_total`` gets for one Explain through a real Ingress over a fake worker."""
    import grpc
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    ingress = Ingress.func_or_class({"m": _Worker(overloaded)}, ServiceConfig.from_args({"models": [{"id": "m"}]}))
    counted: list[dict[str, str]] = []

    class Recorder:
        def inc(self, value: float, tags: dict[str, str]) -> None:
            counted.append(tags)

    ingress.metrics._metrics["explainer_errors_total"] = Recorder()
    context = GrpcContext()
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=image(ingress)), context))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return counted


def _tiny(ingress: Any) -> Any:
    import numpy as np
    from ierf_proto.v1 import explainer_pb2 as pb

    pixels = np.zeros((4, 4, 3), np.uint8)
    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))


def _over_the_byte_cap(ingress: Any) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    return pb.Image(encoded=b"\x89PNG" + bytes(ingress.limits.max_bytes))


def test_overload_alert_counts_full_queues_not_a_callers_oversize_images() -> None:
    """IerfOverloaded ("Queues are full: raise max_replicas or the worker group's maxReplicas") reads
    ``explainer_errors_total{code="RESOURCE_EXHAUSTED"}``, but the ingress counts a cap refusal (image over
    max_image_bytes / max_pixels / max_side: the caller's mistake, never retried) under exactly the same
    labels as a full worker queue. Seen live: three 25 Mpx PNGs refused "over the cap" gave
    ``ray_explainer_errors_total{code="RESOURCE_EXHAUSTED",rpc="Predict"} 3``. One client re-sending an
    oversize image every 2 s pages the on-call to add capacity the service does not lack. The two need
    different labels (a reason, or the cap as INVALID_ARGUMENT-like code) and the rule must select only the
    overload."""
    expr = _alert("IerfOverloaded")
    (overload,) = _error_tags(True, _tiny)
    assert _selected(expr, "ray_explainer_errors_total", overload), "a full worker queue is not counted"
    (cap,) = _error_tags(False, _over_the_byte_cap)
    assert not _selected(expr, "ray_explainer_errors_total", cap), (
        f"a cap refusal {cap} is counted as overload by {expr}"
    )


def test_overload_alert_sees_the_proxys_own_backpressure_refusals() -> None:
    """When the Ingress deployment's queue is full, Serve's proxy answers RESOURCE_EXHAUSTED ("Request dropped
    due to backpressure") without calling the ingress, so ``ray_explainer_errors_total`` never counts it; the
    proxy counts it in ``ray_serve_num_grpc_requests_total{status_code="RESOURCE_EXHAUSTED"}`` (where ierf's
    own error replies read OK, README "Metrics"). Seen live with a small ingress queue: 11 overload refusals,
    9 by the proxy (``ray_serve_num_grpc_requests_total{status_code="RESOURCE_EXHAUSTED"} 9``) and only 2 in
    ``ray_explainer_errors_total``: IerfOverloaded missed most of the overload, and all of it when the ingress
    is the bottleneck."""
    expr = _alert("IerfOverloaded")
    proxy_refusal = {"method": "/ierf.v1.ExplainService/Explain", "route": "ierf", "status_code": "RESOURCE_EXHAUSTED"}
    assert _selected(expr, "ray_serve_num_grpc_requests_total", proxy_refusal), (
        f"the proxy's backpressure refusals are not counted by {expr}"
    )

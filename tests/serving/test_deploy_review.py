"""Deploy review: the shipped alerts, Serve config and image against what the service does when deployed."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.fakes import GrpcContext, Method

ROOT = Path(__file__).resolve().parents[2]
SCRAPE = {"namespace": "prod", "pod": "ierf-raycluster-abc-worker-cpu-xyz", "application": "ierf"}
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _alerts() -> dict[str, str]:
    (rule,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "alerts.yaml").read_text()) if d]
    return {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}


def _selected(expr: str, metric: str, labels: dict[str, str]) -> bool:
    """Whether one of ``expr``'s ``metric{...}`` selectors picks a series with these labels (PromQL anchors
    regex matchers; a missing label reads as "")."""
    labels = {**SCRAPE, **labels}
    for match in _SELECTOR.finditer(expr):
        if match.group(1) != metric:
            continue
        ok = True
        for label, op, value in _MATCHER.findall(match.group(2)):
            have = labels.get(label, "")
            hit = have == value if op in ("=", "!=") else re.fullmatch(value, have) is not None
            ok = ok and hit == (op in ("=", "=~"))
        if ok:
            return True
    return False


class _SlowWorker:
    """A worker that answers its description at once but takes far longer than any deadline to explain:
    what every Explain meets when the workers slow down (CPU throttling, a GPU node come up without CUDA,
    a model swapped for a larger one)."""

    def __init__(self) -> None:
        self.describe = Method(self._describe)
        self.explain = Method(self._explain)

    async def _describe(self) -> Any:
        return "description"

    async def _explain(self, job: Any) -> Any:
        await asyncio.sleep(30)


def _timed_out_explain_tags() -> tuple[dict[str, str], dict[str, str]]:
    """(request histogram tags, error counter tags) the ingress records for an Explain that ran past the
    server's own request_timeout_s cap."""
    import grpc
    import numpy as np
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    config = ServiceConfig.from_args({"models": [{"id": "m"}], "ingress": {"request_timeout_s": 0.3}})
    ingress = Ingress.func_or_class({"m": _SlowWorker()}, config)
    seen: dict[str, dict[str, str]] = {}

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: float, tags: dict[str, str]) -> None:
            seen[self.name] = tags

        def observe(self, value: float, tags: dict[str, str]) -> None:
            seen[self.name] = tags

    for name in ("explainer_errors_total", "explainer_request_duration_seconds"):
        ingress.metrics._metrics[name] = Recorder(name)
    pixels = np.zeros((4, 4, 3), np.uint8)
    image = pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 3]))
    context = GrpcContext()
    asyncio.run(ingress.Explain(pb.ExplainRequest(image=image), context))
    assert context.code == grpc.StatusCode.DEADLINE_EXCEEDED, (context.code, context.details)
    return seen["explainer_request_duration_seconds"], seen["explainer_errors_total"]


@pytest.mark.timeout(60)
def test_an_explain_outage_by_timeouts_is_seen_by_some_alert() -> None:
    """When every Explain runs past its deadline (the SDK's default 60 s budget travels to the server; the
    server caps each call at request_timeout_s), each one ends DEADLINE_EXCEEDED. IerfServerErrors counts only
    INTERNAL|UNKNOWN|UNAVAILABLE, and IerfExplainSlow's p99 reads code="OK" buckets only, so the slower the
    service gets, the fewer requests either alert sees: a service that answers nothing in time pages no one
    (unless queues also overflow at > 0.5 refusals/s). Some rule must count a call the server itself failed
    to finish in time (IerfTimingOut)."""
    request_tags, error_tags = _timed_out_explain_tags()
    alerts = _alerts()
    seen_by = [
        name
        for name, expr in alerts.items()
        if _selected(expr, "ray_explainer_errors_total", error_tags)
        or _selected(expr, "ray_explainer_request_duration_seconds_bucket", request_tags)
    ]
    assert seen_by, f"an Explain that timed out on the server ({error_tags}) is counted by no alert"


def test_a_cluster_deploy_refuses_an_image_cap_the_grpc_proxy_cannot_carry(monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m ierf.serving serve`` refuses ``ingress.max_image_bytes`` above what Serve's gRPC proxy passes
    (``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``, 40 MiB in the Dockerfile and the RayService). On KubeRay (or ``serve
    deploy``) the same config goes through ``build_app`` alone, which never compares the two: raising
    max_image_bytes to 64 MiB in serveConfigV2 deploys cleanly, and every image between 40 and 64 MiB is then
    refused by the proxy's gRPC core ("Received message larger than max") with RESOURCE_EXHAUSTED, never by
    ierf's ingress, never in ierf's metrics. The cluster's containers carry the variable (the Dockerfile sets
    it), so the app builder can refuse the mismatch with the key named, as README "Configuration" promises
    for values out of range."""
    from ierf.serving.app import build_app
    from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV

    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(40 * 2**20))  # the Dockerfile's and the RayService's value
    with pytest.raises(ValueError, match="max_image_bytes"):
        build_app({"ingress": {"max_image_bytes": 64 * 2**20}})


def test_the_cache_metrics_help_names_every_result_the_alerts_and_dashboard_select() -> None:
    """``ray_explainer_cache_requests_total``'s exported ``# HELP`` (Prometheus's and Grafana's metric browser
    show it; it is ``METRICS[...][1]``) lists its result values as "hit, miss, error, skipped, too_big, stored,
    dropped", but the worker also reports ``corrupt`` (README "Metrics" lists it), and IerfCacheCorrupt and the
    "Redis trouble" panel select exactly that value: an on-call reading the metric's own help cannot learn what
    the alert that paged them counts."""
    import json

    from ierf.serving.metrics import METRICS

    help_text = METRICS["explainer_cache_requests_total"][1]
    texts = list(_alerts().values())
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "ierf-service.json").read_text())
    texts += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    selected = set()
    for text in texts:
        for match in _SELECTOR.finditer(text):
            if match.group(1) == "ray_explainer_cache_requests_total":
                for label, _, value in _MATCHER.findall(match.group(2)):
                    if label == "result":
                        selected |= set(value.split("|"))
    assert selected
    missing = sorted(v for v in selected if not re.search(rf"\b{v}\b", help_text))
    assert not missing, f"results {missing} are selected by alerts or panels but not named in the HELP: {help_text!r}"


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def test_no_serve_proxy_is_allowed_to_queue_more_uploads_than_its_pod_can_hold() -> None:
    """Every node runs a Serve gRPC proxy (``proxy_location: EveryNode``), the head's included, and a proxy holds
    each request it has read whole in memory while it waits for an Ingress slot: up to the Ingress's
    ``max_queued_requests`` per proxy (256 in the RayService), each up to ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``
    (40 MiB). Measured on Ray 2.60 (local start, Ingress max_ongoing_requests 1): 24 concurrent Explains of a
    27 MB PNG took the proxy from 140 MB to 2.4 GB resident (~93 MB per queued request, ~3.4x the message).
    The head pod (4 GiB for the GCS, the dashboard, the Serve controller and that proxy) could be sent
    256 x 40 MiB = 10 GiB by anyone who reaches ``ierf-grpc`` (the service authenticates no one), and the OOM
    killer would take the GCS. So: the head takes no Serve traffic at all, and a worker pod's proxy may
    queue at most half of its memory limit at 4x the message cap (measured 3.4x)."""
    service = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text())
    (rayservice,) = [d for d in service if d and d["kind"] == "RayService"]
    assert rayservice["spec"].get("excludeHeadPodFromServeSvc") is True, "callers' uploads can reach the head's proxy"
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config["proxy_location"] == "EveryNode"
    (ingress,) = [d for d in serve_config["applications"][0]["deployments"] if d["name"] == "Ingress"]
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        queued = ingress["max_queued_requests"] * int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) * 4
        limit = _bytes(container["resources"]["limits"]["memory"])
        assert queued <= limit / 2, (
            f"worker group {group['groupName']}: its proxy may hold {queued / 2**30:.1f} GiB of queued uploads "
            f"in a pod limited to {limit / 2**30:.1f} GiB"
        )

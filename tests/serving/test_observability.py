"""What an operator reads off Prometheus: alert rules that can fire per deployment, histograms that reach
as far as what they time, and a value-size histogram that sizes only bytes that moved to or from Redis."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import torch
import yaml
from ierf.serving.cache import CacheKey, RedisSettings, RedisTier, TieredCache, tensors_nbytes
from ierf.serving.local import load_serve_config
from ierf.serving.metrics import STAGE_BUCKETS_S, ServiceMetrics
from ierf.serving.settings import ServiceConfig

ROOT = Path(__file__).resolve().parents[2]


def _alert_rules() -> list[dict]:
    (rule,) = [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "alerts.yaml").read_text()) if d]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_every_alert_keeps_the_namespace_so_one_deployment_going_down_is_seen() -> None:
    """The dashboard shows one namespace at a time because staging and production share a Prometheus; the
    rules must then fire per namespace too. ``absent(x{application="ierf"})`` is empty as long as *any*
    namespace still reports, so production going away entirely (no controller, no series: IerfNoHealthyWorker
    has nothing to compare either) raises no alert while staging runs."""
    for rule in _alert_rules():
        expr = rule["expr"]
        assert re.search(r"\bby \([^)]*\bnamespace\b", expr), f"{rule['alert']}: result has no namespace: {expr}"


def _shipped_request_caps() -> dict[str, float]:
    """``ingress.request_timeout_s`` of local.yaml and of the RayService's serveConfigV2."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    configs = {"local.yaml": load_serve_config(), "rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}
    return {
        name: ServiceConfig.from_args(config["applications"][0]["args"]).ingress.request_timeout_s
        for name, config in configs.items()
    }


def test_stage_histogram_reaches_the_request_cap_of_every_shipped_config() -> None:
    """A stage (the worker's ``explain``, the ``dispatch`` wait behind Serve's queue, the ``queue`` wait behind
    another job) may last nearly the whole request, up to ``request_timeout_s`` (300 s as shipped; metrics.py
    expects cold CPU explanations of large models to take minutes). Past the top finite bucket an observation
    lands in +Inf and ``histogram_quantile`` answers that bucket's bound: the dashboard's "Stage duration p95"
    would read 60 s for a 250 s explain, the mistake the request histogram's buckets were widened to avoid."""
    for name, cap in _shipped_request_caps().items():
        assert STAGE_BUCKETS_S[-1] >= cap, f"{name}: stages up to {cap} s, stage buckets end at {STAGE_BUCKETS_S[-1]} s"


class _Recorder:
    """Takes the place of one Ray metric object in a ServiceMetrics: keeps what it is given."""

    def __init__(self) -> None:
        self.counted: list[tuple[float, dict]] = []
        self.observed: list[tuple[float, dict]] = []

    def inc(self, value: float, tags: dict) -> None:
        self.counted.append((value, tags))

    def observe(self, value: float, tags: dict) -> None:
        self.observed.append((value, tags))


def _recorded(*names: str) -> tuple[ServiceMetrics, dict[str, _Recorder]]:
    """A ServiceMetrics whose metrics ``names`` record instead of exporting."""
    metrics = ServiceMetrics()
    recorders = {name: _Recorder() for name in names}
    metrics._metrics.update(recorders)
    return metrics, recorders


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_value_too_big_for_redis_is_not_sized_as_a_redis_value() -> None:
    """``explainer_cache_value_bytes`` is "Size of values read from or written to Redis" (the dashboard's
    "Redis value size p50 / p99"). A value over ``max_value_bytes`` is never sent (counted as ``too_big`` in
    explainer_cache_requests_total): sizing it there puts values Redis never saw into the p99."""
    metrics, sizes = _recorded("explainer_cache_requests_total", "explainer_cache_value_bytes")
    observed = sizes["explainer_cache_value_bytes"].observed
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0", max_value_bytes=1000))
    cache = TieredCache(10_000_000, tier, metrics.cache)
    tensors = {"logits": torch.zeros(1, 1000)}  # 4000 bytes: over the 1000-byte cap
    key = CacheKey("logits", "m", "digest", "prep-v1", "model", "x", "ab" * 32).redis_key()
    assert cache.put(key, tensors, tensors_nbytes(tensors), tensors) == "too_big"
    assert observed == [], f"sized as a Redis value though never sent: {observed}"


def test_a_value_read_back_from_the_write_behind_queue_is_not_sized_as_a_redis_value() -> None:
    """A value still waiting to be written (deferred) is served from the replica's memory: an L2 hit for
    the hit ratio, but no bytes came from Redis, so the value-size histogram must not count it."""
    metrics, sizes = _recorded("explainer_cache_requests_total", "explainer_cache_value_bytes")
    observed = sizes["explainer_cache_value_bytes"].observed
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0"))
    cache = TieredCache(0, tier, metrics.cache, write_behind_bytes=1_000_000)  # L1 off: the get reaches L2
    try:
        tensors = {"logits": torch.zeros(1, 1000)}
        key = CacheKey("logits", "m", "digest", "prep-v1", "model", "x", "cd" * 32).redis_key()
        assert cache.put(key, tensors, 4000, tensors, background=True, deferred=True) == "queued"
        found = cache.get(key, lambda state: (state, 4000))
        assert found.tier == "l2" and found.value is tensors
        assert observed == [], f"sized as a Redis value though read from memory: {observed}"
    finally:
        cache.close()


def test_stage_seconds_are_counted_exactly_beside_the_histogram() -> None:
    """Ray 2.60 exports a histogram's ``_sum`` from bucket midpoints (a 0.3 s stage adds 0.375), so the
    dashboard's busy-seconds panel reads an exact counter instead: every stage adds its own seconds."""
    metrics, recorders = _recorded("explainer_stage_duration_seconds", "explainer_stage_seconds_total")
    metrics.stage("forward", "m", 0.3)
    metrics.stage("queue", "m", 0.0)  # nothing to add: a counter only goes up
    assert recorders["explainer_stage_seconds_total"].counted == [(0.3, {"stage": "forward", "model": "m"})]
    assert len(recorders["explainer_stage_duration_seconds"].observed) == 2


def test_no_panel_or_alert_reads_a_histogram_sum() -> None:
    """``rate(..._sum)`` of a Ray histogram is built from bucket midpoints (up to half a bucket off, ~40 % with
    these buckets): means and busy time must come from counters, quantiles from ``_bucket``."""
    texts = {
        "dashboard": (ROOT / "deploy" / "grafana" / "ierf-service.json").read_text(),
        "alerts": (ROOT / "deploy" / "k8s" / "alerts.yaml").read_text(),
    }
    for name, text in texts.items():
        assert not re.search(r"ray_explainer_\w+_sum\b", text), f"{name} reads a Ray histogram's _sum"


def test_a_put_the_open_breaker_skips_is_not_sized_as_a_redis_value() -> None:
    """With the circuit breaker open a put is ``skipped``: nothing goes to Redis, so the value-size histogram
    must not count it (guards against sizing every put's data, not only those Redis answered: ``stored``, or an
    error reply). Neither is a refused connection sized: nothing reached Redis."""
    metrics, sizes = _recorded("explainer_cache_requests_total", "explainer_cache_value_bytes")
    observed = sizes["explainer_cache_value_bytes"].observed
    settings = RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0", failure_threshold=1, open_seconds=600.0)
    cache = TieredCache(0, RedisTier(settings), metrics.cache)
    tensors = {"logits": torch.zeros(1, 1000)}
    key = CacheKey("logits", "m", "digest", "prep-v1", "model", "x", "ef" * 32).redis_key()
    assert cache.put(key, tensors, 4000, tensors) == "error"  # the connection is refused: the breaker opens
    assert cache.put(key, tensors, 4000, tensors) == "skipped"
    assert observed == [], f"sized as a Redis value though never sent: {observed}"

"""Application metrics, exported through Ray's metrics endpoint (``ray.serve.metrics``).

Units are seconds and bytes; every label takes values from a small fixed set (RPC names, registered
method and model ids, stage names, gRPC code names), never image hashes or request ids. Ray adds
the ``ray_`` prefix and the ``deployment``/``replica``/``application`` tags, so
``explainer_request_duration_seconds`` is scraped as ``ray_explainer_request_duration_seconds_bucket``.

One instance per replica process: metric objects must be created inside the replica, not pickled in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# Request latency spans decode-only errors (~ms) to cold CPU explanations of large models (~minutes).
# Up to the 300 s request cap (a p99 between 120 and 300 s must not read as 120). Stages too: the
# worker's explain, or the wait behind Serve's queue (dispatch) or another job (queue), can take most of it.
# Every alert threshold is a bound (IerfExplainSlow's 30 s): inside a bucket histogram_quantile interpolates.
REQUEST_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 40, 60, 120, 180, 300]
STAGE_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
GAUGE_REFRESH_S = 5.0
VALUE_BUCKETS_BYTES = [1e3, 1e4, 1e5, 1e6, 4e6, 16e6, 64e6, 256e6]

# name -> (kind, description, labels); tests/serving/test_deploy.py checks the README's metric table against it.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "explainer_request_duration_seconds": (
        "histogram",
        "End-to-end time of one RPC inside the ingress, by RPC, explanation method, model and gRPC code.",
        ("rpc", "method", "model", "code"),
    ),
    "explainer_errors_total": (
        "counter",
        "RPCs that ended with a non-OK gRPC code; reason tells RESOURCE_EXHAUSTED's full queue (overload) "
        "from a request over a cap (cap), else none.",
        ("rpc", "code", "reason"),
    ),
    "explainer_inflight_requests": ("gauge", "RPCs being served by this ingress replica.", ("rpc",)),
    "explainer_stage_duration_seconds": (
        "histogram",
        "Time per stage: admission, decode, dispatch, queue, preprocess, cache_get, forward, explain, render, "
        "encode, cache_put.",
        ("stage", "model"),
    ),
    "explainer_stage_seconds_total": (
        "counter",
        "Seconds spent per stage, summed exactly: Ray 2.60 exports a histogram's _sum from bucket midpoints, "
        "so rate() of this counter, not of the stage histogram's _sum, gives busy seconds per second.",
        ("stage", "model"),
    ),
    "explainer_cache_requests_total": (
        "counter",
        "Cache operations by tier (l1, l2), op (get, put) and result "
        "(hit, miss, error, corrupt, skipped, too_big, stored, dropped).",
        ("tier", "op", "result"),
    ),
    "explainer_cache_value_bytes": ("histogram", "Size of values read from or written to Redis.", ("op",)),
    "explainer_jobs_stopped_total": (
        "counter",
        "Worker jobs stopped part-way at an engine checkpoint, by reason: cancelled (the caller went away: "
        "a cancel, or its gRPC deadline at the proxy) or deadline (the budget ran out).",
        ("model", "reason"),
    ),
    "explainer_model_info": (
        "gauge",
        "1 per loaded model replica; labels carry the model id, weights digest and device.",
        ("model", "weights_digest", "device"),
    ),
}


@dataclass
class ServiceMetrics:
    """Thin wrapper that creates the Ray metric objects once and records with bounded labels."""

    _metrics: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ray.serve import metrics

        for name, (kind, description, labels) in METRICS.items():
            if kind == "histogram":
                buckets = {
                    "explainer_request_duration_seconds": REQUEST_BUCKETS_S,
                    "explainer_stage_duration_seconds": STAGE_BUCKETS_S,
                    "explainer_cache_value_bytes": VALUE_BUCKETS_BYTES,
                }[name]
                metric: object = metrics.Histogram(name, description=description, boundaries=buckets, tag_keys=labels)
            elif kind == "counter":
                metric = metrics.Counter(name, description=description, tag_keys=labels)
            else:
                metric = metrics.Gauge(name, description=description, tag_keys=labels)
            self._metrics[name] = metric
        self._inflight: dict[str, int] = {}
        # Ray drops a gauge series ~20 s after its last set(); re-set them so they stay visible.
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges_lock = threading.Lock()
        threading.Thread(target=self._refresh_gauges, name="ierf-gauge-refresh", daemon=True).start()

    def _set_gauge(self, name: str, value: float, tags: dict[str, str]) -> None:
        with self._gauges_lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = value
        self._metrics[name].set(value, tags=tags)  # type: ignore[attr-defined]

    def _refresh_gauges(self, interval_s: float = GAUGE_REFRESH_S) -> None:
        while True:
            threading.Event().wait(interval_s)
            with self._gauges_lock:
                items = list(self._gauges.items())
            for (name, tags), value in items:
                self._metrics[name].set(value, tags=dict(tags))  # type: ignore[attr-defined]

    def request(self, rpc: str, method: str, model: str, code: str, seconds: float, reason: str = "none") -> None:
        tags = {"rpc": rpc, "method": method or "none", "model": model or "none", "code": code}
        self._metrics["explainer_request_duration_seconds"].observe(seconds, tags=tags)  # type: ignore[attr-defined]
        if code != "OK":
            errors = self._metrics["explainer_errors_total"]
            errors.inc(1, tags={"rpc": rpc, "code": code, "reason": reason})  # type: ignore[attr-defined]

    def inflight(self, rpc: str, delta: int) -> None:
        self._inflight[rpc] = self._inflight.get(rpc, 0) + delta
        self._set_gauge("explainer_inflight_requests", self._inflight[rpc], {"rpc": rpc})

    def stage(self, stage: str, model: str, seconds: float) -> None:
        tags = {"stage": stage, "model": model}
        self._metrics["explainer_stage_duration_seconds"].observe(seconds, tags=tags)  # type: ignore[attr-defined]
        if seconds > 0:  # a counter only goes up
            self._metrics["explainer_stage_seconds_total"].inc(seconds, tags=tags)  # type: ignore[attr-defined]

    def cache(self, tier: str, op: str, result: str, seconds: float, nbytes: int) -> None:
        self._metrics["explainer_cache_requests_total"].inc(  # type: ignore[attr-defined]
            1, tags={"tier": tier, "op": op, "result": result}
        )
        if tier == "l2" and nbytes > 0:
            self._metrics["explainer_cache_value_bytes"].observe(nbytes, tags={"op": op})  # type: ignore[attr-defined]

    def stopped(self, model: str, reason: str) -> None:
        self._metrics["explainer_jobs_stopped_total"].inc(1, tags={"model": model, "reason": reason})  # type: ignore[attr-defined]

    def model_info(self, model: str, weights_digest: str, device: str) -> None:
        self._set_gauge("explainer_model_info", 1, {"model": model, "weights_digest": weights_digest, "device": device})

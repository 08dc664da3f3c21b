"""Tests that kill round-44 mutants (TieredCache.can_keep and may_hold, ModelHost.pixels_needed) which the
suites of the change let survive; each docstring names its mutants."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from serving.test_worker_warm_up import PIXELS

pytestmark = pytest.mark.slow


def test_a_half_open_redis_may_hold_and_keep_values_as_the_trial_call_goes_through(redis_flushed: Any) -> None:
    """M03, M11: half-open (the breaker's open time is over), the next Redis call is let through as the trial,
    so a lookup can find what Redis holds and a write is made: ``may_hold`` and ``can_keep`` must say True.
    Taking only "closed" as up, a job by hash for an image Redis holds was refused at once on an L1-less
    replica, and the ingress forgot images Redis did keep, until some other request closed the breaker."""
    from ierf.serving.cache import CacheKey, CircuitBreaker, RedisSettings, RedisTier, TieredCache

    key = CacheKey("logits", "m", "digest", "prep-v1", "forward", "f-1", "cd" * 32).redis_key()
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    now = [0.0]
    tier.breaker = CircuitBreaker(failure_threshold=1, open_seconds=10.0, clock=lambda: now[0])  # time set here
    cache = TieredCache(0, tier)  # L1 off: only Redis keeps values
    value = {"logits": torch.arange(10, dtype=torch.float32).reshape(1, 10)}
    try:
        assert cache.put(key, value, 40, value) == "stored"
        tier.breaker.record_failure()
        assert tier.breaker.state == "open"
        assert not cache.may_hold(key) and not cache.can_keep(40, 40)  # known down: surely lacks, keeps nothing
        now[0] = 10.0
        assert tier.breaker.state == "half_open"
        assert cache.may_hold(key) and cache.can_keep(40, 40)
        found = cache.get(key, lambda state: (state["logits"], 40))  # the trial call: Redis holds it
        assert found.tier == "l2" and torch.equal(found.value, value["logits"])
        assert tier.breaker.state == "closed"
    finally:
        cache.close(timeout_s=5)


def test_a_prediction_by_hash_on_an_image_only_predicted_before_is_answered_from_its_logits() -> None:
    """M18, M19: a Predict by hash reads the cached logits, not the decomposition (a Predict with pixels caches
    only the logits). Checking another key, a replica without Redis refused at once every repeat of an image it
    had only predicted, though its L1 held the answer: one more hop, and the pixels sent again for nothing."""
    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import PredictJob
    from ierf.serving.settings import ServiceConfig

    model = {"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 1}
    config = ServiceConfig.from_args({"models": [model], "cache": {"redis_url": None}})  # L1 only
    worker = ExplainerWorker.func_or_class(config.models[0], config.cache)
    try:
        first = asyncio.run(worker.predict(PredictJob(PIXELS, "seen", top_k=2)))
        assert first.provenance.cache == [("logits", "miss")]
        assert isinstance(asyncio.run(worker.predict(PredictJob(None, "never", top_k=2))), PixelsNeeded)
        again = asyncio.run(worker.predict(PredictJob(None, "seen", top_k=2)))
        assert not isinstance(again, Exception), again
        assert again.provenance.cache == [("logits", "l1")] and again.top_classes == first.top_classes
    finally:
        worker.__del__()

"""Resource bounds a long-running worker relies on (found by a soak: 1,200 in-process requests with Redis
stopped, flushed, filled and poisoned in between, 5,000 through the real service). Counted objects and
bytes, not wall-clock, so they are fast and deterministic."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import torch


def test_a_model_host_that_is_dropped_is_freed(monkeypatch) -> None:
    """``ModelHost._method_version`` is a ``functools.cache`` on a method, so the process-wide cache keeps
    ``(self, name)`` alive: every host that ever explained is pinned for the life of the process with its
    model and its whole L1 (up to ``l1_bytes``, 512 MiB by default). Four ResNet18 hosts made and dropped
    one after another held ~135 MB of RSS each (Serve local testing mode, tests, notebooks)."""
    from ierf.serving import worker
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(worker, "WARM_UP_PASSES", 1)
    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": None}}
    )
    host = worker.ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    host.explain(worker.ExplainJob(pixels, "f" * 64, target=1))
    assert len(host.cache.l1) > 0
    ref = weakref.ref(host)
    del host
    gc.collect()
    assert ref() is None, f"the dropped ModelHost is still referenced by {[type(r) for r in gc.get_referrers(ref())]}"


def test_deferred_and_queued_redis_writes_share_one_byte_budget() -> None:
    """README: ``write_behind_bytes`` bounds the encoded values pending, and "deferred and queued values share
    the write_behind_bytes budget". A deferred write that does not fit beside the others goes behind at once,
    and the queue then checks only its own bytes: with 6 MB deferred, a second 6 MB value is queued against
    a 10 MB budget (12 MB pending; up to twice the budget in general)."""
    from ierf.serving.cache import RedisSettings, RedisTier, TieredCache

    budget = 10_000_000
    tier = RedisTier(RedisSettings(url="redis://127.0.0.1:1/0", max_value_bytes=8_000_000))
    cache = TieredCache(0, tier, write_behind_bytes=budget)
    release = threading.Event()
    cache._behind._write = lambda key, value: release.wait(10)  # a slow Redis: the queue does not drain
    try:
        value = {"x": torch.zeros(1_500_000)}  # 6 MB
        cache.put("a", object(), 6_000_000, value, background=True, deferred=True)
        cache.put("b", object(), 6_000_000, dict(value), background=True, deferred=True)
        pending = cache._deferred_bytes + cache._behind.pending_bytes
        assert pending <= budget, f"{pending / 1e6:.0f} MB pending against a {budget / 1e6:.0f} MB budget"
    finally:
        release.set()
        cache.close(timeout_s=2.0)


def test_cached_logits_count_their_entry_overhead_against_the_l1_bound(monkeypatch) -> None:
    """A soak filled L1 with Predict logits: each 4,000-byte entry cost 0.9-1.3 kB more than it declared, so
    an L1 of logits held 22-33 % more than ``l1_bytes``. Each entry counts its overhead too."""
    from ierf.serving import worker
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(worker, "WARM_UP_PASSES", 1)
    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": None}}
    )
    host = worker.ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    host.predict(worker.PredictJob(pixels, "e" * 64))
    assert host.cache.l1.nbytes == 1000 * 4 + worker.L1_ENTRY_OVERHEAD_BYTES
    host.close()

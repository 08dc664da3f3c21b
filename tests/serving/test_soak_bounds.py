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
    view = 224 * 224 * 3  # the view kept beside the logits counts its overhead too
    assert host.cache.l1.nbytes == 1000 * 4 + worker.L1_ENTRY_OVERHEAD_BYTES + view + worker.L1_ENTRY_OVERHEAD_BYTES
    host.close()


def test_a_replaced_deferred_value_gives_its_bytes_back_to_the_budget() -> None:
    """A key put again while its first value still waits for write_deferred replaces it: the budget must count
    the value once, or each re-put leaks its bytes until no deferred write fits any more."""
    from ierf.serving.cache import RedisSettings, RedisTier, TieredCache, tensors_nbytes

    tensors = {"x": torch.zeros(100_000)}
    size = tensors_nbytes(tensors)
    tier = RedisTier(RedisSettings(url="redis://127.0.0.1:1/0"))
    cache = TieredCache(0, tier, write_behind_bytes=size + size // 2)
    release = threading.Event()
    cache._behind._write = lambda key, value: release.wait(10)
    try:
        for _ in range(3):
            assert cache.put("a", object(), 1, dict(tensors), background=True, deferred=True) == "queued"
        assert cache._deferred_bytes == size
        assert cache.write_deferred() == 1 and cache._deferred_bytes == 0
    finally:
        release.set()
        cache.close(timeout_s=2.0)


def test_the_shared_budget_holds_to_the_byte_with_the_codecs_header() -> None:
    """The pre-check counts a value's tensor bytes; what is queued is the encoded value, a header longer. A
    value that fits only without its header, beside a deferred one, is dropped: the queue itself counts the
    deferred bytes, so deferred + queued never pass ``write_behind_bytes``."""
    from ierf.serving.cache import RedisSettings, RedisTier, TieredCache, tensors_nbytes

    tensors = {"x": torch.zeros(100_000)}
    size = tensors_nbytes(tensors)
    budget = 2 * size
    tier = RedisTier(RedisSettings(url="redis://127.0.0.1:1/0"))
    cache = TieredCache(0, tier, write_behind_bytes=budget)
    release = threading.Event()
    cache._behind._write = lambda key, value: release.wait(10)
    try:
        assert cache.put("a", object(), 1, dict(tensors), background=True, deferred=True) == "queued"
        assert cache.put("b", object(), 1, dict(tensors), background=True) == "dropped"
        assert cache._deferred_bytes + cache._behind.pending_bytes <= budget
    finally:
        release.set()
        cache.close(timeout_s=2.0)


def test_logits_read_back_from_redis_count_their_entry_overhead_too() -> None:
    """Logits a worker reads back from Redis go into L1 as well: sized like the ones it computed (tensor bytes
    plus the entry's overhead), or an L1 refilled from Redis after a restart holds more than ``l1_bytes``."""
    from types import SimpleNamespace

    from ierf.serving import worker

    host = SimpleNamespace(model=SimpleNamespace(class_names=[str(i) for i in range(1000)]))
    logits, nbytes = worker.ModelHost._cached_logits(host, {"logits": torch.zeros(1, 1000)})
    assert logits.shape == (1, 1000)
    assert nbytes == 1000 * 4 + worker.L1_ENTRY_OVERHEAD_BYTES

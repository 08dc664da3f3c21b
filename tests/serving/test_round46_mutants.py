"""Round 46 mutants: the worker keeps the model's view of each image, and every repeat goes by content hash.

Each test names the mutants of ``service/ierf/serving/worker.py`` it kills; all run a real ModelHost
(randomly initialised ResNet18) and, where Redis matters, the session's real Redis.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from serving.test_repeats_by_hash import LAYER, POSITIONS, _view_key
from serving.test_worker_warm_up import HASH, PIXELS, _host, _tamper

pytestmark = pytest.mark.slow


def test_a_view_the_ingress_cut_is_kept_for_later_jobs_by_hash() -> None:
    """V01 (``made_view`` False for a job carrying the ingress's crop): a large photo reaches the worker as its
    view, and that view was not kept, so every later job by hash that reads it was refused."""
    from ierf.serving.jobs import ExplainJob

    host = _host({"redis_url": None})
    view = host.model.resize_crop(PIXELS)
    host.explain(ExplainJob(view, HASH, target=1, view_version=host.model.preprocess_version))
    np.testing.assert_array_equal(host.cache.l1.get(_view_key(host)), view)
    again = host.explain(ExplainJob(None, HASH, target=1, return_input=True))
    np.testing.assert_array_equal(again.model_input, view)


@pytest.mark.parametrize("rpc", ["ierf", "predict"])
def test_an_ierf_or_a_predict_keeps_the_view_it_cut(rpc: str) -> None:
    """V35, V36 (no ``_keep_view`` in ierf / predict): an image first sent for an iERF or a prediction left no
    view, so the overlay asked for next by hash was refused."""
    from ierf.serving.jobs import ExplainJob, IERFJob, PredictJob

    host = _host({"redis_url": None})
    first = IERFJob(PIXELS, HASH, LAYER, POSITIONS) if rpc == "ierf" else PredictJob(PIXELS, HASH, top_k=2)
    (host.ierf if rpc == "ierf" else host.predict)(first)
    np.testing.assert_array_equal(host.cache.l1.get(_view_key(host)), host.model.resize_crop(PIXELS))
    assert host.pixels_needed(ExplainJob(None, HASH, target=1, overlay=True)) is None
    assert host.explain(ExplainJob(None, HASH, target=1, overlay=True)).overlays


def test_a_prediction_by_hash_needs_the_logits_not_the_decomposition() -> None:
    """V15 (Predict checked against the decomposition up front): an image only predicted on, its view evicted,
    was refused by hash although its logits answer the prediction."""
    from ierf.serving.jobs import PredictJob

    host = _host({"redis_url": None})
    expected = host.predict(PredictJob(PIXELS, HASH, top_k=3))
    host.cache.l1.discard(_view_key(host))
    job = PredictJob(None, HASH, top_k=3)
    assert host.pixels_needed(job) is None
    assert host.predict(job).top_classes == expected.top_classes


def test_the_view_s_lookup_and_write_are_timed() -> None:
    """V19, V32 (no ``cache_get`` / ``cache_put`` stage for the view): the stage timings, in provenance and the
    metrics, left out the view's cache traffic."""
    from ierf.serving.jobs import ExplainJob

    host = _host({"redis_url": None})
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    host.cache.l1.discard(_view_key(host))  # the decomposition and logits stay: only the view is written
    kept = host.explain(ExplainJob(PIXELS, HASH, target=2, overlay=True))
    assert [stage for stage, _ in kept.provenance.timings].count("cache_put") == 1
    assert kept.provenance.cache == [("decomposition", "l1")]
    by_hash = host.explain(ExplainJob(None, HASH, target=2, overlay=True))
    assert by_hash.provenance.cache == [("view", "l1"), ("decomposition", "l1")]  # the overlay's view read first
    assert [stage for stage, _ in by_hash.provenance.timings].count("cache_get") == 2


def test_the_view_goes_to_redis_after_the_answer(redis_flushed: Any) -> None:
    """V28, V29 (the view's Redis write not in the background, or not deferred): with deferral on (the Serve
    worker's setting), the view was encoded and sent while the caller waited."""
    from ierf.serving.jobs import ExplainJob
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    args = {
        "models": [{"id": "r18", "name": "resnet18", "random_init": True}],
        "cache": {"redis_url": redis_flushed.url},
    }
    config = ServiceConfig.from_args(args)
    host = ModelHost(config.models[0], config.cache, defer_cache_writes=True)
    try:
        host.explain(ExplainJob(PIXELS, HASH, target=1))
        host.cache.write_deferred()
        assert host.cache.flush(10.0)
        host.cache.l1.discard(_view_key(host))
        host.explain(ExplainJob(PIXELS, HASH, target=2, return_input=True))  # only the view is written
        assert host.cache.write_deferred() == 1
    finally:
        host.close()


def test_the_view_s_l1_size_is_its_bytes(redis_flushed: Any) -> None:
    """V23, V31 (the view's L1 size without its bytes): views a thousand times lighter than they are would
    crowd the decompositions out of L1's byte budget unaccounted."""
    from ierf.serving.jobs import ExplainJob
    from ierf.serving.worker import L1_ENTRY_OVERHEAD_BYTES

    size = 224 * 224 * 3 + L1_ENTRY_OVERHEAD_BYTES
    writer = _host({"redis_url": redis_flushed.url})
    writer.explain(ExplainJob(PIXELS, HASH, target=1))
    assert writer.cache.l1._items[_view_key(writer)][1] == size
    assert writer.cache.flush(10.0)
    reader = _host({"redis_url": redis_flushed.url})
    got = reader.explain(ExplainJob(None, HASH, target=1, overlay=True))
    assert ("view", "l2") in got.provenance.cache
    assert reader.cache.l1._items[_view_key(reader)][1] == size


@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
def test_a_cached_view_of_another_dtype_is_a_miss(redis_flushed: Any, dtype: torch.dtype) -> None:
    """V21 (no dtype check on a view read from Redis): a view of the right shape and another dtype was
    returned to the caller as the model's input, and rendered."""
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob

    writer = _host({"redis_url": redis_flushed.url})
    writer.explain(ExplainJob(PIXELS, HASH, target=1))
    assert writer.cache.flush(10.0)

    def retype(state: dict[str, Any]) -> None:
        state["view"] = state["view"].to(dtype)

    _tamper(redis_flushed.url, _view_key(writer), retype)
    reader = _host({"redis_url": redis_flushed.url})
    with pytest.raises(PixelsNeeded):
        reader.explain(ExplainJob(None, HASH, target=1, return_input=True))


def test_a_view_read_from_redis_is_not_written_back(redis_flushed: Any) -> None:
    """V07 (a view read from the caches counted as made by the job): a replica without room in L1 wrote each
    view it read from Redis back to Redis, a 150 KB write per request."""
    from ierf.serving.jobs import ExplainJob

    writer = _host({"redis_url": redis_flushed.url})
    writer.explain(ExplainJob(PIXELS, HASH, target=1))
    assert writer.cache.flush(10.0)
    reader = _host({"redis_url": redis_flushed.url, "l1_bytes": 0})
    puts: list[str] = []
    real_put = reader.cache.put
    reader.cache.put = lambda key, *a, **k: puts.append(key) or real_put(key, *a, **k)
    got = reader.explain(ExplainJob(None, HASH, target=1, overlay=True))
    assert ("view", "l2") in got.provenance.cache
    assert _view_key(reader) not in puts


def test_a_replica_that_may_find_the_view_in_redis_takes_a_job_that_reads_it(redis_flushed: Any) -> None:
    """V46 (the up-front check asking L1 alone for the view): a replica that never saw the image refused an
    overlay by hash that Redis answers, one more hop with the pixels for every repeat routed elsewhere."""
    from ierf.serving.jobs import ExplainJob

    writer = _host({"redis_url": redis_flushed.url})
    expected = writer.explain(ExplainJob(PIXELS, HASH, target=1, overlay=True))
    assert writer.cache.flush(10.0)
    reader = _host({"redis_url": redis_flushed.url})
    job = ExplainJob(None, HASH, target=1, overlay=True)
    assert reader.pixels_needed(job) is None
    assert reader.explain(job).overlays == expected.overlays

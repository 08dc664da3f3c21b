"""Session 47: what a job's arrays look like after Ray has carried them.

Ray hands a worker the numpy arrays of a job as read-only views of the message buffer. ``torch.from_numpy``
warns on such an array (PyTorch cannot stop a later write through the tensor), once per process, into the
replica's log: the worker must take a copy of what it converts.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from serving.test_worker_warm_up import HASH, PIXELS, _host

pytestmark = pytest.mark.slow


def test_ierf_positions_as_ray_delivers_them_convert_without_a_warning() -> None:
    from ierf.serving.jobs import IERFJob

    host = _host()
    positions = np.array([[0, 0], [1, 2]], dtype=np.int64)
    positions.setflags(write=False)  # as deserialised from Ray's object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each warning is raised, however often it was shown before
        outcome = host.ierf(IERFJob(PIXELS, HASH, "layer3.1", positions))
    assert outcome.maps.shape[0] == 2


def test_a_view_cut_by_the_ingress_as_ray_delivers_it_converts_without_a_warning() -> None:
    """The ingress cuts large images to the model's view and sends that: the worker's input is then the
    job's own (read-only) buffer."""
    from ierf.images import resize_crop
    from ierf.serving.jobs import ExplainJob

    host = _host()
    photo = np.random.default_rng(5).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    view = resize_crop(photo, host.description.resize, host.description.input_height)
    view.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cut = host.explain(
            ExplainJob(view, "cut-47", target=3, view_version=host.description.preprocess_version, overlay=True)
        )
    whole = host.explain(ExplainJob(photo, "whole-47", target=3, overlay=True))
    np.testing.assert_array_equal(cut.maps, whole.maps)


@pytest.mark.parametrize("rpc", ["explain", "predict"])
def test_a_job_by_hash_recomputed_from_the_view_in_redis_counts_its_misses(redis_flushed, rpc: str) -> None:
    """Another replica holds only the image's view, in Redis (the decomposition and the logits were evicted):
    a job by hash reads the view and recomputes, so it is not sent again, and no job with the pixels will count
    the misses of what it recomputed. Before, they were held back (as for a job about to be refused) and then
    never counted: the hit-ratio metrics saw a view hit and no miss, while provenance said "miss"."""
    import redis
    from ierf.serving.jobs import ExplainJob, PredictJob

    from serving.test_repeats_by_hash import _observed_host

    def job(pixels):
        return ExplainJob(pixels, HASH, target=2) if rpc == "explain" else PredictJob(pixels, HASH, top_k=3)

    writer = _host({"redis_url": redis_flushed.url})
    getattr(writer, rpc)(job(PIXELS))
    assert writer.cache.flush(10.0)
    client = redis.Redis.from_url(redis_flushed.url, socket_timeout=5)
    artefact, method = ("decomposition", "srd") if rpc == "explain" else ("logits", "model")
    assert client.delete(writer._key(artefact, method, HASH)) == 1
    client.close()

    reader, lookups = _observed_host(redis_flushed.url)
    outcome = getattr(reader, rpc)(job(None))
    assert (artefact, "miss") in outcome.provenance.cache and ("view", "l2") in outcome.provenance.cache
    # the view's lookup, then the artefact's misses, counted once the view was found
    assert lookups == [("l1", "miss"), ("l2", "hit"), ("l1", "miss"), ("l2", "miss")]


@pytest.mark.parametrize("kind", ["explain overlay", "explain return_input", "ierf overlay", "ierf return_input"])
def test_a_job_by_hash_that_shows_a_view_no_replica_holds_is_refused_before_any_work(
    redis_flushed, monkeypatch, kind: str
) -> None:
    """The view can age out of Redis before the decomposition does. A job by hash that would show it was
    refused only after its map was computed, which the job sent again with the pixels then computed again."""
    import redis
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob, IERFJob
    from ierf.srd.explainer import Decomposition

    def job(pixels):
        if kind.startswith("ierf"):
            return IERFJob(
                pixels,
                HASH,
                "layer3.1",
                [[0, 0]],
                overlay=kind.endswith("overlay"),
                return_input=kind.endswith("input"),
            )
        return ExplainJob(pixels, HASH, target=2, overlay=kind.endswith("overlay"), return_input=kind.endswith("input"))

    writer = _host({"redis_url": redis_flushed.url})
    run = writer.ierf if kind.startswith("ierf") else writer.explain
    expected = run(job(PIXELS))
    assert writer.cache.flush(10.0)
    client = redis.Redis.from_url(redis_flushed.url, socket_timeout=5)
    assert client.delete(writer._key("view", "view", HASH)) == 1  # the decomposition and logits stay
    client.close()

    reader = _host({"redis_url": redis_flushed.url})
    work: list[str] = []
    for name in ("saliency", "ierf"):
        original = getattr(Decomposition, name)
        monkeypatch.setattr(
            Decomposition, name, lambda self, *a, _o=original, _n=name, **k: work.append(_n) or _o(self, *a, **k)
        )
    run = reader.ierf if kind.startswith("ierf") else reader.explain
    with pytest.raises(PixelsNeeded):
        run(job(None))
    assert work == []
    again = run(job(PIXELS))  # the job sent again with its pixels
    np.testing.assert_array_equal(again.maps, expected.maps)


@pytest.mark.parametrize("rpc", ["explain", "explain overlay", "predict"])
def test_a_job_by_hash_refused_for_its_deadline_counts_its_misses(redis_flushed, rpc: str) -> None:
    """A deadline refusal after a cache miss reaches the caller: the job is not sent again with its pixels, so
    the misses its lookup held back are counted by it or by no one (found in review 47)."""
    import redis
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.jobs import ExplainJob, PredictJob
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import DECOMPOSE, FORWARD, ModelHost

    def job(pixels):
        deadline = time.time() + 5.0
        if rpc == "predict":
            return PredictJob(pixels, HASH, top_k=3, deadline=deadline)
        return ExplainJob(pixels, HASH, target=2, overlay=rpc.endswith("overlay"), deadline=deadline)

    writer = _host({"redis_url": redis_flushed.url})
    writer.explain(ExplainJob(PIXELS, HASH, target=2))
    assert writer.cache.flush(10.0)
    client = redis.Redis.from_url(redis_flushed.url, socket_timeout=5)
    for artefact, method in (("decomposition", "srd"), ("logits", "model")):
        assert client.delete(writer._key(artefact, method, HASH)) == 1  # only the view stays
    client.close()
    writer.close()

    lookups: list[tuple[str, str]] = []
    args = {
        "models": [{"id": "r18", "name": "resnet18", "random_init": True}],
        "cache": {"redis_url": redis_flushed.url, "l1_bytes": 0},  # every reuse through Redis
    }
    config = ServiceConfig.from_args(args)
    reader = ModelHost(
        config.models[0],
        config.cache,
        cache_observer=lambda tier, op, result, *_: lookups.append((tier, result)) if op == "get" else None,
    )
    run = reader.predict if rpc == "predict" else reader.explain

    def refused(pixels) -> list[tuple[str, str]]:
        lookups.clear()
        for work in (DECOMPOSE, FORWARD):  # this replica learnt the work takes 100 s: a 5 s deadline is refused
            reader._estimates[work] = reader._measured[work] = 100.0
        with pytest.raises(DeadlineExceeded):
            run(job(pixels))
        return [lookup for lookup in lookups if lookup != ("l2", "hit")]  # the view's hit, by hash

    with_pixels = refused(PIXELS)
    assert with_pixels == [("l2", "miss")]
    assert refused(None) == with_pixels  # before: [] (held back, then dropped)
    reader.close()


def test_a_corrupt_value_met_by_a_job_by_hash_is_counted_once(redis_flushed) -> None:
    """Only misses are held back for a job without pixels: a corrupt value (or an error) is counted at once,
    and counting the held-back misses later must not count it again (round 47's M28)."""
    import collections

    import redis
    from ierf.serving.jobs import ExplainJob

    from serving.test_repeats_by_hash import _observed_host

    writer = _host({"redis_url": redis_flushed.url})
    writer.explain(ExplainJob(PIXELS, HASH, target=2))
    assert writer.cache.flush(10.0)
    client = redis.Redis.from_url(redis_flushed.url, socket_timeout=5)
    client.set(writer._key("decomposition", "srd", HASH), b"not a safetensors value")
    client.close()

    reader, lookups = _observed_host(redis_flushed.url)
    outcome = reader.explain(ExplainJob(None, HASH, target=2))  # recomputed from the view in Redis
    assert ("view", "l2") in outcome.provenance.cache
    counted = collections.Counter(lookups)
    assert counted[("l2", "corrupt")] == 1 and counted[("l2", "hit")] == 1, lookups

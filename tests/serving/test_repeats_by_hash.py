"""A repeat of an image travels to the worker by its content hash alone.

The ingress remembers the images it sent lately (``ingress.remembered_images``); any job on one of them goes
without pixels. The worker answers SRD saliency, iERFs and predictions from the cached decomposition or logits,
and overlays, the returned input and the other methods from the model's view it kept of the image (a
decomposition or logits evicted since are recomputed from that view); a worker that holds neither answers
PixelsNeeded, upon which the ingress sends the job again with them. These tests hold the two halves to each
other on a real ModelHost (randomly initialised ResNet18): every job sent by hash is answered exactly as with
its pixels, or refused rather than answered wrongly, and every refusal ends in the right answer for the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from serving.fakes import Method
from serving.test_worker_warm_up import HASH, PIXELS, _host, _tamper

pytestmark = pytest.mark.slow

LAYER = "layer3.1"
POSITIONS = np.array([[0, 0], [1, 2]], dtype=np.int64)


def _jobs() -> list[tuple[str, Any, bool]]:
    """(name, job with pixels, whether it reads the model's view: an overlay, the returned input, another
    method than SRD; the others read only the decomposition or the logits)."""
    from ierf.serving.jobs import ExplainJob, IERFJob, PredictJob

    return [
        ("explain", ExplainJob(PIXELS, HASH, target=2), False),
        ("explain auto target, mean", ExplainJob(PIXELS, HASH, contrast="mean"), False),
        ("explain minus a class", ExplainJob(PIXELS, HASH, target=2, contrast=7), False),
        ("explain with overlay", ExplainJob(PIXELS, HASH, target=2, overlay=True), True),
        ("explain returning its input", ExplainJob(PIXELS, HASH, target=2, return_input=True), True),
        ("explain by gradient", ExplainJob(PIXELS, HASH, method="gradient", target=2), True),
        ("explain by gradcam", ExplainJob(PIXELS, HASH, method="gradcam", target=2), True),
        ("ierf", IERFJob(PIXELS, HASH, LAYER, POSITIONS), False),
        ("ierf with overlay", IERFJob(PIXELS, HASH, LAYER, POSITIONS, overlay=True), True),
        ("ierf returning its input", IERFJob(PIXELS, HASH, LAYER, POSITIONS, return_input=True), True),
        ("predict", PredictJob(PIXELS, HASH, top_k=3), False),
    ]


_JOB_IDS = [name for name, _, _ in _jobs()]


def _run(host: Any, job: Any) -> Any:
    from ierf.serving.jobs import ExplainJob, IERFJob

    if isinstance(job, ExplainJob):
        return host.explain(job)
    if isinstance(job, IERFJob):
        return host.ierf(job)
    return host.predict(job)


def _scores(outcome: Any) -> list[Any]:
    return [s for s in [outcome.target, *outcome.top_classes] if s is not None]


def _same_answer(got: Any, expected: Any, exact_scores: bool = True) -> None:
    """``exact_scores=False``: logits of a plain forward pass against a decomposition's, which differ by float
    rounding (~1e-6)."""
    if expected.maps is None:
        assert got.maps is None
    else:
        np.testing.assert_array_equal(got.maps, expected.maps)
    if exact_scores:
        assert (got.target, got.top_classes) == (expected.target, expected.top_classes)
    else:
        assert [(s.index, s.name) for s in _scores(got)] == [(s.index, s.name) for s in _scores(expected)]
        for a, b in zip(_scores(got), _scores(expected), strict=True):
            assert a.logit == pytest.approx(b.logit, rel=1e-5)
            assert a.probability == pytest.approx(b.probability, rel=1e-5)
    assert got.layer == expected.layer
    assert got.overlays == expected.overlays  # the same PNG bytes: rendered from the same view
    if expected.model_input is None:
        assert got.model_input is None
    else:
        np.testing.assert_array_equal(got.model_input, expected.model_input)


def _view_key(host: Any) -> str:
    from ierf.serving.worker import VIEW_METHOD

    return host._key("view", VIEW_METHOD, HASH)


@pytest.fixture(scope="module")
def warm_host() -> Any:
    """A host that has seen PIXELS once (decomposition, logits and view in its L1)."""
    from ierf.serving.jobs import ExplainJob

    host = _host({"redis_url": None})
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    return host


@pytest.fixture(scope="module")
def reference_host() -> Any:
    """A host that answers every job with its pixels."""
    return _host({"redis_url": None})


@pytest.mark.parametrize(("name", "job", "reads_view"), _jobs(), ids=_JOB_IDS)
def test_every_job_by_hash_alone_is_answered_as_with_its_pixels(
    warm_host: Any, name: str, job: Any, reads_view: bool
) -> None:
    """The ingress sends every repeat by hash: each kind of job, on an image the worker holds, must be
    answered by hash alone exactly as with its pixels (overlays byte for byte, the returned view too), from
    what L1 holds, without cutting the view again."""
    with_pixels = _run(warm_host, job)
    by_hash_alone = _run(warm_host, dataclasses.replace(job, pixels=None))
    _same_answer(by_hash_alone, with_pixels)
    assert {tier for _, tier in by_hash_alone.provenance.cache} == {"l1"}
    assert (("view", "l1") in by_hash_alone.provenance.cache) is reads_view, name
    assert warm_host.pixels_needed(dataclasses.replace(job, pixels=None)) is None
    if getattr(job, "method", "srd") == "srd":  # other methods normalise the view: their own preprocess stage
        assert "preprocess" not in dict(by_hash_alone.provenance.timings)


def test_an_image_the_worker_does_not_hold_is_refused_by_hash_before_any_work() -> None:
    from ierf.serving.errors import PixelsNeeded

    host = _host({"redis_url": None})
    learned: list[str] = []
    host._learn = lambda work, seconds: learned.append(work)
    for name, job, _ in _jobs():
        without = dataclasses.replace(job, pixels=None)
        assert isinstance(host.pixels_needed(without), PixelsNeeded), name
        with pytest.raises(PixelsNeeded, match=f"image {HASH[:16]} is not cached here: send its pixels"):
            _run(host, without)
        assert len(host.cache.l1._items) == 0, name
    assert learned == []  # no forward pass, no explanation ran


@pytest.mark.parametrize(("name", "job", "reads_view"), _jobs(), ids=_JOB_IDS)
def test_without_the_view_only_jobs_that_do_not_read_it_go_by_hash(name: str, job: Any, reads_view: bool) -> None:
    """The view evicted, the decomposition and logits still held: a job that reads the view is refused (up
    front and on the compute thread alike), never answered from something else; the others are answered."""
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob

    host = _host({"redis_url": None})
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    host.cache.l1.discard(_view_key(host))
    without = dataclasses.replace(job, pixels=None)
    if reads_view:
        assert isinstance(host.pixels_needed(without), PixelsNeeded), name
        with pytest.raises(PixelsNeeded):
            _run(host, without)
    else:
        assert host.pixels_needed(without) is None, name
        _same_answer(_run(host, without), _run(host, job))
    assert _view_key(host) not in host.cache.l1  # a job by hash alone has no view to keep


@pytest.mark.parametrize(("name", "job", "reads_view"), _jobs(), ids=_JOB_IDS)
def test_an_evicted_decomposition_and_logits_are_recomputed_from_the_kept_view(
    reference_host: Any, name: str, job: Any, reads_view: bool
) -> None:
    """Only the view held (a decomposition is 20 times its size, and goes first under memory pressure): every
    job by hash alone is recomputed from it, exactly as from the pixels."""
    from ierf.serving.jobs import ExplainJob

    host = _host({"redis_url": None})
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    view = host.cache.l1.get(_view_key(host))
    host.cache.l1.clear()
    host.cache.l1.put(_view_key(host), view, view.nbytes)
    assert host.pixels_needed(dataclasses.replace(job, pixels=None)) is None
    by_hash_alone = _run(host, dataclasses.replace(job, pixels=None))
    # the reference's logits came from its decomposition (SRD jobs ran on it first), these from a forward pass
    _same_answer(by_hash_alone, _run(reference_host, job), exact_scores=False)
    assert ("view", "l1") in by_hash_alone.provenance.cache, name
    assert by_hash_alone.provenance.cache[-1][1] == "miss", name  # the decomposition or logits, recomputed


def test_the_view_kept_is_the_one_the_job_made_and_is_kept_once() -> None:
    from ierf.serving.jobs import ExplainJob

    host = _host({"redis_url": None})
    first = host.explain(ExplainJob(PIXELS, HASH, target=1, return_input=True))
    kept = host.cache.l1.get(_view_key(host))
    np.testing.assert_array_equal(kept, host.model.resize_crop(PIXELS))
    np.testing.assert_array_equal(kept, first.model_input)
    assert kept is not first.model_input and kept.flags.c_contiguous and kept.dtype == np.uint8
    assert dict(first.provenance.timings)["cache_put"] > 0
    puts: list[str] = []
    real_put = host.cache.put
    host.cache.put = lambda key, *a, **k: puts.append(key) or real_put(key, *a, **k)
    host.explain(ExplainJob(PIXELS, HASH, target=2, overlay=True))  # cuts the view again: already kept
    assert puts == []
    host.explain(ExplainJob(None, HASH, target=3, overlay=True))  # read from L1, not written back
    assert puts == []


def test_another_replica_answers_by_hash_from_redis_and_a_bad_cached_value_is_recomputed_from_the_view(
    redis_flushed: Any,
) -> None:
    """With Redis, a repeat routed to a replica that never saw the image is a hit all the same, overlays
    included. A cached decomposition the engine fails on is dropped and recomputed from the kept view; a view
    that is not one (another shape) is a miss, and without it the replica asks for the pixels."""
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob

    writer = _host({"redis_url": redis_flushed.url, "l1_bytes": 0})
    expected = writer.explain(ExplainJob(PIXELS, HASH, target=3, overlay=True))
    assert writer.cache.flush(10.0)
    other = _host({"redis_url": redis_flushed.url, "l1_bytes": 0})
    got = other.explain(ExplainJob(None, HASH, target=3, overlay=True))
    assert got.provenance.cache == [("view", "l2"), ("decomposition", "l2")]  # the overlay's view read first
    np.testing.assert_array_equal(got.maps, expected.maps)
    assert got.overlays == expected.overlays

    def inflate(state: dict[str, Any]) -> None:  # finite ratios 1e5 times too large pass the layout check
        for name in [k for k in state if k.endswith(".mu")]:
            state[name] = state[name] * 1e5

    _tamper(redis_flushed.url, writer._key("decomposition", "srd", HASH), inflate)
    again = other.explain(ExplainJob(None, HASH, target=3))
    assert again.provenance.cache == [("decomposition", "l2"), ("view", "l2"), ("decomposition", "miss")]
    np.testing.assert_allclose(again.maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(expected.maps).max())

    def crop(state: dict[str, Any]) -> None:
        state["view"] = state["view"][1:].contiguous()

    _tamper(redis_flushed.url, _view_key(writer), crop)
    with pytest.raises(PixelsNeeded):
        other.explain(ExplainJob(None, HASH, target=3, return_input=True))
    answer = other.explain(ExplainJob(PIXELS, HASH, target=3, return_input=True))
    np.testing.assert_array_equal(answer.model_input, writer.model.resize_crop(PIXELS))


# ------------------------------------------------------------------------- the ingress and a real worker
class _Worker:
    """Serve handles onto a real ModelHost, answering refusals as ExplainerWorker._run does (returned, not
    raised), and recording whether each job carried pixels."""

    def __init__(self, host: Any) -> None:
        from ierf.serving.errors import ServiceError

        self.host = host
        self.sent: list[bool] = []
        self.refusal_s = 0.0
        self.raise_for_hash: BaseException | None = None  # raised for a job without pixels, as Serve would

        def answering(fn: Callable[[Any], Any]) -> Method:
            async def answer(job: Any) -> Any:
                self.sent.append(job.pixels is not None)
                if job.pixels is None and self.raise_for_hash is not None:
                    raise self.raise_for_hash
                try:
                    return fn(job)
                except ServiceError as refusal:
                    await asyncio.sleep(self.refusal_s)  # a hop as slow as the test needs
                    return refusal

            return Method(answer)

        async def describe() -> Any:
            return host.describe()

        self.explain, self.ierf, self.predict = (answering(f) for f in (host.explain, host.ierf, host.predict))
        self.describe = Method(describe)


def _ingress(worker: _Worker, **ingress: Any) -> Any:
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": ["r18"], "ingress": ingress})
    return Ingress.func_or_class({"r18": worker}, config)


def _image(seed: int) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    pixels = np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[90, 120, 3]))


def _explain(ingress: Any, seed: int, target: int, **fields: Any) -> Any:
    from ierf_proto.v1 import explainer_pb2 as pb

    return asyncio.run(ingress.Explain(pb.ExplainRequest(image=_image(seed), target=target, **fields)))


def _map(response: Any) -> np.ndarray:
    return np.frombuffer(response.map.data, np.float32).reshape(list(response.map.shape))


def test_repeats_go_by_hash_and_an_evicted_image_is_sent_again_with_its_pixels() -> None:
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    reference = _ingress(_Worker(_host({"redis_url": None})), remembered_images=0)  # always with pixels

    first = _explain(ingress, 0, 1)
    second = _explain(ingress, 0, 2)
    with_overlay = _explain(ingress, 0, 3, overlay=True)  # rendered on the view the worker kept
    erf = asyncio.run(
        ingress.ComputeIERF(pb.ComputeIERFRequest(image=_image(0), layer=LAYER, positions=[pb.Position(row=1)]))
    )
    top = asyncio.run(ingress.Predict(pb.PredictRequest(image=_image(0), top_k=2)))
    assert worker.sent == [True, False, False, False, False]
    assert len(with_overlay.overlay_png) > 0 and erf.maps.shape == [1, 224, 224] and len(top.top_classes) == 2
    assert [c.tier for c in second.provenance.cache] == [pb.CACHE_TIER_L1]
    np.testing.assert_array_equal(_map(second), _map(_explain(reference, 0, 2)))

    worker.host.cache.l1.clear()  # evicted (or another replica without Redis)
    worker.refusal_s = 0.3
    evicted = _explain(ingress, 0, 4)
    assert worker.sent[-2:] == [False, True]  # refused by hash, sent again with the pixels
    assert [c.tier for c in evicted.provenance.cache] == [pb.CACHE_TIER_MISS]
    np.testing.assert_array_equal(_map(evicted), _map(_explain(reference, 0, 4)))
    dispatch = [t.seconds for t in evicted.provenance.timings if t.stage == "dispatch"]
    assert len(dispatch) == 1 and dispatch[0] >= 0.3  # both hops, the refused one included, in one stage
    assert _explain(ingress, 0, 5).provenance.cache[0].tier == pb.CACHE_TIER_L1
    assert worker.sent[-1] is False
    assert first.provenance.content_hash == evicted.provenance.content_hash


def test_the_ingress_remembers_a_bounded_number_of_images_most_recent_first() -> None:
    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker, remembered_images=2)
    for seed in (0, 1, 0, 2):  # 0 used again after 1: 1 is the oldest when 2 arrives
        _explain(ingress, seed, 1)
    assert worker.sent == [True, True, False, True]
    _explain(ingress, 1, 1)  # forgotten: with pixels, although the worker still holds it
    _explain(ingress, 2, 1)
    assert worker.sent[4:] == [True, False]
    assert len(ingress._sent) == 2


def test_an_image_no_cache_tier_keeps_is_not_remembered() -> None:
    """With the cache off (or values too big for every tier) a repeat by hash would only cost a refused hop."""
    worker = _Worker(_host({"redis_url": None, "l1_bytes": 0}))
    ingress = _ingress(worker)
    for target in (1, 2, 3):
        assert _explain(ingress, 0, target).provenance.cache[0].tier != 0
    assert worker.sent == [True, True, True]
    assert not ingress._sent


def test_with_only_redis_to_keep_images_and_redis_down_repeats_carry_their_pixels() -> None:
    """L1 off and Redis known down (its breaker open): the worker keeps nothing, so it reports the tier as
    disabled and the ingress does not remember the image; before, each repeat went by hash and was refused."""
    from ierf_proto.v1 import explainer_pb2 as pb

    dead_redis = {"redis_url": "redis://127.0.0.1:1/0", "l1_bytes": 0, "failure_threshold": 1, "open_seconds": 60}
    worker = _Worker(_host(dead_redis))
    ingress = _ingress(worker)
    answers = [_explain(ingress, 0, target) for target in (1, 2, 3)]
    assert worker.host.cache.l2.breaker.state == "open"
    assert [a.provenance.cache[0].tier for a in answers] == [pb.CACHE_TIER_DISABLED] * 3
    assert worker.sent == [True, True, True]
    assert not ingress._sent


def test_an_image_a_later_answer_kept_in_no_tier_is_forgotten() -> None:
    """Remembered while a tier kept it; a later answer with pixels (an overlay, say) that recomputed it and kept
    it nowhere (Redis gone down with L1 off) must make the ingress forget it, not leave it for a refused hop."""
    from ierf.serving.jobs import Outcome, Provenance

    ingress = _ingress(_Worker(_host({"redis_url": None})))

    def outcome(tier: str) -> Any:
        return Outcome(Provenance("r18", "d", "srd", "v", "p", HASH, cache=[("decomposition", tier)]))

    seen = ("r18", HASH)
    ingress._remember_sent(seen, outcome("miss"))
    assert seen in ingress._sent
    ingress._remember_sent(seen, outcome("disabled"))
    assert seen not in ingress._sent
    ingress._remember_sent(seen, outcome("disabled"))  # forgetting what is not remembered is no error
    assert not ingress._sent


def test_a_refusal_of_a_job_sent_by_hash_reaches_the_caller_without_a_second_hop() -> None:
    """Only PixelsNeeded sends a job again: any other refusal is the caller's answer."""
    from ierf.serving.errors import InvalidArgument
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    predicted = asyncio.run(ingress.Explain(pb.ExplainRequest(image=_image(0)))).target.index
    with pytest.raises(InvalidArgument, match="is the predicted class"):
        asyncio.run(ingress.Explain(pb.ExplainRequest(image=_image(0), contrast_class=predicted)))
    assert worker.sent == [True, False]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, r"remembered_images must be an integer >= 0 \(0: always send the pixels\), got -1"),
        (True, r"remembered_images must be an integer >= 0 .* got True"),
        (1_000_001, r"remembered_images must be at most 1000000 \(each takes ~0.3 KB"),
    ],
)
def test_remembered_images_is_checked_at_deploy(value: Any, message: str) -> None:
    from ierf.serving.settings import ServiceConfig

    with pytest.raises(ValueError, match=message):
        ServiceConfig.from_args({"models": ["r18"], "ingress": {"remembered_images": value}})
    assert (
        ServiceConfig.from_args({"models": ["r18"], "ingress": {"remembered_images": 0}}).ingress.remembered_images == 0
    )


@pytest.mark.parametrize("forgotten_by", ["capacity", "a refusal"])
def test_an_answer_by_hash_whose_image_was_forgotten_meanwhile_reaches_the_caller(forgotten_by: str) -> None:
    """While a job sent by hash is in flight, other requests may make the ingress forget its image: newer
    images past ``remembered_images``, or a concurrent repeat refused by a replica that does not hold it (no
    Redis). The answer is right all the same; noting it as recent must not fail the request (it ended
    INTERNAL with a KeyError)."""
    from ierf_proto.v1 import explainer_pb2 as pb

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker, remembered_images=1 if forgotten_by == "capacity" else 8)
    answer = worker.explain._fn
    hold = {"by_hash": 0.0, "with_pixels": 0.0}

    async def slowed(job: Any) -> Any:
        outcome = await answer(job)
        await asyncio.sleep(hold["by_hash" if job.pixels is None else "with_pixels"])
        return outcome

    worker.explain._fn = slowed

    async def scenario() -> tuple[Any, Any]:
        await ingress.Explain(pb.ExplainRequest(image=_image(0), target=1))
        hold["by_hash"] = 0.4
        slow = asyncio.ensure_future(ingress.Explain(pb.ExplainRequest(image=_image(0), target=2)))
        await asyncio.sleep(0.1)  # by hash, answered, held on its way back
        hold["by_hash"] = 0.0
        if forgotten_by == "capacity":
            other = await ingress.Explain(pb.ExplainRequest(image=_image(1), target=2))
        else:  # another replica, which never saw image 0: refused by hash, then sent with the pixels
            worker.host.cache.l1.clear()
            hold["with_pixels"] = 0.6  # the pixels' hop still under way when the slow answer arrives
            other = await ingress.Explain(pb.ExplainRequest(image=_image(0), target=3))
        return await slow, other

    slow, other = asyncio.run(scenario())
    reference = _ingress(_Worker(_host({"redis_url": None})), remembered_images=0)
    np.testing.assert_array_equal(_map(slow), _map(_explain(reference, 0, 2)))
    assert worker.sent[1] is False  # the slow one went by hash
    assert other.target.index == (2 if forgotten_by == "capacity" else 3)


@pytest.mark.parametrize("rpc", ["explain", "ierf"])
def test_an_overlay_on_a_cached_image_books_its_crop_once(warm_host: Any, rpc: str) -> None:
    """On a cache hit the crop is first needed by the overlay: it was timed as "preprocess" inside "render",
    so the stages summed past the request's wall time (by the crop's time, large for a large photo)."""
    import time

    from ierf.serving.jobs import ExplainJob, IERFJob

    photo = np.random.default_rng(3).integers(0, 256, (1800, 2400, 3), dtype=np.uint8)
    warm_host.explain(ExplainJob(photo, "e" * 64, target=1))  # decomposition cached
    job = (
        ExplainJob(photo, "e" * 64, target=2, overlay=True)
        if rpc == "explain"
        else IERFJob(photo, "e" * 64, LAYER, POSITIONS[:1], overlay=True)
    )
    start = time.perf_counter()
    outcome = _run(warm_host, job)
    wall = time.perf_counter() - start
    stages = dict(outcome.provenance.timings)
    assert stages["preprocess"] > 0.002 and outcome.overlays  # a crop worth counting, and the overlay drawn
    assert sum(stages.values()) <= wall


def test_a_worker_of_an_earlier_build_fails_a_job_by_hash_and_the_caller_still_gets_its_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """During a rollout a new ingress may send a repeat by hash to a worker replica of an earlier build, which
    takes ``pixels=None`` for an image and fails (as Serve raises a replica's exception: a RayTaskError around
    it). Not the caller's fault: the job goes again with its pixels, and the log says why."""
    from ray.exceptions import RayTaskError

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    reference = _explain(_ingress(_Worker(_host({"redis_url": None})), remembered_images=0), 0, 2)
    _explain(ingress, 0, 1)
    earlier = TypeError("expected a PIL.Image or a uint8 numpy array, got NoneType")  # resize_crop(None)
    worker.raise_for_hash = RayTaskError("explain", "Traceback ...", earlier).as_instanceof_cause()
    serve_log = logging.getLogger("ray.serve")  # Ray's logger does not propagate to the root's
    serve_log.addHandler(caplog.handler)
    try:
        answer = _explain(ingress, 0, 2)
    finally:
        serve_log.removeHandler(caplog.handler)
    np.testing.assert_array_equal(_map(answer), _map(reference))
    assert worker.sent == [True, False, True]
    assert "sent by content hash alone failed" in caplog.text and "got NoneType" in caplog.text


def test_an_overload_or_a_dead_replica_met_by_a_job_by_hash_is_the_callers_answer() -> None:
    """What a job with pixels would meet as well (a full queue, a replica gone) is not worth a second hop."""
    from ierf.serving.errors import Overloaded, Unavailable
    from ray.exceptions import RayActorError

    from serving.fakes import BackPressureError

    worker = _Worker(_host({"redis_url": None}))
    ingress = _ingress(worker)
    _explain(ingress, 0, 1)
    # the replica gone first: after an overload the ingress sheds the next calls itself for a moment
    for error, expected in ((RayActorError(), Unavailable), (BackPressureError("queue full"), Overloaded)):
        worker.raise_for_hash = error
        sent = len(worker.sent)
        with pytest.raises(expected):
            _explain(ingress, 0, 2)
        assert worker.sent[sent:] == [False]


def _observed_host(redis_url: str | None) -> tuple[Any, list[tuple[str, str]]]:
    """A real ModelHost whose cache lookups are recorded as (tier, result), as the hit-ratio metrics see them."""
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    lookups: list[tuple[str, str]] = []

    def observe(tier: str, op: str, result: str, seconds: float, nbytes: int) -> None:
        if op == "get":
            lookups.append((tier, result))

    args = {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": redis_url}}
    config = ServiceConfig.from_args(args)
    return ModelHost(config.models[0], config.cache, cache_observer=observe), lookups


def test_a_job_by_hash_counts_its_cache_misses_only_when_it_is_answered(redis_flushed: Any) -> None:
    """The hit-ratio metrics count what requests found. A job by hash that misses is sent again with its pixels
    and that job counts the miss: counted by both, every eviction would read as two misses of one request.
    A job by hash answered from a later tier counts the earlier tier's miss as any request does."""
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob

    host, lookups = _observed_host(None)
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    host.explain(ExplainJob(None, HASH, target=2))
    assert lookups == [("l1", "miss"), ("l1", "hit")]
    host.cache.l1.clear()
    with pytest.raises(PixelsNeeded):
        host.explain(ExplainJob(None, HASH, target=3))
    assert lookups[2:] == []  # the job sent again counts the miss
    host.explain(ExplainJob(PIXELS, HASH, target=3))
    assert lookups[2:] == [("l1", "miss")]
    host.cache.l1.discard(host._key("decomposition", "srd", HASH))  # the kept view stays: the job is answered
    host.explain(ExplainJob(None, HASH, target=4))
    assert lookups[3:] == [("l1", "miss"), ("l1", "hit")]  # the decomposition's miss, then the view

    writer = _host({"redis_url": redis_flushed.url})
    writer.explain(ExplainJob(PIXELS, HASH, target=1))
    assert writer.cache.flush(10.0)
    reader, lookups = _observed_host(redis_flushed.url)
    reader.explain(ExplainJob(None, HASH, target=2))  # another replica: found in Redis
    assert lookups == [("l1", "miss"), ("l2", "hit")]


def test_a_job_by_hash_for_an_image_the_replica_surely_lacks_is_refused_without_queueing(monkeypatch) -> None:
    """An image evicted from L1 on a replica without Redis (or with Redis known down): the refusal by hash was
    made on the compute thread, so the attempt first waited behind the job being computed, and then the job
    sent again with its pixels waited once more. It is now refused before it queues; an image that may be
    held (in L1, or Redis up) still goes to the compute thread."""
    import time

    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.errors import PixelsNeeded
    from ierf.serving.jobs import ExplainJob, IERFJob, PredictJob
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    original = ModelHost.explain

    def explain(self: Any, job: Any) -> Any:  # a long cold decomposition ahead in the queue
        if job.content_hash == "busy":
            time.sleep(1.5)
        return original(self, job)

    monkeypatch.setattr(ModelHost, "explain", explain)

    def worker(cache: dict) -> Any:
        args = {"models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 1}], "cache": cache}
        config = ServiceConfig.from_args(args)
        return ExplainerWorker.func_or_class(config.models[0], config.cache)

    without_redis = worker({"redis_url": None})
    with_redis = worker({"redis_url": "redis://127.0.0.1:1/0", "failure_threshold": 1, "open_seconds": 60})
    by_hash = [
        ("explain", ExplainJob(None, "gone", target=1)),
        ("ierf", IERFJob(None, "gone", LAYER, POSITIONS)),
        ("predict", PredictJob(None, "gone", top_k=1)),
    ]

    async def refusal_times(w: Any) -> list[tuple[Any, float]]:
        busy = asyncio.ensure_future(w.explain(ExplainJob(PIXELS, "busy", target=1)))
        await asyncio.sleep(0.1)
        timed = []
        for rpc, job in by_hash:
            start = time.perf_counter()
            answer = await getattr(w, rpc)(job)
            timed.append((answer, time.perf_counter() - start))
        await busy
        return timed

    try:
        for answer, waited in asyncio.run(refusal_times(without_redis)):
            assert isinstance(answer, PixelsNeeded)
            assert waited < 0.5, f"refused only after {waited:.2f} s behind the queued job"
        cached = asyncio.run(without_redis.explain(ExplainJob(None, "busy", target=2)))  # held in L1: answered
        assert not isinstance(cached, Exception) and cached.provenance.cache == [("decomposition", "l1")]
        # Redis configured and not known down: it may hold the image, so the job queues and is asked there
        # (the first lookup fails and opens the breaker: from then on the refusal is made at once).
        first = asyncio.run(refusal_times(with_redis))
        assert isinstance(first[0][0], PixelsNeeded) and first[0][1] >= 1.0
        assert with_redis.host.cache.l2.breaker.state == "open"
        assert all(isinstance(a, PixelsNeeded) and waited < 0.5 for a, waited in first[1:])
    finally:
        without_redis.__del__()
        with_redis.__del__()


def test_every_job_on_an_image_renews_its_kept_view_in_l1() -> None:
    """The view is put once, by the job that cut it; later jobs by hash read the decomposition, which L1 renews.
    Unless they renew the view too, a hot image's view ages out first, and its next overlay by hash is refused."""
    from ierf.serving.jobs import ExplainJob

    sizing = _host({"redis_url": None})
    sizing.explain(ExplainJob(PIXELS, HASH, target=1))
    per_image = sizing.cache.l1.nbytes  # decomposition, logits, view
    host = _host({"redis_url": None, "l1_bytes": 2 * per_image + 1024})
    other, third = PIXELS[::-1].copy(), PIXELS[:, ::-1].copy()
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    host.explain(ExplainJob(other, "b" * 64, target=1))
    host.explain(ExplainJob(None, HASH, target=2))  # a hot image: by hash, without overlay
    host.explain(ExplainJob(third, "c" * 64, target=1))  # evicts the least recently used entries
    answer = host.explain(ExplainJob(None, HASH, target=2, overlay=True))
    assert ("view", "l1") in answer.provenance.cache and answer.overlays

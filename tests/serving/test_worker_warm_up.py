"""A worker replica before and after its first request: warm-up estimates, and cached values checked
against the layout of the replica's own warm-up decomposition when they come back from Redis."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PIXELS = np.random.default_rng(11).integers(0, 256, (90, 120, 3), dtype=np.uint8)
HASH = "f" * 64


def _host(cache: dict | None = None):
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    args = {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": cache or {"redis_url": None}}
    config = ServiceConfig.from_args(args)
    return ModelHost(config.models[0], config.cache)


def test_a_fresh_replica_knows_its_times_and_refuses_a_first_request_that_cannot_finish() -> None:
    """Before warm-up a replica let its first request through whatever the deadline (nothing measured
    yet), holding its only compute thread long after the caller gave up."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import DECOMPOSE, FORWARD, ExplainJob, PredictJob

    host = _host()
    assert {DECOMPOSE, FORWARD, "explain:srd"} <= host._estimates.keys()
    assert all(0 < seconds < 30 for seconds in host._estimates.values())
    warm_up = dict(host._estimates)
    assert host._measured == warm_up  # what the refusals below fall back to (round 26's W15)
    too_short = 0.2 * host._estimates[DECOMPOSE]
    start = time.perf_counter()
    with pytest.raises(DeadlineExceeded, match="decomposing a new image and srd saliency need about"):
        host.explain(ExplainJob(PIXELS, HASH, target=1, deadline=time.time() + too_short))
    with pytest.raises(DeadlineExceeded, match="a forward pass needs about"):
        host.predict(PredictJob(PIXELS, HASH, top_k=1, deadline=time.time() + 0.2 * host._estimates[FORWARD]))
    assert time.perf_counter() - start < host._estimates[DECOMPOSE], "refused only after the work"
    assert len(host.cache.l1._items) == 0  # nothing was computed for them

    # A caller with time enough is let through: the refusals' lowered estimate gives way to the warm-up's
    # measurement, which this run's time then blends into (without it, one run's time replaced it outright).
    learned: dict[str, float] = {}
    learn = host._learn

    def record(work: str, seconds: float) -> None:
        learned[work] = seconds
        learn(work, seconds)

    host._learn = record
    host.explain(ExplainJob(PIXELS, HASH, target=1, deadline=time.time() + 600))
    assert host._estimates[DECOMPOSE] == pytest.approx(0.7 * warm_up[DECOMPOSE] + 0.3 * learned[DECOMPOSE])


def _tamper(url: str, key: str, change) -> None:
    import redis
    from ierf.serving.cache import decode_tensors, encode_tensors

    client = redis.Redis.from_url(url, socket_timeout=5)
    state = decode_tensors(key, client.get(key))
    change(state)
    client.set(key, encode_tensors(key, state))
    client.close()


def _truncate_a_ratio_map(state: dict[str, torch.Tensor]) -> None:
    state["stage.3.mu"] = state["stage.3.mu"][..., :-1].contiguous()


def _poison_a_ratio(state: dict[str, torch.Tensor]) -> None:
    mu = state["stage.2.mu"].clone()
    mu.view(-1)[7] = float("nan")
    state["stage.2.mu"] = mu


def _move_a_route(state: dict[str, torch.Tensor]) -> None:
    routes = state["stage.4.routes"].clone()
    routes[0, 3] += 1  # a tap read one row lower: a well-formed but different network
    state["stage.4.routes"] = routes


def _drop_a_stage(state: dict[str, torch.Tensor]) -> None:
    last = max(int(k.split(".")[1]) for k in state if k.startswith("stage."))
    for suffix in ("mu", "routes", "sink"):
        del state[f"stage.{last}.{suffix}"]


@pytest.mark.parametrize("change", [_truncate_a_ratio_map, _poison_a_ratio, _move_a_route, _drop_a_stage])
def test_a_cached_decomposition_unlike_the_models_own_is_a_miss_and_recomputed(redis_flushed, change) -> None:
    """Redis holding a well-formed value of the wrong structure under a decomposition key (another build
    of the model, a partial write, tampering): before, a truncated ratio map failed the request
    (INTERNAL), and a NaN or a moved route gave a wrong map with an L2 hit in its provenance."""
    from ierf.serving.worker import ExplainJob

    cache = {"redis_url": redis_flushed.url, "l1_bytes": 0}
    writer = _host(cache)
    expected = writer.explain(ExplainJob(PIXELS, HASH, target=3))
    assert writer.cache.flush(10.0)
    key = writer._key("decomposition", "srd", HASH)
    _tamper(redis_flushed.url, key, change)

    reader = _host(cache)  # another replica: nothing in memory
    got = reader.explain(ExplainJob(PIXELS, HASH, target=3))
    assert got.provenance.cache == [("decomposition", "miss")]
    np.testing.assert_allclose(got.maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(expected.maps).max())
    assert reader.cache.flush(10.0)
    again = _host(cache).explain(ExplainJob(PIXELS, HASH, target=3))  # the recomputed value replaced it
    assert again.provenance.cache == [("decomposition", "l2")]
    np.testing.assert_allclose(again.maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(expected.maps).max())


def test_predict_answers_the_same_logits_before_and_after_an_explain_of_the_image() -> None:
    """The decomposition's logits differ from the plain forward's by float rounding: an Explain replaced
    the cached logits, and the same Predict then answered ~1e-6 differently, still as an L1 hit."""
    from ierf.serving.worker import ExplainJob, PredictJob

    host = _host({"redis_url": None})
    first = host.predict(PredictJob(PIXELS, HASH, top_k=5))
    host.explain(ExplainJob(PIXELS, HASH, target=3))
    again = host.predict(PredictJob(PIXELS, HASH, top_k=5))
    assert again.provenance.cache == [("logits", "l1")]
    assert [(s.index, s.logit) for s in again.top_classes] == [(s.index, s.logit) for s in first.top_classes]


def test_predict_logits_in_redis_are_kept_by_an_explain_on_another_replica(redis_flushed) -> None:
    """Checking only the replica's own memory let an Explain elsewhere (or with L1 off) replace them."""
    from ierf.serving.worker import ExplainJob, PredictJob

    cache = {"redis_url": redis_flushed.url, "l1_bytes": 64 << 20}
    predicting, explaining, reading = _host(cache), _host(cache), _host(cache)
    first = predicting.predict(PredictJob(PIXELS, HASH, top_k=5))
    assert predicting.cache.flush(10.0)
    explaining.explain(ExplainJob(PIXELS, HASH, target=3))
    assert explaining.cache.flush(10.0)
    again = reading.predict(PredictJob(PIXELS, HASH, top_k=5))
    assert again.provenance.cache == [("logits", "l2")]
    assert [(s.index, s.logit) for s in again.top_classes] == [(s.index, s.logit) for s in first.top_classes]


@pytest.mark.parametrize(
    "logits",
    [torch.zeros(1, 999), torch.full((1, 1000), float("nan")), torch.zeros(1, 1000, dtype=torch.float64)],
    ids=["truncated", "nan", "float64"],
)
def test_cached_logits_of_the_wrong_shape_or_values_are_a_miss(redis_flushed, logits: torch.Tensor) -> None:
    from ierf.serving.worker import PredictJob

    cache = {"redis_url": redis_flushed.url, "l1_bytes": 0}
    writer = _host(cache)
    expected = writer.predict(PredictJob(PIXELS, HASH, top_k=3))
    assert writer.cache.flush(10.0)
    _tamper(redis_flushed.url, writer._key("logits", "model", HASH), lambda state: state.update(logits=logits))

    got = _host(cache).predict(PredictJob(PIXELS, HASH, top_k=3))
    assert got.provenance.cache == [("logits", "miss")]
    assert [s.index for s in got.top_classes] == [s.index for s in expected.top_classes]


@pytest.mark.parametrize("l1_bytes", [0, 512 << 20], ids=["l2", "l1-after-l2"])
def test_a_cached_decomposition_the_engine_fails_on_is_dropped_and_recomputed(redis_flushed, l1_bytes) -> None:
    """Ratios of the right dtype and shape, finite but 1e5 times too large (overflowing the squared norms
    in float32), pass the layout check. Before, every Explain and ComputeIERF on the image failed with
    INVALID_ARGUMENT, blaming the caller's image, until the value's TTL ran out (6 h); with L1 on, the
    bad value also stayed in the replica's memory. Now the request recomputes the image and succeeds."""
    from ierf.serving.worker import ExplainJob, IERFJob

    cache = {"redis_url": redis_flushed.url, "l1_bytes": 0}
    writer = _host(cache)
    expected = writer.explain(ExplainJob(PIXELS, HASH, target=3))
    assert writer.cache.flush(10.0)
    key = writer._key("decomposition", "srd", HASH)

    def inflate(state: dict[str, torch.Tensor]) -> None:
        for name in [k for k in state if k.endswith(".mu")]:
            state[name] = state[name] * 1e5

    _tamper(redis_flushed.url, key, inflate)
    reader = _host({"redis_url": redis_flushed.url, "l1_bytes": l1_bytes})
    got = reader.explain(ExplainJob(PIXELS, HASH, target=3))
    assert got.provenance.cache == [("decomposition", "l2"), ("decomposition", "miss")]  # tried, then recomputed
    np.testing.assert_allclose(got.maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(expected.maps).max())
    layer = reader.srd.layers[-3]
    erf = reader.ierf(IERFJob(PIXELS, HASH, layer=layer, positions=np.array([[0, 0]])))
    assert erf.provenance.cache == [("decomposition", "l1" if l1_bytes else "l2")]  # the good value now
    np.testing.assert_allclose(erf.maps.sum(), 1.0, atol=1e-3)
    assert reader.cache.flush(10.0)
    again = _host(cache).explain(ExplainJob(PIXELS, HASH, target=3))  # Redis holds the good value again
    assert again.provenance.cache == [("decomposition", "l2")]
    np.testing.assert_allclose(again.maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(expected.maps).max())


def test_an_error_on_a_fresh_decomposition_still_reaches_the_caller() -> None:
    """Only a cached value is retried: an input whose own map cannot be computed fails once, as before."""
    from ierf.serving.worker import ExplainJob

    host = _host({"redis_url": None, "l1_bytes": 512 << 20})
    calls = []
    real = host.srd.decompose

    def decompose(x):
        calls.append(1)
        d = real(x)
        d.saliency = lambda *a, **k: (_ for _ in ()).throw(ValueError("the map is not finite"))
        return d

    host.srd.decompose = decompose
    with pytest.raises(ValueError, match="not finite"):
        host.explain(ExplainJob(PIXELS, HASH, target=3))
    assert len(calls) == 1


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_cached_logits_with_one_non_finite_value_are_a_miss(bad: float) -> None:
    """One non-finite logit turns every softmax probability into NaN: a cached value holding one, however
    it got there, must be treated as a miss and recomputed, not answered."""
    host = _host()
    logits = torch.zeros(1, len(host.model.class_names))
    assert host._cached_logits({"logits": logits})[0] is logits
    logits[0, 7] = bad
    with pytest.raises(ValueError, match="cached logits hold NaN or infinite values"):
        host._cached_logits({"logits": logits})


def test_a_request_whose_deadline_has_already_passed_is_refused_as_such() -> None:
    """A caller that has stopped waiting gets no work done for it, and is told the deadline passed (not
    that the work needs more time than is left, which invites a retry with a longer deadline)."""
    import time

    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import PredictJob

    host = _host()
    with pytest.raises(DeadlineExceeded, match=r"deadline passed [\d.]+ s ago, before the forward pass"):
        host.predict(PredictJob(PIXELS, HASH, top_k=1, deadline=time.time() - 0.5))


def test_an_explanation_of_class_0_scores_class_0_with_its_own_logit() -> None:
    """``target`` 0 is a class like any other (not "auto"), and the score that comes with a map is the
    target's own logit and probability, not the top class's: both went wrong silently for a non-top class."""
    from ierf.serving.worker import ExplainJob, PredictJob

    host = _host()
    ranking = host.predict(PredictJob(PIXELS, HASH, top_k=len(host.model.class_names))).top_classes
    own = next(score for score in ranking if score.index == 0)
    assert ranking[0].index != 0  # class 0 is not the predicted class, so "auto" would differ
    score = host.explain(ExplainJob(PIXELS, HASH, target=0)).target
    assert (score.index, score.name) == (0, host.model.class_names[0])
    assert score.logit == pytest.approx(own.logit, rel=1e-4, abs=1e-5)
    assert score.probability == pytest.approx(own.probability, rel=1e-3)


def test_work_whose_estimate_barely_exceeds_the_time_left_is_let_through() -> None:
    """Estimates are moving averages of noisy runs: work is refused only when the time left is clearly
    below its estimate (under 80 % of it), not whenever it is a little short."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import FORWARD, PredictJob

    host = _host()
    host._estimates[FORWARD] = 100.0  # seconds; a real forward pass takes milliseconds
    assert host.predict(PredictJob(PIXELS, "a" * 64, top_k=1, deadline=time.time() + 90.0)).top_classes
    host._estimates[FORWARD] = 100.0
    with pytest.raises(DeadlineExceeded, match="a forward pass needs about"):
        host.predict(PredictJob(PIXELS, "b" * 64, top_k=1, deadline=time.time() + 70.0))


def test_every_forward_pass_and_decomposition_updates_its_time_estimate() -> None:
    """The deadline estimates follow the replica's real speed: an estimate left at one slow run (a busy
    machine at warm-up) would refuse every short-deadline request for good."""
    from ierf.serving.worker import DECOMPOSE, FORWARD, ExplainJob, PredictJob

    host = _host()
    host._estimates[FORWARD] = host._estimates[DECOMPOSE] = 1000.0
    host.predict(PredictJob(PIXELS, "c" * 64, top_k=1))
    host.explain(ExplainJob(PIXELS, "d" * 64, target=1))
    # 0.7 * 1000 + 0.3 * t < 710 for any run under 33 s (from 100, one run over 3.3 s on a busy machine failed it)
    assert host._estimates[FORWARD] < 710.0 and host._estimates[DECOMPOSE] < 710.0


def test_a_stop_while_using_a_cached_decomposition_keeps_the_cached_value() -> None:
    """An Interrupted (the caller went away) raised while a cached decomposition is used is the caller's,
    not the value's: it must stop the job, not drop a good cached value and start recomputing it."""
    from ierf.interrupt import Interrupted
    from ierf.serving.worker import ExplainJob, Provenance, _ModelInput, _Stages

    host = _host({"redis_url": None, "l1_bytes": 512 << 20})
    host.explain(ExplainJob(PIXELS, HASH, target=1))  # now in L1
    calls: list[int] = []

    def stopped(decomposition: object) -> None:
        calls.append(1)
        raise Interrupted("the caller went away")

    stages = _Stages(lambda *_: None, "r18")
    inputs = _ModelInput(host, PIXELS, HASH, stages)
    with pytest.raises(Interrupted, match="the caller went away"):
        host._with_decomposition(inputs, Provenance("r18", "d", "srd", "v", "p", HASH), stages, None, stopped)
    assert calls == [1]
    again = host.explain(ExplainJob(PIXELS, HASH, target=1))
    assert again.provenance.cache == [("decomposition", "l1")]


def test_a_prediction_names_no_explanation_method_in_its_provenance() -> None:
    """Guards against Predict's provenance naming a method: the proto promises ``method`` empty for Predict
    (no explanation ran), and a caller grouping answers by method would count predictions as a method's."""
    from ierf.serving.worker import PredictJob

    provenance = _host().predict(PredictJob(PIXELS, "f" * 64, top_k=1)).provenance
    assert (provenance.method, provenance.method_version) == ("", "")


def test_rendering_many_ierf_overlays_stops_at_a_checkpoint_once_the_caller_is_gone() -> None:
    """A ComputeIERF with overlays renders one PNG per position (~25 ms each, up to max_positions) after
    the maps: one deadline check before them let a cancelled caller's overlays all render on the
    replica's one compute thread. Each overlay is now an engine checkpoint."""
    from ierf.interrupt import Interrupted, interruptible
    from ierf.serving.worker import IERFJob

    host = _host()
    layer = host.description.layers[-1]
    positions = np.array([[r % layer.height, r % layer.width] for r in range(6)])
    checks: list[int] = []

    def why_stop() -> str | None:
        checks.append(1)
        return "the caller went away" if len(checks) > 2 else None

    rendered = host.ierf(IERFJob(PIXELS, HASH, layer=layer.name, positions=positions, overlay=True))
    assert len(rendered.overlays) == 6
    with interruptible(why_stop), pytest.raises(Interrupted, match="went away"):
        host.ierf(IERFJob(PIXELS, HASH, layer=layer.name, positions=positions, overlay=True))
    assert len(checks) == 3  # the maps came from L1 (no engine checkpoint), then two overlays, then the stop

"""Mutation round 26 on ``ierf.serving.worker``, ``ierf.serving.convert`` and ``ierf.serving.admission``.

Each test fails on a plausible slip that the suite let through: the replica's stages not reaching its stage
metric, or its cache lookups not reaching the cache metric; the model's input laid out (W, H) instead of (H, W),
or an Explain's returned input left out; a configured seed, Redis timeout, TTL, value cap, breaker setting or
write-behind budget not reaching the part that uses it; the engine digest blind to a renamed module, or the
method version missing the method's own; a caller's mistake on a cached decomposition dropping the cached value;
a cached decomposition, or a deadline that passed while the map was made, letting a late request through; an
explanation's time estimate never learning; class 0 read as "auto" by the baselines; a baseline refused only
after the forward pass it cannot follow; an iERF overlay marking the transposed cell; a prediction without
timings or in no order; a plain job read as a stale view; a uint8 ``map_dtype`` accepted or a refused dtype
misnamed; ModelInfo, provenance and score fields dropped or exchanged; stages out of the order a request meets
them; the decode gate built with a budget of no pixels, counting an image of exactly ``small_pixels`` against
its bound or taking one back that it never counted; and a failed or cancelled decode of a caller that left
reported to the event loop as an unhandled error. One is a fix: a stage ``STAGE_ORDER`` does not name came
after "total" when it was met after it (the two shared a rank), against the documented "others after, then
total".
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from serving.test_worker_warm_up import HASH, PIXELS, _host, _tamper


@pytest.fixture(scope="module")
def host() -> Any:
    """One replica shared by the tests (each puts back what it changes: building one takes seconds)."""
    return _host()


#: Non-default values of every cache setting the worker passes on (defaults would hide a dropped one).
CACHE_SETTINGS = {
    "connect_timeout_s": 0.35,
    "timeout_s": 1.5,
    "ttl_s": 1234,
    "max_value_bytes": 5 << 20,
    "failure_threshold": 7,
    "open_seconds": 3.5,
    "write_behind_bytes": 6 << 20,
}


@pytest.fixture(scope="module")
def configured(redis_server: Any) -> Any:
    """A replica built with a seed, observers and Redis settings of its own; the observed calls are kept."""
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args(
        {
            "models": [{"id": "r18", "name": "resnet18", "random_init": True, "seed": 1}],
            "cache": {"redis_url": redis_server.url, **CACHE_SETTINGS},
        }
    )
    stages: list[tuple[str, str, float]] = []
    lookups: list[tuple[str, str, str]] = []
    replica = ModelHost(
        config.models[0],
        config.cache,
        stage_observer=lambda stage, model, seconds: stages.append((stage, model, seconds)),
        cache_observer=lambda tier, op, result, seconds, nbytes: lookups.append((tier, op, result)),
    )
    replica.observed = (stages, lookups)
    yield replica
    replica.close()


# ------------------------------------------------------------------------------------------------ worker
def test_the_worker_stages_and_cache_lookups_reach_the_observers_it_was_given(configured: Any) -> None:
    """Kills W01, W23, W24: the Serve worker passes its metrics in as observers; a stage booked only in
    provenance (or an observer dropped on the way) leaves the stage and cache dashboards empty."""
    from ierf.serving.worker import ExplainJob

    stages, lookups = configured.observed
    stages.clear()
    outcome = configured.explain(ExplainJob(PIXELS, "3" * 64, target=3))
    assert stages == [(stage, "r18", seconds) for stage, seconds in outcome.provenance.timings]
    assert {"forward", "explain"} <= {stage for stage, _, _ in stages}
    configured.explain(ExplainJob(PIXELS, "3" * 64, target=4))
    assert ("l1", "get", "hit") in lookups, lookups


def test_a_prediction_gives_the_logits_the_models_own_preprocessing_gives(host: Any) -> None:
    """Kills W04, W71: the served input is the library's ``model.preprocess`` of the image, not its transpose
    (a square input hides the swap in every shape check); an Explain asked for its input returns that view."""
    from ierf.serving.worker import ExplainJob, PredictJob

    top = host.predict(PredictJob(PIXELS, "4" * 64, top_k=5)).top_classes
    with torch.inference_mode():
        logits = host.model.module(host.model.preprocess(PIXELS)[None]).reshape(-1)
    assert [s.index for s in top] == logits.topk(5).indices.tolist()
    np.testing.assert_allclose([s.logit for s in top], logits.topk(5).values.numpy(), rtol=1e-4, atol=1e-4)
    view = host.explain(ExplainJob(PIXELS, "4" * 64, target=1, return_input=True)).model_input
    np.testing.assert_array_equal(view, host.model.resize_crop(PIXELS))


def test_a_configured_seed_and_every_cache_setting_reach_the_parts_that_use_them(configured: Any, host: Any) -> None:
    """Kills W12, W17-W22: ``seed`` is the documented way to get two different random-init replicas of one
    architecture (dropped, every seed gave seed 0's weights); a cache setting left out fell back silently to
    the cache module's default."""
    from ierf.serving.cache import RedisSettings

    assert configured.model.weights_digest != host.model.weights_digest
    settings = {name: value for name, value in CACHE_SETTINGS.items() if name != "write_behind_bytes"}
    assert configured.cache.l2.settings == RedisSettings(url=configured.cache.l2.settings.url, **settings)
    assert configured.cache._behind.max_pending_bytes == CACHE_SETTINGS["write_behind_bytes"]


def test_the_engine_digest_sees_a_renamed_module_and_the_method_version_names_the_methods_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W09, W10, W11: a module moved to another name (same bytes) is other code to import; the digest
    is the documented 12 hex; SRD's declared version is part of its method version (and so of its keys)."""
    import ierf
    from ierf.methods import method_version
    from ierf.serving import worker

    assert worker._method_version("srd").startswith(f"srd-{method_version('srd')}+ierf-{ierf.__version__}.")
    copy = tmp_path / "ierf"
    shutil.copytree(Path(ierf.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(ierf, "__file__", str(copy / "__init__.py"))
    try:
        worker.engine_code_digest.cache_clear()
        before = worker.engine_code_digest()
        assert len(before) == 12 and int(before, 16) >= 0
        last = max((p for p in copy.rglob("*.py") if "serving" not in p.parts), key=lambda p: p.as_posix())
        last.rename(last.with_name(last.stem + "_z.py"))  # still the last file: same bytes, same order
        worker.engine_code_digest.cache_clear()
        assert worker.engine_code_digest() != before
    finally:
        worker.engine_code_digest.cache_clear()


def test_a_callers_mistake_on_a_cached_decomposition_keeps_the_cached_value(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W40: an InvalidArgument raised while using a cached decomposition is the caller's (here: the
    contrast class is the auto target), not the value's; it must not drop the value and decompose again."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.worker import ExplainJob

    top = host.explain(ExplainJob(PIXELS, HASH)).target.index
    calls: list[int] = []
    real = host.srd.decompose

    def decompose(x: torch.Tensor) -> Any:
        calls.append(1)
        return real(x)

    monkeypatch.setattr(host.srd, "decompose", decompose)
    with pytest.raises(InvalidArgument, match="is the predicted class"):
        host.explain(ExplainJob(PIXELS, HASH, contrast=top))
    assert calls == []
    assert host.explain(ExplainJob(PIXELS, HASH, target=top)).provenance.cache == [("decomposition", "l1")]


def test_a_cached_decomposition_does_not_let_a_request_past_its_deadline_through(host: Any) -> None:
    """Kills W57, W66: with the decomposition cached, the deadline is checked nowhere else before the map
    is made; a caller that gave up still got an Explain or a ComputeIERF computed for nobody."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import ExplainJob, IERFJob

    host.explain(ExplainJob(PIXELS, HASH, target=2))  # the decomposition is now in L1
    late = time.time() - 1.0
    with pytest.raises(DeadlineExceeded, match="before the explanation"):
        host.explain(ExplainJob(PIXELS, HASH, target=2, deadline=late))
    layer = host.description.layers[-1]
    with pytest.raises(DeadlineExceeded, match="before the iERF computation"):
        host.ierf(IERFJob(PIXELS, HASH, layer=layer.name, positions=np.array([[0, 0]]), deadline=late))


def test_a_deadline_that_passes_while_the_map_is_made_stops_before_the_overlay(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W64: the overlay (~25 ms of PNG) is not rendered for a caller whose time ran out meanwhile."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import ExplainJob

    job = ExplainJob(PIXELS, HASH, target=2, overlay=True, deadline=time.time() + 600.0)
    host.explain(ExplainJob(PIXELS, HASH, target=2))  # cached: the map is the only work left
    decomposition_type = type(host.cache.l1.get(host._key("decomposition", "srd", HASH)))
    real = decomposition_type.saliency

    def saliency(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = real(self, *args, **kwargs)
        job.deadline = time.time() - 1.0  # the caller's time runs out while the map is made
        return result

    monkeypatch.setattr(decomposition_type, "saliency", saliency)
    with pytest.raises(DeadlineExceeded, match="before rendering the overlay"):
        host.explain(job)


def test_a_deadline_that_passes_while_iERF_overlays_are_drawn_stops_the_rest(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W68: iERF overlays are ~25 ms of PNG each, up to max_positions of them; a caller whose time ran
    out after the first is not served the rest (the deadline is checked before each)."""
    from ierf.serving import overlay
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import IERFJob

    layer = host.description.layers[-1]
    positions = [(0, 0), (0, layer.width - 1), (layer.height - 1, 0)]
    job = IERFJob(PIXELS, HASH, layer.name, np.array(positions), overlay=True, deadline=time.time() + 600.0)
    drawn: list[tuple[int, int]] = []
    draw = overlay.ierf_png

    def ierf_png(*args: Any, **kwargs: Any) -> bytes:  # the real picture; the caller's time runs out after it
        drawn.append(args[2])
        job.deadline = time.time() - 1.0
        return draw(*args, **kwargs)

    monkeypatch.setattr(overlay, "ierf_png", ierf_png)
    with pytest.raises(DeadlineExceeded, match="before rendering the overlays"):
        host.ierf(job)
    assert drawn == [(0, 0)]


def test_an_explanation_teaches_its_own_time_estimate(host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills W62: the saliency's estimate follows its runs like the forward pass's; left at one slow run
    (a busy machine at warm-up) it refused every short-deadline Explain of a cached image for good."""
    from ierf.serving.worker import ExplainJob

    monkeypatch.setitem(host._estimates, "explain:srd", 1000.0)
    monkeypatch.setitem(host._measured, "explain:srd", 1000.0)
    host.explain(ExplainJob(PIXELS, HASH, target=1))
    assert host._estimates["explain:srd"] < 710.0


def test_a_deadline_a_little_short_of_the_estimate_is_let_through_and_a_refusal_lowers_the_estimate(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W43, W44: estimates are rough, so a caller with 90 % of the estimated time is let through (refused
    only below 80 %), and each refusal lowers the estimate a fifth, so short-deadline callers are not locked out
    by one slow run."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import DECOMPOSE, ExplainJob

    for table in (host._estimates, host._measured):
        monkeypatch.setitem(table, DECOMPOSE, 100.0)
        monkeypatch.setitem(table, "explain:srd", 0.0)
    host.explain(ExplainJob(PIXELS, "a" * 64, target=1, deadline=time.time() + 90.0))
    before = host._estimates[DECOMPOSE]  # the run above blended its time in: ~70 s
    with pytest.raises(DeadlineExceeded, match="need about"):
        host.explain(ExplainJob(PIXELS, "b" * 64, target=1, deadline=time.time() + 0.5 * before))
    assert host._estimates[DECOMPOSE] == pytest.approx(0.8 * before)


def test_the_probe_let_through_after_refusals_runs_under_the_measured_estimate(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W45: refusals had lowered the estimates to a fifth, so the next short-deadline caller is let through
    as the probe that re-measures. While it runs the measured values apply again: left lowered, every caller
    arriving meanwhile (and all later ones, when the probe is stopped at its deadline and teaches nothing) would
    be let through too and stopped the same way."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import DECOMPOSE, ExplainJob

    measured = {DECOMPOSE: 10.0, "explain:srd": 1.0}
    for name, seconds in measured.items():
        monkeypatch.setitem(host._measured, name, seconds)
        monkeypatch.setitem(host._estimates, name, 0.2 * seconds)
    seen: list[float] = []
    decompose = host.srd.decompose

    def watched(x: torch.Tensor) -> Any:  # the real decomposition, noting the estimate it runs under
        seen.append(host._estimates[DECOMPOSE])
        return decompose(x)

    monkeypatch.setattr(host.srd, "decompose", watched)
    try:  # 2.2 s left of the lowered 2.2 s: let through
        host.explain(ExplainJob(PIXELS, "c" * 64, target=1, deadline=time.time() + 2.2))
    except DeadlineExceeded as exc:  # a slow machine may take longer than that: not what is checked here
        assert "need about" not in str(exc), "refused up front instead of let through"
    assert seen == [10.0]


def test_building_a_methods_explainer_is_timed_as_explain(host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills W55: a method's first request on a replica builds its explainer (a baseline finds its layers and
    hooks); that time is the request's "explain" too, or provenance and the stage metric miss it."""
    import ierf
    from ierf.serving.worker import ExplainJob

    build = ierf.create_explainer

    def slow_build(method: str, module: torch.nn.Module) -> Any:  # the real one, made to take 0.5 s more
        time.sleep(0.5)
        return build(method, module)

    monkeypatch.setattr(ierf, "create_explainer", slow_build)
    monkeypatch.setattr(host, "_explainers", {})  # built afresh; the replica's own come back after the test
    outcome = host.explain(ExplainJob(PIXELS, "d" * 64, method="gradient", target=1))
    # booked as it happens: the build first, then the saliency (whose first run may take seconds too)
    explain = [seconds for stage, seconds in outcome.provenance.timings if stage == "explain"]
    assert len(explain) == 2 and explain[0] >= 0.5, outcome.provenance.timings


def test_a_contrastive_overlays_caption_names_the_class_subtracted(host: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kills W63: the picture is read without the request beside it, so its caption says which class was
    subtracted by number and name, as the CLI's does ("minus 2 'name'"), not by a bare number."""
    import ierf.viz
    from ierf.serving.worker import ExplainJob

    captions: list[tuple[Any, ...]] = []
    caption = ierf.viz.saliency_caption

    def recorded(*args: Any) -> str:  # the real caption, noting what it was given
        captions.append(args)
        return caption(*args)

    monkeypatch.setattr(ierf.viz, "saliency_caption", recorded)
    outcome = host.explain(ExplainJob(PIXELS, HASH, target=1, contrast=2, overlay=True))
    names = host.model.class_names
    assert len(outcome.overlays) == 1
    assert captions == [("srd", 1, names[1], f"minus 2 {names[2]!r}")]


def test_a_decompositions_redis_write_never_holds_the_request(configured: Any, redis_server: Any) -> None:
    """Kills W78: the decomposition (megabytes) goes to Redis on the write-behind thread. Written in the
    request's thread, a Redis that stalls writes (here: CLIENT PAUSE WRITE, as during a failover) held every
    fresh image's answer for the whole socket timeout (1.5 s in this replica's settings)."""
    import redis
    from ierf.serving.worker import ExplainJob

    admin = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
    try:
        outcome = configured.explain(ExplainJob(PIXELS, "5" * 64, target=2))
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    put = sum(seconds for stage, seconds in outcome.provenance.timings if stage == "cache_put")
    assert put < 0.75, outcome.provenance.timings  # queued, not written: milliseconds


def test_a_baseline_explains_class_0_and_is_refused_before_a_forward_pass_it_cannot_follow(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills W59, W60, W61: class 0 is a class for every method (not "auto"); a baseline whose saliency
    cannot finish in time is refused before the forward pass (naming both), and after it too when the
    logits were cached."""
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.worker import ExplainJob, PredictJob

    assert host.predict(PredictJob(PIXELS, "0" * 64, top_k=1)).top_classes[0].index != 0
    assert host.explain(ExplainJob(PIXELS, "0" * 64, method="gradient", target=0)).target.index == 0

    monkeypatch.setitem(host._estimates, "explain:gradient", 1000.0)
    soon = time.time() + 60.0
    with pytest.raises(DeadlineExceeded, match="a forward pass and gradient saliency need about"):
        host.explain(ExplainJob(PIXELS, "1" * 64, method="gradient", target=1, deadline=soon))
    assert host.cache.l1.get(host._key("logits", "model", "1" * 64)) is None  # no forward pass ran
    monkeypatch.setitem(host._estimates, "explain:gradient", 1000.0)
    with pytest.raises(DeadlineExceeded, match="gradient saliency needs about"):  # logits cached above
        host.explain(ExplainJob(PIXELS, "0" * 64, method="gradient", target=1, deadline=soon))


def test_an_ierf_overlay_marks_the_row_and_column_asked_for(host: Any) -> None:
    """Kills W67: the overlay's box is the (row, col) of the map it shows; with rows and columns swapped an
    off-diagonal position was drawn on another cell under a caption naming the right one."""
    from ierf.serving.overlay import ierf_png
    from ierf.serving.worker import IERFJob

    layer = host.description.layers[-3]
    position = (1, layer.width - 2)
    outcome = host.ierf(
        IERFJob(PIXELS, HASH, layer=layer.name, positions=np.array([position]), overlay=True, return_input=True)
    )
    caption = f"iERF {layer.name} @ {position[0]},{position[1]}"
    expected = ierf_png(outcome.model_input, outcome.maps[0], position, (layer.height, layer.width), caption)
    assert outcome.overlays == [expected]


def test_a_prediction_reports_its_timings_and_ranks_its_classes(host: Any) -> None:
    """Kills W72, W76: Predict's provenance carries the worker's stages like the other RPCs; its classes
    come most probable first (a caller reads top_classes[0] as the prediction)."""
    from ierf.serving.worker import PredictJob

    outcome = host.predict(PredictJob(PIXELS, "2" * 64, top_k=50))
    assert "forward" in dict(outcome.provenance.timings)
    probabilities = [s.probability for s in outcome.top_classes]
    assert probabilities == sorted(probabilities, reverse=True) and len(probabilities) == 50


def test_a_job_without_a_view_version_is_never_a_stale_view(host: Any) -> None:
    """Kills W26, W28: a plain job (decoded pixels of any size, no view version) is not checked as a view;
    and a layer's alias list never maps a name to itself."""
    assert host.stale_view(PIXELS, "") is None
    assert host.stale_view(np.zeros((*host.input_hw, 3), np.uint8), "") is None
    aliases = host.description.layer_aliases
    assert all(alias != name for alias, name in aliases.items())


# ------------------------------------------------------------------------------------------------ convert
def test_a_dtype_the_maps_or_the_image_cannot_travel_in_is_refused_by_its_name() -> None:
    """Kills C04, C34: maps are float32 or float16 (uint8 would truncate every signed value); a refused image
    dtype is named as the proto names it, and a number outside the enum as that number."""
    from ierf.serving.convert import map_dtype, open_image
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.images import ImageLimits
    from ierf_proto.v1 import explainer_pb2 as pb

    assert map_dtype(pb.DATA_TYPE_UNSPECIFIED) is np.float32
    with pytest.raises(InvalidArgument, match="map_dtype DATA_TYPE_UINT8 is not accepted"):
        map_dtype(pb.DATA_TYPE_UINT8)
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20, max_side=1024)
    for dtype, name in ((pb.DATA_TYPE_UNSPECIFIED, "DATA_TYPE_UNSPECIFIED"), (99, "99")):
        image = pb.Image(tensor=pb.Tensor(data=bytes(12), dtype=dtype, shape=[2, 2, 3]))
        with pytest.raises(InvalidArgument, match=f"image.tensor.dtype {name} is not accepted"):
            open_image(image, limits)


def test_the_model_input_score_and_cache_tiers_travel_as_they_are() -> None:
    """Kills C08, C09, C10, C11, C13: the model input's shape is (H, W, 3) (a non-square view shows a swap); a
    score's probability and logit are not exchanged; "l2" and "disabled" are tiers of their own (a caller
    reads "disabled" as: computed again next time); the request id and server version are not exchanged."""
    from ierf.serving.convert import input_message, provenance_message, score_message
    from ierf.serving.jobs import Provenance, Score
    from ierf_proto.v1 import explainer_pb2 as pb

    view = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    message = input_message(view)
    assert list(message.shape) == [2, 5, 3] and message.data == view.tobytes()
    score = score_message(Score(7, "seven", 0.25, -3.5))
    assert (score.index, score.name, score.probability, score.logit) == (7, "seven", 0.25, -3.5)
    tiers = [("decomposition", "l2"), ("logits", "disabled"), ("logits", "l1"), ("decomposition", "miss")]
    prov = Provenance("m", "d", "srd", "v", "p", "h", cache=tiers)
    message = provenance_message(prov, [], "request-1", "2.5.0")
    assert (message.request_id, message.server_version) == ("request-1", "2.5.0")
    assert [(c.artifact, c.tier) for c in message.cache] == [
        ("decomposition", pb.CACHE_TIER_L2),
        ("logits", pb.CACHE_TIER_DISABLED),
        ("logits", pb.CACHE_TIER_L1),
        ("decomposition", pb.CACHE_TIER_MISS),
    ]


def test_stages_come_in_the_order_met_and_an_unnamed_one_after_them_and_before_total() -> None:
    """Kills C15, C17 and pins a fix: the stages come in the order a request meets them (the job is handed
    over before it waits for the compute thread); "others after, then total" held only when the other stage
    came before "total" in the list (the two shared one rank, so their order was the order they were met in)."""
    from ierf.serving.convert import STAGE_ORDER, _sum_by_stage

    met = ["admission", "decode", "dispatch", "queue", "cache_get", "preprocess", "forward", "cache_put"]
    met += ["explain", "render", "encode"]
    assert [stage for stage, _ in _sum_by_stage([(stage, 1.0) for stage in reversed(STAGE_ORDER)])] == met
    timings = [("total", 3.0), ("zeta", 1.0), ("decode", 0.5), ("alpha", 0.25), ("zeta", 1.0)]
    assert _sum_by_stage(timings) == [("decode", 0.5), ("zeta", 2.0), ("alpha", 0.25), ("total", 3.0)]


def test_model_info_carries_every_field_of_the_description() -> None:
    """Kills C18, C23, C24, C28, C29, C30, C31: a client shapes its requests and reads its maps by ModelInfo
    (a layer's grid as height x width, the class count, the tensor dtypes and encodings it may send, the
    preprocessing its views must be cut by, the method used when it names none); a non-square layer shows
    a swap that the square ones hide."""
    from ierf.serving.convert import model_message
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf.serving.settings import IngressConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    desc = ModelDescription(
        "m", "digest", 224, 224, "prep-v9", ["a", "b", "c"], [LayerShape("l", 8, 7, 5)], ["srd", "gradient"],
        "srd", "cpu", encodings=("png", "webp"), tensor_dtypes=("uint8", "float16", "float32"),
    )  # fmt: skip
    info = model_message(desc, IngressConfig())
    assert (info.id, info.weights_digest, info.num_classes) == ("m", "digest", 3)
    assert list(info.class_names) == ["a", "b", "c"]
    assert [(layer.name, layer.channels, layer.height, layer.width) for layer in info.layers] == [("l", 8, 7, 5)]
    assert (list(info.methods), info.default_method) == (["srd", "gradient"], "srd")
    spec = info.input
    assert (spec.height, spec.width, spec.channels, spec.color_space) == (224, 224, 3, "RGB")
    assert (spec.preprocess_version, list(spec.encodings)) == ("prep-v9", ["png", "webp"])
    assert list(spec.tensor_dtypes) == [pb.DATA_TYPE_UINT8, pb.DATA_TYPE_FLOAT16, pb.DATA_TYPE_FLOAT32]


def test_provenance_carries_its_method_version_and_an_unknown_tier_is_unspecified_and_no_maps_is_an_error() -> None:
    """Kills C25, C32, C33: the method version is what a caller compares maps across deploys by; a tier this
    build does not know is not reported as a computed value (MISS); an outcome without maps is a server
    fault, never an empty map."""
    from ierf.serving.convert import outcome_maps, provenance_message
    from ierf.serving.jobs import Outcome, Provenance
    from ierf_proto.v1 import explainer_pb2 as pb

    prov = Provenance("m", "d", "srd", "srd-1.0+ierf-1", "p", "h", cache=[("decomposition", "l3")])
    message = provenance_message(prov, [], "r", "1.0")
    assert message.method_version == "srd-1.0+ierf-1"
    assert [c.tier for c in message.cache] == [pb.CACHE_TIER_UNSPECIFIED]
    with pytest.raises(RuntimeError, match="worker returned no maps"):
        outcome_maps(Outcome(provenance=prov))


# ---------------------------------------------------------------------------------------------- admission
def test_a_decode_gate_needs_a_budget_of_pixels_and_bounds_of_none_or_more() -> None:
    """Kills A01, A02, A03: a budget of 0 pixels, or a negative bound, is a configuration error at start."""
    from ierf.serving.admission import DecodeGate

    for active, queued, small in [(0, 10, 0), (1, -1, 0), (1, 0, -1)]:
        with pytest.raises(ValueError, match="active_pixels must be >= 1"):
            DecodeGate(active, queued, small)
    gate = DecodeGate(1, 0, 0)
    assert (gate.active_limit, gate.queued_limit, gate.small_limit) == (1, 0, 0)


def _loop_reports(scenario: Any) -> list[dict[str, Any]]:
    """What the event loop was asked to report as unhandled while ``scenario`` ran (and its garbage went)."""
    reports: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reports.append(context))
        await scenario()
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    return reports


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_failed_decode_of_a_caller_that_left_is_not_an_unretrieved_exception() -> None:
    """Kills A09: the decode's error is nobody's once its caller left; unretrieved, asyncio logged it as
    "Task exception was never retrieved" for every abandoned bad image."""
    from ierf.serving.admission import DecodeGate

    async def scenario() -> None:
        gate = DecodeGate(100, 100)
        fail = asyncio.Event()

        async def decoding() -> None:
            await fail.wait()
            raise OSError("image file is truncated")

        caller = asyncio.create_task(gate.run(50, time.time() + 3600, lambda: asyncio.ensure_future(decoding())))
        await _settle()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        fail.set()
        await _settle()
        assert gate.active == 0

    assert _loop_reports(scenario) == []


def test_a_cancelled_decode_gives_its_pixels_back_without_an_error_in_the_callback() -> None:
    """Kills A10: a decode future cancelled (an executor shutting down) has no exception to retrieve; asking
    for it raised CancelledError inside the gate's callback, which the loop reported as an error."""
    from ierf.serving.admission import DecodeGate

    async def scenario() -> None:
        gate = DecodeGate(100, 100)
        work: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        caller = asyncio.create_task(gate.run(50, time.time() + 3600, lambda: work))
        await _settle()
        work.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await _settle()
        assert gate.active == 0

    assert _loop_reports(scenario) == []


def test_an_image_of_exactly_small_pixels_waits_outside_the_bound_and_leaves_it_as_it_was() -> None:
    """Kills A12, A27: ``small_pixels`` is inclusive for the waiting bound as it is for the headroom (an
    image of exactly that size was refused as overload behind a full bound); a small image that leaves the
    queue takes back nothing from a bound it never counted against (the count went below the large images
    still waiting, letting more in than ``queued_pixels``)."""
    from ierf.serving.admission import DecodeGate

    async def scenario() -> None:
        gate = DecodeGate(active_pixels=100, queued_pixels=100, small_pixels=10)
        release = asyncio.Event()
        order: list[int] = []

        async def hold(pixels: int) -> None:
            async def decoding() -> None:
                order.append(pixels)
                await release.wait()

            await gate.run(pixels, time.time() + 3600, lambda: asyncio.ensure_future(decoding()))

        tasks = [asyncio.create_task(hold(p)) for p in (100, 10, 100)]
        await _settle()
        assert (gate.active, gate.queued, order) == (110, 100, [100, 10])  # budget, headroom and bound full
        small = asyncio.create_task(hold(10))
        await _settle()
        assert not small.done() and gate.queued == 100  # waiting, not refused, not counted
        small.cancel()
        with pytest.raises(asyncio.CancelledError):
            await small
        assert gate.queued == 100
        release.set()
        await asyncio.gather(*tasks)
        assert order == [100, 10, 100] and gate.active == gate.queued == 0

    asyncio.run(scenario())


def test_the_l1_counts_each_logits_entry_beside_its_data(host: Any) -> None:
    """Kills W06: a model's 4 kB of logits costs L1 more than its data (the tensor object, the key, the LRU's
    node); counted as data alone, many small entries held more memory than the byte bound says. The count per
    entry must cover at least the Python objects an entry adds (traced here; the tensor's malloc header and
    the storage object, which tracemalloc does not see, come on top)."""
    import tracemalloc

    logits = torch.randn(1, len(host.model.class_names))
    hashes = [f"l1-overhead-{i:052d}" for i in range(300)]
    l1 = host.cache.l1
    host._put_logits("l1-overhead-warm", logits)  # first-use allocations outside the measurement
    counted_before = l1.nbytes
    tracemalloc.start()
    try:
        traced_before = tracemalloc.get_traced_memory()[0]
        for content_hash in hashes:
            host._put_logits(content_hash, logits)
        traced = (tracemalloc.get_traced_memory()[0] - traced_before) / len(hashes)
    finally:
        tracemalloc.stop()
    counted = (l1.nbytes - counted_before) / len(hashes)
    try:
        data = logits.numel() * logits.element_size()
        assert counted - data >= traced > 0, (counted, data, traced)
    finally:
        for content_hash in ["l1-overhead-warm", *hashes]:
            host.cache.l1.discard(host._key("logits", "model", content_hash))


def test_a_deferring_replica_holds_the_decomposition_unencoded_until_the_answer_has_left(redis_flushed: Any) -> None:
    """Kills W37: the Serve worker builds its host with ``defer_cache_writes=True`` so that the ~3.6 MB
    decomposition is assembled and encoded for Redis after the answer is sent, not before it; dropped, the
    decomposition's put was queued at once and every cold Explain paid for the encoding. The deferred value
    still reaches Redis once it is written."""
    import redis
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"redis_url": redis_flushed.url}}
    )
    deferring = ModelHost(config.models[0], config.cache, defer_cache_writes=True)
    try:
        deferring.explain(ExplainJob(PIXELS, "7" * 64, target=3))
        assert deferring.cache.has_deferred()
        client = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
        assert deferring.cache.flush(timeout_s=10) and not deferring.cache.has_deferred()
        keys = list(client.scan_iter())
        assert any(b"decomposition" in key for key in keys), keys
        client.close()
    finally:
        deferring.close()


def test_a_bad_cached_decomposition_leaves_redis_even_when_the_fresh_value_cannot_be_written(
    redis_flushed: Any,
) -> None:
    """Kills W33: the image is recomputed when its cached decomposition fails the engine, and the bad value
    is deleted from Redis before the fresh one is written: were the write lost (here Redis refuses writes
    with OOM while it still allows deletes), the bad value would stay for its TTL and every replica
    reading it would decompose the image twice."""
    import redis
    from ierf.serving.worker import ExplainJob

    cache = {"redis_url": redis_flushed.url, "l1_bytes": 0}
    writer = _host(cache)
    writer.explain(ExplainJob(PIXELS, HASH, target=3))
    assert writer.cache.flush(10.0)
    key = writer._key("decomposition", "srd", HASH)
    writer.close()

    def inflate(state: dict[str, torch.Tensor]) -> None:
        for name in [k for k in state if k.endswith(".mu")]:
            state[name] = state[name] * 1e5

    _tamper(redis_flushed.url, key, inflate)
    reader = _host({**cache, "write_behind_bytes": 0})  # writes before answering: no queue to wait for
    client = redis.Redis.from_url(redis_flushed.url, socket_timeout=5)
    policy, limit = client.config_get("maxmemory-policy"), client.config_get("maxmemory")
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)  # every SET now fails with OOM; DEL still works
        got = reader.explain(ExplainJob(PIXELS, HASH, target=3))
        assert got.provenance.cache == [("decomposition", "l2"), ("decomposition", "miss")]
    finally:
        client.config_set("maxmemory", limit["maxmemory"])
        client.config_set("maxmemory-policy", policy["maxmemory-policy"])
        reader.close()
    assert client.exists(key) == 0
    client.close()

"""App logic through Serve's local testing mode: ingress + worker in this process, no cluster, no gRPC.

Uses ResNet18 with explicit random weights (fast on CPU) and exercises what the integration tier
does not: the worker's in-process LRU (L1), and errors raised as typed exceptions through handles.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ingress():
    from ierf.serving.app import build_app
    from ray import serve

    args = {
        "models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 2}],
        "cache": {"redis_url": None},
    }
    return serve.run(build_app(args), _local_testing_mode=True)


def _image(seed: int = 0) -> object:
    from ierf_proto.v1 import explainer_pb2 as pb

    pixels = np.random.default_rng(seed).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    return pb.Image(tensor=pb.Tensor(data=pixels.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=[120, 150, 3]))


def test_second_target_layer_and_prediction_reuse_the_decomposition_from_l1(ingress) -> None:
    from ierf_proto.v1 import explainer_pb2 as pb

    first = ingress.Explain.remote(pb.ExplainRequest(image=_image(), target=1)).result()
    assert [(c.artifact, c.tier) for c in first.provenance.cache] == [("decomposition", pb.CACHE_TIER_MISS)]
    first_stages = [t.stage for t in first.provenance.timings]  # the crop and the normalisation: one entry
    assert first_stages.count("preprocess") == 1 and len(first_stages) == len(set(first_stages)), first_stages
    assert first_stages[:4] == ["admission", "decode", "dispatch", "queue"] and first_stages[-1] == "total", (
        first_stages
    )
    seconds = {t.stage: t.seconds for t in first.provenance.timings}
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"] * 1.001  # parts of the whole
    second = ingress.Explain.remote(pb.ExplainRequest(image=_image(), target=2, contrast="mean")).result()
    assert [(c.artifact, c.tier) for c in second.provenance.cache] == [("decomposition", pb.CACHE_TIER_L1)]
    stages = {t.stage for t in second.provenance.timings}
    assert "forward" not in stages and "preprocess" not in stages  # a hit skips the model entirely
    mean_map = np.frombuffer(second.map.data, np.float32)
    assert abs(float(mean_map.sum())) < 1e-3 * float(np.abs(mean_map).sum())  # "mean" contrast sums to 0

    info = ingress.GetModel.remote(pb.GetModelRequest(model_id="r18")).result()
    limits = info.input  # what a request meets, found here rather than by hitting it (defaults)
    assert (limits.max_side, limits.max_positions, limits.max_top_k) == (16384, 64, 100), limits
    assert limits.max_deadline_s == 120.0 and list(limits.tensor_dtypes) == [
        pb.DATA_TYPE_UINT8,
        pb.DATA_TYPE_FLOAT16,
        pb.DATA_TYPE_FLOAT32,
    ]
    layer = info.layers[len(info.layers) // 2]
    erf = ingress.ComputeIERF.remote(
        pb.ComputeIERFRequest(image=_image(), layer=layer.name, positions=[pb.Position(row=1, col=1)])
    ).result()
    assert erf.provenance.cache[0].tier == pb.CACHE_TIER_L1
    assert abs(float(np.frombuffer(erf.maps.data, np.float32).sum()) - 1.0) < 1e-3
    # the engine's aliases work through the service too: "layer4" is the last block's output
    alias = ingress.ComputeIERF.remote(
        pb.ComputeIERFRequest(image=_image(), layer="layer4", positions=[pb.Position(row=1, col=1)])
    ).result()
    assert alias.layer.name == "layer4.1" and alias.layer.height == info.layers[-1].height

    prediction = ingress.Predict.remote(pb.PredictRequest(image=_image(), top_k=3)).result()
    assert (
        prediction.provenance.cache[0].artifact == "logits" and prediction.provenance.cache[0].tier == pb.CACHE_TIER_L1
    )
    assert len(prediction.top_classes) == 3


def test_errors_come_back_as_typed_service_errors(ingress) -> None:
    from ierf.serving.errors import InvalidArgument, NotFound
    from ierf_proto.v1 import explainer_pb2 as pb

    with pytest.raises(NotFound, match="unknown model 'x'"):
        ingress.Explain.remote(pb.ExplainRequest(model_id="x", image=_image())).result()
    with pytest.raises(InvalidArgument, match="out of range"):
        ingress.Explain.remote(pb.ExplainRequest(image=_image(), target=1000)).result()
    with pytest.raises(InvalidArgument, match="either contrast"):
        ingress.Explain.remote(pb.ExplainRequest(image=_image(), contrast="mean", contrast_class=3)).result()
    with pytest.raises(InvalidArgument, match="contrast_class 3 is the target"):  # a map of zeros otherwise
        ingress.Explain.remote(pb.ExplainRequest(image=_image(), target=3, contrast_class=3)).result()
    top = ingress.Predict.remote(pb.PredictRequest(image=_image(), top_k=1)).result().top_classes[0].index
    with pytest.raises(InvalidArgument, match=f"contrast_class {top} is the predicted class"):  # auto target
        ingress.Explain.remote(pb.ExplainRequest(image=_image(), contrast_class=top)).result()


def test_health_check_serves(ingress) -> None:
    from grpc_health.v1 import health_pb2

    response = ingress.Check.remote(health_pb2.HealthCheckRequest()).result()
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_baselines_are_served_through_the_method_field(ingress, method: str) -> None:
    """A baseline picked by ``method`` gives the in-process baseline's map, with its own provenance."""
    import ierf
    import torch
    from ierf.models import load_model
    from ierf_proto.v1 import explainer_pb2 as pb

    served = ingress.Explain.remote(pb.ExplainRequest(image=_image(3), target=5, method=method)).result()
    assert served.provenance.method == method
    from ierf.serving.worker import engine_code_digest

    declared = f"{method}-{ierf.method_version(method)}+ierf-{ierf.__version__}.{engine_code_digest()}"
    assert served.provenance.method_version == declared
    # no decomposition for a baseline; a repeat of the image reads the view the worker kept of it
    assert [c.artifact for c in served.provenance.cache if c.artifact != "view"] == ["logits"]

    model = load_model("resnet18", random_init=True)
    pixels = np.random.default_rng(3).integers(0, 256, (120, 150, 3), dtype=np.uint8)
    x = model.normalize(torch.from_numpy(model.resize_crop(pixels)).permute(2, 0, 1)[None])
    expected = ierf.create_explainer(method, model.module).saliency(x, 5)[0].numpy()
    got = np.frombuffer(served.map.data, np.float32).reshape(tuple(served.map.shape))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))

    from ierf.serving.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="contrast is an SRD option"):
        ingress.Explain.remote(pb.ExplainRequest(image=_image(3), method=method, contrast="mean")).result()


def test_worker_does_all_tensor_work_on_one_compute_thread(monkeypatch) -> None:
    """OpenMP keeps a thread team per calling thread: the worker must load and compute on one thread
    (with asyncio's pool, several teams on 2 cores throttled each other to ~1.3 cores)."""
    import asyncio
    import threading

    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost, PredictJob

    threads: list[tuple[str, int]] = []

    def recorded(name: str, method):
        def run(self, *args, **kwargs):
            threads.append((name, threading.get_ident()))
            return method(self, *args, **kwargs)

        return run

    for name in ("__init__", "explain", "predict"):
        monkeypatch.setattr(ModelHost, name, recorded(name, getattr(ModelHost, name)))
    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 2}], "cache": {}}
    )
    worker = ExplainerWorker.func_or_class(config.models[0], config.cache)
    queue_seconds: list[float] = []  # the compute-thread wait reaches the stage metric, as provenance does
    observe = worker.metrics.stage

    def stage(name: str, model: str, seconds: float) -> None:
        if name == "queue":
            queue_seconds.append(seconds)
        observe(name, model, seconds)

    worker.metrics.stage = stage
    pixels = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    async def requests() -> list:
        return await asyncio.gather(
            *(worker.predict(PredictJob(pixels=pixels, content_hash=f"p{i}", top_k=2)) for i in range(3)),
            *(worker.explain(ExplainJob(pixels=pixels, content_hash=f"e{i}", target=i)) for i in range(3)),
        )

    try:
        outcomes = asyncio.run(requests())
        healthy = worker.check_health()  # what Serve calls every 2 s: a loaded replica is healthy (D71)
    finally:
        worker.__del__()
    assert healthy is None
    assert len(outcomes) == 6
    reported = sorted(dict(outcome.provenance.timings)["queue"] for outcome in outcomes)
    assert sorted(queue_seconds) == reported
    assert [name for name, _ in threads].count("__init__") == 1 and len(threads) == 7
    assert len({ident for _, ident in threads}) == 1, threads
    assert threads[0][1] != threading.get_ident()  # and not on the caller's (event loop's) thread


def test_a_job_whose_caller_went_away_or_whose_deadline_passed_stops_at_the_next_checkpoint(monkeypatch) -> None:
    """A caller's own gRPC deadline (Serve does not forward it) or a cancel left the job running to its end
    on the worker's one compute thread, ahead of everyone else's work."""
    import asyncio
    import time

    from ierf.interrupt import checkpoint
    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    ran: list[float] = []

    def slow_explain(self, job):  # an engine call with a checkpoint every 10 ms, 10 s in all
        start = time.monotonic()
        try:
            for _ in range(1000):
                checkpoint()
                time.sleep(0.01)
        finally:
            ran.append(time.monotonic() - start)

    monkeypatch.setattr(ModelHost, "explain", slow_explain)
    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 2}], "cache": {}}
    )
    worker = ExplainerWorker.func_or_class(config.models[0], config.cache)
    reasons: list[str] = []  # explainer_jobs_stopped_total's reason label: a deadline, then a cancel
    worker.metrics.stopped = lambda model, reason: reasons.append(reason)
    pixels = np.zeros((8, 8, 3), np.uint8)

    async def scenario() -> None:
        refusal = await worker.explain(ExplainJob(pixels=pixels, content_hash="a", deadline=time.time() + 0.3))
        assert isinstance(refusal, DeadlineExceeded) and "stopped part-way: the deadline passed" in refusal.message
        task = asyncio.ensure_future(worker.explain(ExplainJob(pixels=pixels, content_hash="b")))  # no deadline
        await asyncio.sleep(0.3)
        task.cancel()  # what Serve does when the caller goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the thread notices at its next checkpoint
            if len(ran) == 2:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(scenario())
    finally:
        worker.__del__()
    assert len(ran) == 2 and all(seconds < 1.5 for seconds in ran), ran
    assert reasons == ["deadline", "cancelled"]


def test_caller_mistakes_are_answered_without_waiting_for_a_busy_worker(ingress) -> None:
    """Once the ingress holds the model's description (fetched in the background on first use), a bad
    target, method, layer or position is refused at once, not after the job ahead of it on the worker."""
    import time

    from ierf.serving.errors import InvalidArgument
    from ierf_proto.v1 import explainer_pb2 as pb

    ingress.GetModel.remote(pb.GetModelRequest(model_id="r18")).result()
    ingress.Predict.remote(pb.PredictRequest(image=_image(7), top_k=1)).result()  # description now held
    slow_start = time.perf_counter()
    slow = ingress.Explain.remote(pb.ExplainRequest(image=_image(8), target=5, method="integrated_gradients"))
    time.sleep(0.3)  # the slow job now occupies the worker's compute thread
    bad = [
        ("Explain", pb.ExplainRequest(image=_image(9), target=1000), "out of range"),
        ("Explain", pb.ExplainRequest(image=_image(9), method="nope"), "unknown method"),
        (
            "ComputeIERF",
            pb.ComputeIERFRequest(image=_image(9), layer="nope", positions=[pb.Position()]),
            "unknown layer 'nope'",
        ),
        (
            "ComputeIERF",
            pb.ComputeIERFRequest(image=_image(9), layer="layer4.1", positions=[pb.Position(row=99, col=0)]),
            "outside",
        ),
        ("Predict", pb.PredictRequest(image=_image(9), top_k=1001), "out of range"),
    ]
    answered = []
    for rpc, request, message in bad:
        start = time.perf_counter()
        with pytest.raises(InvalidArgument, match=message):
            getattr(ingress, rpc).remote(request).result()
        answered.append((rpc, time.perf_counter() - start, time.perf_counter()))
    timings = {t.stage: t.seconds for t in slow.result().provenance.timings}
    slow_done = slow_start + timings["total"]  # when the ingress had the slow job's answer
    # at once: all of them before the slow job ended (a bound relative to it, so a loaded machine that
    # slows both does not fail the test; waiting behind it would put them after)
    assert all(at < slow_done for _, _, at in answered), (answered, slow_done)


def test_malformed_timeout_metadata_is_a_precise_error() -> None:
    import types

    from ierf.serving.deployments import Ingress
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    me = types.SimpleNamespace(config=config)

    class Context:
        def __init__(self, value: str) -> None:
            self.value = value

        def invocation_metadata(self):
            return [("ierf-timeout-ms", self.value)]

    deadline = Ingress.func_or_class._deadline
    import time

    assert 1.9 < deadline(me, Context("2000")) - time.time() <= 2.0
    for bad in ("nan", "abc", "-5", "inf"):
        with pytest.raises(InvalidArgument, match="ierf-timeout-ms"):
            deadline(me, Context(bad))


def test_refused_work_lowers_the_time_estimate_so_probes_get_through() -> None:
    import time

    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    host._learn("decompose", 60.0)  # one pathological run
    refused = 0
    for _ in range(40):
        try:
            host._check_time_for(time.time() + 3.0, "the forward pass", "decompose", "explain:srd")
            break
        except DeadlineExceeded:
            refused += 1
    assert 0 < refused < 40


def test_a_baseline_that_cannot_finish_before_its_deadline_is_refused_before_it_starts() -> None:
    """Baselines and the plain forward pass learn their time like SRD's decomposition does: a job that
    would finish long after its caller stopped waiting is refused at once, not run on the worker's only
    compute thread (integrated gradients on ResNet18 took ~2.5 s on CPU, well past a 0.3 s deadline)."""
    import time

    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)

    def job(content_hash: str, deadline: float | None = None) -> ExplainJob:
        return ExplainJob(pixels, content_hash, method="integrated_gradients", target=1, deadline=deadline)

    start = time.perf_counter()
    host.explain(job("seen"))  # no deadline: runs, and teaches this replica how long it takes
    took = time.perf_counter() - start
    # A new image (forward pass + saliency), then one whose logits are cached (saliency only).
    for content_hash, message in (
        ("new", "a forward pass and integrated_gradients saliency need about"),
        ("seen", "integrated_gradients saliency needs about"),
    ):
        start = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match=message):
            host.explain(job(content_hash, deadline=time.time() + 0.3 * took))
        assert time.perf_counter() - start < 0.3 * took, "refused only after the work"
    # with time enough it runs
    assert host.explain(job("new", deadline=time.time() + 20 * took + 5)).maps is not None


def test_a_method_that_cannot_explain_the_model_is_refused_once_and_remembered(monkeypatch) -> None:
    import ierf
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    calls = []

    def refuse(name, model, **options):
        calls.append(name)
        raise ValueError("no final feature map")

    monkeypatch.setattr(ierf, "create_explainer", refuse)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="'gradcam' is not available for model r18: no final feature map"):
            host._explainer("gradcam")
    assert calls == ["gradcam"]


def test_the_logits_cache_key_names_the_architecture_and_package_version(monkeypatch) -> None:
    """The logits are keyed like the decomposition (``srd@srd-1.0+ierf-X``), not ``model@na``: a release
    that changes a model's code must not read the logits an older one wrote to a shared Redis."""
    import ierf
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost, PredictJob

    monkeypatch.setattr(ierf, "__version__", "9.8.7")
    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    host.predict(PredictJob(pixels=pixels, content_hash="c" * 64, top_k=1))
    key, view_key = sorted(host.cache.l1._items)  # the logits, and the view kept beside them
    digest, preprocess = host.model.weights_digest, host.model.preprocess_version
    from ierf.serving.worker import engine_code_digest

    code = engine_code_digest()
    assert key == f"ierf:v1:safetensors-2:logits:r18:{digest}:{preprocess}:model@resnet18+ierf-9.8.7.{code}:" + "c" * 64
    assert view_key == f"ierf:v1:safetensors-2:view:r18:{digest}:{preprocess}:view@{preprocess}:" + "c" * 64


@pytest.mark.parametrize(
    "cache",
    [
        {"l1_bytes": 0, "redis_url": None},  # the cache is off
        {"l1_bytes": 1000, "redis_url": "redis://127.0.0.1:1/0", "max_value_bytes": 1000},  # too big for both
    ],
)
def test_work_no_tier_can_keep_is_reported_disabled_not_miss(cache: dict) -> None:
    """Provenance promises DISABLED for an artifact that cannot be cached: the caller learns that the next
    request on the image will compute it again."""
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost, PredictJob

    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": cache}
    )
    host = ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for _ in range(2):  # and again: nothing was kept
        explained = host.explain(ExplainJob(pixels, "d" * 64, target=1))
        assert explained.provenance.cache == [("decomposition", "disabled")]
        predicted = host.predict(PredictJob(pixels, "e" * 64, top_k=1))
        assert predicted.provenance.cache == [("logits", "disabled")]


def test_work_a_tier_keeps_is_a_miss() -> None:
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost, PredictJob

    config = ServiceConfig.from_args(  # the logits (4 kB) fit L1; the decomposition would not
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True}], "cache": {"l1_bytes": 10_000}}
    )
    host = ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert host.predict(PredictJob(pixels, "e" * 64, top_k=1)).provenance.cache == [("logits", "miss")]
    assert host.predict(PredictJob(pixels, "e" * 64, top_k=1)).provenance.cache == [("logits", "l1")]


def test_a_model_with_fully_connected_pfv_layers_is_served(monkeypatch) -> None:
    """VGG16's classifier ReLUs are PFV layers holding a (4096,) vector: the worker failed to start on
    them (its layer table wanted (C, H, W)). They are listed as 1x1 grids and take iERF requests at (0, 0)."""
    import time

    from ierf.serving import worker
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(worker, "WARM_UP_PASSES", 1)
    config = ServiceConfig.from_args({"models": [{"id": "vgg16", "random_init": True}], "cache": {"redis_url": None}})
    host = worker.ModelHost(config.models[0], config.cache)
    layers = {layer.name: layer for layer in host.describe().layers}
    fc = layers["classifier.1"]
    assert (fc.channels, fc.height, fc.width) == (4096, 1, 1)
    pixels = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    job = worker.IERFJob(pixels, "vgg-test", "classifier.1", np.array([[0, 0]]), deadline=time.time() + 600)
    maps = host.ierf(job).maps
    assert maps.shape == (1, 224, 224) and abs(float(maps.sum()) - 1.0) < 1e-4
    outside = worker.IERFJob(pixels, "vgg-test", "classifier.1", np.array([[0, 1]]), deadline=time.time() + 600)
    with pytest.raises(InvalidArgument, match="outside"):
        host.ierf(outside)


def test_the_worker_refuses_an_ierf_response_over_the_grpc_cap_before_any_work(monkeypatch) -> None:
    """The ingress checks the response size only once it holds the model's description, so the first
    requests after it starts reached the worker unchecked, were computed, then dropped by the proxy."""
    import time

    from ierf.serving import worker
    from ierf.serving.errors import ResourceExhausted
    from ierf.serving.settings import GRPC_MAX_MESSAGE_ENV, ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = worker.ModelHost(config.models[0], config.cache)
    monkeypatch.setenv(GRPC_MAX_MESSAGE_ENV, str(8 * 2**20))
    pixels = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    positions = np.array([[r, c] for r in range(7) for c in range(7)])
    big = worker.IERFJob(pixels, "cap-test", "layer4", positions, overlay=True, deadline=time.time() + 600)
    decompose, decompositions = host._decomposition, []
    monkeypatch.setattr(host, "_decomposition", lambda *a: decompositions.append(a) or decompose(*a))
    with pytest.raises(ResourceExhausted, match=r"over the gRPC message cap of 8 MiB.*at most 20 positions"):
        host.ierf(big)
    assert decompositions == []  # refused before any work
    small = worker.IERFJob(pixels, "cap-test", "layer4", positions[:20], overlay=False, map_itemsize=2)
    assert host.ierf(small).maps.shape == (20, 224, 224) and len(decompositions) == 1


def test_the_worker_times_its_overlays_as_render_apart_from_the_ingress_encode() -> None:
    """Overlay PNGs are the worker's work, the response message the ingress's: one stage name for both
    put two different costs in one histogram (the dashboard's stage p95) and one provenance entry."""
    from ierf.serving import worker
    from ierf.serving.settings import ServiceConfig

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = worker.ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    stages = [
        s for s, _ in host.ierf(worker.IERFJob(pixels, "render", "layer4", [[0, 0]], overlay=True)).provenance.timings
    ]
    assert "render" in stages and "encode" not in stages
    plain = host.ierf(worker.IERFJob(pixels, "render", "layer4", [[0, 0]], overlay=False)).provenance.timings
    assert "render" not in [s for s, _ in plain]


def test_the_worker_sends_a_new_decomposition_to_redis_after_answering(redis_flushed) -> None:
    """The Serve worker defers a new decomposition's Redis copy until its answer has left, then must write
    it without waiting for another request: other replicas (and this one after a restart) read it there."""
    import asyncio
    import time

    import redis
    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob

    config = ServiceConfig.from_args(
        {
            "models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 2}],
            "cache": {"redis_url": redis_flushed.url},
        }
    )
    worker = ExplainerWorker.func_or_class(config.models[0], config.cache)
    pixels = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    client = redis.Redis.from_url(redis_flushed.url, socket_timeout=5)
    key = worker.host._key("decomposition", "srd", "w" * 64)

    async def scenario() -> bool:
        await worker.explain(ExplainJob(pixels=pixels, content_hash="w" * 64, target=1))
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # no other request comes
            if client.exists(key):
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        assert asyncio.run(scenario()), "the decomposition never reached Redis"
    finally:
        client.close()
        worker.__del__()


def test_a_job_stopped_because_its_budget_ran_out_is_counted_as_deadline_not_cancelled(monkeypatch) -> None:
    """When a job's deadline passes, the ingress's own wait for the worker ends at the same moment and cancels
    the call (Ingress._call: wait_for times out, then response.cancel()). The job then stops at its next
    checkpoint with both conditions true; explainer_jobs_stopped_total must say "deadline" (the budget ran
    out), as README's metric table defines it, not "cancelled" (the caller went away): the caller is still
    waiting and is answered DEADLINE_EXCEEDED. Seen live: integrated_gradients with ierf-timeout-ms 600 and a
    60 s gRPC deadline was counted reason="cancelled"."""
    import asyncio
    import time

    from ierf.interrupt import checkpoint
    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    def slow_explain(self, job):  # an engine call with a checkpoint every 0.25 s (a batch of IG steps), 5 s in all
        for _ in range(20):
            checkpoint()
            time.sleep(0.25)

    monkeypatch.setattr(ModelHost, "explain", slow_explain)
    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 2}], "cache": {}}
    )
    worker = ExplainerWorker.func_or_class(config.models[0], config.cache)
    reasons: list[str] = []
    worker.metrics.stopped = lambda model, reason: reasons.append(reason)
    pixels = np.zeros((8, 8, 3), np.uint8)

    async def scenario() -> None:
        deadline = time.time() + 0.3
        task = asyncio.ensure_future(worker.explain(ExplainJob(pixels=pixels, content_hash="a", deadline=deadline)))
        await asyncio.sleep(max(0.0, deadline - time.time()) + 0.01)  # the ingress's wait_for ends here ...
        task.cancel()  # ... and cancels the call to the worker
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the thread notices at its next checkpoint
            if reasons:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(scenario())
    finally:
        worker.__del__()
    assert reasons == ["deadline"], reasons


def test_get_model_lists_only_methods_that_can_explain_the_model() -> None:
    """GetModel.methods is where callers (README: ``method`` … — ``GetModel.methods``) learn what they may send.
    LRP refuses DenseNet when its explainer is made (README, Methods), so every ``lrp`` request to a DenseNet
    is INVALID_ARGUMENT: the list must not offer it."""
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    args = {"models": [{"id": "dn", "name": "densenet121", "random_init": True}], "cache": {"redis_url": None}}
    config = ServiceConfig.from_args(args)
    host = ModelHost(config.models[0], config.cache)
    refused = []
    for method in host.description.methods:
        if method == "srd":
            continue
        try:
            host._explainer(method)
        except InvalidArgument:
            refused.append(method)
    assert refused == [], f"GetModel offers {refused}, which the worker refuses"
    assert "lrp" not in host.description.methods and "gradcam" in host.description.methods
    from ierf.serving.jobs import check_explain_args

    with pytest.raises(InvalidArgument, match="method 'lrp' is not available for model dn: LRP canonizer"):
        check_explain_args(host.description, "lrp", 1, "identity")  # the ingress's answer: why, not "unknown"


def test_probes_stopped_by_their_deadline_do_not_keep_lowering_the_time_estimate() -> None:
    """Each up-front refusal lowers the time estimate so that one probe gets through and re-measures; but a
    probe stopped at its deadline (it could not finish, as the estimate said) learned nothing, so the lowered
    estimate stayed, and every later request with the same too-short deadline was let through and held the
    worker's one compute thread until its deadline. Seen live: integrated_gradients on EfficientNet-Lite0
    (~1-3 s) sent with 1 s deadlines was refused 4 times, then about every other call ran ~1 s and was
    stopped part-way (jobs_stopped_total rose by 5 in 14 calls), with the estimate falling further."""
    import time

    from ierf.interrupt import Interrupted, interruptible
    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import DECOMPOSE, ExplainJob, ModelHost

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    pixels = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    took = []
    for i in range(2):  # what a decomposition takes here (the faster of two runs)
        done = host.explain(ExplainJob(pixels, f"measure-{i}", target=1))
        took.append(dict(done.provenance.timings)["forward"])
    host._estimates[DECOMPOSE] = min(took)
    let_through = 0
    for i in range(14):  # a caller whose deadline is a fifth of what the decomposition needs
        deadline = time.time() + 0.2 * min(took)

        def why_stop(deadline: float = deadline) -> str | None:  # as ExplainerWorker._run checks it
            return "the deadline passed" if time.time() > deadline else None

        try:
            with interruptible(why_stop):
                host.explain(ExplainJob(pixels, f"short-{i}", target=1, deadline=deadline))
        except DeadlineExceeded:
            pass  # refused before any work
        except Interrupted:
            let_through += 1  # ran on the compute thread until its deadline
    assert let_through <= 3, f"{let_through} of 14 requests that could not finish were run until their deadline"


def test_the_logits_check_after_a_cold_decomposition_is_not_counted_as_a_request_lookup() -> None:
    """The hit-ratio panel counts what requests found. A cold decomposition also looked up the image's logits
    (to keep a Predict's), counted as a second miss: an image explained twice read 1 hit in 3 lookups, not 1
    in 2 (README: cache requests by tier and result)."""
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    seen: list[tuple[str, str, str]] = []
    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(
        config.models[0], config.cache, cache_observer=lambda tier, op, result, *_: seen.append((tier, op, result))
    )
    pixels = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    host.explain(ExplainJob(pixels, "one-image", target=1))
    host.explain(ExplainJob(pixels, "one-image", target=2))
    assert [entry for entry in seen if entry[1] == "get"] == [("l1", "get", "miss"), ("l1", "get", "hit")]


def test_a_configured_resize_reaches_the_replicas_preprocessing() -> None:
    """``models[].resize`` (a renamed second-generation file) is what the worker preprocesses with, and its
    preprocess version (a cache-key field) says so."""
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    args = {"models": [{"id": "r18", "name": "resnet18", "random_init": True, "resize": 232}]}
    config = ServiceConfig.from_args(args)
    host = ModelHost(config.models[0], config.cache)
    assert host.model.preprocessing.resize == 232 and "-r232-" in host.description.preprocess_version


def test_a_reused_activation_hint_counts_and_lists_every_run_of_a_resnet_block() -> None:
    """``ierf --server ADDR explain IMG --layer layer4.1.relu --position 3,4`` on a ResNet answered "runs 1
    times ... name one run, layer4.1.relu:0", while in-process the same command says "runs 2 times ...
    layer4.1.relu:0, layer4.1.relu:1" and the server itself accepts ``layer4.1.relu:1`` (an alias of the
    block's canonical name ``layer4.1``): the hint looked only at canonical names, not at the aliases."""
    import ierf
    from ierf.serving.errors import InvalidArgument
    from ierf.serving.jobs import check_ierf_args
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ModelHost

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    desc = host.describe()
    assert check_ierf_args(desc, "layer4.1.relu:1", np.array([[3, 4]])).name == "layer4.1"  # a run it accepts
    with pytest.raises(ValueError) as engine:
        ierf.SRD(host.model.module).program.source_id("layer4.1.relu")
    assert "runs 2 times" in str(engine.value)
    with pytest.raises(InvalidArgument) as server:
        check_ierf_args(desc, "layer4.1.relu", np.array([[3, 4]]))
    message = str(server.value)
    assert "runs 2 times" in message, message
    assert "layer4.1.relu:0" in message and "layer4.1.relu:1" in message, message


def test_a_run_after_refusals_is_blended_with_what_was_measured_not_with_the_lowered_estimate() -> None:
    """Guards ``_learn`` reading the *measured* value: refusals lower only the estimates (so that a probe gets
    through), and a run that finishes must be blended with what runs measured. A run without a deadline skips
    the probe's restore, so blending it with the lowered estimate kept most of the lowering (0.7 x 10.7 + 0.3 x
    t instead of 0.7 x 100 + 0.3 x t): every later too-short caller was let through to run until its deadline."""
    import time

    from ierf.serving.errors import DeadlineExceeded
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import DECOMPOSE, ExplainJob, ModelHost

    config = ServiceConfig.from_args({"models": [{"id": "r18", "name": "resnet18", "random_init": True}]})
    host = ModelHost(config.models[0], config.cache)
    host._measured[DECOMPOSE] = host._estimates[DECOMPOSE] = 100.0  # as if a decomposition had taken 100 s here
    pixels = np.random.default_rng(11).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for i in range(10):
        with pytest.raises(DeadlineExceeded):
            host.explain(ExplainJob(pixels, f"short-{i}", target=1, deadline=time.time() + 1.0))
    assert host._estimates[DECOMPOSE] < 11.0  # lowered by each refusal: 0.8 ** 10 x 100
    host.explain(ExplainJob(pixels, "no-deadline", target=1))  # finishes: its time is what teaches
    assert host._estimates[DECOMPOSE] >= 70.0


def test_a_view_cut_by_the_ingress_gives_the_maps_of_the_whole_image_and_a_stale_one_is_refused() -> None:
    """The ingress sends large images as the model's view (ierf.images.resize_crop, the worker's own
    arithmetic): the answers must be those of the decoded image, and a view cut by other preprocessing (a
    description from before a redeploy) is refused, never explained."""
    from ierf.images import resize_crop
    from ierf.serving.errors import StaleView
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, IERFJob, ModelHost, PredictJob

    config = ServiceConfig.from_args(
        {
            "models": [{"id": "r18", "name": "resnet18", "random_init": True, "resize": 240}],
            "cache": {"redis_url": None},
        }
    )
    host = ModelHost(config.models[0], config.cache)
    photo = np.random.default_rng(3).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    version = host.description.preprocess_version
    assert host.description.resize == 240
    view = resize_crop(photo, host.description.resize, host.description.input_height)
    whole = host.explain(ExplainJob(photo, "whole", target=5, return_input=True))
    cut = host.explain(ExplainJob(view, "cut", target=5, return_input=True, view_version=version))
    np.testing.assert_array_equal(cut.maps, whole.maps)
    np.testing.assert_array_equal(cut.model_input, whole.model_input)
    positions = np.array([[0, 0], [1, 1]], dtype=np.int64)
    np.testing.assert_array_equal(
        host.ierf(IERFJob(view, "cut", "layer2.1", positions, view_version=version)).maps,
        host.ierf(IERFJob(photo, "whole", "layer2.1", positions)).maps,
    )
    assert host.predict(PredictJob(view, "cut2", view_version=version)).top_classes == (
        host.predict(PredictJob(photo, "whole2")).top_classes
    )
    for pixels, stated in ((view, "v0-r256-c224-imagenet"), (photo, version)):
        with pytest.raises(StaleView, match="this replica uses"):
            host.explain(ExplainJob(pixels, "stale", target=5, view_version=stated))


def test_a_stale_view_is_refused_without_waiting_for_the_compute_thread(monkeypatch) -> None:
    """During a redeploy that changes a model's resize, every large image the ingress cuts by the old
    description is refused by a new replica (StaleView) and sent again whole. The refusal is a comparison of
    two strings and a shape, but it was made inside ModelHost on the compute thread, so the stale attempt
    first waited behind every queued job (and held a queue slot): each large request paid the worker's
    queue twice during the rollout, enough to push a caller with a normal deadline into DEADLINE_EXCEEDED or
    a full queue into RESOURCE_EXHAUSTED."""
    import asyncio
    import time

    from ierf.serving.deployments import ExplainerWorker
    from ierf.serving.errors import StaleView
    from ierf.serving.settings import ServiceConfig
    from ierf.serving.worker import ExplainJob, ModelHost

    original = ModelHost.explain

    def explain(self, job):  # a long cold decomposition ahead in the queue
        if job.content_hash == "busy":
            time.sleep(2.0)
        return original(self, job)

    monkeypatch.setattr(ModelHost, "explain", explain)
    config = ServiceConfig.from_args(
        {"models": [{"id": "r18", "name": "resnet18", "random_init": True, "num_threads": 1, "resize": 288}],
         "cache": {}}
    )  # fmt: skip
    worker = ExplainerWorker.func_or_class(config.models[0], config.cache)
    old_view = np.zeros((224, 224, 3), np.uint8)  # cut by the description from before the redeploy (resize 256)
    pixels = np.zeros((8, 8, 3), np.uint8)

    async def scenario() -> float:
        busy = asyncio.ensure_future(worker.explain(ExplainJob(pixels=pixels, content_hash="busy", target=1)))
        await asyncio.sleep(0.1)
        start = time.perf_counter()
        refusal = await worker.explain(
            ExplainJob(pixels=old_view, content_hash="photo", target=1, view_version="v1-r256-c224-imagenet")
        )
        waited = time.perf_counter() - start
        assert isinstance(refusal, StaleView)
        await busy
        return waited

    try:
        waited = asyncio.run(scenario())
    finally:
        worker.__del__()
    assert waited < 0.5, f"the stale view was refused only after {waited:.2f} s behind the queued job"

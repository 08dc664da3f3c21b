"""Rolling upgrades and config changes: version skew between ingress and workers, and what callers see
while Serve replaces replicas."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

from serving.fakes import Method

ROOT = Path(__file__).resolve().parents[2]


def _outcome(preprocess_version: str) -> Any:
    from ierf.serving.jobs import Outcome, Provenance, Score

    return Outcome(
        provenance=Provenance("m", "digest", "srd", "srd-1.0", preprocess_version, "hash"),
        maps=np.zeros((32, 32), np.float32),
        target=Score(1, "one", 0.5, 2.0),
    )


def test_the_ingress_never_stamps_a_view_with_a_preprocessing_it_cannot_cut() -> None:
    """Rolling upgrade that bumps PIPELINE_VERSION: a worker replica of the new build describes itself as
    v<N+1>-..., and an ingress replica of the old build (its ``resize_crop`` is pipeline N's arithmetic)
    cuts large images by that description and stamps the view ``view_version`` = the worker's own version.
    The worker's StaleView check compares only that string (and the shape), so it accepts pixels it never
    made: the maps (and the returned model_input) are of another crop than provenance names, and the
    decomposition is cached under the decoded image's key in a shared Redis, where every replica, of either
    build, then serves it until its TTL. Reproduced end to end with a real ModelHost (pipeline "v4" =
    nearest-neighbour resize): the view differed from the worker's own on 149,494 of 150,528 values and the
    saliency map moved by as much as its own scale, while provenance said v4. The view's stamp must name the
    arithmetic that cut it (the ingress's own pipeline / code), not what the worker said."""
    from ierf.models.preprocessing import PIPELINE_VERSION
    from ierf.serving.deployments import Ingress
    from ierf.serving.jobs import LayerShape, ModelDescription
    from ierf.serving.settings import ServiceConfig
    from ierf_proto.v1 import explainer_pb2 as pb

    newer = f"v{PIPELINE_VERSION + 1}-r36-c32-imagenet"  # a worker of the next build: other resize arithmetic
    jobs: list[Any] = []

    class Worker:
        async def _explain(self, job: Any) -> Any:
            jobs.append(job)
            return _outcome(newer)

        async def _describe(self) -> Any:
            return ModelDescription(
                "m", "digest", 32, 32, newer, [str(i) for i in range(10)], [LayerShape("l", 4, 8, 8)],
                ["srd"], "srd", "cpu", resize=36,
            )  # fmt: skip

        def __init__(self) -> None:
            self.explain = Method(self._explain)
            self.describe = Method(self._describe)

    ingress = Ingress.func_or_class({"m": Worker()}, ServiceConfig.from_args({"models": [{"id": "m"}]}))
    photo = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    image = pb.Image(tensor=pb.Tensor(data=photo.tobytes(), dtype=pb.DATA_TYPE_UINT8, shape=list(photo.shape)))

    async def scenario() -> None:
        await ingress.GetModel(pb.GetModelRequest(model_id="m"))  # the ingress now holds the new description
        await ingress.Explain(pb.ExplainRequest(image=image, target=1))

    asyncio.run(scenario())
    (job,) = jobs
    assert job.view_version != newer, (
        f"a view cut by pipeline v{PIPELINE_VERSION}'s resize_crop reached the worker stamped {job.view_version!r} "
        "(the worker's own version), so the worker cannot tell it was cut by other arithmetic"
    )


def test_a_config_change_does_not_kill_the_ingress_before_the_worker_it_waits_on() -> None:
    """Every ``args`` change (cache, ingress caps, a model's resize) rebinds the Ingress too, so ``serve deploy``
    / a serveConfigV2 edit replaces the ingress replicas along with the workers. The Ingress sets no
    graceful_shutdown_timeout_s, so Serve's default 20 s applies, below the worker's 30 s: calls queued in an
    old ingress replica wait for the new worker replica (model load + warm-up), and Serve kills that ingress at
    20 s. Seen live (resnet18, redeploy changing resize while 6 calls were in flight; the new worker took 23 s
    to start): 3 calls failed after 21.5 s with INTERNAL "The actor died unexpectedly before finishing this
    task ... ServeReplica:ierf:Ingress", which the SDK does not retry. README: "a downscale or redeploy kills
    a job running longer [than the worker's 30 s], whose caller sees UNAVAILABLE"."""
    from ierf.serving.app import configured_deployments
    from ierf.serving.settings import ServiceConfig

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "rayservice.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    overrides = {d.pop("name"): d for d in app["deployments"]}
    config = ServiceConfig.from_args(app["args"])
    deployments = configured_deployments(config, overrides)
    ingress = deployments["Ingress"]._deployment_config.graceful_shutdown_timeout_s
    for model in config.models:
        worker = deployments[model.deployment_name]._deployment_config.graceful_shutdown_timeout_s
        assert ingress >= worker, (
            f"Ingress graceful_shutdown_timeout_s {ingress} s < {model.deployment_name}'s {worker} s: a redeploy "
            "kills the ingress (callers: INTERNAL) while the worker would still finish their jobs"
        )


# What Serve's gRPC proxy answers for a call whose ingress replica was killed under it (Ray 2.60, seen live).
INGRESS_DIED = (
    "The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:ierf:Ingress\n\t"
    "actor_id: c8847fd02eae7c13b484b98401000000\n\tpid: 26733\n\tname: SERVE_REPLICA::ierf#Ingress#maut"
)


def test_the_sdk_retries_a_call_whose_ingress_replica_died_under_it() -> None:
    """During a redeploy or downscale Serve kills old Ingress replicas (after their graceful timeout), and its
    proxy answers the calls they held with INTERNAL "The actor died unexpectedly ... ServeReplica:...:Ingress"
    (not UNAVAILABLE). Nothing of the request reached an answer, every RPC is a pure read, and the next attempt
    lands on a live replica, so it is the transient kind RetryPolicy exists for (as Serve's "Application
    metadata not set" during a restart already is); the SDK raised IerfError(INTERNAL) at once instead."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from ierf_client import Client

    answered: list[grpc.StatusCode] = []
    lock = threading.Lock()

    class Redeploying(health_pb2_grpc.HealthServicer):
        def Check(self, request: Any, context: Any) -> Any:
            with lock:
                first = not answered
                answered.append(grpc.StatusCode.INTERNAL if first else grpc.StatusCode.OK)
            if first:
                context.abort(grpc.StatusCode.INTERNAL, INGRESS_DIED)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Redeploying(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop(None)
    assert answered == [grpc.StatusCode.INTERNAL, grpc.StatusCode.OK]


def test_a_rolling_upgrade_that_changes_the_codec_format_does_not_read_as_corruption(
    redis_flushed: Any, monkeypatch: Any
) -> None:
    """The Redis key names the engine code (engine_code_digest) but not the value's codec: CODEC_FORMAT moved
    to "ierf-safetensors-2" (commit 79a4892, CRC-32) while the key's SCHEMA_VERSION stayed "v1". In a rolling
    upgrade whose release changes only serving code (the codec, say), old and new replicas share one key per
    image: each reads the other's value as "corrupt", deletes it and recomputes (the ping-pong
    engine_code_digest's docstring says the key now prevents), and IerfCacheCorrupt (deploy/k8s/alerts.yaml)
    tells the on-call to look for an intruder writing to Redis. A value of another codec version is another
    build's, not corruption: it must not be counted corrupt nor deleted (e.g. put the codec in the key)."""
    import redis
    import torch
    from ierf.serving import cache as cache_module
    from ierf.serving.cache import CacheKey, RedisSettings, RedisTier, TieredCache, tensors_nbytes

    def key() -> str:
        return CacheKey("decomposition", "m", "digest", "v3-r256", "srd", "srd-1.0+x", "ab" * 32).redis_key()

    settings = RedisSettings(url=redis_flushed.url)
    tensors = {"logits": torch.arange(10, dtype=torch.float32).reshape(1, 10)}
    monkeypatch.setattr(cache_module, "CODEC_FORMAT", "ierf-safetensors-3")  # the next build's replica writes
    new_key = key()
    assert TieredCache(10_000_000, RedisTier(settings)).put(new_key, tensors, 1, tensors) == "stored"
    monkeypatch.undo()  # an old build's replica reads the same image
    events: list[tuple[str, str, str]] = []
    old = TieredCache(10_000_000, RedisTier(settings), lambda tier, op, result, s, n: events.append((tier, op, result)))
    assert old.get(key(), lambda state: (state, tensors_nbytes(state))).tier == "miss"
    assert ("l2", "get", "corrupt") not in events, events
    assert redis.Redis.from_url(redis_flushed.url).exists(new_key), "the new build's value was deleted"

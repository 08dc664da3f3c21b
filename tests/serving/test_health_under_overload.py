"""Health under overload: a full worker queue is a busy worker, not a dead one (acceptance finding)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving.fakes import BackPressureError, Method


class _BusyWorker:
    """A live worker whose router queue is full: every further call, the health probe's ``describe``
    included, is refused at once with back-pressure, as Serve's router does."""

    def __init__(self) -> None:
        self.full = False

        async def describe() -> Any:
            if self.full:
                raise BackPressureError(
                    "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."
                )
            return "description"

        self.describe = Method(describe)


def test_a_health_probe_refused_by_a_full_worker_queue_does_not_read_not_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README: a probe that queues behind a busy worker is not taken for an outage, "a load balancer must
    not drain capacity under load". Against the live service (resnet18, one worker replica with
    max_queued_requests 4, 200 concurrent Explains from one AsyncClient), Health.Check answered NOT_SERVING:
    the probe's ``describe`` went through the same full queue, was refused with BackPressureError, and
    ``_probe`` counts any exception as a worker that does not answer (the ingress log: "health check: worker
    resnet18 does not answer: Request dropped due to backpressure"), also dropping the busy grace. A
    refusal for a full queue says the worker is busy; health must stay SERVING while it answered recently."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.1, raising=False)
    worker = _BusyWorker()
    ingress = Ingress.func_or_class({"m": worker}, ServiceConfig.from_args({"models": ["m"]}))

    async def check() -> int:
        return (await ingress.Check(health_pb2.HealthCheckRequest())).status

    async def scenario() -> list[int]:
        assert await check() == health_pb2.HealthCheckResponse.SERVING  # answered just now
        worker.full = True  # load arrives: the worker's queue fills up
        await asyncio.sleep(0.15)  # past the cache of the last answer: the next check probes
        return [await check(), await check()]

    statuses = asyncio.run(scenario())
    assert worker.describe.calls >= 2
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2, statuses


def test_a_worker_whose_queue_stays_full_past_the_busy_grace_reads_not_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Back-pressure is a busy worker only while it answered recently: one that has refused every probe for
    longer than the busy grace (a wedged replica whose queue never drains), or never answered at all, is
    NOT_SERVING, or a load balancer keeps sending to a replica that will not answer."""
    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.2, raising=False)
    monkeypatch.setattr(deployments, "HEALTH_BUSY_GRACE_S", 0.6)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def scenario(worker: _BusyWorker) -> list[int]:
        ingress = Ingress.func_or_class({"m": worker}, ServiceConfig.from_args({"models": ["m"]}))

        async def check() -> int:
            return (await ingress.Check(health_pb2.HealthCheckRequest())).status

        async def run() -> list[int]:
            statuses = []
            if not worker.full:
                statuses.append(await check())  # answers, then its queue fills for good
                worker.full = True
                await asyncio.sleep(0.25)
                statuses.append(await check())  # within the grace: busy
                await asyncio.sleep(0.7)
            statuses.append(await check())  # past the grace (or never answered): not serving
            statuses.append(await check())  # and so it stays while that answer is cached
            return statuses

        return asyncio.run(run())

    assert scenario(_BusyWorker()) == [serving, serving, not_serving, not_serving]
    never = _BusyWorker()
    never.full = True
    assert scenario(never) == [not_serving, not_serving]
    assert never.describe.calls == 1  # the second answer was the cached one


@pytest.mark.parametrize(("running", "expected"), [(0, "NOT_SERVING"), (1, "SERVING"), (None, "SERVING")])
def test_a_probe_refused_while_serve_counts_no_running_replica_reads_not_serving(
    monkeypatch: pytest.MonkeyPatch, running: int | None, expected: str
) -> None:
    """Chaos drill: with the only worker replica SIGKILLed, Serve re-queues the probes for its replacement
    instead of failing them, so no error says the worker is gone and the busy grace read SERVING for the
    whole outage. A refused probe now asks Serve's controller: no replica RUNNING is not busy; one
    running, or no answer from the controller, keeps the busy reading."""
    from types import SimpleNamespace

    from grpc_health.v1 import health_pb2
    from ierf.serving import deployments
    from ierf.serving.deployments import Ingress
    from ierf.serving.settings import ServiceConfig

    monkeypatch.setattr(deployments, "HEALTH_CACHE_S", 0.1, raising=False)
    asked: list[str] = []

    def status() -> Any:
        asked.append("status")
        if running is None:
            raise TimeoutError("the controller does not answer")
        overview = SimpleNamespace(replica_states={"RUNNING": running} if running else {"STARTING": 1})
        return SimpleNamespace(applications={"ierf": SimpleNamespace(deployments={"Worker_m": overview})})

    monkeypatch.setattr(deployments.serve, "status", status)
    monkeypatch.setattr("ray.is_initialized", lambda: True)  # as in a replica (else Serve is never asked)
    worker = _BusyWorker()
    worker.app_name, worker.deployment_name = "ierf", "Worker_m"
    ingress = Ingress.func_or_class({"m": worker}, ServiceConfig.from_args({"models": ["m"]}))

    async def scenario() -> int:
        await ingress.Check(health_pb2.HealthCheckRequest())  # answered just now: within the busy grace
        worker.full = True
        await asyncio.sleep(0.15)
        return (await ingress.Check(health_pb2.HealthCheckRequest())).status

    assert health_pb2.HealthCheckResponse.ServingStatus.Name(asyncio.run(scenario())) == expected
    assert asked == ["status"]


def test_outside_a_ray_cluster_serve_is_never_asked_so_none_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve.status() runs ray.init() when Ray is not running: an ingress in Serve's local testing mode (or
    any test double) whose probe went unanswered would have started a whole local cluster (~13 s, 1.3 GB)."""
    from types import SimpleNamespace

    from ierf.serving import deployments

    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr(deployments.serve, "status", lambda: pytest.fail("serve.status() was called"))
    handle = SimpleNamespace(app_name="ierf", deployment_name="Worker_m")
    assert asyncio.run(deployments._running_replicas(handle)) is None

"""Chaos drill (acceptance finding): health must tell the truth while the only worker replica is dead.

Uses the session's live service (tests/serving/conftest.py). Killing the worker's process costs the session
one replica restart (~10-20 s on 2 cores); the test waits for the replacement before it returns.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytestmark = pytest.mark.integration

WORKER_TITLE = "ray::ServeReplica:ierf:Worker_efficientnet_lite0"


def _worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(WORKER_TITLE):
                pids.append(int(entry))
    return pids


def test_health_reads_not_serving_while_the_only_worker_replica_is_dead(live_service) -> None:
    """README: Health/Check is SERVING "while every worker answers" and NOT_SERVING "when a replica died".
    Drill (resnet18 and efficientnet_lite0, one worker replica): SIGKILL the worker's process while callers
    poll health. Serve re-queues the calls and the probes for the replacement instead of failing them, so the
    ingress never sees an ActorDiedError; each probe's 2 s timeout is taken for a busy worker, because the
    worker "answered" under 30 s ago (the health poller's own probes keep that fresh). Health stayed SERVING
    for the whole 14-19 s without a worker, while every Explain/Predict waited out its deadline: a load
    balancer or readiness probe keeps routing to an instance that cannot answer anything. Expected:
    NOT_SERVING within a few seconds of the death (Serve's router and controller know the replica is gone:
    the ingress log says "will not be considered for future requests because it has died"), SERVING again
    once the replacement answers."""
    from ierf_client import Client, IerfError

    with Client(live_service.grpc_address, timeout=180) as client:
        client.wait_until_serving(timeout=120)
        client.predict(np.zeros((32, 32, 3), np.uint8))  # the worker answers: a fresh "last answer"
        assert client.health() == "SERVING"
        (pid,) = _worker_pids()
        os.kill(pid, signal.SIGKILL)
        seen = []
        try:
            until = time.monotonic() + 20  # Serve's check every 2 s, the ingress's 2 s cache and probe
            while time.monotonic() < until:
                try:
                    seen.append(client.health(timeout=3))
                except IerfError as exc:
                    seen.append(exc.code.name)
                if "NOT_SERVING" in seen:
                    break
                time.sleep(0.25)
        finally:
            # leave the session's service serving: wait for the replacement replica to answer
            client.predict(np.zeros((32, 32, 3), np.uint8), timeout=150)
        assert "NOT_SERVING" in seen, f"health while the only worker was dead: {seen}"
        deadline = time.monotonic() + 10
        while client.health() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.health() == "SERVING"

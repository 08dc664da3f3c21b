"""Fixtures for the service tests: a real redis-server per session, stopped by PID at the end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    from ierf.serving.local import RedisProcess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs Debian's redis-server)")
    server = RedisProcess(maxmemory="128mb").start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_flushed(redis_server: object) -> object:
    """The session's Redis, emptied, and running again if an earlier test stopped it."""
    import redis

    if redis_server.process is None:  # type: ignore[attr-defined]
        redis_server.start()  # type: ignore[attr-defined]
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)  # type: ignore[attr-defined]
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture(scope="session")
def live_service(redis_server: object) -> Iterator[object]:
    """The real stack on loopback, once per session: private Ray cluster, Serve gRPC, real Redis.

    Sized for 2-core CI: fractional CPUs, a 300 MB object store, tiny queues (so overload is
    reachable), and no L1 in the worker, so every reuse goes through Redis (L2).
    """
    from ierf.serving.local import free_port, load_serve_config, start_service

    config = load_serve_config()
    app = config["applications"][0]
    app["deployments"] = [
        {
            "name": "Ingress",
            "max_ongoing_requests": 32,
            "max_queued_requests": 32,
            "ray_actor_options": {"num_cpus": 0.1},
        },
        {
            "name": "Worker_efficientnet_lite0",
            "num_replicas": 1,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "ray_actor_options": {"num_cpus": 0.5},
        },
    ]
    service = start_service(
        config,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        redis_url=redis_server.url,  # type: ignore[attr-defined]
        num_cpus=2,
        args_overrides={
            "models": [{"id": "efficientnet_lite0", "num_threads": 2}],
            "cache": {"l1_bytes": 0, "open_seconds": 2.0},
            "ingress": {"max_image_bytes": 2_000_000, "max_pixels": 4_000_000, "request_timeout_s": 120},
        },
    )
    try:
        yield service
    finally:
        service.stop()

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


def pytest_configure(config: pytest.Config) -> None:
    # Ray 2.60's own pydantic models warn on import; not ours to fix, and noise hides real warnings.
    config.addinivalue_line("filterwarnings", "ignore:.*extra keyword arguments on `Field`.*")
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:ray.*")

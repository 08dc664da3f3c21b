"""Redis operator findings (redisop2): what the Redis cache reports while a real server refuses it."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from ierf.serving.cache import RedisSettings, RedisTier, TieredCache
from ierf.serving.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_a_write_to_a_refused_connection_reports_no_bytes_sent_to_redis() -> None:
    """The observer contract (and `ray_explainer_cache_value_bytes`, "values written to Redis") says nbytes is
    what went to Redis, 0 when nothing did. A put whose connection was refused reported the whole encoded
    value as written: every outage's first failures and each half-open trial showed phantom write traffic."""
    events: list[tuple[str, str, str, int]] = []
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens there
    cache = TieredCache(0, tier, lambda tier_, op, result, seconds, nbytes: events.append((tier_, op, result, nbytes)))
    try:
        assert cache.put("ierf:k", object(), 1, {"a": torch.zeros(1000)}) == "error"
        assert events == [("l2", "put", "error", 0)], events
    finally:
        cache.close()


def test_the_redis_unavailable_alert_points_at_the_log_line_an_error_reply_writes() -> None:
    """A full (noeviction OOM) or read-only (a replica) Redis answers every SET with an error reply: each is
    counted as l2 put `error` and fires IerfRedisUnavailable, but the worker then logs "Redis ... refused SET
    (OutOfMemoryError ...)" (once a minute), never the "Redis ... is failing" line the alert sends the
    on-call to look for (that one is only written when the breaker opens, which error replies never do)."""
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "alerts.yaml").read_text())
    rules = [
        rule
        for doc in docs
        if doc
        for group in doc.get("spec", {}).get("groups", [])
        for rule in group.get("rules", [])
        if rule.get("alert") == "IerfRedisUnavailable"
    ]
    assert rules, "IerfRedisUnavailable not found"
    text = rules[0]["annotations"]["description"] + rules[0]["annotations"]["summary"]
    assert "refused" in text, text


def test_a_write_redis_refused_with_an_error_reply_counts_its_bytes(redis_flushed) -> None:
    """The other side of the contract: a full Redis (OOM) answered the SET, so the value did go over the wire
    and its bytes are counted; only an unanswered SET reports 0."""
    import redis

    events: list[tuple[str, str, str, int]] = []
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, lambda tier_, op, result, seconds, nbytes: events.append((tier_, op, result, nbytes)))
    raw = redis.Redis.from_url(redis_flushed.url)
    raw.set("filler", b"x" * 1000)
    raw.config_set("maxmemory", "1")  # every write is refused: OOM
    try:
        assert cache.put("ierf:k", object(), 1, {"a": torch.zeros(1000)}) == "error"
    finally:
        raw.config_set("maxmemory", "128mb")
        raw.close()
        cache.close()
    assert len(events) == 1 and events[0][:3] == ("l2", "put", "error") and events[0][3] > 4000, events


def test_a_value_over_the_cap_is_reported_unsent() -> None:
    """RedisTier.write refuses a value over max_value_bytes before any connection: not answered, 0 bytes."""
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", max_value_bytes=10))
    try:
        assert tier.write("ierf:k", b"x" * 11) == ("too_big", False)
    finally:
        tier.close()

"""Cache tiers: codec safety, byte-bounded LRU, circuit breaker, and Redis failures as misses."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
import torch
from ierf.serving.cache import (
    ByteLRU,
    CacheKey,
    CircuitBreaker,
    CodecError,
    RedisSettings,
    RedisTier,
    TieredCache,
    decode_tensors,
    encode_tensors,
    tensors_nbytes,
)
from ierf.serving.local import free_port

KEY = CacheKey("decomposition", "m", "digest", "prep-v1", "srd", "srd-0.1.0", "ab" * 32).redis_key()


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(1, 10, generator=g),
        "ratio.layer1": torch.rand(1, 8, 8, generator=g).half(),
        "index": torch.arange(12, dtype=torch.int64).reshape(3, 4),
    }


def test_key_names_every_dependency() -> None:
    key = CacheKey("decomposition", "resnet50", "0123abcd", "v1-r256", "srd", "srd-0.1.0", "f" * 64).redis_key()
    assert key == "ierf:v1:safetensors-2:decomposition:resnet50:0123abcd:v1-r256:srd@srd-0.1.0:" + "f" * 64


def test_codec_round_trip_keeps_dtypes_shapes_and_values() -> None:
    tensors = _tensors()
    restored = decode_tensors(KEY, encode_tensors(KEY, tensors))
    assert set(restored) == set(tensors)
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype
        assert torch.equal(restored[name], tensor)


def test_codec_writes_what_safetensors_reads() -> None:
    """Our writer, the library's reader: every dtype we store, 0-d, empty and non-contiguous tensors."""
    import json
    import struct

    from safetensors.torch import load

    g = torch.Generator().manual_seed(1)
    tensors = {
        "f32": torch.randn(3, 5, generator=g).t(),  # non-contiguous
        "f64": torch.randn(2, generator=g, dtype=torch.float64),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "i64": torch.tensor(-5),  # 0-d
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(5, dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.arange(3, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    data = encode_tensors(KEY, tensors)
    restored = load(data)
    assert set(restored) == set(tensors)
    for name, tensor in tensors.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        assert torch.equal(restored[name], tensor), name
    (header_len,) = struct.unpack("<Q", data[:8])
    assert (8 + header_len) % 8 == 0
    header = json.loads(data[8 : 8 + header_len])
    for name, tensor in tensors.items():  # each tensor starts aligned to its element size
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0, name


def test_a_dtype_the_format_lacks_stays_in_l1_only() -> None:
    recorder = Recorder()
    dead = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    cache = TieredCache(10_000_000, dead, recorder)
    tensors = {"z": torch.zeros(2, dtype=torch.complex64)}
    with pytest.raises(CodecError, match="complex64"):
        encode_tensors(KEY, tensors)
    assert cache.put(KEY, tensors, 16, tensors) == "error"
    assert ("l2", "put", "error") in recorder.events
    assert cache.get(KEY, _rebuild).tier == "l1"


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"short",
        b"\xff" * 64,
        b"\x08\x00\x00\x00\x00\x00\x00\x00{not json",
        b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
    ],
)
def test_codec_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(CodecError):
        decode_tensors(KEY, garbage)


def test_codec_rejects_a_value_written_under_another_key() -> None:
    data = encode_tensors(KEY, _tensors())
    with pytest.raises(CodecError, match="another key"):
        decode_tensors(KEY + "x", data)


def test_codec_rejects_foreign_safetensors_and_truncation() -> None:
    from safetensors.torch import save

    with pytest.raises(CodecError, match="format"):
        decode_tensors(KEY, save({"a": torch.zeros(3)}))
    data = encode_tensors(KEY, _tensors())
    with pytest.raises(CodecError):
        decode_tensors(KEY, data[:-10])


def test_byte_lru_evicts_least_recently_used_and_refuses_oversize() -> None:
    lru: ByteLRU[str] = ByteLRU(100)
    assert lru.put("a", "A", 40) and lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # a is now most recent
    assert lru.put("c", "C", 40)  # evicts b
    assert lru.get("b") is None and lru.get("a") == "A" and lru.get("c") == "C"
    assert lru.nbytes == 80
    assert not lru.put("huge", "H", 101)
    assert lru.put("a", "A2", 10) and lru.nbytes == 50 and lru.get("a") == "A2"


def test_a_value_of_exactly_the_l1_capacity_is_kept() -> None:
    """Guards against L1 refusing a value as big as its whole capacity (``>=`` for ``>``): can_keep says
    such a value fits, so with Redis off the worker would compute it, find it unstored and recompute it
    on every request for the image."""
    cache = TieredCache(100)
    assert cache.can_keep(100, 10**9)
    cache.put("k", "V", 100, None)
    assert cache.get("k", _rebuild).tier == "l1" and cache.l1.nbytes == 100


def test_breaker_opens_after_threshold_then_half_opens_with_one_trial() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=5, clock=lambda: now[0])
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 5.0
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record_failure()
    assert breaker.state == "open"
    now[0] = 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def _closed_port() -> int:
    port = free_port()
    with socket.socket() as probe:  # make sure nothing listens there
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


def test_redis_down_fails_fast_and_trips_the_breaker() -> None:
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0", failure_threshold=2))
    start = time.perf_counter()
    assert tier.get("k") == ("error", None)
    assert time.perf_counter() - start < 0.5  # redis-py defaults would block ~4 s retrying
    assert tier.put("k", b"v") == "error"
    assert tier.breaker.state == "open"
    start = time.perf_counter()
    assert tier.get("k") == ("skipped", None)
    assert tier.put("k", b"v") == "skipped"
    # An open breaker answers without a socket; the bound leaves room for a loaded 2-core CI host's scheduler
    # (a closed port refuses in microseconds, so "skipped" above is what tells the two apart).
    assert time.perf_counter() - start < 0.1


def test_black_holed_redis_times_out_quickly() -> None:
    """A server that accepts and never answers (a hung Redis) costs one read timeout, then nothing."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{port}/0", timeout_s=0.2, failure_threshold=1))
        start = time.perf_counter()
        assert tier.get("k") == ("error", None)
        assert time.perf_counter() - start < 1.5
        assert tier.get("k") == ("skipped", None)


def test_real_redis_round_trip_ttl_and_size_cap(redis_flushed) -> None:
    import redis

    tier = RedisTier(RedisSettings(url=redis_flushed.url, ttl_s=60, max_value_bytes=1000))
    assert tier.get("k") == ("miss", None)
    assert tier.put("k", b"v" * 10) == "stored"
    assert tier.get("k") == ("hit", b"v" * 10)
    assert 0 < redis.Redis.from_url(redis_flushed.url).ttl("k") <= 60
    assert tier.put("big", b"v" * 1001) == "too_big"
    assert tier.get("big") == ("miss", None)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, tier: str, op: str, result: str, seconds: float, nbytes: int) -> None:
        self.events.append((tier, op, result))


def _rebuild(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    return state, tensors_nbytes(state)


def test_tiered_cache_l2_serves_a_new_process_and_fills_l1(redis_flushed) -> None:
    settings = RedisSettings(url=redis_flushed.url)
    writer = TieredCache(10_000_000, RedisTier(settings))
    tensors = _tensors()
    assert writer.put(KEY, tensors, tensors_nbytes(tensors), tensors) == "stored"
    recorder = Recorder()
    reader = TieredCache(10_000_000, RedisTier(settings), recorder)  # a fresh replica: empty L1
    first = reader.get(KEY, _rebuild)
    assert first.tier == "l2" and torch.equal(first.value["logits"], tensors["logits"])
    assert reader.get(KEY, _rebuild).tier == "l1"
    assert recorder.events == [
        ("l1", "get", "miss"),
        ("l2", "get", "hit"),
        ("l1", "put", "stored"),
        ("l1", "get", "hit"),
    ]
    small = TieredCache(16, None, recorder)  # an L1 too small for the value: counted as too_big
    recorder.events.clear()
    assert small.put(KEY, tensors, tensors_nbytes(tensors), None) == "disabled"
    assert recorder.events == [("l1", "put", "too_big")]


def test_garbage_under_a_key_is_a_miss_and_is_removed(redis_flushed) -> None:
    import redis

    client = redis.Redis.from_url(redis_flushed.url)
    client.set(KEY, b"\x00garbage\xff" * 10)
    recorder = Recorder()
    cache = TieredCache(10_000_000, RedisTier(RedisSettings(url=redis_flushed.url)), recorder)
    assert cache.get(KEY, _rebuild).tier == "miss"
    # counted apart from an outage: Redis answered, with a value that is not ierf's (tampering shows)
    assert ("l2", "get", "corrupt") in recorder.events and ("l2", "get", "error") not in recorder.events
    assert client.get(KEY) is None


def test_values_the_engine_rejects_are_misses(redis_flushed) -> None:
    settings = RedisSettings(url=redis_flushed.url)
    tensors = _tensors()
    TieredCache(10_000_000, RedisTier(settings)).put(KEY, tensors, 1, tensors)

    def refuse(state: dict[str, torch.Tensor]) -> tuple[object, int]:
        raise ValueError("state from another engine version")

    assert TieredCache(10_000_000, RedisTier(settings)).get(KEY, refuse).tier == "miss"


def test_redis_stopped_mid_run_means_misses_then_recovery(redis_flushed) -> None:
    settings = RedisSettings(url=redis_flushed.url, failure_threshold=2, open_seconds=0.3)
    tier = RedisTier(settings)
    cache = TieredCache(10_000_000, tier)
    tensors = _tensors()
    assert cache.put(KEY, tensors, 1, tensors) == "stored"
    redis_flushed.stop()
    try:
        fresh = TieredCache(10_000_000, tier)
        start = time.perf_counter()
        for _ in range(5):
            assert fresh.get(KEY, _rebuild).tier == "miss"
            assert fresh.put(KEY + ":other", tensors, 10**9, tensors) in ("error", "skipped")
        assert time.perf_counter() - start < 2.0
        assert tier.breaker.state == "open"
    finally:
        redis_flushed.start()
    time.sleep(0.35)  # breaker half-opens, the trial succeeds, Redis is used again
    assert cache.put(KEY, tensors, 1, tensors) == "stored"
    assert TieredCache(10_000_000, tier).get(KEY, _rebuild).tier == "l2"


def test_too_big_values_stay_in_l1_only(redis_flushed) -> None:
    cache = TieredCache(10_000_000, RedisTier(RedisSettings(url=redis_flushed.url, max_value_bytes=10)))
    tensors = _tensors()
    assert cache.put(KEY, tensors, tensors_nbytes(tensors), tensors) == "too_big"
    assert cache.get(KEY, _rebuild).tier == "l1"


def test_can_keep_says_whether_any_tier_fits_a_value() -> None:
    settings = RedisSettings(url="redis://127.0.0.1:1/0", max_value_bytes=100)
    assert not TieredCache(0).can_keep(1, 1)  # cache off
    assert TieredCache(10).can_keep(10, 10**9) and not TieredCache(10).can_keep(11, 11)
    with_l2 = TieredCache(10, RedisTier(settings))
    assert with_l2.can_keep(11, 100) and not with_l2.can_keep(11, 101)
    with_l2.close()


def test_may_hold_is_false_only_when_no_tier_could_answer(redis_flushed) -> None:
    """The worker refuses a job sent by hash at once when this says False, so it must say True for every
    place a lookup reads: L1, a deferred or queued Redis write on this replica, and Redis unless known down;
    and it must not count or reorder anything (it is a check, not a use)."""
    tensors = _tensors()
    recorder = Recorder()
    assert not TieredCache(0).may_hold(KEY) and not TieredCache(10).may_hold(KEY)
    small = TieredCache(100, observer=recorder)
    small.put(KEY, tensors, 60, None)
    small.put(KEY + ":b", tensors, 40, None)
    assert small.may_hold(KEY) and not small.may_hold(KEY + ":c")
    small.put(KEY + ":c", tensors, 40, None)  # evicts the least recently used: KEY, as may_hold did not use it
    assert not small.may_hold(KEY) and small.may_hold(KEY + ":b")
    assert [op for _, op, _ in recorder.events] == ["put"] * 3  # no lookups counted

    tier, release = _held_tier(redis_flushed.url)
    cache = TieredCache(0, tier, write_behind_bytes=64 * 1024 * 1024)
    try:
        assert cache.may_hold(KEY + ":anything")  # Redis up: it may hold anything
        assert cache.put(KEY + ":deferred", object(), 1, tensors, background=True, deferred=True) == "queued"
        assert cache.put(KEY + ":queued", tensors, 1, tensors, background=True) == "queued"  # held on its way
        for _ in range(tier.settings.failure_threshold):
            tier.breaker.record_failure()
        assert tier.breaker.state == "open"
        assert not cache.may_hold(KEY + ":anything")
        assert cache.may_hold(KEY + ":deferred") and cache.may_hold(KEY + ":queued")
    finally:
        release.set()
        cache.close(timeout_s=5)


def test_single_flight_serialises_one_key_only_and_forgets_idle_keys() -> None:
    """Before, locks were pruned past 4096 keys by "not locked", which also dropped a lock handed out
    but not yet acquired: a second request for the image then got a new lock and computed it again."""
    cache = TieredCache(1000)
    inside = threading.Event()
    release = threading.Event()
    order: list[str] = []

    def holder() -> None:
        with cache.single_flight("a"):
            inside.set()
            release.wait(5)
            order.append("first")

    def same_key() -> None:
        with cache.single_flight("a"):
            order.append("second")

    first = threading.Thread(target=holder)
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=same_key)
    second.start()
    for i in range(5000):  # many other images meanwhile: none of them waits, and "a" keeps its lock
        with cache.single_flight(f"other{i}"):
            pass
    time.sleep(0.05)
    assert order == []  # the second request for "a" still waits for the first
    release.set()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"]
    assert cache._key_locks == {}  # nothing held, nothing kept


class FakeRedis:
    """A TCP server that answers every command with ``reply`` (sent ``chunk`` bytes per ``interval_s``), or
    hands each request to ``respond(server, conn, request)``."""

    def __init__(
        self,
        reply: bytes = b"",
        chunk: int | None = None,
        interval_s: float = 0.0,
        respond: Callable[[FakeRedis, socket.socket, bytes], None] | None = None,
    ) -> None:
        self.reply, self.chunk, self.interval_s = reply, chunk or len(reply) or 1, interval_s
        self.respond = respond or FakeRedis._send_reply
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while not self.stopped.is_set():
                    request = conn.recv(65536)
                    if not request:
                        return
                    self.respond(self, conn, request)
            except OSError:
                return

    def _send_reply(self, conn: socket.socket, request: bytes) -> None:
        for i in range(0, len(self.reply), self.chunk):
            conn.sendall(self.reply[i : i + self.chunk])
            if self.stopped.wait(self.interval_s):
                return

    def close(self) -> None:
        self.stopped.set()
        self.server.close()


@pytest.mark.parametrize(
    ("reply", "fails"), [(b"$abc\r\n", True), (b"!!garbage\r\n", True), (b"*-5\r\n", False), (b"+OK\r\n", False)]
)
def test_a_malformed_reply_is_a_miss_and_never_wedges_the_breaker(reply: bytes, fails: bool) -> None:
    """redis-py raises ValueError and friends (not RedisError) on some malformed replies: still a miss,
    counted as a failure, and a half-open trial that meets one lets the next trial through. Whatever
    the reply, nothing raises."""
    fake = FakeRedis(reply)
    try:
        tier = RedisTier(RedisSettings(url=fake.url, failure_threshold=1, open_seconds=0.2, timeout_s=0.5))
        recorder = Recorder()
        cache = TieredCache(10_000_000, tier, recorder)
        assert cache.get(KEY, _rebuild).tier == "miss"
        tensors = _tensors()
        assert cache.put(KEY + ":2", tensors, 1, tensors) in ("stored", "error", "skipped")
        if fails:
            assert ("l2", "get", "error") in recorder.events
            assert tier.breaker.state == "open"
            for _ in range(2):  # each half-open trial fails and re-opens; none is left "in flight"
                time.sleep(0.25)
                assert tier.breaker.state == "half_open"
                assert tier.get("k") == ("error", None)
        tier.close()
    finally:
        fake.close()


def test_a_server_that_trickles_its_reply_is_abandoned_at_the_operation_deadline() -> None:
    """socket_timeout bounds each read only; a reply sent a byte every 0.2 s would hold a GET for hours."""
    fake = FakeRedis(b"$100000\r\n" + b"x" * 100000 + b"\r\n", chunk=1, interval_s=0.2)
    try:
        settings = RedisSettings(url=fake.url, connect_timeout_s=0.2, timeout_s=0.5)
        tier = RedisTier(settings)
        for _ in range(2):
            start = time.perf_counter()
            assert tier.get("k") == ("error", None)
            assert time.perf_counter() - start < settings.operation_timeout_s + 0.5
        tier.close()
    finally:
        fake.close()


def test_redis_replies_are_parsed_by_hiredis() -> None:
    """The pure-Python parser read a ResNet50 decomposition (3.4 MB) in ~14 ms, hiredis in ~2 ms: every
    L2 hit pays it, so the install must bring hiredis."""
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE


def test_writes_behind_a_hung_redis_return_at_once_and_are_bounded() -> None:
    """With write-behind, a SET to a server that never answers costs the request nothing; the write fails
    on the background thread (counted), and writes past the pending-bytes bound are dropped, not queued."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings = RedisSettings(url=url, timeout_s=0.3, failure_threshold=5)
        recorder = Recorder()
        tensors = _tensors()
        size = len(encode_tensors(KEY, tensors))
        cache = TieredCache(10_000_000, RedisTier(settings), recorder, write_behind_bytes=2 * size)
        start = time.perf_counter()
        assert cache.put(KEY, tensors, 1, tensors, background=True) == "queued"
        assert cache.put(KEY + ":b", tensors, 1, tensors, background=True) == "queued"
        assert cache.put(KEY + ":c", tensors, 1, tensors, background=True) == "dropped"
        assert time.perf_counter() - start < 0.1  # the first SET alone blocks for its read timeout
        assert cache.l1.get(KEY) is tensors and cache.l1.get(KEY + ":c") is tensors  # L1 is written at once
        assert ("l2", "put", "dropped") in recorder.events
        assert cache.flush(timeout_s=3 * settings.operation_timeout_s)
        assert recorder.events.count(("l2", "put", "error")) == 2
        cache.close()


def _held_tier(url: str) -> tuple[RedisTier, threading.Event]:
    """A Redis tier whose SETs wait for the returned event (5 s at most): a write held on its way."""
    tier = RedisTier(RedisSettings(url=url))
    release = threading.Event()
    real_write = tier.write

    def held_write(key: str, value: bytes) -> tuple[str, bool]:
        release.wait(5)
        return real_write(key, value)

    tier.write = held_write  # type: ignore[method-assign]
    return tier, release


def test_a_key_still_being_written_behind_is_read_from_memory(redis_flushed) -> None:
    """Read-after-write within a replica: with L1 off, the next request for the image is served from the
    queued bytes while the SET is still on its way (here held back), neither missing nor waiting."""
    tier, release = _held_tier(redis_flushed.url)
    recorder = Recorder()
    cache = TieredCache(0, tier, recorder, write_behind_bytes=64 * 1024 * 1024)  # L1 off: reads go to L2
    tensors = _tensors()
    try:
        assert cache.put(KEY, tensors, tensors_nbytes(tensors), tensors, background=True) == "queued"
        start = time.perf_counter()
        found = cache.get(KEY, _rebuild)
        assert time.perf_counter() - start < 1.0
        assert found.tier == "l2" and torch.equal(found.value["logits"], tensors["logits"])
        assert tier.get(KEY) == ("miss", None)  # not in Redis yet
    finally:
        release.set()
    assert cache.flush(timeout_s=5)
    assert tier.get(KEY)[0] == "hit"  # landed
    assert ("l2", "put", "stored") in recorder.events
    cache.close()
    assert cache.put(KEY + ":later", tensors, 1, tensors, background=True) == "dropped"  # closed


def test_a_deferred_write_waits_unencoded_is_read_meanwhile_and_lands_when_written(redis_flushed) -> None:
    """``deferred``: nothing is encoded or sent until write_deferred (the worker calls it once the answer
    has left); meanwhile the same replica reads the object itself, and other replicas miss."""
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    recorder = Recorder()
    cache = TieredCache(0, tier, recorder, write_behind_bytes=64 * 1024 * 1024)  # L1 off: reads go to L2
    tensors = _tensors()
    obj = object()
    assert cache.put(KEY, obj, 1, tensors, background=True, deferred=True) == "queued"
    assert cache.has_deferred() and not recorder.events  # nothing encoded, nothing sent
    found = cache.get(KEY, _rebuild)
    assert found.tier == "l2" and found.value is obj  # the object itself, no decoding
    other = TieredCache(0, RedisTier(RedisSettings(url=redis_flushed.url)))  # another replica
    assert other.get(KEY, _rebuild).tier == "miss"
    assert cache.write_deferred() == 1 and not cache.has_deferred()
    assert cache.flush(timeout_s=5)
    assert ("l2", "put", "stored") in recorder.events
    landed = other.get(KEY, _rebuild)
    assert landed.tier == "l2" and torch.equal(landed.value["logits"], tensors["logits"])
    # discarded before it was written: never sent; and close() writes what is still deferred
    assert cache.put(KEY + ":gone", obj, 1, tensors, background=True, deferred=True) == "queued"
    cache.discard(KEY + ":gone")
    assert cache.put(KEY + ":late", obj, 1, tensors, background=True, deferred=True) == "queued"
    cache.close(timeout_s=5)
    assert other.get(KEY + ":gone", _rebuild).tier == "miss" and other.get(KEY + ":late", _rebuild).tier == "l2"
    assert cache.put(KEY + ":closed", obj, 1, tensors, background=True, deferred=True) == "dropped"  # not held


def test_a_deferred_write_makes_its_tensors_only_when_written(redis_flushed) -> None:
    """The worker hands the decomposition's ``state_dict`` itself (assembling a ResNet50's took ~1 ms of
    each new image's answer): a deferred put must not call it, write_deferred calls it once, and an
    undeferred put at once; its declared size bounds the queue like the tensors' own."""
    tensors = {"ratios": torch.rand(100_000)}
    size = tensors_nbytes(tensors)
    calls: list[int] = []

    def make() -> dict[str, torch.Tensor]:
        calls.append(1)
        return tensors

    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, write_behind_bytes=size + size // 2)
    with pytest.raises(ValueError, match="tensors_size"):
        cache.put(KEY, object(), 1, make, background=True, deferred=True)
    assert cache.put(KEY, object(), 1, make, background=True, deferred=True, tensors_size=size) == "queued"
    assert not calls and cache._deferred_bytes == size
    # no room beside it: neither held nor queued, nor even made
    assert cache.put(KEY + ":b", object(), 1, make, background=True, deferred=True, tensors_size=size) == "dropped"
    assert not calls
    assert cache.write_deferred() == 1 and len(calls) == 1 and cache._deferred_bytes == 0
    assert cache.flush(timeout_s=5)
    assert tier.get(KEY)[0] == "hit" and tier.get(KEY + ":b")[0] == "miss"
    cache.close()


def test_deferred_writes_are_bounded_like_the_write_behind_queue(redis_flushed) -> None:
    """Deferred and queued values share the write-behind budget: past it a put is neither held nor queued
    (dropped: the value stays in L1), and what was held is written once write_deferred runs."""
    tensors = {"ratios": torch.rand(100_000)}  # 400 KB: the codec's header is negligible next to it
    size = tensors_nbytes(tensors)
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, write_behind_bytes=size + size // 2)
    assert cache.put(KEY, tensors, 1, tensors, background=True, deferred=True) == "queued"
    assert cache.put(KEY + ":b", tensors, 1, tensors, background=True, deferred=True) == "dropped"
    assert cache.put(KEY + ":c", tensors, 1, tensors, background=True) == "dropped"  # the queue counts it too
    assert cache._behind is not None and cache._behind.pending_bytes == 0
    assert cache.write_deferred() == 1  # the first, held
    assert cache.flush(timeout_s=5)
    assert tier.get(KEY)[0] == "hit" and tier.get(KEY + ":b")[0] == "miss"
    cache.close()


def test_a_deferred_put_counts_the_bytes_already_queued_behind(redis_flushed) -> None:
    """Guards against the deferred bound ignoring the queued bytes: with a write already pending behind
    a slow Redis, a deferred value that does not fit beside it must not be held as well, or the replica
    keeps twice its write-behind budget of tensors in memory."""
    tensors = {"ratios": torch.rand(100_000)}  # 400 KB: the codec's header is negligible next to it
    size = tensors_nbytes(tensors)
    tier, release = _held_tier(redis_flushed.url)
    cache = TieredCache(0, tier, write_behind_bytes=size + size // 2)
    try:
        assert cache.put(KEY, tensors, 1, tensors, background=True) == "queued"  # pending behind the held SET
        assert cache.put(KEY + ":b", tensors, 1, tensors, background=True, deferred=True) == "dropped"
        assert not cache.has_deferred()
    finally:
        release.set()
    assert cache.flush(timeout_s=5)
    cache.close()


def test_a_key_written_behind_twice_stays_readable_until_its_last_write_lands() -> None:
    """Guards against the write-behind queue counting one pending write per key: when the same key is
    queued twice, the first write to finish must not forget the second (its value would no longer be
    read from memory, and the writer thread would fail on the second and write nothing more)."""
    from ierf.serving.cache import _WriteBehind

    gate = threading.Semaphore(0)
    written: list[tuple[str, bytes]] = []

    def write(key: str, value: bytes) -> None:
        assert gate.acquire(timeout=5)
        written.append((key, value))

    behind = _WriteBehind(write, 1000)
    try:
        assert behind.submit("k", b"old") and behind.submit("k", b"new!")
        assert behind.peek("k") == b"new!"
        gate.release()  # the first write lands
        deadline = time.monotonic() + 5
        while behind.pending_bytes != 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert behind.pending_bytes == 4
        assert behind.peek("k") == b"new!"  # the second is still on its way: still read from memory
        gate.release()
        assert behind.flush(5) and behind.peek("k") is None
        assert behind.submit("j", b"x")
        gate.release()
        assert behind.flush(5)
        assert written == [("k", b"old"), ("k", b"new!"), ("j", b"x")]
    finally:
        for _ in range(3):
            gate.release()
        behind.close(1)


def test_a_deferred_value_whose_encoding_fails_is_dropped_not_retried_forever(redis_flushed) -> None:
    """An encoding error other than the codec's own (memory, torch) used to leave the value at the head of
    the deferred queue, failing every later write_deferred and close()."""
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, write_behind_bytes=64 * 1024 * 1024)
    tensors = _tensors()
    assert cache.put(KEY + ":bad", object(), 1, {"x": _ExplodingTensor()}, background=True, deferred=True) == "queued"
    assert cache.put(KEY, object(), 1, tensors, background=True, deferred=True) == "queued"
    with pytest.raises(RuntimeError, match="cannot encode"):
        cache.write_deferred()
    assert cache.write_deferred() == 1 and not cache.has_deferred()
    cache.close(timeout_s=5)
    assert tier.get(KEY)[0] == "hit" and tier.get(KEY + ":bad")[0] == "miss"


class _ExplodingTensor(torch.Tensor):
    """A tensor the codec accepts until it reads the data (stands for an out-of-memory error)."""

    @staticmethod
    def __new__(cls) -> torch.Tensor:
        return torch.Tensor._make_subclass(cls, torch.zeros(4))

    def contiguous(self, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("cannot encode this tensor")


def test_synchronous_puts_stay_the_default(redis_flushed) -> None:
    cache = TieredCache(10_000_000, RedisTier(RedisSettings(url=redis_flushed.url)), write_behind_bytes=1 << 20)
    tensors = _tensors()
    assert cache.put(KEY, tensors, 1, tensors) == "stored"  # background=False: written before returning
    assert TieredCache(0, RedisTier(RedisSettings(url=redis_flushed.url))).get(KEY, _rebuild).tier == "l2"


def _slow_or_quick(fake: FakeRedis, conn: socket.socket, request: bytes) -> None:
    """A GET of "slow" trickles its reply (a large value over a slow link); any other GET answers after 0.1 s."""
    if b"slow" in request:
        conn.sendall(b"$100000\r\n")
        for _ in range(100000):
            conn.sendall(b"x")
            if fake.stopped.wait(0.1):
                return
    elif b"GET" in request:
        time.sleep(0.1)
        conn.sendall(b"$2\r\nok\r\n")
    elif b"HELLO" in request:  # the RESP3 handshake: a map
        conn.sendall(b"%1\r\n$5\r\nproto\r\n:3\r\n")
    else:
        conn.sendall(b"+OK\r\n" * request.count(b"*"))


def test_an_overrunning_command_drops_only_its_own_connection() -> None:
    """The worker runs two Redis users at once: a request's GET and the write-behind thread's SET. Before,
    the watchdog dropped the whole connection pool when one command overran, so the other, healthy one
    failed too and counted as a second breaker failure."""
    slow_seen = threading.Event()

    def respond(fake: FakeRedis, conn: socket.socket, request: bytes) -> None:
        if b"slow" in request:
            slow_seen.set()
        elif b"GET" in request and slow_seen.is_set():
            time.sleep(0.25)  # 0.35 s in all (under the 0.5 s read timeout): in flight when the slow one goes
        _slow_or_quick(fake, conn, request)

    fake = FakeRedis(respond=respond)
    try:
        tier = RedisTier(RedisSettings(url=fake.url, timeout_s=0.5, failure_threshold=3))
        assert tier.get("quick") == ("hit", b"ok")
        results: dict[str, object] = {}
        slow = threading.Thread(target=lambda: results.update(slow=tier.get("slow")))
        slow.start()
        assert slow_seen.wait(5)  # timed from the slow GET's arrival, not the thread's start (late on a busy host)
        time.sleep(tier.settings.operation_timeout_s - 0.15)  # the slow GET is abandoned during the next one
        results["quick"] = tier.get("quick")
        slow.join(5)
        assert results == {"slow": ("error", None), "quick": ("hit", b"ok")}
        assert tier.breaker._failures <= 1  # the slow GET's own failure at most, never the healthy one's too
        tier.close()
    finally:
        fake.close()


def test_a_value_of_another_type_under_a_key_is_a_miss_not_an_outage(redis_flushed) -> None:
    """WRONGTYPE is the server answering: before, it counted as a failure, so three such keys opened the
    breaker and every image missed Redis for 10 s; and the foreign key was never removed."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    tensors = _tensors()
    recorder = Recorder()
    tier = RedisTier(RedisSettings(url=redis_flushed.url, failure_threshold=2))
    cache = TieredCache(0, tier, recorder)
    assert cache.put(KEY + ":good", tensors, 1, tensors) == "stored"
    for i in range(3):
        raw.rpush(f"{KEY}:list{i}", "x")
        assert cache.get(f"{KEY}:list{i}", _rebuild).tier == "miss"
        assert not raw.exists(f"{KEY}:list{i}")  # removed: the next request recomputes and stores
    assert tier.breaker.state == "closed"
    assert cache.get(KEY + ":good", _rebuild).tier == "l2"
    assert recorder.events.count(("l2", "get", "error")) == 3
    tier.close()
    raw.close()


def test_a_corrupted_value_is_a_miss_not_a_wrong_map(redis_flushed) -> None:
    """A flipped bit in a tensor's bytes keeps the value well-formed; before the CRC it was served as an
    L2 hit with changed numbers."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    tensors = _tensors()
    cache = TieredCache(0, RedisTier(RedisSettings(url=redis_flushed.url)))
    assert cache.put(KEY, tensors, 1, tensors) == "stored"
    data = bytearray(raw.get(KEY))
    data[-3] ^= 0x10  # in the last tensor's data
    raw.set(KEY, bytes(data))
    assert cache.get(KEY, _rebuild).tier == "miss"
    assert not raw.exists(KEY)
    with pytest.raises(CodecError, match="CRC-32"):
        decode_tensors(KEY, bytes(data))
    raw.close()
    cache.close()


def test_with_l1_off_reads_count_no_l1_misses() -> None:
    recorder = Recorder()
    assert TieredCache(0, None, recorder).get(KEY, _rebuild).tier == "miss"
    assert not [e for e in recorder.events if e[0] == "l1"]


class _Interrupted(BaseException):
    pass


def test_a_half_open_trial_that_never_returns_normally_does_not_wedge_the_breaker() -> None:
    """A BaseException (KeyboardInterrupt, a cancelled thread) in the half-open trial left it "in flight"
    for good before: Redis was then skipped for the life of the replica."""
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0", failure_threshold=1, open_seconds=0.1))
    assert tier.get("k") == ("error", None)
    time.sleep(0.15)
    assert tier.breaker.state == "half_open"

    def interrupted(*_: object) -> None:
        raise _Interrupted

    with pytest.raises(_Interrupted):
        tier._run(interrupted)
    time.sleep(0.15)
    assert tier.breaker.allow()  # a new trial is let through
    tier.close()


# -- cache review follow-ups: values past the cap, DNS, URLs, logging ---------------------------------------
def test_a_value_past_the_cap_is_read_no_further_than_the_cap(redis_flushed) -> None:
    """Someone else's 400 MB value under a key was read whole on every lookup (+720 MB of memory each).
    It is left in place: it may be a replica's with a larger cap, and each look costs at most the cap."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    raw.set(KEY, b"x" * 200_000)
    tier = RedisTier(RedisSettings(url=redis_flushed.url, max_value_bytes=1000))
    for _ in range(2):
        sent_before = int(raw.info("stats")["total_net_output_bytes"])
        assert tier.get(KEY) == ("too_big", None)  # a miss, not an outage
        assert int(raw.info("stats")["total_net_output_bytes"]) - sent_before < 20_000  # not the 200 kB
    assert raw.strlen(KEY) == 200_000 and tier.breaker.state == "closed"
    assert tier.put(KEY, b"v" * 1000) == "stored" and tier.get(KEY) == ("hit", b"v" * 1000)  # exactly the cap
    tier.close()
    raw.close()


def test_a_hit_is_not_examined_as_a_refusal(redis_flushed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every hit went through str(value).lower() looking for "unknown command": ~30 ms for a ResNet50
    decomposition (3.6 MB), five times the rest of the lookup. A value that cannot be turned into text
    shows it is not."""
    import redis

    class Unprintable(bytes):
        def __str__(self) -> str:
            raise AssertionError("a hit's value was turned into text")

        __repr__ = __str__

    real = redis.Redis.getrange
    monkeypatch.setattr(redis.Redis, "getrange", lambda self, *args: Unprintable(real(self, *args)))
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    assert tier.put(KEY, b"v" * 100_000) == "stored"
    status, value = tier.get(KEY)
    assert status == "hit" and value == b"v" * 100_000 and tier.get("absent") == ("miss", None)
    tier.close()


def test_a_server_that_refuses_getrange_is_read_with_get(redis_flushed) -> None:
    """A Redis user allowed GET/SET/DEL only answered GETRANGE with NOPERM, and the key was deleted as if
    it held another program's value: nothing was ever read back."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    raw.acl_setuser(
        "cacheonly", enabled=True, passwords=["+pw"], keys=["*"], commands=["-@all", "+get", "+set", "+del"]
    )
    try:
        url = redis_flushed.url.replace("redis://", "redis://cacheonly:pw@")
        tier = RedisTier(RedisSettings(url=url))
        assert tier.put("k", b"value") == "stored"
        assert tier.get("k") == ("hit", b"value") and tier.get("k") == ("hit", b"value")
        assert raw.exists("k") and tier.breaker.state == "closed"
        tier.close()
    finally:
        raw.acl_deluser("cacheonly")
        raw.close()


def _dns(answers: dict[str, str | list[str]], silent: set[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A name service for this test: ``answers`` resolve to addresses, ``silent`` names never answer (as a
    DNS server that drops queries: glibc waits 5 s per try); every other lookup is the real one."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host in silent:
            asked.append(host)
            time.sleep(5)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host in answers:
            asked.append(host)
            targets = answers[host] if isinstance(answers[host], list) else [answers[host]]
            return [info for target in targets for info in real(target, port, *args, **kwargs)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_dns_server_that_does_not_answer_costs_a_request_the_connect_timeout_not_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py resolves the host on every reconnect, in the request's thread: each command blocked 10 s
    (20 s with a pod's search list) while the DNS did not answer, past the 2.2 s cap on a command."""
    _dns({}, {"redis.silent.test"}, monkeypatch)
    tier = RedisTier(RedisSettings(url="redis://redis.silent.test:6379/0", failure_threshold=2))
    start = time.perf_counter()
    assert tier.get("k") == ("error", None)
    assert tier.put("k", b"v") == "error"
    assert time.perf_counter() - start < 1.0  # two connect timeouts (0.2 s) at most, not 10 s
    assert tier.breaker.state == "open"
    tier.close()


def test_a_host_name_is_looked_up_behind_the_requests_and_followed_when_it_moves(
    redis_flushed, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(redis_flushed.url.rsplit(":", 1)[1].split("/")[0])
    answers = {"redis.moving.test": "127.0.0.1"}
    asked = _dns(answers, set(), monkeypatch)
    tier = RedisTier(RedisSettings(url=f"redis://redis.moving.test:{port}/0", failure_threshold=1, open_seconds=0.2))
    assert tier.put("k", b"v") == "stored" and tier.get("k") == ("hit", b"v")
    assert asked == ["redis.moving.test"]  # once, not per command
    answers["redis.moving.test"] = "127.0.0.2"  # nothing listens there: Redis "moved" away
    tier._resolver.failed()
    deadline = time.monotonic() + 5
    while tier.get("k")[0] == "hit" and time.monotonic() < deadline:  # the new address arrives behind
        time.sleep(0.05)
    assert tier.breaker.state == "open"
    answers["redis.moving.test"] = "127.0.0.1"  # and back: the failure asked for a fresh lookup
    deadline = time.monotonic() + 5
    while tier.get("k") != ("hit", b"v") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tier.get("k") == ("hit", b"v")
    tier.close()


def test_a_name_with_a_dead_first_address_is_served_by_the_next(redis_flushed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first address was kept: an IPv6 address first where Redis listens on IPv4 only, or a dead
    one among several, failed every call where a connect through the name would have tried the next."""
    port = int(redis_flushed.url.rsplit(":", 1)[1].split("/")[0])
    _dns({"redis.two.test": ["127.0.0.2", "127.0.0.1"]}, set(), monkeypatch)  # nothing listens on .2
    tier = RedisTier(RedisSettings(url=f"redis://redis.two.test:{port}/0", failure_threshold=3))
    assert tier.put("k", b"v") == "error"  # the first address
    assert tier.put("k", b"v") == "stored" and tier.get("k") == ("hit", b"v")
    assert tier.breaker.state == "closed"
    tier.close()


def test_failures_are_logged_when_they_open_the_breaker_and_when_it_closes(
    redis_flushed, caplog: pytest.LogCaptureFixture
) -> None:
    """Failures were only counted: a wrong password, a full server or a timeout looked the same."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0", failure_threshold=2, open_seconds=0.1))
    with caplog.at_level("WARNING", logger="ray.serve"):
        for _ in range(4):
            tier.get("k")
    failing = [r.getMessage() for r in caplog.records if "is failing" in r.getMessage()]
    assert len(failing) == 1 and "ConnectionError" in failing[0]
    tier.close()

    caplog.clear()
    tier = RedisTier(RedisSettings(url=redis_flushed.url, failure_threshold=1, open_seconds=0.1))

    def fails(client: object) -> None:
        raise ConnectionError("dropped")

    with caplog.at_level("WARNING", logger="ray.serve"):
        tier._run(fails)
        time.sleep(0.15)
        assert tier.get("k") == ("miss", None)  # the trial succeeds
    messages = [r.getMessage() for r in caplog.records]
    assert any("is failing (ConnectionError: dropped)" in m for m in messages)
    assert any("answers again" in m for m in messages)
    tier.close()

    caplog.clear()
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    raw.rpush("a-list", "x")
    raw.config_set("maxmemory", "1")  # every write is refused: OOM
    try:
        with caplog.at_level("WARNING", logger="ray.serve"):
            for _ in range(3):
                assert tier.put("k", b"v") == "error"
    finally:
        raw.config_set("maxmemory", "128mb")
    refused = [r.getMessage() for r in caplog.records if "refused SET" in r.getMessage()]
    assert len(refused) == 1 and "OutOfMemoryError" in refused[0]  # once a minute, not per write
    tier.close()
    raw.close()


def test_the_resolver_moves_once_per_unreachable_address_and_never_on_a_slow_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every failing request moved to the next address: two failing together on the bad one moved twice,
    back onto it, and a timeout on the good one moved off it."""
    from ierf.serving.cache import _HostResolver

    _dns({"redis.pair.test": ["127.0.0.2", "127.0.0.1"]}, set(), monkeypatch)
    resolver = _HostResolver("redis.pair.test", 6379)
    assert resolver.address(wait_s=2.0) == "127.0.0.2"
    resolver.failed("127.0.0.2")
    resolver.failed("127.0.0.2")  # the second request that failed on it: already moved
    assert resolver.address(wait_s=0) == "127.0.0.1"
    resolver.failed(None)  # a timeout: the address answered, slowly
    assert resolver.address(wait_s=0) == "127.0.0.1"


def test_an_uncounted_lookup_is_not_observed_in_any_tier_or_outcome(redis_flushed: object) -> None:
    """Guards ``get(counted=False)`` in every branch: the worker's own logits check after a cold decomposition
    must not reach the hit-ratio metrics (README: cache requests by tier and result count what requests
    found). With L1 off a Predict's logits may still be deferred (or in Redis); such a lookup counted there
    read as a request's L2 hit."""
    tier = RedisTier(RedisSettings(url=redis_flushed.url))  # type: ignore[attr-defined]
    recorder = Recorder()
    cache = TieredCache(0, tier, recorder, write_behind_bytes=64 * 1024 * 1024)  # L1 off: reads go to L2
    tensors = _tensors()
    assert cache.put(KEY, object(), 1, tensors, background=True, deferred=True) == "queued"
    assert cache.get(KEY, _rebuild, counted=False).tier == "l2"  # the deferred object itself
    assert cache.get(KEY + ":absent", _rebuild, counted=False).tier == "miss"
    assert cache.write_deferred() == 1 and cache.flush(timeout_s=5)
    fresh = TieredCache(0, tier, recorder)  # another replica: decoded from Redis
    assert fresh.get(KEY, _rebuild, counted=False).tier == "l2"
    assert [event for event in recorder.events if event[1] == "get"] == []
    assert fresh.get(KEY, _rebuild).tier == "l2" and ("l2", "get", "hit") in recorder.events  # counted by default


def test_a_value_is_not_encoded_for_a_redis_the_breaker_knows_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """During an outage each new decomposition was still encoded (~3 ms of the worker's compute thread for a
    ResNet50's 3.6 MB) before its write was skipped: with the breaker open, the put is skipped unencoded."""
    from ierf.serving import cache as cache_module

    tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{_closed_port()}/0", failure_threshold=1))
    assert tier.get("k") == ("error", None) and tier.breaker.state == "open"
    encoded: list[str] = []
    real = cache_module.encode_tensors
    monkeypatch.setattr(cache_module, "encode_tensors", lambda key, t: encoded.append(key) or real(key, t))
    cache = TieredCache(1 << 20, tier, write_behind_bytes=1 << 20)
    tensors = _tensors()
    assert cache.put(KEY, object(), 1, tensors) == "skipped"
    assert cache.put(KEY + ":b", object(), 1, tensors, background=True) == "skipped"
    assert cache.put(KEY + ":c", object(), 1, tensors, background=True, deferred=True) == "queued"
    assert cache.write_deferred() == 0 and not encoded
    cache.close()


def test_a_password_protected_redis_serves_the_url_with_its_password_and_refuses_others_as_misses(
    redis_flushed, caplog: pytest.LogCaptureFixture
) -> None:
    """deploy/k8s runs Redis with requirepass and hands the password in IERF_REDIS_URL
    (redis://:PASSWORD@host): that form must authenticate, and a wrong or missing password must be a
    miss that never names the password, not a failed request."""
    import redis

    password = "3f9c2a7e1b"
    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    raw.config_set("requirepass", password)
    try:
        authed = redis.Redis.from_url(f"redis://:{password}@127.0.0.1:{redis_flushed.port}/0", socket_timeout=2)
        host = f"127.0.0.1:{redis_flushed.port}/0"
        tier = RedisTier(RedisSettings(url=f"redis://:{password}@{host}"))
        assert tier.put("k", b"v") == "stored" and tier.get("k") == ("hit", b"v")
        assert password not in tier.where
        tier.close()
        for url in (f"redis://:wrong@{host}", f"redis://{host}"):
            tier = RedisTier(RedisSettings(url=url, failure_threshold=1))
            with caplog.at_level("WARNING", logger="ray.serve"):
                assert tier.get("k") == ("error", None)
                assert tier.put("k", b"other") == "skipped"
            tier.close()
        assert authed.get("k") == b"v"
        assert any("is failing" in r.getMessage() for r in caplog.records)
        assert not any(password in r.getMessage() for r in caplog.records)
    finally:
        authed.config_set("requirepass", "")
        authed.close()
        raw.close()

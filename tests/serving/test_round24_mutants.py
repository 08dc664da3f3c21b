"""Mutation round 24 on ``ierf.serving.cache`` (the safetensors codec, the byte-bounded L1, the circuit breaker,
the Redis tier and its watchdog, write-behind and deferred writes).

Each test fails on a plausible slip that the suite let through: a header of exactly the codec's bound refused by
the writer or the reader; a header that is not UTF-8, metadata that is not an object or a payload safetensors
cannot parse escaping ``decode_tensors`` as something other than ``CodecError``; ``ByteLRU.clear`` keeping its byte
count; a failed half-open trial (or every success) logged as a change of state; a whole-operation cap grown past
twice the read timeout; a command that overran its deadline counted as a success; a reply that is not bytes served
as a hit; the client's read or connect timeout left out (the watchdog's cap hid both); the write-behind thread
dying on a write that raised, or on the bookkeeping of a write in flight at close; a value served from the deferred
map not refilling L1 or counted as a miss; ``discard`` leaving Redis alone; a value deferred again while the first
was being made lost, with the deferred bytes drifting; ``flush`` skipping deferred values; a value read from the
write-behind queue sized as bytes that came from Redis; ``close`` leaving the Redis connections open; single-flight
forgetting a key's lock that a second request holds; and the host resolver going back to a dead first address on a
refresh, or waiting ``refresh_s`` after a failed lookup.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import zlib
from typing import Any

import pytest
import torch
from ierf.serving.cache import (
    CODEC_FORMAT,
    MAX_HEADER_BYTES,
    ByteLRU,
    CacheKey,
    CircuitBreaker,
    CodecError,
    RedisSettings,
    RedisTier,
    TieredCache,
    decode_tensors,
    encode_tensors,
)

from serving.test_cache import FakeRedis, _dns

KEY = CacheKey("decomposition", "m", "digest", "prep-v1", "srd", "srd-0.1.0", "cd" * 32).redis_key()


def _forge(header: dict[str, object] | bytes, data: bytes = b"", key: str = KEY) -> bytes:
    """A value laid out as the codec lays it out, with its own header: the metadata (format, key, the data's
    CRC-32) is filled in when ``header`` is a dict, so only what the test changes is wrong."""
    if isinstance(header, dict):
        header = {"__metadata__": {"format": CODEC_FORMAT, "key": key, "crc32": f"{zlib.crc32(data):08x}"}, **header}
        header = json.dumps(header).encode()
    return struct.pack("<Q", len(header)) + header + data


# ---- codec ---------------------------------------------------------------------------------------------------
def test_a_header_of_exactly_the_bound_is_written_and_read() -> None:
    """M06 (writer ``len(text) >= MAX_HEADER_BYTES``) and M08 (reader ``header_len >= MAX_HEADER_BYTES``): the
    bound is the largest header the codec writes, so one of exactly that size must round-trip; an off-by-one
    in either side turns such a value into an L1-only value or a miss on every read."""
    probe = encode_tensors(KEY, {"a": torch.zeros(1)})
    (padded,) = struct.unpack("<Q", probe[:8])
    unpadded = len(probe[8 : 8 + padded].rstrip(b" "))
    name = "a" * (1 + MAX_HEADER_BYTES - unpadded)  # the header grows by one byte per character of the name
    tensors = {name: torch.tensor([2.5])}  # the probe's shape and offsets: same width
    data = encode_tensors(KEY, tensors)
    assert struct.unpack("<Q", data[:8])[0] == MAX_HEADER_BYTES
    assert torch.equal(decode_tensors(KEY, data)[name], tensors[name])
    with pytest.raises(CodecError, match="header"):  # one byte more (padded to the next 8) is refused
        encode_tensors(KEY, {name + "b": tensors[name]})


def test_a_header_that_is_not_utf8_is_a_codec_error() -> None:
    """M10 (``UnicodeDecodeError`` left out of the JSON errors caught): ``decode_tensors`` promises
    CodecError for anything that is not this codec's value; a header with a byte that is not UTF-8 raised
    UnicodeDecodeError instead."""
    with pytest.raises(CodecError, match="not JSON"):
        decode_tensors(KEY, _forge(b'{"\xff\xfe":1}'))


@pytest.mark.parametrize("metadata", [["format", CODEC_FORMAT], "ierf", 7])
def test_metadata_that_is_not_an_object_is_a_codec_error(metadata: object) -> None:
    """M13 (``meta = meta or {}`` for the isinstance check): a value whose ``__metadata__`` is a list, a string
    or a number raised AttributeError from ``.get`` instead of CodecError."""
    with pytest.raises(CodecError, match="format"):
        decode_tensors(KEY, _forge(json.dumps({"__metadata__": metadata}).encode()))


def test_a_payload_safetensors_cannot_parse_is_a_codec_error() -> None:
    """M18 (the ``load`` errors narrowed to ValueError): a value with this codec's metadata, key and a
    matching CRC whose tensor table does not fit its data (safetensors raises its own error type) must be a
    CodecError like any other unreadable value."""
    data = b"\x00" * 8
    bad_shape = {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 8]}}  # 5 floats in 8 bytes
    with pytest.raises(CodecError, match="does not parse"):
        decode_tensors(KEY, _forge(bad_shape, data))
    past_end = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(CodecError, match="does not parse"):
        decode_tensors(KEY, _forge(past_end, data))


# ---- L1 ------------------------------------------------------------------------------------------------------
def test_clearing_the_lru_gives_back_its_bytes() -> None:
    """M26 (``clear`` empties the entries but keeps ``_bytes``): afterwards every put evicted everything else
    and ``nbytes`` reported memory nobody held."""
    lru: ByteLRU[str] = ByteLRU(100)
    assert lru.put("a", "A", 60) and lru.put("b", "B", 40)
    lru.clear()
    assert lru.nbytes == 0 and len(lru) == 0
    assert lru.put("c", "C", 50) and lru.put("d", "D", 50)
    assert lru.get("c") == "C" and lru.get("d") == "D" and lru.nbytes == 100


# ---- breaker -------------------------------------------------------------------------------------------------
def test_only_the_failure_that_opens_the_breaker_says_so() -> None:
    """M34 (``record_failure`` returns whether the breaker is open, not whether this failure opened it): each
    failed half-open trial during an outage then logged "Redis ... is failing" again, once per open period,
    where the log promises one line when the breaker opens and one when it closes."""
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, open_seconds=1.0, clock=lambda: now[0])
    assert breaker.record_failure() is False  # one failure: still closed
    assert breaker.record_failure() is True  # this one opened it
    for trial in range(3):
        now[0] += 1.0
        assert breaker.allow(), trial
        assert breaker.record_failure() is False, trial  # a failed trial re-opens: no new outage
    now[0] += 1.0
    assert breaker.allow() and breaker.record_success() is True  # the trial that closes it says so
    assert breaker.record_success() is False  # and later successes do not


# ---- Redis tier ----------------------------------------------------------------------------------------------
def test_a_trickled_reply_is_abandoned_within_twice_the_read_timeout() -> None:
    """M36 (the whole-operation cap scaled up, ``20 * timeout_s``): the suite's trickle test measured the
    abandonment against ``operation_timeout_s`` itself, so any cap passed. A reply trickled a byte at a time
    must be given up at two read timeouts and a connect timeout, in wall-clock seconds."""
    fake = FakeRedis(b"$100000\r\n" + b"x" * 100000 + b"\r\n", chunk=1, interval_s=0.1)
    tier = RedisTier(RedisSettings(url=fake.url, connect_timeout_s=0.1, timeout_s=0.3, failure_threshold=5))
    try:
        assert tier.settings.operation_timeout_s == pytest.approx(0.7)
        start = time.perf_counter()
        assert tier.get("k") == ("error", None)
        assert time.perf_counter() - start < 0.7 + 1.5  # a loaded CI host; the mutant's cap was 6.1 s
    finally:
        tier.close()
        fake.close()


def test_a_command_that_overran_is_a_failure_even_when_it_then_returns(redis_flushed: Any) -> None:
    """M38 (the watchdog never marks the overrun), M44 (an overrun not counted as a breaker failure), M45 (its
    result returned) and M39 (overrun marks never forgotten): a command that got past its deadline (here it
    stalls, then reconnects and reads) is an error and a failure for the breaker, whatever it returns later,
    and the watchdog keeps nothing of it."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    raw.set("k", b"v")
    tier = RedisTier(RedisSettings(url=redis_flushed.url, connect_timeout_s=0.1, timeout_s=0.1, failure_threshold=1))
    try:
        late = tier.settings.operation_timeout_s + 0.2
        assert tier._run(lambda client: (time.sleep(late), client.get("k"))[1]) == ("error", None)
        assert tier.breaker.state == "open"
        assert not tier._watchdog._overran and not tier._watchdog._deadlines
    finally:
        tier.close()
        raw.close()


def _listener(backlog: int) -> socket.socket:
    return socket.create_server(("127.0.0.1", 0), backlog=backlog)


def test_a_silent_server_costs_one_read_timeout_not_the_whole_operation_cap() -> None:
    """M41 (``socket_timeout`` left out of the client's options): the watchdog's whole-operation cap
    (2 read timeouts + the connect timeout) still ended the read, so the suite's black-hole test passed; but
    each request then waited twice the read timeout the settings promise, for every call until the
    breaker opened."""
    with _listener(8) as silent:  # accepts (the kernel's handshake), never answers
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        tier = RedisTier(RedisSettings(url=url, connect_timeout_s=1.5, timeout_s=0.5, failure_threshold=5))
        try:
            start = time.perf_counter()
            assert tier.get("k") == ("error", None)
            assert time.perf_counter() - start < 1.5  # the read timeout (0.5 s), not the 2.5 s cap
        finally:
            tier.close()


def test_a_connect_that_is_never_accepted_costs_the_connect_timeout() -> None:
    """M42 (``socket_connect_timeout`` left out): redis-py then waited the read timeout on a connect (a Redis
    host that drops SYNs: its accept queue full, a firewall), five times the 0.2 s the settings give it."""
    with _listener(0) as full:
        port = full.getsockname()[1]
        queued = []
        for _ in range(4):  # fill the accept queue: later SYNs are dropped and the connect hangs
            pending = socket.socket()
            pending.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                pending.connect(("127.0.0.1", port))
            queued.append(pending)
        tier = RedisTier(RedisSettings(url=f"redis://127.0.0.1:{port}/0", connect_timeout_s=0.2, timeout_s=3.0))
        try:
            start = time.perf_counter()
            assert tier.get("k") == ("error", None)
            assert time.perf_counter() - start < 1.5  # not the 3 s read timeout
        finally:
            tier.close()
            for pending in queued:
                pending.close()


# ---- tiers and write-behind ----------------------------------------------------------------------------------
def test_a_write_that_raises_does_not_stop_the_write_behind_thread() -> None:
    """M60 (the writer thread's ``except Exception`` narrowed to OSError): a write that raised anything else
    (an observer that fails, a bug in the writer) ended the only writer thread; later writes were queued and
    never sent, so nothing more reached Redis for the replica's life, and each stayed in memory until the
    budget filled."""
    from ierf.serving.cache import _WriteBehind

    written: list[str] = []

    def write(key: str, value: bytes) -> None:
        if key == "bad":
            raise RuntimeError("observer failed")
        written.append(key)

    behind = _WriteBehind(write, 1000)
    try:
        assert behind.submit("bad", b"x") and behind.flush(5)
        assert behind.pending_bytes == 0 and behind.peek("bad") is None
        assert behind.submit("good", b"y")
        assert behind.flush(5) and written == ["good"]
    finally:
        behind.close(1)


def test_a_deferred_value_served_from_memory_refills_l1_like_a_redis_hit(redis_flushed: Any) -> None:
    """M61 (the deferred-hit branch of ``get`` not putting the object back in L1): once L1 had evicted a
    value still waiting to be written, each read of it came from the deferred map, and after the write from
    Redis, decoded again, where any other L2 hit fills L1 for the next read. M104 (that hit observed as
    ``miss``): the suite checked only its size and the uncounted lookup, so the hit ratio could lose it."""
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    events: list[tuple[str, str, str]] = []
    cache = TieredCache(
        100, tier, lambda t, op, result, s, n: events.append((t, op, result)), write_behind_bytes=1 << 20
    )
    obj, other = object(), object()
    tensors = {"x": torch.zeros(4)}
    try:
        assert cache.put(KEY, obj, 100, tensors, background=True, deferred=True) == "queued"
        cache.put(KEY + ":other", other, 100, None)  # evicts the first value from L1
        assert cache.l1.get(KEY) is None
        events.clear()
        found = cache.get(KEY, lambda state: (state, 0))
        assert found.tier == "l2" and found.value is obj
        assert cache.l1.get(KEY) is obj
        assert events == [("l1", "get", "miss"), ("l2", "get", "hit"), ("l1", "put", "stored")]
    finally:
        cache.close(timeout_s=5)


def test_discarding_a_value_removes_it_from_redis_too(redis_flushed: Any) -> None:
    """M67 (``discard`` leaving Redis alone): the worker discards a decoded value it cannot use so that it is
    computed again once; left in Redis, every replica (this one too, once L1 is gone) read it back, found
    it unusable and recomputed, until its TTL, six hours by default."""
    import redis

    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    cache = TieredCache(1 << 20, tier)
    tensors = {"x": torch.arange(4, dtype=torch.float32)}
    try:
        assert cache.put(KEY, tensors, 16, tensors) == "stored" and raw.exists(KEY)
        cache.discard(KEY)
        assert not raw.exists(KEY) and cache.l1.get(KEY) is None
        assert TieredCache(0, tier).get(KEY, lambda state: (state, 16)).tier == "miss"
    finally:
        cache.close()
        raw.close()


def test_a_value_deferred_again_while_the_first_is_being_written_is_kept_and_written(redis_flushed: Any) -> None:
    """M76 (``write_deferred`` removing the key's entry without checking it is still the one it wrote): a put
    of the same key while the first value's tensors were being made (another request for the image) lost the
    newer value, so Redis kept the older one, and took the older size off the deferred bytes while the newer
    size stayed counted: the budget drifted by the difference each time, until every write was dropped."""
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, write_behind_bytes=1 << 20)
    newer = {"x": torch.arange(8, dtype=torch.float32)}

    def make_older() -> dict[str, torch.Tensor]:
        # another request stores the image again while this value is being made
        assert cache.put(KEY, object(), 1, newer, background=True, deferred=True) == "queued"
        return {"x": torch.zeros(2)}

    try:
        assert cache.put(KEY, object(), 1, make_older, background=True, deferred=True, tensors_size=8) == "queued"
        cache.write_deferred()
        assert not cache.has_deferred() and cache._deferred_bytes == 0
        assert cache.flush(timeout_s=5)
        status, data = tier.get(KEY)
        assert status == "hit" and torch.equal(decode_tensors(KEY, data)["x"], newer["x"])
    finally:
        cache.close(timeout_s=5)


def test_flush_writes_what_was_deferred(redis_flushed: Any) -> None:
    """M79 (``flush`` only waiting for the queue): a deferred value is not queued yet, so flush returned True
    ("none is left") with the value still unwritten, and a test or a shutdown that flushed and then read
    Redis missed it."""
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, write_behind_bytes=1 << 20)
    tensors = {"x": torch.arange(4, dtype=torch.float32)}
    try:
        assert cache.put(KEY, object(), 1, tensors, background=True, deferred=True) == "queued"
        assert cache.flush(timeout_s=5)
        assert not cache.has_deferred() and tier.get(KEY)[0] == "hit"
    finally:
        cache.close(timeout_s=5)


def test_a_value_read_from_the_write_behind_queue_moves_no_redis_bytes(redis_flushed: Any) -> None:
    """M83 (``moved`` counting a value peeked from the write-behind queue): the value-size histogram is for
    bytes that came from Redis; the suite checked the deferred branch only. Here the SET is held by Redis
    itself (``CLIENT PAUSE ... WRITE``) while the same key is read from the queued bytes."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    sizes: list[tuple[str, str, str, int]] = []
    tier = RedisTier(RedisSettings(url=redis_flushed.url, timeout_s=3.0))  # outlasts the pause
    cache = TieredCache(
        0, tier, lambda t, op, result, s, n: sizes.append((t, op, result, n)), write_behind_bytes=1 << 20
    )
    tensors = {"x": torch.arange(64, dtype=torch.float32)}
    try:
        raw.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # ms
        assert cache.put(KEY, object(), 1, tensors, background=True) == "queued"
        found = cache.get(KEY, lambda state: (state, 256))
        assert found.tier == "l2" and torch.equal(found.value["x"], tensors["x"])
        assert ("l2", "get", "hit", 0) in sizes, sizes
        assert cache.flush(timeout_s=5) and tier.get(KEY)[0] == "hit"  # and the SET landed after the pause
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
        cache.close(timeout_s=5)
        raw.close()


def test_a_write_in_flight_when_the_queue_closes_ends_its_thread_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    """M87 (the writer's bookkeeping after a write no longer skipped once closed): ``close`` gives up on a write
    still in flight and clears the pending table; when that write returned, the thread looked its key up in
    the cleared table and died on a KeyError, a traceback in every replica's log at each slow shutdown."""
    from ierf.serving.cache import _WriteBehind

    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))
    started, release = threading.Event(), threading.Event()

    def write(key: str, value: bytes) -> None:
        started.set()
        release.wait(5)

    behind = _WriteBehind(write, 1000)
    assert behind.submit("k", b"value") and started.wait(5)
    behind.close(0.05)  # gives up on the write in flight
    release.set()
    assert behind._thread is not None
    behind._thread.join(5)
    assert not behind._thread.is_alive() and raised == [] and behind.pending_bytes == 0


def test_a_third_request_waits_while_the_second_holds_the_key() -> None:
    """M99 (``single_flight`` setting the users to 1 instead of counting them): when the first request left,
    the key's lock was forgotten although the second held it, so a third request for the image got a fresh
    lock and computed it again beside the second."""
    cache = TieredCache(1000)
    order: list[str] = []
    a_in, b_in, release_a, release_b = (threading.Event() for _ in range(4))

    def hold(name: str, inside: threading.Event, release: threading.Event) -> None:
        with cache.single_flight("k"):
            inside.set()
            release.wait(5)
            order.append(name)

    def third() -> None:
        with cache.single_flight("k"):
            order.append("c")

    a = threading.Thread(target=hold, args=("a", a_in, release_a))
    b = threading.Thread(target=hold, args=("b", b_in, release_b))
    c = threading.Thread(target=third)
    a.start()
    assert a_in.wait(5)
    b.start()
    time.sleep(0.1)  # b now waits on the key's lock
    release_a.set()
    assert b_in.wait(5)
    c.start()
    time.sleep(0.1)
    assert order == ["a"]  # c waits for b
    release_b.set()
    for thread in (a, b, c):
        thread.join(5)
    assert order == ["a", "b", "c"] and cache._key_locks == {}


def test_a_new_lookup_keeps_the_address_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """M100 (a changed answer always restarting at its first address): a name whose first address is dead
    moved to the next one after a failure; the next refresh that added an address put requests back on the
    dead one, one more failed command per replica and refresh."""
    from ierf.serving.cache import _HostResolver

    answers: dict[str, str | list[str]] = {"redis.three.test": ["127.0.0.2", "127.0.0.1"]}
    _dns(answers, set(), monkeypatch)
    resolver = _HostResolver("redis.three.test", 6379)
    assert resolver.address(wait_s=2.0) == "127.0.0.2"
    resolver.failed("127.0.0.2")  # refused: move on, and look the name up again
    assert resolver.address(wait_s=0) == "127.0.0.1"
    deadline = time.monotonic() + 5
    while resolver._busy and time.monotonic() < deadline:
        time.sleep(0.01)
    answers["redis.three.test"] = ["127.0.0.3", "127.0.0.2", "127.0.0.1"]  # one more address, listed first
    resolver.failed(None)  # a timeout: asks for a fresh lookup, moves nothing
    while len(resolver._addresses) != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(resolver._addresses) == 3 and resolver.address(wait_s=0) == "127.0.0.1"


def test_a_failed_lookup_is_retried_after_retry_s_not_refresh_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """M101 (a failed lookup scheduling the next one at ``refresh_s``): with DNS down when a replica started,
    the breaker's half-open trial found no lookup due and failed without an address, so Redis stayed unused
    for another open period after DNS came back; ``retry_s`` lets the trial's own lookup find it."""
    from ierf.serving.cache import _HostResolver

    real = socket.getaddrinfo
    dns_up = [False]

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "redis.late.test":
            if not dns_up[0]:
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    resolver = _HostResolver("redis.late.test", 6379, refresh_s=30.0, retry_s=0.1)
    deadline = time.monotonic() + 5
    while (resolver._busy or resolver._next_at == 0.0) and time.monotonic() < deadline:
        time.sleep(0.01)  # the first lookup failed
    assert resolver.address(wait_s=0) is None
    dns_up[0] = True
    time.sleep(0.15)  # past retry_s
    assert resolver.address(wait_s=2.0) == "127.0.0.1"


def test_closing_the_cache_closes_its_redis_connections(redis_flushed: Any) -> None:
    """M108 (``TieredCache.close`` not closing its Redis tier): a worker's host closed on redeploy or model
    drop left its connections open on Redis (each thread's client: the request threads', the write-behind
    thread's) and its watchdog thread polling, per host, for the life of the process."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    before = len(raw.client_list())
    tier = RedisTier(RedisSettings(url=redis_flushed.url))
    cache = TieredCache(0, tier, write_behind_bytes=1 << 20)
    tensors = {"x": torch.zeros(4)}
    assert cache.put(KEY, object(), 1, tensors) == "stored"  # this thread's client
    assert cache.put(KEY + ":b", object(), 1, tensors, background=True) == "queued"  # the writer's
    assert cache.flush(timeout_s=5) and len(raw.client_list()) == before + 2
    cache.close(timeout_s=5)
    deadline = time.monotonic() + 5
    while len(raw.client_list()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(raw.client_list()) == before and tier._watchdog._stop.is_set()
    raw.close()


def test_a_reply_that_is_not_bytes_is_an_error_not_a_hit(redis_flushed: Any) -> None:
    """M90 (the ``isinstance(value, bytes)`` check dropped): a URL with ``decode_responses=true`` (redis-py
    reads it from the query) makes every reply text; such a reply was returned as a hit, so the cache decoded
    text, counted it as corruption and deleted the key, a value the next replica had written correctly."""
    import redis

    raw = redis.Redis.from_url(redis_flushed.url, socket_timeout=2)
    raw.set("k", b"ascii value")
    tier = RedisTier(RedisSettings(url=redis_flushed.url + "?decode_responses=true"))
    try:
        assert tier.get("k") == ("error", None)
        assert raw.get("k") == b"ascii value"
    finally:
        tier.close()
        raw.close()

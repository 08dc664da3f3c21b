"""Two-tier cache for target-independent work per image: in-process LRU (L1) in front of Redis (L2).

Why: on CPU the SRD decomposition of one image (forward pass + sharing ratios) costs seconds while
every further class, layer or PFV on that image is a cheap scatter. Caching the decomposition's flat
tensors lets a second request reuse them, within a replica (L1) and across replicas/restarts (L2).

Rules that keep the cache from ever failing a request:
- values are safetensors bytes (a JSON header + raw arrays) whose metadata echoes the key; anything
  that does not parse or does not match is a miss (never pickle: whoever can write to Redis would
  otherwise run code in every worker);
- the Redis client has short timeouts and no retries, behind a circuit breaker; every Redis error is
  a miss (or a skipped write), counted for the metrics, never raised;
- values over a size cap are not sent to Redis;
- writes may go behind the request (``TieredCache(write_behind_bytes=...)``): a slow Redis then delays
  no response by its writes, and a key still being written is read from the queued bytes;
- a write may also wait, unencoded, until its caller says no answer is waiting (``put(..., deferred=True)``,
  then :meth:`TieredCache.write_deferred`): encoding and sending a 3.6 MB decomposition while the
  request that computed it was still explaining and answering made cold requests ~8 ms slower on 2 cores.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import math
import socket
import struct
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

logger = logging.getLogger("ray.serve")  # Serve writes it to the replica's log

SCHEMA_VERSION = "v1"
CODEC_FORMAT = "ierf-safetensors-2"  # -2: the metadata carries a CRC-32 of the tensor data
T = TypeVar("T")

# Observer signature: (tier, op, result, seconds, nbytes). tier "l1"|"l2"; op "get"|"put"; result
# "hit"|"miss"|"error"|"corrupt"|"skipped"|"too_big"|"stored"|"dropped" — a bounded set, safe as metric
# labels. "corrupt": Redis answered, but the value under the key failed its checks (format, key, CRC, the
# engine's layout): corruption, or someone else writing to this Redis, which an outage must not hide.
# nbytes: for l2, the bytes that went to or came from Redis (0 when none did: a value served from this
# replica's own write-behind queue, one refused or dropped before it was sent, or a SET Redis never answered
# (refused connection, timeout)); for l1, the value's size.
CacheObserver = Callable[[str, str, str, float, int], None]


def _noop_observer(tier: str, op: str, result: str, seconds: float, nbytes: int) -> None:
    return None


@dataclass(frozen=True)
class CacheKey:
    """Everything an artifact depends on. ``artifact`` names what is stored (e.g. "decomposition")."""

    artifact: str
    model_id: str
    weights_digest: str
    preprocess_version: str
    method: str
    method_version: str
    content_hash: str

    def redis_key(self) -> str:
        codec = CODEC_FORMAT.removeprefix("ierf-")  # another build's format is its value, not corruption here
        return (
            f"ierf:{SCHEMA_VERSION}:{codec}:{self.artifact}:{self.model_id}:{self.weights_digest}:"
            f"{self.preprocess_version}:{self.method}@{self.method_version}:{self.content_hash}"
        )


# --------------------------------------------------------------------------------------------- codec
class CodecError(ValueError):
    """Bytes under a key are not a value this version wrote for this key."""


# torch dtype -> safetensors dtype name (the format's own spelling)
_SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


# Bounds on a value's header. The largest decomposition measured (EfficientNet-B7) lists 660 tensors in
# 51 KB; past these a value is not one this codec wrote, and reading it on (safetensors builds every
# listed tensor: 100,000 empty ones held the compute thread 2-4 s) would let whoever can write to Redis
# stall a replica per planted key. The writer keeps to the same bounds (larger values stay in L1).
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 8192


def encode_tensors(key: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """Flat tensors -> safetensors bytes whose metadata records the codec format, the key and a CRC-32
    of the tensor data (a flipped bit in memory or on the wire is a miss, not a silently wrong map;
    ~1.4 ms for 3.6 MB, against ~6 ms for a cryptographic digest that would only matter to someone who
    can write to this Redis anyway).

    Written directly (8-byte header length, JSON header, raw little-endian data) rather than through
    ``safetensors.torch.save``, which spent ~11 ms on a ResNet50 decomposition's 153 tensors (3.4 MB)
    against ~2 ms here: that was on every cold request. Any safetensors reader loads the result.
    """
    if sys.byteorder != "little":  # the format is little-endian; this writer copies memory as is
        raise CodecError("the safetensors writer needs a little-endian host")
    if len(tensors) > MAX_TENSORS:
        raise CodecError(f"{len(tensors)} tensors: the cache stores at most {MAX_TENSORS} per value")
    arrays = []
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise CodecError(f"tensor {name!r} has dtype {tensor.dtype}, which the cache does not store")
        arrays.append((name, tensor.detach().to("cpu").contiguous()))
    # Widest elements first (then by name), so every tensor starts at a multiple of its element size.
    arrays.sort(key=lambda item: (-item[1].element_size(), item[0]))
    metadata = {"format": CODEC_FORMAT, "key": key}
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[Any] = []
    offset = 0
    crc = 0
    for name, tensor in arrays:
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        crc = zlib.crc32(raw, crc)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        chunks.append(raw)
        offset += raw.nbytes
    metadata["crc32"] = f"{crc:08x}"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data then starts 8-byte aligned, as the format recommends
    if len(text) > MAX_HEADER_BYTES:
        raise CodecError(f"a {len(text)}-byte header: the cache stores headers of at most {MAX_HEADER_BYTES} bytes")
    return b"".join([struct.pack("<Q", len(text)), text, *chunks])


def _read_header(data: bytes) -> tuple[dict[str, Any], int]:
    """The JSON header and where the tensor data starts."""
    if len(data) < 8:
        raise CodecError(f"value is {len(data)} bytes, too short for a header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CodecError("header length points past the value")
    if header_len > MAX_HEADER_BYTES:
        raise CodecError(f"a {header_len}-byte header is past the {MAX_HEADER_BYTES} this codec writes")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CodecError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CodecError("header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:  # and __metadata__
        raise CodecError(f"the header lists {len(header) - 1} tensors, past the {MAX_TENSORS} this codec writes")
    return header, 8 + header_len


def decode_tensors(key: str, data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_tensors`; raises CodecError for anything else (garbage, other key)."""
    from safetensors.torch import load

    header, data_start = _read_header(data)
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("format") != CODEC_FORMAT:
        raise CodecError(f"value format {meta.get('format')!r} is not {CODEC_FORMAT!r}")
    if meta.get("key") != key:
        raise CodecError("value was written under another key")
    if meta.get("crc32") != f"{zlib.crc32(memoryview(data)[data_start:]):08x}":
        raise CodecError("tensor data does not match its CRC-32 (corrupted in memory or on the wire)")
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types for corrupt payloads
        raise CodecError(f"payload does not parse: {exc}") from None


_Tensors = dict[str, torch.Tensor] | Callable[[], dict[str, torch.Tensor]]


def tensors_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------------------------------------- L1
class ByteLRU(Generic[T]):
    """Thread-safe LRU bounded by the sum of the values' declared byte sizes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._items: OrderedDict[str, tuple[T, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> T | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: str, value: T, nbytes: int) -> bool:
        """Insert, evicting least-recently-used entries; values bigger than the capacity are refused."""
        if nbytes > self.capacity_bytes:
            return False
        with self._lock:
            self._discard_locked(key)
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.capacity_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
            return True

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency (a check, not a use)."""
        with self._lock:
            return key in self._items

    def discard(self, key: str) -> None:
        with self._lock:
            self._discard_locked(key)

    def _discard_locked(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


# ----------------------------------------------------------------------------------------- breaker
class CircuitBreaker:
    """After ``failure_threshold`` consecutive failures, skip calls for ``open_seconds``.

    Then one trial call is let through (half-open): success closes the breaker, failure re-opens it.
    Why: a dead or black-holed Redis must cost each request nothing, not one timeout per request.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        open_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.open_seconds:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        with self._lock:
            state = self._state_locked()
            if state == "closed":
                return True
            if state == "half_open" and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def record_success(self) -> bool:
        """Count a success; True when it closes an open breaker."""
        with self._lock:
            was_open = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
            self._trial_in_flight = False
            return was_open

    def record_failure(self) -> bool:
        """Count a failure; True when it opens a closed breaker."""
        with self._lock:
            was_open = self._opened_at is not None
            self._failures += 1
            self._trial_in_flight = False
            if was_open or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            return not was_open and self._opened_at is not None


# ---------------------------------------------------------------------------------------------- L2
@dataclass(frozen=True)
class RedisSettings:
    url: str
    connect_timeout_s: float = 0.2
    timeout_s: float = 1.0  # per socket read or write
    ttl_s: int = 6 * 3600
    max_value_bytes: int = 64 * 1024 * 1024
    failure_threshold: int = 3
    open_seconds: float = 10.0

    @property
    def operation_timeout_s(self) -> float:
        """Whole-operation cap. ``timeout_s`` bounds each socket read, so a server that trickles its
        reply a byte at a time would otherwise hold a request (and the worker's thread) for hours."""
        return 2 * self.timeout_s + self.connect_timeout_s


class _Watchdog:
    """Enforces whole-operation deadlines on commands that run in the caller's thread.

    A thread polls the registered deadlines and, when one passes, calls that operation's ``on_overrun``
    (which drops the connections of the client that ran it: a socket shutdown wakes the stuck read, and
    commands of other threads, on their own clients, are left alone). Registering costs a dict insert:
    handing each command to another thread instead measured several ms per call in a busy Ray worker,
    where every hand-off waits for the GIL.
    """

    def __init__(self, period_s: float = 0.05) -> None:
        self._period_s = period_s
        self._deadlines: dict[int, tuple[float, Callable[[], None]]] = {}
        self._overran: set[int] = set()
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, timeout_s: float, on_overrun: Callable[[], None]) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="ierf-redis-watchdog", daemon=True)
                self._thread.start()
            self._next += 1
            self._deadlines[self._next] = (time.monotonic() + timeout_s, on_overrun)
            return self._next

    def end(self, token: int) -> bool:
        """True when the operation overran its deadline (its result, if any, is not to be trusted)."""
        with self._lock:
            self._deadlines.pop(token, None)
            if token in self._overran:
                self._overran.discard(token)
                return True
            return False

    def _watch(self) -> None:
        while not self._stop.wait(self._period_s):
            now = time.monotonic()
            with self._lock:
                late = [token for token, (deadline, _) in self._deadlines.items() if deadline <= now]
                actions = [self._deadlines.pop(token)[1] for token in late]
                self._overran.update(late)
            for action in actions:
                with contextlib.suppress(Exception):
                    action()

    def stop(self) -> None:
        self._stop.set()


class _HostResolver:
    """The Redis host's addresses, looked up on a thread of its own and refreshed in the background.

    redis-py resolves the host name on every (re)connect, in the calling thread: with a DNS server that
    does not answer, each command then blocked for the resolver's whole timeout (10 s with glibc's
    defaults, 20 s with a pod's search list), past every Redis timeout and out of the watchdog's reach.
    Requests connect to an address already found instead. A failure moves on to the name's next address
    (an IPv6 address first where Redis listens on IPv4 only, a dead one among several), as a connect
    through the name would have, and starts a fresh lookup at once: Redis may have moved.
    """

    def __init__(self, host: str, port: int, refresh_s: float = 30.0, retry_s: float = 1.0) -> None:
        self.host, self.port = host, port
        self.refresh_s, self.retry_s = refresh_s, retry_s
        self._addresses: list[str] = []
        self._current = 0
        self._next_at = 0.0
        self._busy = False
        self._found = threading.Event()
        self._lock = threading.Lock()
        self.address(wait_s=0.0)  # start the first lookup now

    def address(self, wait_s: float) -> str | None:
        """The address to connect to (waiting up to ``wait_s`` for a first lookup); starts a lookup in
        the background when the addresses are due for a refresh."""
        self._start_lookup_if_due()
        if not self._found.is_set() and wait_s > 0:
            self._found.wait(wait_s)
        with self._lock:
            return self._addresses[self._current] if self._addresses else None

    def failed(self, unreachable: str | None = None) -> None:
        """A command failed: look the name up again, and when ``unreachable`` (an address that refused or
        dropped the connection) is still the one in use, move to the next. A timeout on a reachable
        address moves nothing, and requests failing together on one address move once, not once each."""
        with self._lock:
            if self._addresses and unreachable == self._addresses[self._current]:
                self._current = (self._current + 1) % len(self._addresses)
            self._next_at = 0.0
        self._start_lookup_if_due()

    def _start_lookup_if_due(self) -> None:
        with self._lock:
            start = not self._busy and time.monotonic() >= self._next_at
            self._busy = self._busy or start
        if start:
            threading.Thread(target=self._lookup, name="ierf-redis-resolver", daemon=True).start()

    def _lookup(self) -> None:
        found: list[str] = []
        with contextlib.suppress(OSError, UnicodeError):  # no answer: keep the addresses found before
            for *_, sockaddr in socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM):
                if str(sockaddr[0]) not in found:
                    found.append(str(sockaddr[0]))
        with self._lock:
            self._busy = False
            self._next_at = time.monotonic() + (self.refresh_s if found else self.retry_s)
            if found and found != self._addresses:
                # keep the address in use when it is still among them (no reconnect for a reordering)
                current = self._addresses[self._current] if self._addresses else None
                self._addresses = found
                self._current = found.index(current) if current in found else 0
        if found:
            self._found.set()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _refused_command(reply: object) -> bool:
    """A reply error saying the server does not let this client run the command (an ACL, a proxy without
    it), as opposed to a transient one. Only ever given the error: str() of a hit's value (megabytes of
    bytes) cost ~30 ms per lookup."""
    from redis.exceptions import NoPermissionError

    return isinstance(reply, NoPermissionError) or "unknown command" in str(reply).lower()


class RedisTier:
    """Redis GET/SET that never raises: results are ("hit", bytes) / ("miss"|"error"|"skipped", None).

    Every command is abandoned after ``operation_timeout_s`` (a watchdog drops the connections of the
    client that ran it, which wakes a stuck read). Each thread has a client of its own, so an abandoned
    SET on the write-behind thread never takes a request's GET down with it. Any exception counts as a
    failure, not only redis-py's own: a malformed reply surfaces as ValueError or AttributeError. An
    error reply from a server that answered (WRONGTYPE: another program's value under the key) is no
    outage: a miss, and the breaker counts the server as up. A plain ``redis://`` host name is resolved
    off the request path (:class:`_HostResolver`); ``rediss://`` keeps the name for its certificate check.
    Failures are logged when they open the breaker (and when it closes again), error replies at most once
    a minute per kind.
    """

    def __init__(self, settings: RedisSettings) -> None:
        from redis.connection import parse_url

        self.settings = settings
        self._options = parse_url(settings.url)  # ValueError for a URL redis-py cannot read: at start, not per call
        host = self._options.get("host")
        plain = "connection_class" not in self._options  # redis://, not TLS or a unix socket
        self._resolver = (
            _HostResolver(host, int(self._options.get("port", 6379)))
            if plain and isinstance(host, str) and not _is_ip(host)
            else None
        )
        self.where = self._options.get("path") or f"{host}:{self._options.get('port', 6379)}"  # no password
        self.breaker = CircuitBreaker(settings.failure_threshold, settings.open_seconds)
        self._local = threading.local()
        self._clients: weakref.WeakSet[Any] = weakref.WeakSet()
        self._clients_lock = threading.Lock()
        self._watchdog = _Watchdog()
        self._logged: dict[str, float] = {}  # error reply kind -> when last logged
        self._plain_get = False  # GETRANGE refused by this server: GET (whole values) instead

    def _client(self) -> Any:
        address = None
        if self._resolver is not None:
            address = self._resolver.address(wait_s=self.settings.connect_timeout_s)
            if address is None:
                raise ConnectionError(f"no address found for Redis host {self._resolver.host!r} (yet)")
        client = getattr(self._local, "client", None)
        if client is not None and getattr(self._local, "address", None) != address:
            with contextlib.suppress(Exception):
                client.close()  # the name now resolves elsewhere
            client = None
        if client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # redis-py 8 defaults block ~4 s on a refused connection (retries with backoff): disable both.
            options = {
                "socket_connect_timeout": self.settings.connect_timeout_s,
                "socket_timeout": self.settings.timeout_s,
                "retry": Retry(NoBackoff(), 0),
                "retry_on_timeout": False,
                "health_check_interval": 0,
                "max_connections": 4,  # one thread runs one command at a time
                **self._options,  # what the URL says wins, as in redis.Redis.from_url
            }
            if address is not None:
                options["host"] = address
            pool = redis.ConnectionPool(**options)
            client = redis.Redis(connection_pool=pool)
            client.auto_close_connection_pool = True
            self._local.client, self._local.address = client, address
            with self._clients_lock:
                self._clients.add(client)
        return client

    def _run(self, command: Callable[[Any], T], name: str = "command") -> tuple[str, T | None]:
        """("ok", result); ("skipped", None) while the breaker is open; ("error", None) after any error or
        past the operation deadline; ("reply_error", the ResponseError) when the server answered with one."""
        import redis

        if not self.breaker.allow():
            return "skipped", None
        outcome, result, overran, problem, unreachable = "error", None, False, "", None
        try:
            client = self._client()
            token = self._watchdog.begin(self.settings.operation_timeout_s, client.connection_pool.disconnect)
            try:
                result = command(client)
                outcome = "ok"
            finally:
                overran = self._watchdog.end(token)  # finished, but only after its connection was dropped
        except redis.ResponseError as exc:
            outcome, result = "reply_error", exc
            self._log_reply(name, exc)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, redis.ConnectionError):  # refused or dropped, not a slow reply
                unreachable = getattr(self._local, "address", None)
        finally:
            if outcome == "error" or overran:
                # in ``finally``: a half-open trial is never left in flight
                if self.breaker.record_failure():
                    problem = problem or f"no reply within {self.settings.operation_timeout_s:g} s"
                    logger.warning(
                        "Redis %s is failing (%s): cache reads and writes skip it for %g s, then one trial",
                        self.where,
                        problem[:300],
                        self.settings.open_seconds,
                    )
                if self._resolver is not None:
                    self._resolver.failed(unreachable)
            elif self.breaker.record_success():
                logger.warning("Redis %s answers again: cache reads and writes resume", self.where)
        if overran:
            return "error", None
        return outcome, result

    def _log_reply(self, command: str, exc: Exception) -> None:
        """An error reply (a full or read-only server, missing permissions) changes no outcome, but
        operators need its cause: once a minute per kind."""
        kind = f"{type(exc).__name__}:{(str(exc).split() or ['?'])[0]}"  # redis-py drops "OOM" for its class
        now = time.monotonic()
        if now - self._logged.get(kind, -math.inf) >= 60.0:
            self._logged[kind] = now
            logger.warning("Redis %s refused %s (%s: %s)", self.where, command, type(exc).__name__, str(exc)[:300])

    def get(self, key: str) -> tuple[str, bytes | None]:
        # At most one byte past the cap comes over the wire: a larger value (not something this cache
        # wrote, or a replica's with a larger cap) was read whole on every lookup, 400 MB at a time. It is
        # a miss here and stays for whoever wrote it (its TTL, or LRU eviction, removes it).
        cap = self.settings.max_value_bytes
        if self._plain_get:
            status, value = self._run(lambda client: client.get(key), "GET")
        else:
            status, value = self._run(lambda client: client.getrange(key, 0, cap), "GETRANGE")
            if status == "reply_error" and _refused_command(value):
                # an ACL that allows GET but not GETRANGE, a proxy without it: read whole values from now on
                # (transient replies such as LOADING or OOM are a miss, and GETRANGE stays)
                self._plain_get = True
                return self.get(key)
        if status == "reply_error":
            if str(value).startswith("WRONGTYPE"):  # another program's value of another type: never readable
                self.delete(key)
            return "error", None
        if status != "ok":
            return status, None
        if value is None or value == b"":  # no such key (GETRANGE: b""; an empty value no codec writes)
            return "miss", None
        if not isinstance(value, bytes):
            return "error", None
        if len(value) > cap:  # Redis answered normally: a miss here, not an outage (no alert counts it)
            return "too_big", None
        return "hit", value

    def put(self, key: str, value: bytes) -> str:
        return self.write(key, value)[0]

    def write(self, key: str, value: bytes) -> tuple[str, bool]:
        """SET: (result, whether Redis answered). An error reply (a full or read-only server) had the value;
        a refused connection or a timeout may not have, so the byte count the observer gets follows this."""
        if len(value) > self.settings.max_value_bytes:
            return "too_big", False
        status, _ = self._run(lambda client: client.set(key, value, ex=self.settings.ttl_s), "SET")
        return {"ok": "stored", "reply_error": "error"}.get(status, status), status in ("ok", "reply_error")

    def delete(self, key: str) -> None:
        """Best effort: drop a value that failed to decode so it is recomputed once, not forever."""
        self._run(lambda client: client.delete(key), "DEL")

    def close(self) -> None:
        self._watchdog.stop()
        with self._clients_lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


# ------------------------------------------------------------------------------------ write-behind
class _WriteBehind:
    """Redis writes on one background thread, so a response never waits for them.

    Pending writes are bounded by the bytes of their values (a write that does not fit is dropped: it is
    a cache). Values queued or being written stay readable through :meth:`peek`, so a read of one is
    served from memory (read-after-write within the replica) instead of missing and recomputing, and
    never waits on Redis for it.
    """

    def __init__(self, write: Callable[[str, bytes], Any], max_pending_bytes: int) -> None:
        self._write = write
        self.max_pending_bytes = int(max_pending_bytes)
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._pending: dict[str, tuple[bytes, int]] = {}  # key -> (latest value, writes of it not done)
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, key: str, value: bytes, reserved: int = 0) -> bool:
        """Queue ``write(key, value)``; False (nothing queued) when closed or when the pending bytes, with
        ``reserved`` more held elsewhere against the same budget (the deferred values), would pass the bound."""
        with self._cond:
            if self._closed or reserved + self._bytes + len(value) > self.max_pending_bytes:
                return False
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="ierf-cache-write-behind", daemon=True)
                self._thread.start()
            self._queue.append((key, value))
            self._bytes += len(value)
            _, writes = self._pending.get(key, (b"", 0))
            self._pending[key] = (value, writes + 1)
            self._cond.notify_all()
            return True

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._bytes

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def peek(self, key: str) -> bytes | None:
        """The value of a write of ``key`` not yet finished, if any."""
        with self._cond:
            entry = self._pending.get(key)
            return None if entry is None else entry[0]

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write has finished; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float) -> None:
        """Finish what is queued (bounded by ``timeout_s``), then stop the thread; later writes are refused."""
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._pending.clear()
            self._bytes = 0
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key, value = self._queue.popleft()
            try:
                self._write(key, value)
            except Exception:  # the writer reports its own failures; never let the thread die
                pass
            finally:
                with self._cond:
                    if not self._closed:
                        self._bytes -= len(value)
                        latest, writes = self._pending[key]
                        if writes > 1:
                            self._pending[key] = (latest, writes - 1)
                        else:
                            del self._pending[key]
                    self._cond.notify_all()


# -------------------------------------------------------------------------------------------- tiers
@dataclass
class Lookup(Generic[T]):
    value: T | None
    tier: str  # "l1" | "l2" | "miss"
    # The misses a lookup with ``misses_counted=False`` held back: counted by TieredCache.count_withheld once
    # the job goes ahead without being sent again (it found the image's view after all).
    withheld: tuple[tuple[str, str, str, float, int], ...] = ()


class _KeyLock:
    """A single-flight lock and how many requests hold or await it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class TieredCache:
    """L1 (objects, bytes-bounded) in front of L2 (Redis, encoded tensors).

    L1 holds ready-to-use objects so a hit costs a dict lookup; L2 holds flat tensors encoded by
    :func:`encode_tensors`. ``redis`` may be None (L2 off). With ``write_behind_bytes`` > 0, ``put(...,
    background=True)`` hands the Redis SET to a background thread, with at most that many bytes of
    encoded values pending.
    """

    def __init__(
        self,
        l1_capacity_bytes: int,
        redis_tier: RedisTier | None = None,
        observer: CacheObserver = _noop_observer,
        write_behind_bytes: int = 0,
    ) -> None:
        self.l1: ByteLRU[Any] = ByteLRU(l1_capacity_bytes)
        self.l2 = redis_tier
        self.observer = observer
        self._behind: _WriteBehind | None = None
        if redis_tier is not None and write_behind_bytes > 0:
            self._behind = _WriteBehind(self._put_l2, write_behind_bytes)
        # key -> (object, its L1 size, its tensors or the function that makes them, their bytes): L2 writes
        # waiting for write_deferred, bounded like the write-behind queue (by the tensors' bytes) and
        # readable meanwhile like it
        self._deferred: OrderedDict[str, tuple[Any, int, _Tensors, int]] = OrderedDict()
        self._deferred_bytes = 0
        self._deferred_lock = threading.Lock()
        self._writing_deferred = threading.Lock()  # one writer at a time (compute thread, or close())
        self._key_locks: dict[str, _KeyLock] = {}
        self._locks_guard = threading.Lock()

    @contextlib.contextmanager
    def single_flight(self, key: str) -> Iterator[None]:
        """Hold the key's lock: concurrent requests for one image compute it once. A lock lives while
        someone holds or awaits it (counted), so memory stays bounded and no waiter is left on a lock
        that a later request no longer finds."""
        with self._locks_guard:
            entry = self._key_locks.setdefault(key, _KeyLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._locks_guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._key_locks[key]

    def get(
        self,
        key: str,
        from_tensors: Callable[[dict[str, torch.Tensor]], tuple[T, int]],
        counted: bool = True,
        misses_counted: bool = True,
    ) -> Lookup[T]:
        """Look in L1, then L2. ``from_tensors`` rebuilds the object (and its byte size) from L2 tensors.
        ``counted=False``: a lookup the service makes for itself, not for a request (the hit-ratio metrics
        count what requests found). ``misses_counted=False``: a lookup for a job sent without its pixels, which
        a miss sends back for them: its misses are counted only if a later tier finds the value (the job sent
        again with its pixels counts them otherwise)."""
        if not counted:
            return self._lookup(key, from_tensors, _noop_observer)
        if misses_counted:
            return self._lookup(key, from_tensors, self.observer)
        seen: list[tuple[str, str, str, float, int]] = []
        found = self._lookup(key, from_tensors, lambda *observation: seen.append(observation))
        withheld = []
        for observation in seen:  # in order, once the outcome is known
            if found.value is not None or observation[2] != "miss":
                self.observer(*observation)
            else:
                withheld.append(observation)
        found.withheld = tuple(withheld)
        return found

    def count_withheld(self, found: Lookup[Any]) -> None:
        """Count the misses ``found`` held back: its job goes ahead after all (from the image's view, found in a
        later lookup), so no job sent again with the pixels will count them."""
        withheld, found.withheld = found.withheld, ()
        for observation in withheld:
            self.observer(*observation)

    def _lookup(
        self, key: str, from_tensors: Callable[[dict[str, torch.Tensor]], tuple[T, int]], observe: CacheObserver
    ) -> Lookup[T]:
        if self.l1.capacity_bytes > 0:  # L1 off: nothing to look up or count
            start = time.perf_counter()
            value = self.l1.get(key)
            observe("l1", "get", "hit" if value is not None else "miss", time.perf_counter() - start, 0)
            if value is not None:
                return Lookup(value, "l1")
        if self.l2 is None:
            return Lookup(None, "miss")
        start = time.perf_counter()
        with self._deferred_lock:
            deferred = self._deferred.get(key)
        if deferred is not None:  # on its way to Redis, still the object itself: no decoding
            obj, nbytes, _, _ = deferred
            observe("l2", "get", "hit", time.perf_counter() - start, 0)  # 0: no bytes moved from Redis
            self._put_l1(key, obj, nbytes)
            return Lookup(obj, "l2")
        queued = None if self._behind is None else self._behind.peek(key)
        # A value still on its way to Redis is read from memory: no round trip, no recompute.
        result, data = ("hit", queued) if queued is not None else self.l2.get(key)
        moved = 0 if queued is not None or data is None else len(data)  # value-size histogram: Redis bytes only
        if data is None:
            observe("l2", "get", result, time.perf_counter() - start, 0)
            return Lookup(None, "miss")
        try:
            obj, nbytes = from_tensors(decode_tensors(key, data))
        except Exception:  # garbage under the key, or tensors the engine rejects: a miss, never a failure
            observe("l2", "get", "corrupt", time.perf_counter() - start, moved)
            self.l2.delete(key)
            return Lookup(None, "miss")
        observe("l2", "get", "hit", time.perf_counter() - start, moved)
        self._put_l1(key, obj, nbytes)
        return Lookup(obj, "l2")

    def may_hold(self, key: str) -> bool:
        """Whether a lookup of ``key`` could find it, judged without I/O and without counting: False only when
        L1 lacks it, no write of it to Redis waits here, and Redis is off or known down (breaker open)."""
        if key in self.l1:
            return True
        if self.l2 is None:
            return False
        with self._deferred_lock:
            if key in self._deferred:
                return True
        if self._behind is not None and self._behind.peek(key) is not None:
            return True
        return self.l2.breaker.state != "open"

    def discard(self, key: str) -> None:
        """Drop a value its user found unusable from both tiers (Redis best effort), so it is computed
        again once instead of served until its TTL."""
        self.l1.discard(key)
        with self._deferred_lock:
            self._pop_deferred(key)
        if self.l2 is not None:
            self.l2.delete(key)

    def can_keep(self, nbytes: int, encoded_nbytes: int) -> bool:
        """Whether a value of ``nbytes`` in L1 (``encoded_nbytes`` of tensors for L2) fits some tier: False
        when it is too big for each, the cache is off (L1 of 0 bytes, no Redis), or only Redis could keep it
        and Redis is known down (breaker open: the write would be skipped). The ingress remembers an image
        only while this holds, so a repeat by hash never costs a refused hop it could have foreseen."""
        if nbytes <= self.l1.capacity_bytes:
            return True
        l2 = self.l2
        return l2 is not None and encoded_nbytes <= l2.settings.max_value_bytes and l2.breaker.state != "open"

    def put(
        self,
        key: str,
        obj: Any,
        nbytes: int,
        tensors: _Tensors | None,
        background: bool = False,
        deferred: bool = False,
        tensors_size: int | None = None,
    ) -> str:
        """Store in L1, and in L2 when ``tensors`` is given. Returns the L2 result for provenance:
        "queued" when the write went behind (its own result then only reaches the observer), "dropped"
        when the write-behind queue was full. ``deferred`` (with write-behind on) keeps the tensors,
        unencoded, until :meth:`write_deferred`; deferred and queued values share the write-behind byte
        budget, and without room the write goes behind at once (or is dropped, as without deferral).
        ``tensors`` may be a function that makes them, with ``tensors_size`` their bytes: a deferred write
        then makes them only when it is written, after the caller has its answer."""
        self._put_l1(key, obj, nbytes)
        if self.l2 is None or tensors is None:
            return "disabled"
        start = time.perf_counter()
        if callable(tensors) and tensors_size is None:
            raise ValueError("tensors given as a function need their tensors_size")
        size = tensors_size if tensors_size is not None else tensors_nbytes(tensors)
        if size > self.l2.settings.max_value_bytes:
            self.observer("l2", "put", "too_big", time.perf_counter() - start, 0)  # never sent
            return "too_big"
        if deferred and background and self._behind is not None and not self._behind.closed:
            queued_bytes = self._behind.pending_bytes
            with self._deferred_lock:
                self._pop_deferred(key)
                if self._deferred_bytes + queued_bytes + size <= self._behind.max_pending_bytes:
                    self._deferred[key] = (obj, nbytes, tensors, size)
                    self._deferred_bytes += size
                    return "queued"
        with self._deferred_lock:
            reserved = self._deferred_bytes
        behind = self._behind
        if background and behind is not None and reserved + behind.pending_bytes + size > behind.max_pending_bytes:
            self.observer("l2", "put", "dropped", 0.0, 0)  # no room: not even encoded
            return "dropped"
        return self._encode_and_put(key, tensors() if callable(tensors) else tensors, background, start, reserved)

    def _encode_and_put(
        self, key: str, tensors: dict[str, torch.Tensor], background: bool, start: float, reserved: int = 0
    ) -> str:
        """``reserved``: bytes of deferred values (other than this one), which share the write-behind budget."""
        assert self.l2 is not None
        if self.l2.breaker.state == "open":  # Redis is known down: the write would be skipped, so skip encoding
            self.observer("l2", "put", "skipped", time.perf_counter() - start, 0)
            return "skipped"
        try:
            # Encoded here, on the caller's thread, even when written behind: encoding runs torch copies,
            # and a torch op on another thread would give OpenMP a second thread team to throttle.
            data = encode_tensors(key, tensors)
        except CodecError:  # a dtype the format lacks: the value stays in L1 only
            self.observer("l2", "put", "error", time.perf_counter() - start, 0)
            return "error"
        if background and self._behind is not None:
            if self._behind.submit(key, data, reserved):
                return "queued"
            self.observer("l2", "put", "dropped", 0.0, 0)  # never sent
            return "dropped"
        return self._put_l2(key, data, start)

    def has_deferred(self) -> bool:
        with self._deferred_lock:
            return bool(self._deferred)

    def write_deferred(self) -> int:
        """Encode the deferred values, oldest first, and hand them to the write-behind thread; returns how
        many were handed over. Call it on the thread that runs the caller's torch work (see
        ``_encode_and_put``). A value stays readable from memory until its bytes are queued (then
        :meth:`get` reads those); one whose encoding fails is dropped, never retried."""
        written = 0
        with self._writing_deferred:
            while True:
                with self._deferred_lock:
                    if not self._deferred:
                        return written
                    key, (_, _, tensors, size) = next(iter(self._deferred.items()))
                try:
                    made = tensors() if callable(tensors) else tensors
                    with self._deferred_lock:
                        others = self._deferred_bytes - size  # this value leaves the deferred ones as it queues
                    if self._encode_and_put(key, made, True, time.perf_counter(), others) == "queued":
                        written += 1
                finally:
                    with self._deferred_lock:
                        if self._deferred.get(key, (None, 0, None, 0))[2] is tensors:  # not replaced meanwhile
                            del self._deferred[key]
                            self._deferred_bytes -= size

    def _pop_deferred(self, key: str) -> None:
        """Drop ``key``'s deferred value, if any; the caller holds ``_deferred_lock``."""
        previous = self._deferred.pop(key, None)
        if previous is not None:
            self._deferred_bytes -= previous[3]

    def _put_l1(self, key: str, obj: Any, nbytes: int) -> None:
        if self.l1.capacity_bytes <= 0:  # L1 off: nothing to count
            return
        start = time.perf_counter()
        stored = self.l1.put(key, obj, nbytes)
        self.observer("l1", "put", "stored" if stored else "too_big", time.perf_counter() - start, nbytes)

    def _put_l2(self, key: str, data: bytes, start: float | None = None) -> str:
        """SET the encoded value; ``start`` is when the put began (encoding included), for the observer."""
        assert self.l2 is not None
        start = time.perf_counter() if start is None else start
        result, answered = self.l2.write(key, data)
        sent = len(data) if answered else 0  # skipped (breaker open), too_big, unreachable: not counted as sent
        self.observer("l2", "put", result, time.perf_counter() - start, sent)
        return result

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Write what was deferred (on this thread), then wait for background writes to finish (tests,
        shutdown); True when none is left."""
        self.write_deferred()
        return True if self._behind is None else self._behind.flush(timeout_s)

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what was deferred, give queued writes up to ``timeout_s``, then release the Redis client."""
        try:
            if self._behind is not None:
                try:
                    self.write_deferred()
                finally:
                    self._behind.close(timeout_s)
        finally:
            if self.l2 is not None:
                self.l2.close()

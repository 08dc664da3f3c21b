"""Service settings: the ``args`` of the Serve application, validated up front.

Why a dataclass layer: a typo or a wrong value in a Serve config file should fail the deploy with a
message naming the key, not surface inside a replica minutes later (as a KeyError, or as every request
failing: a byte cap written "32MiB" would blame each caller's image, a TTL of 0 would make every Redis
SET fail without a word). Every field's type and range is checked when the object is built.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ierf.serving.images import ImageLimits

# Serve's gRPC proxy reads its message cap (both directions) from this variable when it starts: set by
# local starts (local.py), the Dockerfile and the RayService; the ingress reads it to refuse responses
# that could not pass.
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# Serve's gRPC proxy takes messages up to 2 GiB unless told otherwise, so an oversize request is read
# whole and shipped to the ingress before the ingress refuses it. The proxy reads GRPC_MAX_MESSAGE_ENV when
# it starts (ray/serve/_private/constants.py) and applies it to what it receives *and* what it sends.
# Requests are one image plus a few hundred bytes of fields; the largest response (ComputeIERF with
# 64 positions: 64 float32 224x224 maps, 12.25 MiB, plus 64 overlay PNGs and the input crop) came to
# 17.2 MiB on a noise image, whose overlays compress worst. Clusters set the same variable (Dockerfile
# ENV, the RayService's container env).
GRPC_MAX_MESSAGE_BYTES = 40 * 1024 * 1024
GRPC_REQUEST_OVERHEAD_BYTES = 1024 * 1024  # what a request carries besides its image, with room to spare


def grpc_max_message_bytes(max_image_bytes: int, environ: dict[str, str] | None = None) -> int:
    """The message cap for Serve's gRPC proxy: ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` when set, else 40 MiB
    (or more, when the ingress's image cap needs it). Refuses a set value that would stop images the
    ingress accepts."""
    environ = os.environ if environ is None else environ
    needed = max_image_bytes + GRPC_REQUEST_OVERHEAD_BYTES
    raw = environ.get(GRPC_MAX_MESSAGE_ENV, "").strip()
    if not raw:
        return max(GRPC_MAX_MESSAGE_BYTES, needed)
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"{GRPC_MAX_MESSAGE_ENV}={raw!r} must be a whole number of bytes (digits only, at least {needed}); "
            f"unset it for the default ({max(GRPC_MAX_MESSAGE_BYTES, needed)})"
        ) from None
    if value < needed:
        raise ValueError(
            f"{GRPC_MAX_MESSAGE_ENV}={value} is below ingress.max_image_bytes ({max_image_bytes}) + "
            f"{GRPC_REQUEST_OVERHEAD_BYTES}: the gRPC proxy would refuse images the ingress accepts"
        )
    return value


# Environment for every Ray process of the service (local starts, the Dockerfile and the RayService set
# it; values a caller already set are kept). Measured on a warm Explain of a 600x400 photo (a 720 KB raw
# tensor) on 2 cores, per request:
# - glibc malloc: with its defaults, request-sized buffers are mapped fresh and returned to the kernel
#   every time, ~1,000 page faults in the gRPC proxy and 500 in the ingress (~3 ms of CPU). A fixed mmap
#   threshold keeps buffers below 32 MiB in the heap, and a 256 MiB trim threshold keeps freed heap
#   mapped for the next request (resident memory may stay up to that much above its live size per arena).
# - libgomp: after its last parallel region an OpenMP thread spins 300,000 times (~7 ms here) before it
#   sleeps, so the worker kept a core busy while the ingress and the proxy sent its answer (worker CPU
#   15.6 ms per request, 8.4 ms with 30,000 spins; p50 18.9 -> 15.8 ms). Back-to-back regions inside a
#   decomposition are microseconds apart and still meet a spinning thread: cold requests cost the same.
#   OMP_WAIT_POLICY=PASSIVE, by contrast, made decompositions 40-60 % slower.
PROCESS_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
    "GOMP_SPINCOUNT": "30000",
}

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of settings, got {values!r}")
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    required = sorted(f.name for f in dataclasses.fields(cls) if f.name not in values and _required(f))
    if required:
        raise ValueError(f"{where} lacks required setting(s): {', '.join(required)}")
    try:
        return cls(**values)
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# Checks for __post_init__: the message starts with the key, so _build can prefix its section
# ("cache.ttl_s must be ..."). bool is a subclass of int in Python, and is refused wherever a number is
# expected: `ttl_s: true` is a mistake, not 1.
def _integer(key: str, value: object, minimum: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{key} must be {bound}{meaning}, got {value!r}")


def _seconds(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key} must be a finite number of seconds > 0, got {value!r}")


def _boolean(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def _text(key: str, value: object, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, str) or not value:
        what = "a non-empty string or null" if optional else "a non-empty string"
        raise ValueError(f"{key} must be {what}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """One served model. ``id`` is what callers send; ``name`` is the registry architecture."""

    id: str
    name: str = ""
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when the replica has a GPU, else CPU
    num_threads: int = 0  # torch intra-op threads; 0: from the replica's num_cpus (at least 1)
    resize: int = 0  # the short side before the centre crop; 0: the registry's for the weights file

    def __post_init__(self) -> None:
        if (
            not isinstance(self.id, str)
            or not self.id
            or not self.id.replace("_", "").replace("-", "").replace(".", "").isalnum()
        ):
            raise ValueError(f"id: model id {self.id!r} must be non-empty and use only letters, digits, _ - .")
        if self.name == "":
            object.__setattr__(self, "name", self.id)
        _text("name", self.name)
        _text("weights", self.weights, optional=True)
        _boolean("random_init", self.random_init)
        _integer("seed", self.seed, 0)
        if self.random_init and self.weights is not None:
            raise ValueError(f"weights: set weights or random_init, not both (model {self.id})")
        if self.seed and not self.random_init:
            raise ValueError(f"seed applies to random_init weights only (model {self.id}); drop it or set random_init")
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        _integer("num_threads", self.num_threads, 0, " (0: from the replica's num_cpus)")
        _integer("resize", self.resize, 0, " (0: the registry's for the weights file)")

    @property
    def deployment_name(self) -> str:
        return f"Worker_{self.id}"


@dataclass(frozen=True)
class CacheConfig:
    l1_bytes: int = 512 * 1024 * 1024
    redis_url: str | None = None  # None: L2 off. "env:VAR" reads the URL from $VAR in the replica.
    connect_timeout_s: float = 0.2
    timeout_s: float = 1.0
    ttl_s: int = 6 * 3600
    max_value_bytes: int = 64 * 1024 * 1024
    failure_threshold: int = 3
    open_seconds: float = 10.0
    # Redis writes go behind the response, with at most this many encoded bytes waiting (0: write before
    # answering). A write that does not fit is dropped; a key still queued is read from its queued bytes.
    write_behind_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        _integer("l1_bytes", self.l1_bytes, 0, " (0: no in-process cache)")
        url = self.redis_url
        if url is not None and url != "":  # None or "": L2 off
            env = isinstance(url, str) and url.startswith("env:") and len(url) > 4
            if not env:
                check_redis_url(url, "redis_url")
        _seconds("connect_timeout_s", self.connect_timeout_s)
        _seconds("timeout_s", self.timeout_s)
        _integer("ttl_s", self.ttl_s, 1, " (seconds)")
        _integer("max_value_bytes", self.max_value_bytes, 1)
        _integer("failure_threshold", self.failure_threshold, 1)
        _seconds("open_seconds", self.open_seconds)
        _integer("write_behind_bytes", self.write_behind_bytes, 0, " (0: write before answering)")
        if 0 < self.write_behind_bytes < self.max_value_bytes:
            raise ValueError(
                f"write_behind_bytes ({self.write_behind_bytes}) must be 0 (write before answering) or at least "
                f"max_value_bytes ({self.max_value_bytes}): a value between the two could never be queued, so it "
                "would be cached in no replica's Redis"
            )

    def resolved_redis_url(self) -> str | None:
        """The URL, read from the environment for ``env:VAR`` and checked there: a replica whose variable is
        unset (an overlay that dropped it, a typo) or holds a URL it cannot use fails at start, saying why,
        instead of running without Redis unnoticed or failing every request. ``redis_url: null`` is the
        way to run without Redis."""
        if self.redis_url and self.redis_url.startswith("env:"):
            name = self.redis_url[4:]
            url = os.environ.get(name)
            if not url:
                raise ValueError(
                    f"redis_url is {self.redis_url} but ${name} is not set in this replica: set it to the Redis URL "
                    "(redis://host:6379/0), or set redis_url: null to run without Redis"
                )
            return check_redis_url(url, f"${name} (redis_url {self.redis_url})")
        return self.redis_url or None


def check_redis_url(url: object, what: str) -> str:
    """A Redis URL that redis-py reads as written: a scheme it knows, a port in range, a numeric db."""
    if not (isinstance(url, str) and url.startswith(_REDIS_SCHEMES)):
        shown = _redacted(url) if isinstance(url, str) else repr(url)
        raise ValueError(f"{what} must be null, a redis://, rediss:// or unix:// URL, or env:VARIABLE, got {shown}")
    import redis

    try:
        db = urlsplit(url).path.strip("/")
        pool = redis.ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)  # unknown query options fail here, not per request
    except (ValueError, TypeError, redis.RedisError) as exc:  # redis: ?protocol=4, a bad ssl_cert_reqs
        # redis-py's reason may quote part of a password that broke the parse ("... as 'Zm9v'"): not shown then
        reason = (
            "it does not parse with the user information it holds (percent-encode / ? # @ : and % in a password)"
            if _userinfo_end(url) >= 0
            else _redacted(str(exc))
        )
        raise ValueError(f"{what} {_redacted(url)} is not a Redis URL: {reason}") from None
    if not url.startswith("unix:") and db and not db.isdigit():
        raise ValueError(f"{what} {_redacted(url)}: the database after the last '/' must be a number, got {db!r}")
    if not url.startswith("unix:") and urlsplit(url).port == 0:  # parsed, but no server listens on port 0
        raise ValueError(f"{what} {_redacted(url)}: port 0 is not a port a Redis server can listen on")
    return url


def _redacted(url: str) -> str:
    """``url`` for a message, its password replaced (the config may hold one, after ``:`` or as
    ``?password=``). The user information is cut up to the last ``@`` after the scheme, not where a URL
    parser ends it: an unencoded ``/``, ``?`` or ``#`` in a password ends the parser's netloc early, and
    the password would be shown whole."""
    url = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    end = _userinfo_end(url)
    if end >= 0:
        start = url.index("://") + 3
        user = url[start:end].split(":", 1)[0] if ":" in url[start:end] else ""
        url = f"{url[:start]}{user}:***{url[end:]}"
    return repr(url)


def _userinfo_end(url: str) -> int:
    """Index of the ``@`` that ends a URL's user information, or -1 when it has none."""
    start = url.find("://")
    return -1 if start < 0 else url.rfind("@", start + 3)


MAX_REMEMBERED_IMAGES = 1_000_000


@dataclass(frozen=True)
class IngressConfig:
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 16384
    max_positions: int = 64
    max_top_k: int = 100
    request_timeout_s: float = 120.0  # upper bound when the caller sends no deadline
    # Pixels being decoded at once per ingress replica, and pixels let wait for that (more: refused with
    # RESOURCE_EXHAUSTED); 0: twice and four times max_pixels. See ierf.serving.admission.
    decode_pixels: int = 0
    decode_queue_pixels: int = 0
    # Images per ingress replica remembered as sent to a model's workers: any repeat of one travels by its
    # content hash alone, the pixels following only if the worker no longer holds it (see Ingress._send);
    # 0: always send pixels.
    remembered_images: int = 4096
    # Whether a request may name its image by content hash (Image.content_hash) instead of sending the pixels.
    # The full hash is the key: a caller without the image cannot guess it (see the README's API section).
    accept_image_references: bool = True

    def __post_init__(self) -> None:
        for key in ("max_image_bytes", "max_pixels", "max_side", "max_positions", "max_top_k"):
            _integer(key, getattr(self, key), 1)
        _seconds("request_timeout_s", self.request_timeout_s)
        from PIL import Image

        decodable = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
        if decodable and self.max_pixels > decodable:
            raise ValueError(
                f"max_pixels must be at most {decodable} (twice Pillow's MAX_IMAGE_PIXELS: past it the decoder "
                f"refuses an encoded image from its header, whatever this cap says), got {self.max_pixels}"
            )
        from ierf.serving.protocol import MAX_REPEATED_ENTRIES  # the proxy refuses longer lists unparsed

        if self.max_positions > MAX_REPEATED_ENTRIES:
            raise ValueError(
                f"max_positions must be at most {MAX_REPEATED_ENTRIES} (what the proxy parses of one repeated "
                f"field), got {self.max_positions}"
            )
        _integer("decode_pixels", self.decode_pixels, 0, " (0: twice max_pixels)")
        _integer("decode_queue_pixels", self.decode_queue_pixels, 0, " (0: four times max_pixels)")
        _integer("remembered_images", self.remembered_images, 0, " (0: always send the pixels)")
        _boolean("accept_image_references", self.accept_image_references)
        if self.remembered_images > MAX_REMEMBERED_IMAGES:
            raise ValueError(
                f"remembered_images must be at most {MAX_REMEMBERED_IMAGES} (each takes ~0.3 KB of every ingress "
                f"replica's memory), got {self.remembered_images}"
            )
        if 0 < self.decode_queue_pixels < self.max_pixels:
            raise ValueError(
                f"decode_queue_pixels ({self.decode_queue_pixels}) must be 0 or at least max_pixels "
                f"({self.max_pixels}): a full-size image could otherwise never wait its turn"
            )

    @property
    def decode_budget(self) -> tuple[int, int]:
        """(pixels decoding at once, pixels waiting), the 0 defaults resolved."""
        return self.decode_pixels or 2 * self.max_pixels, self.decode_queue_pixels or 4 * self.max_pixels

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_pixels, max_side=self.max_side)


@dataclass(frozen=True)
class ServiceConfig:
    models: tuple[ModelConfig, ...]
    default_model: str = ""
    cache: CacheConfig = field(default_factory=CacheConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServiceConfig:
        args = dict(args or {})
        known = {"models", "default_model", "cache", "ingress"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown application arg(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        raw_models = args.get("models")
        if raw_models is None:  # left out: the bundled model
            raw_models = [{"id": "efficientnet_lite0"}]
        if not isinstance(raw_models, list | tuple):
            raise ValueError(f"models must be a list of model ids or mappings, got {raw_models!r}")
        if not raw_models:  # an emptied list is a mistake more likely than a wish for the bundled model
            raise ValueError("models is empty: list the models to serve (leave models out for efficientnet_lite0)")
        models = []
        for i, raw in enumerate(raw_models):
            if isinstance(raw, str):
                raw = {"id": raw}
            models.append(_build(ModelConfig, raw, f"models[{i}]"))
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        default = args.get("default_model")
        default = ids[0] if default is None or default == "" else default  # 0 or false is a mistake, not "unset"
        if not isinstance(default, str):
            raise ValueError(f"default_model must be a model id (a string), got {default!r}")
        if default not in ids:
            raise ValueError(f"default_model {default!r} is not one of the served models {ids}")
        return cls(
            models=tuple(models),
            default_model=default,
            cache=_build(CacheConfig, args.get("cache"), "cache"),
            ingress=_build(IngressConfig, args.get("ingress"), "ingress"),
        )

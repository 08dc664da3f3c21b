"""Service settings: the ``args`` of the Serve application, validated up front.

Why a dataclass layer: a typo in a Serve config file should fail the deploy with a message naming
the key, not surface as a KeyError inside a replica minutes later.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ierf.serving.images import ImageLimits


def _build(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


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

    def __post_init__(self) -> None:
        if not self.id or not self.id.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"model id {self.id!r} must be non-empty and use only letters, digits, _ - .")
        if not self.name:
            object.__setattr__(self, "name", self.id)

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

    def resolved_redis_url(self) -> str | None:
        if self.redis_url and self.redis_url.startswith("env:"):
            return os.environ.get(self.redis_url[4:]) or None
        return self.redis_url or None


@dataclass(frozen=True)
class IngressConfig:
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 16384
    max_positions: int = 64
    max_top_k: int = 100
    request_timeout_s: float = 120.0  # upper bound when the caller sends no deadline

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
        raw_models = args.get("models") or [{"id": "efficientnet_lite0"}]
        models = []
        for i, raw in enumerate(raw_models):
            if isinstance(raw, str):
                raw = {"id": raw}
            models.append(_build(ModelConfig, raw, f"models[{i}]"))
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        default = args.get("default_model") or ids[0]
        if default not in ids:
            raise ValueError(f"default_model {default!r} is not one of the served models {ids}")
        return cls(
            models=tuple(models),
            default_model=default,
            cache=_build(CacheConfig, args.get("cache"), "cache"),
            ingress=_build(IngressConfig, args.get("ingress"), "ingress"),
        )

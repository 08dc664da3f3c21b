"""Fused stage statistics: one compiled pass over a stage's contributions instead of one per quantity.

After its matrix products, a stage's ratio statistics - the pre-activation z (the sum of every path's
contribution plus the biases), ||z||^2, each path's dot product <C, z> and norm ||C||, each bias's <beta, z>
- are element-wise work bound by memory traffic. In eager PyTorch each is a separate pass over tensors as
large as the layer output (nine times it for kernel taps); compiled together (``torch.compile``, Inductor's
C++ backend) they read each contribution about twice. On CPU that took a ResNet50 residual stage's
statistics at batch 8 from 45 to 3 ms (glibc's default malloc), and a whole ResNet50 decomposition at
batch 8 from 0.84x to 0.74x of an input-gradient pass (tuned malloc, side by side).

Opt-in with ``IERF_FUSED=1``, on CPU, when a C++ compiler is on the PATH: the first decompositions in a
process compile about a dozen small graphs per network (10-30 s on two cores; Inductor caches them on
disk), which only batch work repays, so it is off by default. Everything else (the default, GPU tensors,
autograd, no compiler, or a compilation error, after which fusion stays off for the process with one
warning) takes the eager path of :mod:`ierf.srd.ratios`, which computes the same quantities.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "IERF_FUSED"  # "1" turns fusion on
RECOMPILE_LIMIT = 64  # each arity / flag combination of a stage is its own compiled graph

_lock = threading.Lock()
_compiled: dict[str, Callable[..., Any]] = {}
_per_thread = threading.local()  # Dynamo's config values set at run time are per thread (torch 2.14)
_disabled_reason: str | None = None


def stage_stats(
    dense: list[torch.Tensor],
    taps: list[torch.Tensor],
    biases: list[torch.Tensor],
    dense_norms: tuple[bool, ...],
    tap_norms: tuple[bool, ...],
) -> tuple[Any, ...]:
    """Statistics of a stage whose paths all write every channel, channels last.

    ``dense``: one-path-per-position contributions (..., C); ``taps``: per-tap contributions (..., T, C);
    ``biases``: per-channel constants (C,). Returns z (..., C), ||z||^2, then per dense path its dot
    product and (where asked) norm, per tap tensor its (..., T) dot products and norms, and <beta, z> per
    bias. Written as plain tensor algebra so the compiler can fuse it; run eagerly it is also correct.
    """
    z: torch.Tensor | None = None
    for p in dense:
        z = p if z is None else z + p
    for y in taps:
        z = y.sum(-2) if z is None else z + y.sum(-2)
    assert z is not None
    for beta in biases:
        z = z + beta
    zz = (z * z).sum(-1)
    dense_dots = [(p * z).sum(-1) for p in dense]
    dense_norm = [(p * p).sum(-1).sqrt() if want else None for p, want in zip(dense, dense_norms, strict=True)]
    zt = z.unsqueeze(-2)
    tap_dots = [(y * zt).sum(-1) for y in taps]
    tap_norm = [(y * y).sum(-1).sqrt() if want else None for y, want in zip(taps, tap_norms, strict=True)]
    bias_dots = [(z * beta).sum(-1) for beta in biases]
    return z, zz, dense_dots, dense_norm, tap_dots, tap_norm, bias_dots


def single_path_stats(part: torch.Tensor, biases: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stage with one path and at least one bias: z, and the ratio (1 where the path carries a nonzero
    contribution to a nonzero z, else 0: the bias has nobody to be shared with)."""
    z = part + biases[0]
    for beta in biases[1:]:
        z = z + beta
    carried = ((z * z).sum(-1) > 0) & (part.abs().amax(-1) > 0)
    return z, carried.to(z.dtype)


def enabled(device: torch.device) -> bool:
    """Whether fused statistics are used for tensors on ``device``."""
    if os.environ.get(ENV_SWITCH, "") != "1" or device.type != "cpu" or _disabled_reason is not None:
        return False
    return _compiler_available()


@functools.cache
def _compiler_available() -> bool:
    """Looked up once per process: scanning PATH at every stage would cost more than some fused calls."""
    cxx = os.environ.get("CXX")
    return bool((cxx and shutil.which(cxx)) or shutil.which("g++") or shutil.which("c++"))


def disabled_reason() -> str | None:
    """Why fusion was switched off in this process (a compilation error), or None."""
    return _disabled_reason


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, compiled. Where compilation fails, ``fn`` runs uncompiled (same values, the
    contributions already formed are not recomputed); after an error other than one shape variant too
    many, fusion is off for the rest of the process."""
    global _disabled_reason
    if not getattr(_per_thread, "limit_raised", False):
        _raise_recompile_limit(RECOMPILE_LIMIT)
        _per_thread.limit_raised = True
    compiled = _compiled.get(fn.__name__)
    if compiled is None:
        with _lock:
            compiled = _compiled.setdefault(fn.__name__, torch.compile(fn, dynamic=True, fullgraph=True))
    try:
        with _independent_sizes():
            return compiled(*args)
    except Exception as exc:
        if not ("RecompileLimit" in type(exc).__name__ or "CacheLimit" in type(exc).__name__):
            # no working compiler, an unsupported op: off for good, loudly once
            _disabled_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            logger.warning("fused SRD statistics disabled, using the eager path (%s)", _disabled_reason)
        return fn(*args)


def _raise_recompile_limit(limit: int) -> None:
    """Dynamo's per-function recompilation limit (default 8) counts every arity, dtype and batch-of-one
    specialisation of a stage; past it the function would run uncompiled. Raised once in each thread that
    runs fused statistics, since the setting is thread-local (a per-call ``config.patch`` costs ~0.1 ms, as
    much as a small fused call)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


@contextlib.contextmanager
def _independent_sizes() -> Iterator[None]:
    """Compile with every size its own symbol. By default ("duck sizing") sizes that happen to be equal at
    the first call are assumed equal: rows == columns of a square map at batch 1 would then compile again
    for every other batch size. Set and restored around each call (a plain attribute, ~1 us)."""
    from torch.fx.experimental import _config as fx_config

    previous = fx_config.use_duck_shape
    fx_config.use_duck_shape = False
    try:
        yield
    finally:
        fx_config.use_duck_shape = previous

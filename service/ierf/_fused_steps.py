"""Fused optimiser steps (``torch.optim.*(fused=True)``) write the parameters in one kernel without bumping
their version counters, which is how SRD's parameter-derived cache and LRP's private copy see an update:
after such a step both kept explaining the old weights. A process-wide optimiser step post-hook bumps the
counters of the fused groups' parameters after each step, as an unfused step's in-place writes do."""

from __future__ import annotations

import threading
from typing import Any

import torch

_lock = threading.Lock()
_watching = False


def _bump_fused(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    params = [
        p
        for group in optimizer.param_groups
        if group.get("fused")
        for p in group["params"]
        if isinstance(p, torch.Tensor) and not p.is_inference()
    ]
    if params:
        torch.autograd.graph.increment_version(params)


def watch_fused_optimizers() -> None:
    """Install the hook once per process (idempotent, thread-safe)."""
    global _watching
    with _lock:
        if not _watching:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(_bump_fused)
            _watching = True

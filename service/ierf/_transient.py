"""Hooks ierf puts on a caller's model for the length of one call (CAM's activation capture).

Other explainers on the same model, in other threads, ignore them (SRD refuses models with hooks, which
the traced forward would not run: these are not the caller's), and they record only the forward of the
thread that installed them, so a concurrent SRD pass through the hooked module is not captured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

_MARK = "_ierf_transient_hook"


def transient_hook(fn: F) -> F:
    """Mark a hook function (or method) as ierf's own, installed and removed within one call."""
    setattr(fn, _MARK, True)
    return fn


def is_transient_hook(hook: object) -> bool:
    """True for hooks marked by :func:`transient_hook` (bound methods read their function's mark)."""
    return getattr(hook, _MARK, False) is True

"""Input checks shared by the metrics."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
from torch import nn


def check_maps(maps: object, name: str = "maps") -> torch.Tensor:
    """A finite floating (B, H, W) tensor, or a precise error."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if maps.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {maps.dtype}")
    if maps.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return maps.detach()


def _is_integer(value: object) -> bool:
    """Python's and numpy's integers (settings read from arrays or config sweeps); bools are not counts."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(value: object, name: str) -> int:
    if not _is_integer(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_seed(value: object, name: str = "seed") -> int:
    """An integer torch.Generator.manual_seed takes; anything else named here, not failing inside torch."""
    if not _is_integer(value) or not -(2**63) <= value < 2**64:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64), got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_fraction(value: object, name: str) -> float:
    """A real number (bools are refused, not read as 1); its range is the caller's to check."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_positive_finite(value: object, name: str) -> float:
    """A real number in (0, inf): bools are refused, not read as 1, and NaN or inf never pass."""
    number = check_fraction(value, name)
    if not 0 < number < float("inf"):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return number


def check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own training flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag

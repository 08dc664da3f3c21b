"""Shared plumbing of the baseline explainers: input/target checks, map post-processing, model guard."""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ierf.errors import TOO_SMALL_MESSAGES, InputSizeError, UnsupportedModelError
from ierf.interrupt import checkpoint
from ierf.methods import check_input as shared_check_input
from ierf.methods import check_model_finite

# Hook dictionaries a library may add entries to; restored key by key after every call.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def check_input(x: object, model: nn.Module | None = None) -> torch.Tensor:
    """A (B, C, H, W) floating tensor (``ierf.methods.check_input``) that autograd can differentiate."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    x = shared_check_input(x, dtype)
    if x.is_inference():  # made under torch.inference_mode (servers do): autograd needs an ordinary copy
        with torch.inference_mode(False):
            x = x.clone()
    return x


def check_ordinary_tensors(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are inference tensors (made under ``torch.inference_mode()``).

    Autograd can neither save them for backward nor make them require grad outside inference mode, so every
    autograd-based method failed on such a model with a message about inference tensors deep in a library."""
    found = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_inference()), None)
    if found is not None:
        raise ValueError(
            f"the model's tensors were made under torch.inference_mode() (e.g. {found!r} is an inference tensor), "
            "which autograd-based methods cannot differentiate through: build or load the model outside "
            "torch.inference_mode() (torch.no_grad() is fine), or explain it with 'srd'"
        )


def check_target_range(logits: object, target: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):  # SRD's wording for the same model
        raise UnsupportedModelError(
            f"the model must return one logits tensor, got {type(logits).__name__}: wrap it in a module whose "
            "forward returns the logits (e.g. model(x)[0])"
        )
    if logits.dim() != 2:
        raise ValueError(f"model must return (B, num_classes) logits, got shape {tuple(logits.shape)}")
    k = logits.shape[1]
    if int(target.max()) >= k:  # the wording SRD uses, so every method refuses a class the same way
        raise ValueError(f"target out of range: the model has {k} classes (0..{k - 1}), got {target.tolist()}")


def checked_forward(model: nn.Module, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward, validating the logits shape and target range on every call. The model reads a
    copy of the inputs: a first op in place (``nn.SiLU(inplace=True)``) would otherwise write into the very
    tensor autograd differentiates (refused as a leaf, or a view made without grad) or into the caller's."""

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        checkpoint()  # before each forward (IG runs several): a server stops here for a caller who has gone
        logits = model(inputs.clone())
        check_target_range(logits, target)
        return logits

    return forward


def collapse_channels(attribution: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W) by summing over channels (signed; see the package docstring)."""
    return attribution.sum(dim=1)


def to_input_resolution(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W): bilinear, align_corners=False; a no-op when already at ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


_GUARD_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD_LOCKS_LOCK = threading.Lock()


def _lock_for(model: nn.Module) -> threading.RLock:
    with _GUARD_LOCKS_LOCK:
        lock = _GUARD_LOCKS.get(model)
        if lock is None:
            lock = _GUARD_LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and leave the model exactly as found.

    Restores, even when the body raises: every module's ``training`` flag and every hook dictionary
    (entries a library forgot to remove are dropped). Parameters are left alone: every method takes its
    gradients with ``torch.autograd.grad`` towards inputs or activations, which never writes a parameter's
    ``.grad``, and freezing them (then putting ``.grad`` back) silently erased the gradients of a training
    step that another thread ran on the same model meanwhile. Guarded calls on the same model are
    serialised (one lock per model): otherwise two threads' snapshots would interleave and one could
    restore the other's temporary hooks or flags.
    Gradients are on inside, whatever the caller's ``torch.no_grad()`` or ``torch.inference_mode()``:
    these methods are defined by a backward pass.
    """
    with _lock_for(model), torch.inference_mode(False), torch.enable_grad(), _guarded(model):
        try:
            yield
        except RuntimeError as exc:
            refusal = input_refusal(exc)
            if refusal is None:
                raise
            raise refusal from None


# torch's words for an input the model's layers cannot take (what SRD refuses as InputSizeError): a window
# past the map, or a classifier reading another number of features than the map gives
_TOO_SMALL = (*TOO_SMALL_MESSAGES, "mat1 and mat2 shapes cannot be multiplied")
_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")


def input_refusal(exc: RuntimeError) -> ValueError | None:
    """The ValueError an input the model cannot take deserves (SRD's words), for torch's RuntimeError from
    inside the model; None for any other failure. Named from torch's message, whose batch may be a
    method's own (integrated gradients' and SmoothGrad's batches of copies), not the caller's."""
    message = str(exc)
    channels = _CHANNELS.search(message)
    if channels:
        return ValueError(f"x must have {channels.group(1)} channels, got {channels.group(2)}")
    if any(p in message for p in _TOO_SMALL):
        first = message.strip().splitlines()[0]
        return InputSizeError(f"the input's height and width do not fit this model: {first}")
    return None


@contextlib.contextmanager
def _guarded(model: nn.Module) -> Iterator[None]:
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [{name: dict(getattr(m, name, {})) for name in _HOOK_DICTS} for m in modules]
    try:
        model.eval()
        yield
    finally:
        _restore(modules, training, hooks)


def _restore(modules: list[nn.Module], training: list[bool], hooks: list[dict[str, dict]]) -> None:
    """Put back what ``_guarded`` saved: training flags, and hook dictionaries where entries were added."""
    for m, flag, saved in zip(modules, training, hooks, strict=True):
        m.training = flag
        for name, entries in saved.items():
            current = getattr(m, name, None)
            if current is not None and (current.keys() != entries.keys()):
                current.clear()
                current.update(entries)


def finish(maps: torch.Tensor, size: tuple[int, int], model: nn.Module) -> torch.Tensor:
    """Detached float32 (B, H, W) at input resolution; a NaN map (NaN weights) is refused, never returned."""
    if not bool(torch.isfinite(maps).all()):
        check_model_finite(model, "the map")
    return to_input_resolution(maps.detach().float(), size).contiguous()

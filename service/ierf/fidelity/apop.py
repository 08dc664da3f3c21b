"""APOP: Activation-Pattern-Only Prediction (methods spec §2.7).

Claim reproduced: the on/off pattern of a network's activations, frozen from the real image,
carries most of what the prediction needs - even when the input is replaced by an uninformative
one, the network run through the frozen pattern mostly predicts the original class.

Pattern = for every call of every activation module, the state of each unit:

* ReLU: off (z <= 0) or on (linear); replay: ``z * on``;
* ReLU6 has two thresholds, so three states: off (z <= 0), linear (0 < z < 6), saturated (z >= 6);
  replay: 0, z, or the constant 6;
* MaxPool2d: the argmax index of every window; replay gathers the new input at those indices.

Everything else (convolutions with their biases, batch norm in eval mode, average pooling, linear
layers, residual additions) runs normally on the new input. The published code's APOP forward also
has a "bias scaling" option whose semantics could not be recovered; it is not used here.

Implementation: forward hooks on a private deep copy of the model (the caller's model is never
touched), removed in ``finally``. A module called several times per forward (EfficientNet reuses one
ReLU6 module inside each block) is matched call by call. Every other activation module (SiLU, GELU,
LeakyReLU…, a ReLU subclass with a forward of its own) and every other max-pool (adaptive, 1-d/3-d,
fractional) would choose its state afresh on the replacement input, mixing live gates into the frozen
pattern: models containing one raise UnsupportedModelError naming it. Activations called as functions
inside a forward (``F.relu``) cannot be seen by module hooks at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ierf.errors import UnsupportedModelError
from ierf.srd.graph import rule_type

# The modules APOP freezes, each with the stock class whose forward it must run (a subclass that brings a
# forward of its own computes something else). ReLU6's forward is Hardtanh's: plain Hardtanh is not frozen.
_FROZEN = (nn.ReLU, nn.ReLU6, nn.MaxPool2d)
_ACTIVATIONS_MODULE = nn.ReLU.__module__  # torch.nn.modules.activation: every activation module torch defines


@dataclass
class ActivationPattern:
    """Per hooked module name: one tensor per call (uint8 states, or int64 max-pool indices)."""

    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def units(self) -> int:
        return sum(t.numel() for calls in self.states.values() for t in calls)


def _frozen_kind(module: nn.Module) -> type[nn.Module] | None:
    """The stock class whose pattern ``module`` has, or None when APOP cannot freeze it (the test SRD uses to
    tell a stock module from one with a forward of its own)."""
    return rule_type(module, _FROZEN)


def _is_gate(module: nn.Module) -> bool:
    """An activation or max-pool module: something that decides a state per unit from its input."""
    defined_in = {cls.__module__ for cls in type(module).__mro__}
    return _ACTIVATIONS_MODULE in defined_in or any("MaxPool" in cls.__name__ for cls in type(module).__mro__)


def _patterned_modules(model: nn.Module) -> dict[str, nn.Module]:
    found = {}
    for name, module in model.named_modules():
        if _frozen_kind(module) is not None:
            found[name] = module
        elif _is_gate(module):
            raise UnsupportedModelError(
                f"APOP freezes only nn.ReLU, nn.ReLU6 and nn.MaxPool2d; {name!r} is {type(module).__name__}, which "
                "would decide its state afresh on the replacement input"
            )
    if not any(_frozen_kind(m) in (nn.ReLU, nn.ReLU6) for m in found.values()):
        raise UnsupportedModelError("APOP found no nn.ReLU / nn.ReLU6 modules (functional activations are not hooked)")
    return found


def _relu6_state(out: torch.Tensor) -> torch.Tensor:
    state = torch.zeros_like(out, dtype=torch.uint8)
    state[out > 0] = 1
    state[out >= 6] = 2
    return state


class _Hooks:
    """Record or replay the pattern; every handle removed in :meth:`remove`."""

    def __init__(self, modules: dict[str, nn.Module], pattern: ActivationPattern, replay: bool) -> None:
        self.pattern = pattern
        self.replay = replay
        self.calls = dict.fromkeys(modules, 0)
        self.stash: dict[str, torch.Tensor] = {}
        self.handles = []
        try:
            for name, module in modules.items():
                self.handles.append(module.register_forward_pre_hook(self._pre(name)))
                self.handles.append(module.register_forward_hook(self._post(name)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            z = args[0]
            if isinstance(module, nn.MaxPool2d) and not self.replay:
                _, idx = F.max_pool2d(
                    z, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, True
                )
                self.pattern.states.setdefault(name, []).append(idx)
            elif self.replay:
                self.stash[name] = z.clone()  # in-place activations overwrite z

        return hook

    def _post(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            call = self.calls[name]
            self.calls[name] += 1
            if not self.replay:
                if isinstance(module, nn.ReLU6):
                    self.pattern.states.setdefault(name, []).append(_relu6_state(out))
                elif isinstance(module, nn.ReLU):
                    self.pattern.states.setdefault(name, []).append((out > 0).to(torch.uint8))
                return None
            recorded = self.pattern.states.get(name, [])
            if call >= len(recorded):
                raise ValueError(f"pattern has {len(recorded)} call(s) of {name!r}; the replay made more")
            state, z = recorded[call], self.stash.pop(name)
            if isinstance(module, nn.MaxPool2d):
                if state.shape[:2] != z.shape[:2]:
                    raise ValueError(f"max-pool pattern of {name!r} does not match the input shape")
                return z.flatten(2).gather(2, state.flatten(2)).view(state.shape)
            if state.shape != z.shape:
                raise ValueError(f"pattern of {name!r} has shape {tuple(state.shape)}, input {tuple(z.shape)}")
            if isinstance(module, nn.ReLU6):
                return torch.where(state == 1, z, torch.where(state == 2, torch.full_like(z, 6.0), torch.zeros_like(z)))
            return z * state.to(z.dtype)

        return hook


class APOP:
    """Record a model's activation pattern on real inputs and replay it on other inputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in self.model.modules():  # the copy keeps the caller's hooks: they must not see its replays
            for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks):
                hooks.clear()
        self.modules = _patterned_modules(self.model)

    @torch.no_grad()
    def record(self, x: torch.Tensor) -> tuple[torch.Tensor, ActivationPattern]:
        """Logits of ``x`` and its activation pattern."""
        pattern = ActivationPattern()
        hooks = _Hooks(self.modules, pattern, replay=False)
        try:
            logits = self.model(x)
        finally:
            hooks.remove()
        return logits, pattern

    @torch.no_grad()
    def replay(self, pattern: ActivationPattern, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` computed through ``pattern`` (same batch size and input size as recorded)."""
        hooks = _Hooks(self.modules, pattern, replay=True)
        try:
            logits = self.model(x)
        finally:
            hooks.remove()
        for name, count in hooks.calls.items():
            if count != len(pattern.states.get(name, [])):
                raise ValueError(f"replay called {name!r} {count} times; the pattern has {len(pattern.states[name])}")
        return logits


def uninformative(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """The replacement input: "zeros" (normalised zero = the mean colour) or "noise" (N(0, 1), seeded)."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    raise ValueError(f"kind must be 'zeros' or 'noise', got {kind!r}")


@torch.no_grad()
def apop_agreement(model: nn.Module, x: torch.Tensor, batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Top-1 agreement with the real prediction for the APOP forward and its controls.

    * ``pattern_zeros`` / ``pattern_noise``: own pattern, input replaced by zeros / noise (one N(0, 1)
      draw for all of ``x``, so the numbers do not depend on ``batch_size``);
    * ``plain_zeros`` / ``plain_noise``: control, the replacement input through the normal network;
    * ``shuffled_vs_own``: chance control, another image's pattern with zeros input scored against the
      own image's prediction;
    * ``swapped_follows_pattern`` / ``swapped_follows_input``: the own *real* image run through another
      image's pattern, scored against that other image's prediction / the own one (which of the two
      decides the class when they disagree).

    The shuffled and swapped scores are over the images that could be paired with another one in their
    batch: a last batch of one image has none (NaN when no batch had two images).
    """
    apop = APOP(model)
    totals = dict.fromkeys(
        (
            "pattern_zeros",
            "pattern_noise",
            "plain_zeros",
            "plain_noise",
            "shuffled_vs_own",
            "swapped_follows_pattern",
            "swapped_follows_input",
        ),
        0,
    )
    n = x.shape[0]
    noise = uninformative(x, "noise", seed)
    paired = 0
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size]
        logits, pattern = apop.record(batch)
        pred = logits.argmax(1)
        for kind, fake in (("zeros", torch.zeros_like(batch)), ("noise", noise[start : start + batch_size])):
            totals[f"pattern_{kind}"] += int((apop.replay(pattern, fake).argmax(1) == pred).sum())
            totals[f"plain_{kind}"] += int((apop.model(fake).argmax(1) == pred).sum())
        if batch.shape[0] > 1:
            rolled = torch.roll(torch.arange(batch.shape[0]), 1)
            _, other = apop.record(batch[rolled])
            totals["shuffled_vs_own"] += int((apop.replay(other, torch.zeros_like(batch)).argmax(1) == pred).sum())
            swapped = apop.replay(other, batch).argmax(1)
            totals["swapped_follows_pattern"] += int((swapped == pred[rolled]).sum())
            totals["swapped_follows_input"] += int((swapped == pred).sum())
            paired += batch.shape[0]

    def share(key: str, hits: int) -> float:
        if key.startswith(("pattern", "plain")):
            return hits / n
        return hits / paired if paired else float("nan")

    return {key: share(key, hits) for key, hits in totals.items()}

"""Mutation round 37: SRD tracing of opaque functions (torchvision's ``stochastic_depth``), the pool and
return_indices rules beside them, the small engine modules (``ierf._lazy``, ``ierf._transient``,
``ierf.errors``, ``ierf._fused_steps``, ``ierf.models``), and four mutants of the float64 reference that round
36 left without an outcome.

Each test here kills mutants that every earlier test let through: the reference's handling of shape
arithmetic (checked against the fast engine, which must agree), the refusals of a ``math`` function called on
a traced size and of a direct ``F.max_pool2d_with_indices`` call (which must name the op, not blame tracing or
indexing), the caller's model after a failed trace, the kind of each error (a training-mode stochastic depth,
an input too small, a model changed mid-call), torch's other "too small" wording in the baselines, one fused
optimiser hook per process, and every name ``ierf.models`` exports. R15, R16 and R26 of round 36 turned out to
be caught by existing tests (test_srd_gates, test_srd_silent_maps, test_srd_reference); the in-place
activation test below reaches R26's branch without a max pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.errors import UnsupportedModelError
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference
from torch import nn
from torchvision.ops import stochastic_depth

Op = Callable[[torch.Tensor], torch.Tensor]


class _Net(nn.Module):
    """conv -> ``act`` -> ``op`` -> conv -> ReLU -> global mean -> linear (the second conv and the linear are
    lazy: ``op`` may change the number of channels)."""

    def __init__(self, act: nn.Module, op: Op) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = act
        self.op = op
        self.conv2 = nn.LazyConv2d(4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.op(self.act(self.conv1(x)))
        return self.fc(self.relu(self.conv2(h)).mean((2, 3)))


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, 8, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _net(act: nn.Module, op: Op = lambda h: h, gain: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    model = _Net(act, op).double()
    with torch.no_grad():
        model(_x())  # sizes the lazy modules
        model.conv1.weight.mul_(gain)
    return model.eval()


def _assert_engine_is_reference(model: nn.Module, x: torch.Tensor) -> None:
    """The decomposed logits are the model's and the fast maps are the float64 reference's (targets 0, 2)."""
    dec = ierf.SRD(model, head="exact").decompose(x)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits, model(x), atol=1e-10, rtol=1e-10)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-8)


IN_PLACE_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
}


@pytest.mark.parametrize("name", list(IN_PLACE_ACTIVATIONS))
def test_an_in_place_activation_module_leaves_the_references_pre_activation_as_it_was(name: str) -> None:
    """R26: the reference runs an activation module built with ``inplace=True`` on a copy of z; run on z itself
    it overwrote the pre-activation its ratios are measured against. The suite caught that only through an
    in-place ReLU in front of a max pool (tiny_vgg); ReLU6 above 6 (the first conv's weights are scaled up to
    get there), Hardswish and ELU change z where the map is not zero, and the reference's maps then differ
    from the engine's with no pool involved."""
    model = _net(IN_PLACE_ACTIVATIONS[name](), gain=8.0)
    x = _x()
    with torch.no_grad():
        if name == "relu6":
            assert float(model.conv1(x).max()) > 6  # the clipped range is reached
    _assert_engine_is_reference(model, x)


SHAPE_ARITHMETIC: dict[str, Op] = {
    "channels_minus_one": lambda h: h[:, : h.shape[1] - 1],
    "channels_from_size_minus_three": lambda h: h[:, (h.size(1) - 3) :],
    "channels_one_plus_size_minus_two": lambda h: h[:, 1 : 1 + (h.shape[1] - 2)],
}


@pytest.mark.parametrize("name", list(SHAPE_ARITHMETIC))
def test_a_channel_range_computed_from_the_maps_size_matches_the_reference(name: str) -> None:
    """R13: ``h.shape[1] - 1`` is arithmetic on sizes, not a map minus a constant; the reference took its
    ``+`` and ``-`` for constants added to a map and dropped them on every path (the channel range came out
    whole, or empty, and the path runs failed)."""
    _assert_engine_is_reference(_net(nn.ReLU(), SHAPE_ARITHMETIC[name]), _x())


def test_a_training_mode_stochastic_depth_is_a_bad_call_not_an_unsupported_model() -> None:
    """G18: stochastic depth has a rule; called with ``training=True`` it is refused as dropout in training mode
    is, a plain ValueError telling the caller what to change, not an UnsupportedModelError (which says SRD
    lacks a rule, and to which the program appends the modules without one)."""
    model = _net(nn.ReLU(), lambda h: stochastic_depth(h, 0.5, "row"))
    with pytest.raises(ValueError, match="stochastic depth called with training=True") as info:
        ierf.SRD(model, head="exact").decompose(_x())
    assert not isinstance(info.value, UnsupportedModelError)


class _ScaledBySize(nn.Module):
    """conv -> ReLU, scaled by 1/sqrt(channels) (``math.sqrt`` of a traced size) -> global mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))
        return self.fc((h / math.sqrt(h.shape[1])).mean((2, 3)))


def test_a_math_function_of_a_traced_size_is_refused_by_its_name() -> None:
    """G03: torch.fx records ``math.sqrt(h.shape[1])`` as a call of ``sqrt`` only while it patches the ``math``
    module (its default autowrap search, which the tracer extends with the packages re-exporting an opaque
    function, never replaces); otherwise the call raised inside tracing and the refusal blamed tracing and
    data-dependent control flow instead of naming the function SRD has no rule for."""
    model = _ScaledBySize().double().eval()
    with pytest.raises(UnsupportedModelError, match=r"no SRD rule for function sqrt") as info:
        ierf.SRD(model, head="exact").decompose(_x())
    assert "could not trace" not in str(info.value)


def test_max_pool2d_with_indices_called_directly_is_refused_as_such() -> None:
    """G28: ``F.max_pool2d_with_indices`` is public and may be called with the kernel alone; its rule refuses
    it for its indices, whatever arguments it got (handed to the max-pool rule, such a call took the default
    ``return_indices=False``, was pooled as a plain max pool, and was refused only at its ``[0]``, as indexing
    a feature map)."""
    model = _net(nn.ReLU(), lambda h: F.max_pool2d_with_indices(h, 2)[0])
    with pytest.raises(UnsupportedModelError, match=r"max_pool2d_with_indices.*max pooling with return_indices"):
        ierf.SRD(model, head="exact").decompose(_x())


class _Branching(nn.Module):
    """A forward that records what it computed on itself, then branches on the data (fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.seen: list[torch.Tensor] = []
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))
        self.seen.append(h)
        self.last = h
        self.calls += 1
        if h.sum() > 0:  # data-dependent control flow: tracing fails here
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_a_failed_trace_leaves_the_callers_model_as_it_was() -> None:
    """G10: tracing runs the forward, which wrote an fx Proxy into ``self.last`` and ``self.seen`` and counted
    the call before it failed; the refusal must still put the model's attributes and containers back (the
    restore runs however the trace ends), or the caller's model is left holding tracing debris."""
    model = _Branching().double().eval()
    with pytest.raises(UnsupportedModelError, match=r"could not trace _Branching with torch\.fx"):
        ierf.SRD(model, head="exact")
    assert model.seen == [] and model.calls == 0 and "last" not in vars(model)
    with torch.no_grad():  # and it still runs as before
        model(_x())
    assert len(model.seen) == 1 and model.calls == 1


def test_each_error_kind_tells_whose_fault_it_is() -> None:
    """G42 G43: an input too small for the model's windows is an InputSizeError, a ValueError the caller fixes
    by resizing, and not an UnsupportedModelError (callers that fall back to another explainer on that, as
    the manipulation metric does, would switch explainers over an image size); ModelChangedError is no bad
    call: the server reports it as its own fault (INTERNAL), not the caller's (INVALID_ARGUMENT)."""
    import grpc
    from ierf.errors import InputSizeError, ModelChangedError
    from ierf.serving.errors import to_status

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    )
    with torch.no_grad():
        model(torch.zeros(1, 3, 12, 12))
    srd = ierf.SRD(model.eval())
    with pytest.raises(InputSizeError, match="too small") as info:
        srd.saliency(torch.randn(1, 3, 5, 5), 1)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, UnsupportedModelError)
    changed = ModelChangedError("the model's parameters were written while SRD explained it")
    assert not isinstance(changed, ValueError)
    assert to_status(changed)[0] == grpc.StatusCode.INTERNAL


def test_a_kernel_larger_than_the_map_is_an_input_size_error_for_the_baselines_too() -> None:
    """G45: torch words a convolution kernel larger than its (padded) input "Kernel size can't be greater than
    actual input size", not "too small"; the baselines must still read it as an input that does not fit (an
    InputSizeError naming torch's reason), not pass on torch's RuntimeError."""
    from ierf.errors import InputSizeError
    from ierf.methods import create_explainer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    with pytest.raises(InputSizeError, match="Kernel size can't be greater than actual input size"):
        create_explainer("gradient", model).saliency(torch.randn(1, 3, 5, 5), 1)


def test_watching_fused_optimisers_again_installs_no_second_hook() -> None:
    """G49: ``watch_fused_optimizers`` runs wherever a cache reads version counters (SRD's derived tensors, LRP)
    and must install its step hook once per process: a fused step then bumps each parameter's version by one,
    as an unfused step's in-place write does, however often it was called (each call used to add a hook)."""
    from ierf._fused_steps import watch_fused_optimizers

    for _ in range(3):
        watch_fused_optimizers()
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    fused = torch.optim.SGD(lin.parameters(), lr=0.1, fused=True)
    plain = torch.optim.SGD(lin.parameters(), lr=0.1)
    lin(torch.ones(1, 2)).sum().backward()
    bumps = []
    for opt in (fused, plain):
        before = lin.weight._version
        opt.step()
        bumps.append(lin.weight._version - before)
    assert bumps == [1, 1]


def test_every_name_ierf_models_exports_resolves_to_its_definition() -> None:
    """G54 G55: ``ierf.models`` loads its torch-needing names on first use from the module each is mapped to; a
    name of ``__all__`` missing from that map was an AttributeError (``from ierf.models import TF_LITE``)."""
    import importlib

    import ierf.models as models

    homes = ("ierf.models.preprocessing", "ierf.models.registry", "ierf.models.classes")
    for name in models.__all__:
        value = getattr(models, name)
        assert any(vars(importlib.import_module(home)).get(name) is value for home in homes), name

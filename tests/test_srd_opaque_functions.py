"""Plain Python functions with a rule (torchvision's ``stochastic_depth``) stay single nodes of the trace,
however the model's code reaches them, and refusals name the op the user wrote.

torch.fx keeps such a function opaque only where it was ``fx.wrap``-ed: inside torchvision's own module.
Called through ``torchvision.ops`` or imported by name into the model's module, fx used to trace into it,
and a training-mode call was refused as "no SRD rule for function empty" (the random mask's allocation).
"""

from __future__ import annotations

from collections.abc import Callable

import ierf
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ierf.errors import UnsupportedModelError
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference
from torch import nn
from torchvision.ops import stochastic_depth

Block = Callable[[torch.Tensor], torch.Tensor]


class _Residual(nn.Module):
    """conv -> ReLU -> (conv, then ``branch``) + skip -> ReLU -> global mean -> linear."""

    def __init__(self, branch: Block) -> None:
        super().__init__()
        self.branch = branch
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1(x))
        h = self.relu(h + self.branch(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def _model(branch: Block) -> nn.Module:
    torch.manual_seed(0)
    return _Residual(branch).double().eval()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, 7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


SPELLINGS: dict[str, Callable[..., torch.Tensor]] = {
    "through_the_package": lambda y, *a: torchvision.ops.stochastic_depth(y, *a),
    "imported_by_name": lambda y, *a: stochastic_depth(y, *a),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_a_training_mode_stochastic_depth_is_refused_by_its_own_name(spelling: str) -> None:
    """The default ``training=True`` drops rows at random even in eval mode: refused as stochastic depth,
    not as the ``torch.empty`` inside it."""
    call = SPELLINGS[spelling]
    model = _model(lambda y: call(y, 0.5, "row"))
    with pytest.raises(ValueError, match=r"stochastic_depth.*stochastic depth called with training=True"):
        ierf.SRD(model, head="exact").decompose(_x())


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_an_eval_mode_stochastic_depth_is_the_identity(spelling: str) -> None:
    """``training=False`` (or ``p=0``) passes the branch through: the model's logits and the float64
    reference's maps."""
    call = SPELLINGS[spelling]
    for args in ((0.5, "row", False), (0.0, "batch")):
        model = _model(lambda y, args=args: call(y, *args))
        x = _x()
        dec = ierf.SRD(model, head="exact").decompose(x)
        with torch.no_grad():
            torch.testing.assert_close(dec.logits, model(x), atol=1e-10, rtol=1e-10)
        ref = ReferenceSRD(model)
        assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-8)


def test_tracing_leaves_torchvision_ops_as_it_was() -> None:
    """The tracer swaps ``torchvision.ops.stochastic_depth`` for a recording wrapper only while it traces,
    also when the trace fails."""
    before = torchvision.ops.stochastic_depth
    with pytest.raises(ValueError):
        ierf.SRD(_model(lambda y: torchvision.ops.stochastic_depth(y, 0.5, "row")), head="exact").decompose(_x())
    ierf.SRD(_model(lambda y: torchvision.ops.stochastic_depth(y, 0.5, "row", False)), head="exact")
    assert torchvision.ops.stochastic_depth is before is stochastic_depth
    assert torchvision.ops.stochastic_depth.__module__ == "torchvision.ops.stochastic_depth"


def test_functional_max_pool_with_indices_is_refused_as_such() -> None:
    """``F.max_pool2d(..., return_indices=True)`` is recorded as ``max_pool2d_with_indices``: refused with the
    max-pool rule's reason, not as an op without any rule."""
    model = _model(lambda y: F.max_pool2d(y, 3, 1, 1, return_indices=True)[0])
    with pytest.raises(UnsupportedModelError, match=r"max_pool2d_with_indices.*max pooling with return_indices"):
        ierf.SRD(model, head="exact").decompose(_x())

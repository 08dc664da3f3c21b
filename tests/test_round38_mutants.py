"""Mutation round 38: the engine's new refusals (``SRD._own_logits`` and ``SRD._check_reproduces``).

Each test here kills mutants the existing tests let through: running out of memory in the model's own
forward says nothing about the model (M71, M80: the check waits for a call that works), any exception the
model raises is refused, not only a RuntimeError (M73), and the refusal quotes the first line of the model's
message, shortened (M75, M76). The alert mutants of the round are killed by new cases in
tests/serving/alerts_test.yaml, the SDK's and the dashboard's by
tests/serving/test_round38_mutants.py.
"""

from __future__ import annotations

import ierf
import pytest
import torch
import torch.nn.functional as F
from ierf.errors import UnsupportedModelError
from torch import nn


class _FailsOnce(nn.Module):
    """conv -> ReLU -> global mean -> linear, whose own forward raises ``fail`` once if it is set. Set after
    the explainer is built, the traced graph never sees it (as a flag read in forward, or an allocation that
    fails only in the model's own run)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.fail: BaseException | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail is not None:
            fail, self.fail = self.fail, None
            raise fail
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()],
    ids=["cuda-oom", "memory-error"],
)
def test_the_model_running_out_of_memory_in_its_own_forward_is_not_a_refusal(error: BaseException) -> None:
    """M71, M80: out of memory in the model's own forward (the extra forward pass run before the
    decomposition) says nothing about the model; SRD explains, and checks the next call instead. Taken for a
    broken model, the first call on a busy GPU refused a model that works."""
    torch.manual_seed(0)
    model = _FailsOnce().eval()
    srd = ierf.SRD(model)
    x = torch.rand(1, 3, 8, 8)
    model.fail = error
    saliency = srd.saliency(x, 1)
    assert model.fail is None  # the model's own forward did run, and raised
    assert torch.allclose(saliency.sum(), model(x)[0, 1], rtol=1e-4, atol=1e-5)
    assert not srd.__dict__.get("_reproduces")  # not checked yet: the next call checks
    srd.saliency(x, 1)
    assert srd.__dict__.get("_reproduces")


@pytest.mark.parametrize("error", [ValueError, AssertionError, TypeError, KeyError])
def test_a_model_whose_own_forward_raises_anything_is_refused(error: type[Exception]) -> None:
    """M73: the refusal must hold for whatever the model raises (an ``assert`` on its input, a ValueError of
    its own checks, a KeyError from a dict of heads), not for RuntimeError only."""
    model = _FailsOnce().eval()
    srd = ierf.SRD(model)
    model.fail = error("the model's own check failed")
    with pytest.raises(UnsupportedModelError, match=rf"own forward raises {error.__name__} \(") as caught:
        srd.saliency(torch.rand(1, 3, 8, 8), 1)
    assert isinstance(caught.value.__cause__, error)  # chained: the model's own traceback stays reachable


def test_the_refusal_quotes_the_first_line_of_the_model_error_shortened() -> None:
    """M75, M76: the model's message is quoted by its first line, cut to 200 characters: a multi-line
    traceback-like message, or a tensor printed into it, would swamp the refusal (and a service's error
    reply)."""
    model = _FailsOnce().eval()
    srd = ierf.SRD(model)
    model.fail = RuntimeError("shape mismatch in block 3\nfull tensor: " + "0.123, " * 200)
    with pytest.raises(UnsupportedModelError) as caught:
        srd.saliency(torch.rand(1, 3, 8, 8), 1)
    message = str(caught.value)
    assert "own forward raises RuntimeError (shape mismatch in block 3) on this input" in message
    assert "full tensor" not in message and "\n" not in message
    model.fail = RuntimeError("x" * 150 + " " + "y" * 150)
    with pytest.raises(UnsupportedModelError) as caught:
        srd.saliency(torch.rand(1, 3, 8, 8), 1)
    message = str(caught.value)
    assert "y" * 150 not in message and "[...]" in message, message

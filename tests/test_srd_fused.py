"""The compiled stage statistics (ierf.srd.fused) against the eager path, and their fallback."""

from __future__ import annotations

import copy
import logging
import threading

import ierf
import pytest
import torch
from ierf.srd import fused
from srd_nets import all_nets

# The nets added for graph rules (max-pool of a max-pool, channel indexing, operators as linear maps) bring
# no stage statistics the others lack, only new arities to compile (about 70 s on two cores for tiny_googlenet).
GRAPH_RULE_NETS = ("tiny_googlenet", "channel_picks", "tiny_shufflenet", "signed_scaled")
NETS = {name: net for name, net in all_nets().items() if name not in GRAPH_RULE_NETS}
needs_compiler = pytest.mark.skipif(not fused._compiler_available(), reason="no C++ compiler for Inductor")


@pytest.fixture(autouse=True)
def _fusion_on(monkeypatch):
    monkeypatch.setenv(fused.ENV_SWITCH, "1")


def _decompose(model, x, monkeypatch, switch: str):
    monkeypatch.setenv(fused.ENV_SWITCH, switch)
    with torch.no_grad():
        return ierf.SRD(model, head="exact").decompose(x)


NO_FUSED_STAGE = {"composed", "linear"}


@needs_compiler
@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_stages_equal_the_eager_path(name, dtype, monkeypatch):
    model, hw = NETS[name]
    model = copy.deepcopy(model).to(dtype)  # the shared test nets stay float64
    x = torch.randn(2, 3, *hw, dtype=dtype, generator=torch.Generator().manual_seed(4))
    calls = []
    real_run = fused.run

    def counting_run(fn, *args):
        calls.append(fn.__name__)
        return real_run(fn, *args)

    monkeypatch.setattr(fused, "run", counting_run)
    eager = _decompose(model, x, monkeypatch, "0")
    assert not calls
    fast = _decompose(model, x, monkeypatch, "1")
    assert fused.disabled_reason() is None
    # fusion covers stages with several paths; these nets have none (one path per stage or no bias)
    assert bool(calls) == (name not in NO_FUSED_STAGE), calls
    # float64 checks the fusion itself; in float32 both paths are off the float64 ratios by up to 1e-4 on
    # squeeze_excite (ratios up to ~150 where contributions cancel), whichever library ran the products
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for a, b in zip(eager.stages, fast.stages, strict=True):
        assert a.routes == b.routes
        torch.testing.assert_close(b.mu, a.mu, atol=tol, rtol=tol)
    torch.testing.assert_close(fast.saliency(1), eager.saliency(1), atol=tol, rtol=tol)


@needs_compiler
def test_a_failed_compilation_falls_back_to_the_eager_path(monkeypatch, caplog):
    model, hw = NETS["tiny_resnet"]
    x = torch.randn(1, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    eager = _decompose(model, x, monkeypatch, "0")

    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error: no such header\nmore detail")

    monkeypatch.setattr(fused, "_compiled", {"stage_stats": broken, "single_path_stats": broken})
    monkeypatch.setattr(fused, "_disabled_reason", None)
    with caplog.at_level(logging.WARNING, logger="ierf.srd.fused"):
        fast = _decompose(model, x, monkeypatch, "1")
    assert fused.disabled_reason() == "RuntimeError: C++ compile error: no such header"
    assert "fused SRD statistics disabled" in caplog.text
    assert not fused.enabled(torch.device("cpu"))  # off for the rest of the process
    torch.testing.assert_close(fast.saliency(0), eager.saliency(0), atol=0, rtol=0)


@needs_compiler
def test_the_switch(monkeypatch):
    cpu = torch.device("cpu")
    assert fused.enabled(cpu) and not fused.enabled(torch.device("meta"))
    for off in ("", "0"):
        monkeypatch.setenv(fused.ENV_SWITCH, off)
        assert not fused.enabled(cpu)  # opt-in: compiling only pays for batch work


@needs_compiler
def test_one_shape_variant_too_many_runs_that_stage_uncompiled_and_keeps_fusion(monkeypatch):
    model, hw = NETS["tiny_resnet"]
    x = torch.randn(1, 3, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    eager = _decompose(model, x, monkeypatch, "0")

    class FailOnRecompileLimitHit(Exception):  # the name Dynamo's own exception carries
        pass

    def over_limit(*args, **kwargs):
        raise FailOnRecompileLimitHit("recompile limit reached")

    monkeypatch.setattr(fused, "_compiled", {"stage_stats": over_limit, "single_path_stats": over_limit})
    monkeypatch.setattr(fused, "_disabled_reason", None)
    fast = _decompose(model, x, monkeypatch, "1")
    assert fused.disabled_reason() is None and fused.enabled(torch.device("cpu"))
    torch.testing.assert_close(fast.saliency(0), eager.saliency(0), atol=1e-12, rtol=1e-12)


class _DeadOneByOne(torch.nn.Module):
    """A strongly negative stem bias kills every channel around a zero input patch; the biased 1x1 convolution
    after it is a one-path stage whose pre-activation there is its bias alone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 5, 1)
        self.act1, self.act2 = torch.nn.ReLU(), torch.nn.ReLU()
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean((2, 3)))


@needs_compiler
def test_fused_one_path_stage_gives_no_ratio_where_the_path_contributes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Spec §2.4: where a one-path stage's z is its bias alone (the path contributes exactly 0), the bias has
    nobody to be shared with and the ratio is 0; the fused statistics must agree with the eager path there
    (a ratio of 1 would hand the dead path the bias's relevance)."""
    torch.manual_seed(0)
    model = _DeadOneByOne().double().eval()
    with torch.no_grad():
        model.conv1.bias.fill_(-1.0)
        model.conv2.bias.uniform_(0.5, 1.0)  # z = bias > 0 where the path is dead
    x = 3 * torch.randn(1, 3, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x[:, :, 2:9, 3:10] = 0
    assert bool((model.act1(model.conv1(x)) == 0).all(1).any())
    eager = _decompose(model, x, monkeypatch, "0")
    fast = _decompose(model, x, monkeypatch, "1")
    assert fused.disabled_reason() is None
    for a, b in zip(eager.stages, fast.stages, strict=True):
        torch.testing.assert_close(b.mu, a.mu, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast.saliency(1), eager.saliency(1), atol=1e-10, rtol=1e-10)


def test_a_failing_compiled_call_restores_duck_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Independent sizes are set only around each compiled call and restored even when the call raises (then
    the eager fallback runs): a leak would change how every later torch.compile in the process specialises."""
    from torch.fx.experimental import _config as fx_config

    saved = fx_config.use_duck_shape  # set and put back by hand: monkeypatch's undo deletes a torch config entry
    fx_config.use_duck_shape = True
    seen: list[bool] = []

    def probe(v: torch.Tensor) -> torch.Tensor:
        return v + 1

    def broken(*args: torch.Tensor) -> torch.Tensor:
        seen.append(fx_config.use_duck_shape)
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(fused, "_compiled", {"probe": broken})
    monkeypatch.setattr(fused, "_disabled_reason", None)
    try:
        out = fused.run(probe, torch.zeros(3))
        assert seen == [False]  # compiled with every size its own symbol
        assert fx_config.use_duck_shape is True  # and restored although the compiled call raised
    finally:
        fx_config.use_duck_shape = saved
    torch.testing.assert_close(out, torch.ones(3))  # the eager fallback's answer


def test_first_compilation_raises_the_recompile_limit_and_never_lowers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each arity / flag / dtype combination of a stage is its own graph: Dynamo's default limit (8) would
    leave later stages uncompiled, so the first compilation lifts it to RECOMPILE_LIMIT, and a higher limit
    set by the application stays."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    # set and put back by hand: monkeypatch's undo deletes the entry from torch's config module (every later
    # read of it, in any thread, then raised AttributeError)
    saved = getattr(dynamo_config, name)
    try:
        for before, after in ((8, fused.RECOMPILE_LIMIT), (10 * fused.RECOMPILE_LIMIT, 10 * fused.RECOMPILE_LIMIT)):
            setattr(dynamo_config, name, before)
            monkeypatch.setattr(fused, "_compiled", {})
            monkeypatch.setattr(fused, "_disabled_reason", None)
            monkeypatch.setattr(fused, "_per_thread", threading.local())  # a thread that has not run fused yet
            fused.run(fused.single_path_stats, torch.ones(2, 3), [torch.zeros(3)])
            assert getattr(dynamo_config, name) == after
    finally:
        setattr(dynamo_config, name, saved)

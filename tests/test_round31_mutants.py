"""Mutation round 31 on ``ierf.srd.gemm`` (which library runs float32 products), ``ierf.srd.fused`` (the
compiled stage statistics and their switch), ``ierf.srd.precision`` (full float32 on CUDA) and
``ierf.srd.graph`` (tracing without touching the caller's model, which modules count as stock ones, the
names of maps, the model-state checks).

Each test fails on a plausible slip that the suite let through: a tensor that is not on the CPU sent to
oneDNN; ``gemm.chosen()`` measuring instead of reporting; the fused statistics' arithmetic (sum of paths and
biases, squared norm, norms, dot products, the one-path ratio where the path or z is zero), which the suite
checks only through compiled runs; ``IERF_FUSED`` read as anything but "1"; a ``$CXX`` that is not installed
counted as a compiler; a user's higher recompile limit lowered; the duck-shape setting left changed after an
error; TF32 flags switched for a device that is not CUDA; a tensor attribute the model already had frozen into
the program; list items replaced in place, large tables and submodules' containers not put back after tracing;
a module's forward pre-hook not refused; an uninitialised lazy model reported as hooked; a Conv2d subclass
with its own forward taken for a stock Conv2d; a module that returns its input made an alias of that map;
several identities after a block's activation; a functional named like a running activation module split from
its counted name, a top-level functional named like a block without its ``()``, an in-place functional named
``relu_``, and a block called twice but returning an activation only once taken for a repeated map.
"""

from __future__ import annotations

import io

import ierf
import pytest
import torch
from ierf.srd import fused, gemm, precision
from torch import nn


def _t(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ---- gemm -----------------------------------------------------------------------------------------------------
def test_only_cpu_tensors_take_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """K01: oneDNN's 1x1 convolution is the CPU library; a float32 tensor elsewhere (CUDA, meta) keeps
    ``rows @ kernel.T`` whatever the CPU measurement chose."""
    monkeypatch.setattr(gemm, "_choice", "onednn")
    assert gemm.use_onednn(torch.zeros(2, 3))
    assert not gemm.use_onednn(torch.zeros(2, 3, device="meta"))
    rows, kernel = torch.zeros(5, 3, device="meta"), torch.zeros(4, 3, device="meta")
    assert gemm.rows_by_kernel(rows, kernel).shape == (5, 4)


def test_chosen_reports_without_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    """K10: ``chosen()`` is what the service's metrics read ("none yet" before the first product): it must
    not measure, or set, a choice itself."""
    monkeypatch.delenv(gemm.ENV, raising=False)
    monkeypatch.setattr(gemm, "_choice", None)
    assert gemm.chosen() is None
    assert gemm.chosen() is None and gemm._choice is None
    monkeypatch.setattr(gemm, "_choice", "blas")
    assert gemm.chosen() == "blas"


# ---- fused: the statistics' arithmetic (run eagerly, as the fallback runs it) ----------------------------------
def test_stage_stats_are_the_stage_quantities() -> None:
    """F01-F06, F18, F19: z = every dense path + every tap's contribution + every bias; ||z||^2; per path its
    <C, z> and ||C|| (only where asked); per tap tensor its per-tap dot products and norms; per bias <beta, z>.
    Written out here by their definitions, on two dense paths, two tap tensors and two biases."""
    dense = [_t(3, 4, 5, seed=1), _t(3, 4, 5, seed=2)]
    taps = [_t(3, 4, 9, 5, seed=3), _t(3, 4, 2, 5, seed=4)]
    biases = [_t(5, seed=5), _t(5, seed=6)]
    z, zz, dense_dots, dense_norm, tap_dots, tap_norm, bias_dots = fused.stage_stats(
        dense, taps, biases, (True, False), (False, True)
    )
    want_z = dense[0] + dense[1] + taps[0].sum(2) + taps[1].sum(2) + biases[0] + biases[1]
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(zz, torch.einsum("...c,...c->...", want_z, want_z))
    for got, p in zip(dense_dots, dense, strict=True):
        torch.testing.assert_close(got, torch.einsum("...c,...c->...", p, want_z))
    torch.testing.assert_close(dense_norm[0], torch.linalg.vector_norm(dense[0], dim=-1))
    assert dense_norm[1] is None
    for got, y in zip(tap_dots, taps, strict=True):
        torch.testing.assert_close(got, torch.einsum("...tc,...c->...t", y, want_z))
        assert got.shape == y.shape[:-1]
    assert tap_norm[0] is None
    torch.testing.assert_close(tap_norm[1], torch.linalg.vector_norm(taps[1], dim=-1))
    for got, beta in zip(bias_dots, biases, strict=True):
        torch.testing.assert_close(got, want_z @ beta)


def test_single_path_stats_give_a_ratio_only_where_path_and_z_are_nonzero() -> None:
    """F07-F09 (spec §2.4): a one-path stage's z is the path plus all its biases, and its ratio is 1 where the
    path carries something to a nonzero z, else 0: where the path is exactly 0 (z = the biases alone) and
    where path and biases cancel to z = 0."""
    part = _t(2, 3, 4, seed=7)
    biases = [
        torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64),
        torch.tensor([0.25, 4.0, -1.0, 2.0], dtype=torch.float64),
    ]
    part[0, 0] = 0.0  # a dead path: z is the biases alone
    part[1, 2] = -(biases[0] + biases[1])  # a live path cancelled by the biases: z = 0 (exact in binary)
    z, carried = fused.single_path_stats(part, biases)
    torch.testing.assert_close(z, part + biases[0] + biases[1])
    want = torch.ones(2, 3, dtype=torch.float64)
    want[0, 0] = 0.0
    want[1, 2] = 0.0
    assert carried.dtype == z.dtype
    torch.testing.assert_close(carried, want, atol=0, rtol=0)


# ---- fused: the switch and the compiler's settings ------------------------------------------------------------
@pytest.mark.skipif(not fused._compiler_available(), reason="no C++ compiler for Inductor")
def test_only_the_value_1_turns_fusion_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """F10: ``IERF_FUSED=1`` is the documented switch; other spellings ("true", "yes", "on") leave the
    default eager path, rather than starting 10-30 s of compilation the user did not ask for."""
    monkeypatch.setattr(fused, "_disabled_reason", None)
    for value in ("true", "yes", "on", "2", " 1"):
        monkeypatch.setenv(fused.ENV_SWITCH, value)
        assert not fused.enabled(torch.device("cpu")), value
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    assert fused.enabled(torch.device("cpu"))


def test_a_cxx_that_is_not_installed_is_no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """F13: ``$CXX`` counts only if it names a program that exists; with nothing else on the PATH fusion must
    stay off (Inductor would fail on the first stage and print a compiler error)."""
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, no c++
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert fused._compiler_available.__wrapped__() is False
    monkeypatch.delenv("CXX")
    assert fused._compiler_available.__wrapped__() is False


def test_raising_the_recompile_limit_never_lowers_a_users_setting() -> None:
    """F15: the limit is raised to at least 64 in each thread; a process that set a higher one keeps it."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    before = getattr(dynamo_config, name)
    try:
        setattr(dynamo_config, name, 500)
        fused._raise_recompile_limit(fused.RECOMPILE_LIMIT)
        assert getattr(dynamo_config, name) == 500
        setattr(dynamo_config, name, 8)
        fused._raise_recompile_limit(fused.RECOMPILE_LIMIT)
        assert getattr(dynamo_config, name) == fused.RECOMPILE_LIMIT
    finally:
        setattr(dynamo_config, name, before)


def test_independent_sizes_are_set_inside_and_put_back_after_an_error() -> None:
    """F16, F17: every size its own symbol while compiling (duck sizing off), and the caller's setting back
    afterwards, also when the compiled call raises (the fallback then runs eagerly in the same thread)."""
    from torch.fx.experimental import _config as fx_config

    before = fx_config.use_duck_shape
    with pytest.raises(KeyError), fused._independent_sizes():
        assert fx_config.use_duck_shape is False
        raise KeyError("a compilation error")
    assert fx_config.use_duck_shape == before


# ---- precision ------------------------------------------------------------------------------------------------
def _tf32_settings() -> tuple:
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_tf32_flags_are_touched_for_cuda_only() -> None:
    """N02: the process-wide TF32 flags are CUDA's; SRD on another device (meta, a tensor-less dry run) must
    not switch them under another thread's CUDA work."""
    before = _tf32_settings()
    with precision.full_float32(torch.device("meta")):
        assert _tf32_settings() == before
    assert _tf32_settings() == before


# ---- graph: the caller's model as it was ----------------------------------------------------------------------
class _Offset(nn.Module):
    """A per-channel offset held as a plain tensor attribute (neither parameter nor buffer) of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.offset = torch.full((4, 1, 1), 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x) + self.offset).mean((2, 3)))


def test_a_tensor_attribute_the_model_already_had_is_read_live() -> None:
    """G11: only tensors the forward itself creates are kept by the program as constants; a tensor attribute
    the model held before tracing stays the model's, so setting a new one changes what SRD decomposes (as it
    changes what the model computes), instead of SRD silently explaining the old value."""
    torch.manual_seed(0)
    model = _Offset().eval()
    x = torch.randn(2, 3, 6, 6)
    explainer = ierf.SRD(model)
    torch.testing.assert_close(explainer.decompose(x).logits, model(x).detach())
    model.offset = torch.tensor([-0.5, 1.0, 0.25, -2.0]).view(4, 1, 1)
    dec = explainer.decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach())
    torch.testing.assert_close(dec.relevance(1).sum((1, 2)), dec.logits[:, 1], atol=1e-4, rtol=1e-4)


class _Writes(nn.Module):
    """Writes into what it holds: one slot of a list, a large table, and (below) a submodule's list."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.last: list = [None]
        self.table = {i: i for i in range(1000)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        self.last[0] = h  # same length, another item
        self.table[0] = h  # a container of 1000 entries
        return self.fc(h.mean((2, 3)))


def test_an_item_replaced_in_a_list_or_in_a_large_table_is_put_back() -> None:
    """G19, G21: tracing runs forward; a list whose length did not change but whose item did, and a table of
    1000 entries (well under the 100 000 that are not walked), must be left as they were, not holding fx
    Proxies (which break ``torch.save`` and any later use of the slot)."""
    model = _Writes().eval()
    ierf.SRD(model)
    assert model.last[0] is None
    assert model.table[0] == 0 and len(model.table) == 1000
    torch.save(model, io.BytesIO())


class _Tap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.feats: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        self.feats.append(h)
        return h


def test_containers_held_by_submodules_are_put_back_too() -> None:
    """G23: a feature hook written as a list in a submodule (not on the root) is walked and restored as well."""
    model = nn.Sequential(_Tap(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    explainer = ierf.SRD(model)
    assert model[0].feats == []
    x = torch.randn(1, 3, 5, 5)
    explainer.decompose(x)
    assert len(model[0].feats) == 1 and isinstance(model[0].feats[0], torch.Tensor)  # the real forward's


# ---- graph: the model-state checks -------------------------------------------------------------------------
def test_a_forward_pre_hook_added_after_the_first_call_is_refused() -> None:
    """G41, G49: a module's forward *pre*-hook (it may rewrite the module's input) is not run by the traced forward
    any more than a forward hook: one added after the explainer's first call (whose trace check would have
    seen it) is refused by name, not left out of the maps."""
    torch.manual_seed(0)
    model = _Offset().eval()
    explainer = ierf.SRD(model)
    x = torch.randn(1, 3, 5, 5)
    explainer.saliency(x, 0)
    handle = model.conv.register_forward_pre_hook(lambda module, args: (2 * args[0],))
    try:
        with pytest.raises(ValueError, match=r"forward hooks \(on 'conv'\)"):
            explainer.saliency(x, 0)
    finally:
        handle.remove()
    explainer.saliency(x, 0)


def test_an_uninitialised_lazy_model_is_named_as_lazy_not_as_hooked() -> None:
    """G48: a model that is itself an uninitialised lazy module is told to run one forward first (its
    initialisation pre-hook would otherwise be reported as the caller's forward hook)."""
    with pytest.raises(ValueError, match=r"uninitialised lazy modules \('LazyLinear'\)"):
        ierf.SRD(nn.LazyLinear(3))


# ---- graph: which modules are taken for a stock class ----------------------------------------------------------
class _PaddedConv(nn.Conv2d):
    """TensorFlow's "same" padding for an even kernel, written in the subclass's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_a_conv_subclass_with_its_own_forward_is_traced_through() -> None:
    """G02: a subclass that overrides ``forward`` computes something else than its stock class (here a padded
    input): its own code is decomposed, so the logits are the model's and the maps conserve them; taken for
    a stock Conv2d, SRD would decompose the unpadded convolution."""
    torch.manual_seed(0)
    model = nn.Sequential(_PaddedConv(3, 4, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = model.double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    dec = ierf.SRD(model).decompose(x)
    torch.testing.assert_close(dec.logits, model(x).detach())
    torch.testing.assert_close(dec.relevance(1).sum((1, 2)), dec.logits[:, 1])


# ---- graph: names of maps -----------------------------------------------------------------------------------
def test_a_block_ending_in_dropout_then_identity_is_its_activations_name() -> None:
    """G30: a block's output handed on by several identities in a row (eval dropout, then nn.Identity) is still
    its activation's map, so the block's name addresses it."""
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.1), nn.Identity())
    model = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    explainer = ierf.SRD(model)
    assert explainer.layers == ["0"]
    assert explainer.program.source_id("0") == explainer.program.source_id("0.1")


class _PassThrough(nn.Module):
    """Returns its input unchanged without an op of its own (a disabled stage, a "same" padding of zero)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _WithPassThrough(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.skip = _PassThrough()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.skip(self.act(self.conv1(x)))
        return self.fc(self.act2(self.conv2(h)).mean((2, 3)))


def test_a_module_that_returns_its_input_is_not_a_name_of_that_map() -> None:
    """G07, G08: a module whose forward hands back a value made elsewhere (no node of its own) does not
    become an alias of that value's map: the map keeps its activation's name, and the pass-through's name
    is refused as no stage boundary."""
    explainer = ierf.SRD(_WithPassThrough().eval())
    assert explainer.layers == ["act", "act2"]
    with pytest.raises(ValueError, match=r"'skip' \(_PassThrough\) is not a stage boundary"):
        explainer.program.source_id("skip")


class _MixedRelus(nn.Module):
    """One block applies ``F.relu`` and also runs its own ``self.relu`` module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(nn.functional.relu(self.conv1(x))))


def test_a_functional_named_like_a_running_activation_module_shares_its_counted_name() -> None:
    """G25: ``F.relu`` inside a block that also runs a ``relu`` module is counted with it, in call order
    (``block.relu:0`` the functional, ``block.relu:1`` the module, also ``block.relu``); ``()`` is only for a
    functional whose name is the path of a module that is not a running activation."""
    model = nn.Sequential()
    model.add_module("block", _MixedRelus())
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(4, 2))
    explainer = ierf.SRD(model.eval())
    assert explainer.layers == ["block.relu:0", "block.relu"]  # the module's own path names its call
    program = explainer.program
    assert program.source_id("block.relu:1") == program.source_id("block.relu") == program.source_id("block")


class _BlockNamedRelu(nn.Module):
    """A block registered as ``relu`` beside a top-level ``F.relu``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(nn.functional.relu(self.stem(x))).mean((2, 3)))


def test_a_top_level_functional_named_like_a_block_gets_parentheses() -> None:
    """G24: a top-level ``F.relu`` would be named ``relu``, the path of the block registered as ``relu``; it is
    ``relu()`` instead, so that ``relu`` means what the block returns (and the model is not refused for two
    maps of one name)."""
    explainer = ierf.SRD(_BlockNamedRelu().eval())
    assert explainer.layers == ["relu()", "relu"]
    program = explainer.program
    assert program.source_id("relu") == program.source_id("relu.1") != program.source_id("relu()")


class _InPlaceRelus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x).relu_()
        h = torch.relu_(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def test_in_place_functionals_are_named_like_their_out_of_place_spelling() -> None:
    """G27: ``x.relu_()`` and ``torch.relu_(x)`` are the ReLU the user knows as ``relu``: named ``relu:0``,
    ``relu:1`` (call order), not ``relu_``."""
    explainer = ierf.SRD(_InPlaceRelus().eval())
    assert explainer.layers == ["relu:0", "relu:1"]


class _MaybeActivated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

    def forward(self, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        y = self.conv(x)
        return self.relu(y) if act else y


class _CalledTwiceOnceActivated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 3, padding=1), _MaybeActivated(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(torch.relu(self.stem(x)))
        return self.fc(self.block(h, act=False).mean((2, 3)))


def test_a_block_called_twice_that_returns_an_activation_only_once_is_no_boundary() -> None:
    """G34: a block whose calls do not all end in an activation is no repeated map name (nor a crash when
    the model is built): its name is refused as no stage boundary, its activation keeps its own name."""
    explainer = ierf.SRD(_CalledTwiceOnceActivated().eval())
    assert explainer.layers == ["relu", "block.relu"]
    with pytest.raises(ValueError, match=r"'block' \(_MaybeActivated\) is not a stage boundary"):
        explainer.program.source_id("block")
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(explainer.saliency(x, 1).sum(), explainer.model(x)[0, 1], atol=1e-4, rtol=1e-4)

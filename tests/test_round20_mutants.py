"""Mutation round 20 on the SRD engine core (``ierf.srd.ratios``, ``terms``, ``program``): each test pins a
behaviour that a mutant of that code broke while the SRD suite still passed (the mutant's id is in each
docstring). Small float64 nets, compared with the brute-force reference or with an invariant."""

from __future__ import annotations

import ierf
import pytest
import torch
from ierf.srd import ratios
from ierf.srd.reference import ReferenceSRD
from srd_nets import assert_matches_reference, randomise_bn
from torch import nn


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _matches_reference_image_by_image(model: nn.Module, x: torch.Tensor, targets: tuple[int, ...]) -> None:
    """Every image of a batch decomposed at once equals the reference run on that image alone."""
    dec = ierf.SRD(model, head="exact").decompose(x)
    ref = ReferenceSRD(model)
    for image in range(x.shape[0]):
        assert_matches_reference(dec, ref, ref.decompose(x[image : image + 1]), targets, 1e-9, image=image)


# ------------------------------------------------------------------ a shared 1x1 kernel with uneven strides
class _PoolThenStridedPointwise(nn.Module):
    """Max-pool window offsets feeding one 1x1 convolution of stride (1, 2): one shared kernel over the offsets'
    inputs, each read at the convolution's stride, rows and columns alike."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 1)
        self.point = nn.Conv2d(4, 8, 1, stride=(1, 2))
        self.bn = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn(self.point(self.pool(self.act(self.conv(x))))))
        return self.fc(y.mean((2, 3)))


def test_a_one_by_one_convolution_of_uneven_stride_after_a_max_pool_matches_the_reference() -> None:
    """(R25) The max-pool offsets share the 1x1 kernel, whose inputs are read at stride (sy, sx): read at
    (sx, sy) the shared products came from other positions (or another map size) than the paths' own."""
    model = randomise_bn(_PoolThenStridedPointwise()).double().eval()
    _matches_reference_image_by_image(model, _x((2, 3, 9, 12), seed=2), targets=(0, 2))


# ------------------------------------------------------------------ batches split to the tap budget
class _GatedBiasedMap(nn.Module):
    """A batch norm after an activation leaves a bias on a PFV map; a squeeze-excitation gate then scales that
    bias per image, so the next stage holds biases with a batch dimension; a shortcut from the first map joins
    it (two paths per position even with a 1x1 ``kernel``)."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(6)
        self.squeeze = nn.Conv2d(6, 3, 1)
        self.act_s = nn.ReLU()
        self.excite = nn.Conv2d(3, 6, 1)
        self.gate = nn.Sigmoid()
        self.pad = (kernel - 1) // 2
        self.conv2 = nn.Conv2d(6, 6, kernel, padding=self.pad)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        h = self.bn(a)
        g = self.gate(self.excite(self.act_s(self.squeeze(h.mean((2, 3), keepdim=True)))))
        return self.fc(self.act2(self.conv2(h * g) + a).mean((2, 3)))


def test_a_batch_split_to_the_tap_budget_keeps_each_images_own_biases(monkeypatch: pytest.MonkeyPatch) -> None:
    """(R23) Split one image at a time, each part must take its own images' biases (here scaled per image by
    a gate): given the whole batch's, a part added every image's bias to its z."""
    model = randomise_bn(_GatedBiasedMap()).double().eval()
    x = _x((3, 3, 8, 11), seed=4)
    whole = ierf.SRD(model, head="exact").decompose(x)
    monkeypatch.setattr(ratios, "TAP_BUDGET_BYTES", 1)  # one image at a time
    split = ierf.SRD(model, head="exact").decompose(x)
    for target in (0, 3):
        torch.testing.assert_close(split.relevance(target), whole.relevance(target), atol=1e-12, rtol=1e-9)
    ref = ReferenceSRD(model)
    assert_matches_reference(split, ref, ref.decompose(x[2:3]), (1,), 1e-9, image=2)


class _ConcatenatedKernels(nn.Module):
    """Two 3x3 convolutions concatenated before their activation: the stage's z starts as a zero map of the
    part's batch size, which the first convolution fills at its own channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        return self.fc(self.act(torch.cat([self.c1(a), self.c2(a)], 1)).mean((2, 3)))


def test_a_batch_split_into_uneven_parts_ends_at_the_last_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """(R24) Three images, two per part: the last part holds one image and must say so (a part reaching past
    the batch claimed two, and its zero-started z took a second, phantom image)."""
    torch.manual_seed(0)
    model = _ConcatenatedKernels().double().eval()
    x = _x((3, 3, 8, 11), seed=4)
    whole = ierf.SRD(model, head="exact").decompose(x)
    per_image = 9 * 8 * 8 * 11 * 8  # the concatenated stage's float64 taps: 9 taps x 8 channels on 8x11
    monkeypatch.setattr(ratios, "TAP_BUDGET_BYTES", 2 * per_image + per_image // 2)
    split = ierf.SRD(model, head="exact").decompose(x)
    for target in (0, 2):
        torch.testing.assert_close(split.relevance(target), whole.relevance(target), atol=1e-12, rtol=1e-9)


def test_a_per_image_bias_of_a_pointwise_stage_is_dotted_image_by_image() -> None:
    """(R22) After a 1x1 convolution the gated bias is one vector per image, (B, C, 1, 1): its <beta, z> takes
    each image's own vector. The one-product shortcut for a single per-channel constant took it for one."""
    model = randomise_bn(_GatedBiasedMap(kernel=1)).double().eval()
    _matches_reference_image_by_image(model, _x((2, 3, 8, 11), seed=15), targets=(0, 3))


# ------------------------------------------------------------------ an in-place activation on the input itself
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_an_in_place_activation_on_the_input_leaves_the_callers_tensor_alone(layout: torch.memory_format) -> None:
    """(R31, and a defect found with it) A model whose first module is an in-place activation writes its
    input. SRD must not let it write the caller's tensor: neither its check of the model's own logits nor the
    first stage, whose z is the input itself when that is stored channels-last (then copied before the
    activation runs on it). Written in place, a SiLU ran twice and the model was refused as not reproduced."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.SiLU(inplace=True), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).double().eval()  # fmt: skip
    x = _x((2, 3, 7, 9), seed=6).contiguous(memory_format=layout)
    before = x.clone()
    dec = ierf.SRD(model, head="exact").decompose(x)
    assert torch.equal(x, before), "the caller's input was written"
    torch.testing.assert_close(dec.logits, model(before.clone()), atol=1e-12, rtol=1e-12)
    ref = ReferenceSRD(model)
    assert_matches_reference(dec, ref, ref.decompose(before[1:2]), (0, 2), 1e-9, image=1)


# ------------------------------------------------------------------ a shared 1x1 kernel in a channel slice
class _PoolBranchConcatenated(nn.Module):
    """An inception-like block concatenated before its activation: the pool branch's 1x1 convolution (one
    kernel over the nine window offsets, sharing its bias) lands at channels 3..10 of the stage. With ``bn``
    a batch norm follows the concatenation: each branch and bias takes its own channels' scales."""

    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 1, padding=1)
        self.b1 = nn.Conv2d(4, 3, 1)
        self.b2 = nn.Conv2d(4, 8, 1)
        self.bn = nn.BatchNorm2d(11) if bn else nn.Identity()
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        y = torch.cat([self.b1(a), self.b2(self.pool(a))], 1)
        return self.fc(self.act2(self.bn(y)).mean((2, 3)))


@pytest.mark.parametrize("bn", [False, True], ids=["shared-kernel", "batch-norm-after-cat"])
def test_paths_concatenated_before_their_activation_keep_their_own_channels(bn: bool) -> None:
    """(R50, T05, T06) Each path and bias of a concatenation keeps its own channel slice: the shared kernel's
    W^T z is taken at its slice of z, and a batch norm after the concatenation scales each path and bias by
    its own channels' scales. Read from channel 0, the pool branch took the other branch's channels and its
    ratios were wrong."""
    model = randomise_bn(_PoolBranchConcatenated(bn)).double().eval()
    _matches_reference_image_by_image(model, _x((2, 3, 8, 11), seed=8), targets=(0, 2))


# ------------------------------------------------------------------ a bias map padded for an average pooling
class _PaddedPoolOfBiasedMap(nn.Module):
    """A batch norm after the activation leaves a bias on the map; an average pooling padded by rows only
    (count_include_pad) then spreads it, the padding zeros lowering it along the top and bottom rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(3, stride=1, padding=(1, 0))
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.pool(self.bn(self.act(self.conv(x))))).mean((2, 3)))


def test_a_bias_map_padded_by_rows_only_for_an_average_pooling_matches_the_reference() -> None:
    """(T13) A bias map is padded for an average pooling with the pooling's (top, bottom) rows and (left, right)
    columns: padded with rows and columns swapped, the stage's z and ratios were wrong (or its shape)."""
    model = randomise_bn(_PaddedPoolOfBiasedMap()).double().eval()
    _matches_reference_image_by_image(model, _x((2, 3, 8, 11), seed=9), targets=(0, 2))


# ------------------------------------------------------------------ a max-pool window as wide as the map
class _WideDilatedPool(nn.Module):
    """A 3x3 max pool dilated (2, 1), padded by one, on a map two columns wide: each window spans the whole
    width, so winners' offsets are told apart by row and column, not by flat index differences."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1, dilation=(2, 1))
        self.point = nn.Conv2d(4, 5, 1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.point(self.pool(self.act(self.conv(x))))).mean((2, 3)))


def test_a_dilated_max_pool_window_as_wide_as_the_map_routes_each_winner() -> None:
    """(T21) Where the window spans the map's width, each winner's offset is (row step // dy, column step //
    dx): with the dilations swapped the codes matched no offset, or the wrong one, and paths were lost."""
    model = randomise_bn(_WideDilatedPool()).double().eval()
    x = _x((2, 3, 9, 4), seed=10)
    assert model.act(model.conv(x)).shape[-1] == 2
    _matches_reference_image_by_image(model, x, targets=(0, 2))


# ------------------------------------------------------------------ kernels folded into one, and padded 1x1 kernels
class _TwoConvolutionsFolded(nn.Module):
    """A padded 3x3 convolution of stride (1, 2) and dilation (2, 1), then an unpadded (2, 3) one of stride
    (2, 1) and dilation (1, 2), no activation between: SRD folds them into one kernel whose taps are the
    paths of the stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 3, stride=(1, 2), dilation=(2, 1), padding=(2, 1))
        self.conv2 = nn.Conv2d(4, 5, (2, 3), stride=(2, 1), dilation=(1, 2))
        self.act = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv2(self.conv1(self.act0(self.conv0(x))))).mean((2, 3)))


class _PaddedPointwise(nn.Module):
    """A 1x1 convolution padded by rows only: its single path per position reads the input one row up."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.point = nn.Conv2d(4, 5, 1, stride=(1, 2), padding=(1, 0))
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.point(self.act(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("net", [_TwoConvolutionsFolded, _PaddedPointwise])
def test_folded_and_padded_kernels_with_uneven_geometry_match_the_reference(net: type[nn.Module]) -> None:
    """(T22, T24, T25, T30) The folded kernel spells the first kernel's (dy, dx) dilation out, steps by the
    first stride times the second dilation, and strides by the product of the strides, per axis; a padded
    1x1 path is routed by (top, left). Each of these with its axes mixed gave another function or routed
    relevance to the wrong PFVs."""
    model = randomise_bn(net()).double().eval()
    x = _x((2, 3, 15, 17), seed=11)
    _matches_reference_image_by_image(model, x, targets=(0, 2))


# ------------------------------------------------------------------ the start map of gradient heads
class _OneByOneStageAfterTheLastMap(nn.Module):
    """A 1x1 map with an activation of its own after the last spatial map (a pooled bottleneck head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.squeeze = nn.Conv2d(4, 6, 1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.squeeze(self.act(self.conv(x)).mean((2, 3), keepdim=True))).flatten(1))


def test_a_gradient_head_keeps_its_start_map_from_the_one_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """(P03) The forward keeps the last map with more than one position for gradient heads: keeping a later 1x1
    map instead, every Grad-CAM call ran the whole decomposition a second time to get its start map."""
    from ierf.srd.program import Program

    model = randomise_bn(_OneByOneStageAfterTheLastMap()).double().eval()
    runs = []
    real = Program.run
    monkeypatch.setattr(Program, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    srd = ierf.SRD(model, head="gradcam")
    maps = srd.saliency(_x((2, 3, 8, 11), seed=13), 1)
    assert len(runs) == 1 and maps.shape == (2, 8, 11)


# ------------------------------------------------------------------ a shortcut read again after its residual stage
class _ShortcutReadTwice(nn.Module):
    """A PFV map added first in one residual sum (``a + branch``) and read again by the next stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act0(self.conv0(x))
        y = self.act1(a + self.bn1(self.conv1(a)))
        return self.fc(self.act2(self.conv2(y) + a).mean((2, 3)))


def test_a_shortcut_read_again_is_not_the_path_whose_dot_product_is_inferred() -> None:
    """(R40) The path whose dot product comes from the others' starts z as its own tensor, written in place:
    only a tensor of the stage's own may be that path. Taken for the shortcut itself, the stage wrote into the
    PFV map that the next stage reads again."""
    model = randomise_bn(_ShortcutReadTwice()).double().eval()
    _matches_reference_image_by_image(model, _x((2, 3, 8, 11), seed=14), targets=(0, 2))


# ------------------------------------------------------------------ one Linear over maps of one size, two shapes
class _FlattenHead(nn.Module):
    """A Linear over a flattened map: any input whose map has 4 x 24 features fits it, 4x6 and 6x4 alike."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(96, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_one_explainer_reads_a_flattened_map_by_the_shape_of_each_input() -> None:
    """(T28) The Linear's weight is read as a kernel over the map's (C, H, W), kept between calls per shape:
    kept for the first shape alone, a transposed input of the same size was read with the first one's
    kernel and its map no longer matched the model or the reference."""
    model = randomise_bn(_FlattenHead()).double().eval()
    srd = ierf.SRD(model, head="exact")
    for seed, shape in ((16, (1, 3, 6, 8)), (17, (1, 3, 8, 6))):
        x = _x(shape, seed=seed)
        dec = srd.decompose(x)
        torch.testing.assert_close(dec.logits, model(x), atol=1e-12, rtol=1e-12)
        ref = ReferenceSRD(model)
        assert_matches_reference(dec, ref, ref.decompose(x), (0, 2), 1e-9)

"""Every way the ratio kernel forms kernel taps equals the literal definition: one convolution per tap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ierf.srd import gemm, ratios
from ierf.srd.terms import ConvTerm, Route

CASES = [
    # (C_in, C_out, kernel, stride, dilation, pad (t, b, l, r), groups, input H, W)
    (5, 7, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, 17, 19),
    (5, 7, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), 1, 17, 20),
    (4, 6, (5, 3), (2, 1), (2, 1), (0, 1, 2, 1), 1, 23, 18),
    (3, 16, (7, 7), (2, 2), (1, 1), (3, 3, 3, 3), 1, 30, 28),
    (6, 6, (3, 3), (2, 2), (1, 1), (0, 1, 0, 1), 6, 16, 15),  # depthwise, TF "same" padding
    (6, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, 12, 11),  # grouped
    (8, 9, (4, 5), (1, 1), (1, 1), (0, 0, 0, 0), 1, 4, 5),  # kernel covers the map (FC as conv)
    (6, 6, (4, 5), (1, 1), (1, 1), (0, 0, 0, 0), 6, 4, 5),  # depthwise over the whole map (GAP head)
    (6, 6, (3, 3), (1, 1), (1, 1), (1, 0, 1, 0), 6, 2, 2),  # depthwise to one position through padding
    (1, 2, (3, 1), (1, 1), (1, 1), (1, 1, 0, 0), 1, 16, 16),  # one input channel, one kernel column
    (6, 6, (3, 3), (1, 2), (2, 3), (2, 2, 3, 3), 6, 13, 14),  # dilated depthwise (DeepLab-style MobileNets)
]


def _literal_taps(t: ConvTerm) -> torch.Tensor:
    """(B, H, W, T, C_out): conv2d with all but one tap zeroed, tap by tap."""
    kh, kw = t.kernel
    out = []
    for i in range(kh):
        for j in range(kw):
            w = torch.zeros_like(t.weight)
            w[:, :, i, j] = t.weight[:, :, i, j]
            y = F.conv2d(t.padded_input(), w * t.out_scale.view(-1, 1, 1, 1), None, t.stride, 0, t.dilation, t.groups)
            out.append(y.permute(0, 2, 3, 1))
    return torch.stack(out, 3)


def _case_tensors(case: tuple, seed: int, batch: int) -> tuple[torch.Tensor, ...]:
    """Input, kernel and output scale (float64) for a CASES entry, and the generator for more draws."""
    c_in, c_out, kernel, _, _, _, groups, h, w = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, h, w, dtype=torch.float64, generator=g)
    weight = torch.randn(c_out, c_in // groups, *kernel, dtype=torch.float64, generator=g)
    scale = torch.rand(c_out, dtype=torch.float64, generator=g) + 0.5
    return x, weight, scale, g


def _force_layout(monkeypatch, layout: str) -> None:
    """Make the dispatcher take one way of forming taps wherever that way applies."""
    if layout == "wide":  # every stride-1 dense kernel
        monkeypatch.setattr(ratios, "WIDE_MAX_WASTE", float("inf"))
        monkeypatch.setattr(ratios, "WIDE_MIN_ROWS", 0)
    elif layout == "phase":  # never the wide layout, and never im2col: one product per stride phase
        monkeypatch.setattr(ratios, "WIDE_MAX_WASTE", 0.0)
        monkeypatch.setattr(ratios, "UNFOLD_ABOVE", float("inf"))
        monkeypatch.setattr(ratios, "UNFOLD_ABOVE_ONEDNN", float("inf"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["auto", "unfold", "wide", "phase"])
def test_tap_products_equal_one_convolution_per_tap(case, layout, monkeypatch):
    _, c_out, _, stride, dilation, pad, groups, _, _ = case
    x, weight, scale, g = _case_tensors(case, seed=0, batch=3)
    t = ConvTerm(x, Route(0), weight, stride, dilation, pad, groups, scale)
    # the dispatcher picks wide products, per-phase products or im2col by shape; check each on every case
    _force_layout(monkeypatch, layout)
    if layout == "phase":  # the phase products must really run (small maps used to fall back to im2col)
        monkeypatch.setattr(ratios, "_unfolded_tap_products", lambda t: pytest.fail("im2col taken"))
    got = ratios._unfolded_tap_products(t) if layout == "unfold" and groups == 1 else ratios.tap_products(t)
    torch.testing.assert_close(got, _literal_taps(t), atol=1e-10, rtol=1e-10)
    # the taps' sum is the convolution itself, and their routes point at the right input PFVs
    torch.testing.assert_close(got.sum(3), t.total().permute(0, 2, 3, 1), atol=1e-10, rtol=1e-10)
    # the dot products with z read any of these layouts (the wide one through its padded rows)
    z = torch.randn(*got.shape[:3], c_out, dtype=torch.float64, generator=g)
    expected = torch.einsum("bhwtc,bhwc->bhwt", _literal_taps(t), z)
    torch.testing.assert_close(ratios._tap_dots(got, z), expected, atol=1e-10, rtol=1e-10)


def test_wide_layout_is_taken_without_copies(monkeypatch):
    """The stride-1 case really runs through the wide buffer (a view whose rows are longer than W)."""
    _force_layout(monkeypatch, "wide")
    t = ConvTerm(torch.randn(2, 4, 9, 11), Route(0), torch.randn(5, 4, 3, 3), pad=(1, 1, 1, 1))
    got = ratios.tap_products(t)
    assert not got.is_contiguous() and got.stride(1) == 13 * got.stride(2)


@pytest.mark.parametrize("case", [c for c in CASES if c[6] == 1])
def test_gram_norms_and_dots_equal_the_taps(case):
    c_in, c_out, kernel, stride, dilation, pad, _, h, w = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c_in, h, w, dtype=torch.float64, generator=g)
    weight = torch.randn(c_out, c_in, *kernel, dtype=torch.float64, generator=g)
    t = ConvTerm(x, Route(0), weight, stride, dilation, pad, 1, torch.rand(c_out, dtype=torch.float64, generator=g))
    taps = _literal_taps(t)
    z = torch.randn(*taps.shape[:3], c_out, dtype=torch.float64, generator=g)
    norms, dots = ratios._gram_norms_dots(t, z)
    torch.testing.assert_close(norms, taps.norm(dim=-1), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(dots, torch.einsum("bhwtc,bhwc->bhwt", taps, z), atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------ relevance scatter by kernel grids
def _conv_routes(kernel, stride, dilation, pad):
    t = ConvTerm(torch.zeros(1, 1, 9, 9), Route(3), torch.zeros(1, 1, *kernel), stride, dilation, pad)
    return t.tap_routes()


def test_route_grids_recognise_kernel_taps_and_split_the_rest():
    from ierf.srd.explainer import _route_grids

    conv = _conv_routes((3, 5), (2, 1), (1, 2), (1, 1, 4, 4))
    (grid,) = _route_grids(conv)
    assert (grid.start, grid.kh, grid.kw, grid.dy, grid.dx) == (0, 3, 5, 1, 2)
    assert grid.route == conv[0]
    # two convolutions' taps back to back, then a skip path from another map: three grids
    skip = Route(5)
    grids = _route_grids(conv + _conv_routes((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)) + [skip])
    assert [(g.start, g.kh, g.kw) for g in grids] == [(0, 3, 5), (15, 3, 3), (24, 1, 1)]
    # offsets that are not a full grid (one tap missing) fall apart into rows and single routes
    broken = conv[:7] + conv[8:]
    assert sum(g.taps for g in _route_grids(broken)) == len(broken)
    assert all(g.taps < 15 for g in _route_grids(broken))


@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet", "mixed", "composed"])
def test_grid_scatter_equals_tap_by_tap_scatter(name, monkeypatch):
    """One col2im per kernel grid and the per-tap scatters give the same relevance (saliency and iERF)."""
    import ierf
    from ierf.srd import explainer
    from srd_nets import all_nets

    model, (h, w) = all_nets()[name]
    x = torch.randn(2, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    srd = ierf.SRD(model)
    d = srd.decompose(x)
    layer = srd.layers[len(srd.layers) // 2]
    _, lh, lw = d.layer_shape(layer)
    positions = torch.tensor([[0, 0], [lh - 1, lw - 1], [lh // 2, lw // 3]])
    fast = d.saliency(torch.tensor([1, 2])), d.ierf(layer, positions)
    monkeypatch.setattr(explainer, "FOLD_MAX_ELEMENTS", 0)
    slow = srd.decompose(x)
    for a, b in zip(fast, (slow.saliency(torch.tensor([1, 2])), slow.ierf(layer, positions)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "pad", "src"),
    [
        ((3, 5), (2, 1), (1, 2), (1, 2, 4, 0), (15, 16)),  # asymmetric stride, dilation and padding
        ((2, 3), (1, 3), (3, 1), (0, 0, 0, 0), (11, 20)),
        ((7, 7), (2, 2), (1, 1), (3, 3, 3, 3), (14, 13)),  # a stem
    ],
)
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("base", [Route(1, 2, 1, 1, -1), Route(1)])
def test_grid_scatter_equals_per_tap_scatter_on_any_grid(kernel, stride, dilation, pad, src, fold, base, monkeypatch):
    from ierf.srd import explainer
    from ierf.srd.explainer import _route_grids, _scatter, _scatter_grid

    if not fold:
        monkeypatch.setattr(explainer, "FOLD_MAX_ELEMENTS", 0)

    x = torch.zeros(1, 1, *src)
    term = ConvTerm(x, base, torch.zeros(1, 1, *kernel), stride, dilation, pad)
    routes = term.tap_routes()
    (grid,) = _route_grids(routes)
    h, w = term.spatial()
    r = torch.randn(2, 3, h, w, dtype=torch.float64)
    mu = torch.randn(2, len(routes), h, w, dtype=torch.float64)
    expected = torch.zeros(2, 3, 2 * src[0], src[1], dtype=torch.float64)
    for k, route in enumerate(routes):
        _scatter(expected, r * mu[:, k : k + 1], route)
    got = torch.zeros_like(expected)
    _scatter_grid(got, grid, r, mu)
    torch.testing.assert_close(got, expected)


POOL_CASES = [
    # (kernel, stride, pad, dilation, ceil_mode, input H, W)
    ((3, 3), (2, 2), (1, 1), (1, 1), False, 11, 12),  # ResNet stem pool, overlapping windows
    ((2, 2), (2, 2), (0, 0), (1, 1), False, 8, 9),  # VGG pool
    ((3, 2), (1, 2), (1, 0), (2, 1), True, 9, 7),  # dilated rows, ceil mode, non-square
    ((2, 3), (1, 2), (0, 1), (1, 2), False, 6, 9),  # dilated columns
    ((3, 3), (1, 1), (1, 1), (1, 1), False, 3, 2),  # window wider than the map: the division fallback
    ((3, 3), (2, 2), (1, 1), (2, 2), False, 5, 4),  # dilated window wider than the map
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool_terms_route_each_channel_to_its_winner(case):
    from ierf.srd.terms import max_pool_routes

    kernel, stride, pad, dilation, ceil_mode, h, w = case
    g = torch.Generator().manual_seed(1)
    # Few distinct values: ties inside windows (zeros and equal positives) are common, as after a ReLU.
    x = torch.randint(0, 3, (2, 5, h, w), generator=g).double()
    pooled, idx = F.max_pool2d(x, kernel, stride, pad, dilation, ceil_mode, return_indices=True)
    bundle = max_pool_routes(x, Route(0), kernel, stride, pad, dilation, ceil_mode)
    assert len(bundle.terms) == kernel[0] * kernel[1] and not bundle.biases
    total = torch.zeros_like(pooled)
    winners = torch.zeros_like(pooled)
    ys = torch.arange(pooled.shape[2]).view(-1, 1)
    xs = torch.arange(pooled.shape[3]).view(1, -1)
    for term in bundle.terms:
        r = term.route
        # where a term is nonzero, it carries the input at its route's position, and that position is the
        # winner max_pool2d reported (first maximum in the window): ties go to exactly one offset
        sy, sx = ys * r.sy + r.oy, xs * r.sx + r.ox
        inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
        flat = (sy * w + sx).expand_as(idx)
        won = (idx == flat) & inside
        assert torch.equal(term.x, torch.where(won, pooled, 0.0))
        total += term.x
        winners += won.double()
    torch.testing.assert_close(total, pooled, atol=0, rtol=0)
    assert torch.equal(winners, torch.ones_like(winners))  # every output channel has exactly one winner


@pytest.mark.parametrize("rows_limit", [0, 10**9])  # the library convolution / the matrix product
def test_one_by_one_total_is_the_convolution_either_way(rows_limit, monkeypatch):
    from ierf.srd import terms

    monkeypatch.setattr(terms, "MM_MAX_ROWS", rows_limit)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 6, 1, 1, dtype=torch.float64, generator=g)
    scale = torch.rand(4, dtype=torch.float64, generator=g) + 0.5
    for stride in ((1, 1), (2, 2)):
        t = ConvTerm(x, Route(0), weight, stride, (1, 1), (0, 0, 0, 0), 1, scale)
        got = t.total()
        want = F.conv2d(x, weight * scale.view(-1, 1, 1, 1), stride=stride)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        assert got.is_contiguous(memory_format=torch.channels_last)  # SRD reads it channels-last


# ------------------------------------------------------------------ the two libraries for float32 products
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["auto", "wide", "phase"])
@pytest.mark.parametrize("shift_budget", [None, 1])  # all images in one product / one output row at a time
def test_float32_tap_products_through_onednn_equal_the_taps(case, layout, shift_budget, monkeypatch):
    """With oneDNN chosen, stride-1 kernels form their taps by the shifted layout and the others by 1x1
    convolutions; every result equals the literal taps (float64) to float32 precision, in the layout the
    dot products read."""
    _, c_out, _, stride, dilation, pad, groups, _, _ = case
    monkeypatch.setattr(gemm, "_choice", "onednn")
    if shift_budget is not None:
        monkeypatch.setattr(ratios, "SHIFT_MAX_BYTES", shift_budget)
    _force_layout(monkeypatch, layout)
    shifted = []
    real = ratios._shifted_tap_products
    monkeypatch.setattr(ratios, "_shifted_tap_products", lambda *a: shifted.append(1) or real(*a))
    x, weight, scale, g = _case_tensors(case, seed=0, batch=3)
    want = _literal_taps(ConvTerm(x, Route(0), weight, stride, dilation, pad, groups, scale))
    t = ConvTerm(x.float(), Route(0), weight.float(), stride, dilation, pad, groups, scale.float())
    got = ratios.tap_products(t)
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max(), rtol=0)
    z = torch.randn(*got.shape[:3], c_out, generator=g)
    expected = torch.einsum("bhwtc,bhwc->bhwt", want, z.double())
    torch.testing.assert_close(ratios._tap_dots(got, z).double(), expected, atol=1e-5 * expected.abs().max(), rtol=0)
    if layout == "wide" and stride == (1, 1) and groups == 1:
        assert shifted  # the shifted layout really ran


def test_shifted_layout_matches_the_wide_one_image_by_image(monkeypatch):
    """Same buffer layout and values as the BLAS wide products, also when the product is formed a few
    images at a time and with dilation (the row shift of tap (i, j) is i*dy*Wp + j*dx)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 13, 15, 4, generator=g)  # (B, Hp, Wp, C_in), channels last
    w = torch.randn(6, 4, 3, 2, generator=g)
    ho, wo = 13 - 2 * 2, 15 - 1 * 3
    wide = ratios._wide_tap_products(x, w, (3, 2), (2, 3), ho, wo)
    row = 15 * 3 * 2 * 6 * 4  # bytes of the product of one padded input row
    per_image = 13 * row
    # bands of 1 and 3 output rows (each reads 4 more input rows), one image, two images, all images
    for budget in ((1 + 4) * row, (3 + 4) * row, per_image, 2 * per_image, 10**9):
        monkeypatch.setattr(ratios, "SHIFT_MAX_BYTES", budget)
        shifted = ratios._shifted_tap_products(x, w, (3, 2), (2, 3), ho, wo)
        assert shifted.stride() == wide.stride() and shifted.shape == wide.shape
        torch.testing.assert_close(shifted, wide, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("library", gemm.BACKENDS)
def test_rows_by_kernel_is_the_matrix_product_on_either_library(library, monkeypatch):
    monkeypatch.setattr(gemm, "_choice", library)
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(37, 24, generator=g)
    kernel = torch.randn(11, 24, generator=g)
    want = rows.double() @ kernel.double().t()
    for r in (rows, rows[:, :16], rows[::2]):  # contiguous, a channel slice, every other row
        k = kernel[:, : r.shape[1]].contiguous()
        got = gemm.rows_by_kernel(r, k)
        assert got.is_contiguous() and got.shape == (r.shape[0], 11)
        torch.testing.assert_close(got.double(), r.double() @ k.double().t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        gemm.channels_by_kernel(rows.view(1, 37, 24), kernel)[0].double(), want, atol=1e-5, rtol=1e-5
    )


def test_library_choice_comes_from_the_variable_or_a_measurement(monkeypatch):
    monkeypatch.setattr(gemm, "_choice", None)
    for value, expected in (("blas", "blas"), (" ONEDNN ", "onednn")):
        monkeypatch.setenv(gemm.ENV, value)
        gemm.reset()
        assert gemm.backend() == expected
    monkeypatch.setenv(gemm.ENV, "mkl")
    gemm.reset()
    with pytest.raises(ValueError, match=r"IERF_GEMM='mkl': expected one of auto, blas, onednn"):
        gemm.backend()
    monkeypatch.setenv(gemm.ENV, "auto")
    gemm.reset()
    assert gemm.backend() in gemm.BACKENDS  # measured
    # only float32 CPU tensors ever take oneDNN
    monkeypatch.setattr(gemm, "_choice", "onednn")
    assert gemm.use_onednn(torch.zeros(1)) and not gemm.use_onednn(torch.zeros(1, dtype=torch.float64))
    with torch.backends.mkldnn.flags(enabled=False):
        assert not gemm.use_onednn(torch.zeros(1))
    monkeypatch.setattr(gemm, "_choice", "blas")
    assert not gemm.use_onednn(torch.zeros(1))


@pytest.mark.parametrize("case", [c for c in CASES if c[6] == c[0]])  # depthwise
def test_depthwise_taps_carry_the_input_gradient(case):
    """Depthwise taps are written with out= when no gradient is needed; with one, the same values come
    from an autograd-recorded product, and the input gradient equals the literal taps'."""
    _, _, _, stride, dilation, pad, groups, _, _ = case
    x, weight, scale, _ = _case_tensors(case, seed=5, batch=2)
    grads = []
    for form in (ratios.tap_products, _literal_taps):
        xi = x.clone().requires_grad_(True)
        taps = form(ConvTerm(xi, Route(0), weight, stride, dilation, pad, groups, scale))
        r = torch.linspace(-1, 1, taps.numel(), dtype=torch.float64).view(taps.shape)
        (grad,) = torch.autograd.grad((taps * r).sum(), xi)
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)

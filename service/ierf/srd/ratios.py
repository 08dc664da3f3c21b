"""Sharing ratios of one stage: the channel-dimension work of SRD, done once per image.

For the pre-activation PFV z_q of a stage and every path t reaching it (spec §2.2, §2.5b):

    mu_t(q) = ( <C_t(q), z_q> + n_t(q) * sum_o <beta_o, z_q> / N_o(q) ) / ||z_q||^2

with n_t = ||C_t||, and N_o the summed norms of the paths sharing bias o. Everything after this is
channel-free: relevance moves as per-position scalars. Kernel taps are formed in the cheapest exact way
for the layer's shape: one matrix product per tap written in place (stride 1), one per stride phase,
one batched product over unfolded taps (small maps), an element-wise product for depthwise kernels, or
a per-tap Gram matrix when the input has few channels (the RGB stem).
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ierf.srd import fused, gemm
from ierf.srd.derived import DERIVED
from ierf.srd.terms import Affine, BiasTerm, ConvTerm, DenseTerm, Route, Term, materialise, replace

# Largest tap tensor (bytes) formed at once; larger stages are processed a few images at a time.
TAP_BUDGET_BYTES = 256 * 2**20


def tap_products(t: ConvTerm) -> torch.Tensor:
    """Per-tap contributions of a convolution term, channels last: (B, H_out, W_out, T, C_out).

    Dense kernels with stride 1 take a "wide" result (rows of the padded width): with BLAS one matrix
    product per tap written straight into it (:func:`_wide_tap_products`), with oneDNN one product of
    every input row with all taps, copied in at each tap's row shift (:func:`_shifted_tap_products`).
    Other dense kernels: one matrix product per stride phase over the padded input (no im2col), the taps
    copied out of it as shifted views, or one batched product over unfolded taps on small maps. Depthwise
    kernels: one element-wise product of the input's windows (a strided view) with the kernel.
    """
    x = _channels_last(t.padded_input())  # (B, Hp, Wp, C_in)
    b, _, _, c_in = x.shape
    kh, kw = t.kernel
    (sy, sx), (dy, dx) = t.stride, t.dilation
    ho, wo = t.spatial()
    w = t.scaled_weight()  # (C_out, C_in/g, kh, kw)
    c_out, c_in_g = w.shape[:2]
    if t.groups == c_in and c_in_g == 1 and c_out == c_in:  # depthwise
        if (ho, wo) == (1, 1) and (dy, dx) == (1, 1) and x.shape[1:3] == (kh, kw):
            # The kernel covers the map (a global-average-pool head): tap (i, j) is input position (i, j).
            per_tap = w[:, 0].reshape(c_out, kh * kw).t()  # (T, C), a view
            return (x.reshape(b, kh * kw, c_in) * per_tap).view(b, 1, 1, kh * kw, c_out)
        # Every tap at once: the input's windows as a strided view times the (kh, kw, C) kernel, written
        # straight into the tap layout (3-4x faster than one product per tap stacked afterwards).
        per_tap = DERIVED.get("depthwise-w", (w,), lambda: w[:, 0].permute(1, 2, 0).contiguous())
        sb, sh, sw, sc = x.stride()
        windows = x.as_strided(
            (b, ho, wo, kh, kw, c_in), (sb, sy * sh, sx * sw, dy * sh, dx * sw, sc), x.storage_offset()
        )
        if _needs_grad(x, w):  # out= records no gradient
            return (windows * per_tap).reshape(b, ho, wo, kh * kw, c_out)
        out = x.new_empty(b, ho, wo, kh, kw, c_out)
        torch.mul(windows, per_tap, out=out)
        return out.view(b, ho, wo, kh * kw, c_out)
    if t.groups != 1:
        return _grouped_tap_products(t)
    wide = x.shape[2]
    onednn = gemm.use_onednn(x)
    if (sy, sx) == (1, 1) and wide <= WIDE_MAX_WASTE * wo and ho * wide >= WIDE_MIN_ROWS and not _needs_grad(x, w):
        if onednn:
            return _shifted_tap_products(x, w, t.kernel, t.dilation, ho, wo)
        return _wide_tap_products(x, w, t.kernel, t.dilation, ho, wo)
    span_y = max((i * dy) // sy for i in range(kh)) + ho
    span_x = max((j * dx) // sx for j in range(kw)) + wo
    # Kernel large next to the output (small maps, FC-as-conv): im2col, unless the 1x1-convolution products
    # are fast enough to pay for the extra rows of the padded phases.
    if span_y * span_x > (UNFOLD_ABOVE_ONEDNN if onednn else UNFOLD_ABOVE) * ho * wo:
        return _unfolded_tap_products(t)
    out = x.new_empty(b, ho, wo, kh * kw, c_out)
    for (py, px), taps in _stride_phases(t).items():
        phase = x[:, py::sy, px::sx]
        rows = max(tap.oy for tap in taps) + ho
        cols = max(tap.ox for tap in taps) + wo
        phase = phase[:, :rows, :cols].contiguous()
        stacked = DERIVED.get(
            f"taps{[tap.index for tap in taps]}",
            (w,),
            lambda taps=taps: torch.cat([w[:, :, tap.i, tap.j] for tap in taps], 0),
        )  # (T_p*C_out, C_in)
        prod = gemm.rows_by_kernel(phase.reshape(-1, c_in), stacked)
        prod = prod.view(b, phase.shape[1], phase.shape[2], len(taps), c_out)
        for k, tap in enumerate(taps):
            out[:, :, :, tap.index] = prod[:, tap.oy : tap.oy + ho, tap.ox : tap.ox + wo, k]
    return out


# Stride-1 kernels take the wide layout while the extra columns cost at most this fraction of the work, and
# while one image gives the matrix products enough rows to run at speed.
WIDE_MAX_WASTE = 1.3
WIDE_MIN_ROWS = 128
# Phase products cover the padded map; above this many times the output's positions, unfold the taps
# instead (oneDNN's products run ~2x faster than the batched product where it is chosen: see gemm).
UNFOLD_ABOVE = 1.3
UNFOLD_ABOVE_ONEDNN = 2.0
# Largest product of input rows with every tap formed at once for the shifted layout: larger maps (VGG's 224^2
# and 112^2) are formed a band of rows at a time, so the product is still in cache when it is copied (whole,
# their products and copies cost more memory traffic than the faster library saves).
SHIFT_MAX_BYTES = 16 * 2**20


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(v.requires_grad for v in tensors)


#: Set by a decomposition's forward (``Program.run``): every stage's squared norms ||z||^2, checked by
#: :func:`out_of_range` once after the last stage (a handful of ops for the whole forward, not five per
#: stage, and a GPU is not made to wait at each stage). Where one left the float range (inf, or a subnormal
#: that has lost its precision), ratios would lose relevance while staying finite, so the forward refuses
#: the input instead.
RANGE_FLAGS: contextvars.ContextVar[list[torch.Tensor] | None] = contextvars.ContextVar("range_flags", default=None)


def _note_range(zz: torch.Tensor) -> None:
    kept = RANGE_FLAGS.get()
    if kept is not None:
        kept.append(zz.view(-1))


def out_of_range(kept: list[torch.Tensor]) -> bool:
    """Whether any squared norm noted by the stages is inf or a subnormal (per dtype: float16 stages take
    theirs in float32)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for v in kept:
        by_dtype.setdefault(v.dtype, []).append(v)
    flags = []
    for dtype, values in by_dtype.items():
        zz = torch.cat(values) if len(values) > 1 else values[0]
        flags.append((torch.isinf(zz) | ((zz > 0) & (zz < torch.finfo(dtype).tiny))).any())
    return bool(torch.stack(flags).any()) if flags else False


def _wide_tap_products(
    x: torch.Tensor, w: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int], ho: int, wo: int
) -> torch.Tensor:
    """Stride-1 taps without any copy: (B, H, W, T, C) as a view of a (B, H, Wp, T, C) buffer.

    With the padded input flattened to rows of Wp positions, tap (i, j) of output (y, x) reads input row
    (y + i*dy)*Wp + x + j*dx: for all outputs of an image, one contiguous block of input rows. So each tap is
    one matrix product over H*Wp rows, written in place into its slot of the tap-interleaved buffer (the
    columns x >= W are computed and ignored: Wp/W of the work). Nothing is copied afterwards.
    """
    b, hp, wp, c_in = x.shape
    kh, kw = kernel
    dy, dx = dilation
    c_out = w.shape[0]
    taps = kh * kw
    per_tap = DERIVED.get(
        "wide-w", (w,), lambda: w.permute(2, 3, 1, 0).reshape(taps, c_in, c_out).contiguous()
    )  # (T, C_in, C_out)
    flat = x.reshape(-1, c_in)
    out = x.new_empty(b, ho, wp, taps, c_out)
    rows = ho * wp
    for img in range(b):
        dst = out[img].view(rows, taps, c_out)
        for k in range(taps):
            i, j = divmod(k, kw)
            start = img * hp * wp + i * dy * wp + j * dx
            n = min(rows, flat.shape[0] - start)  # the last image's last row runs past the input
            torch.mm(flat[start : start + n], per_tap[k], out=dst[:n, k])
            if n < rows:
                dst[n:, k].zero_()  # only columns x >= W: keep them finite for the wide dot products
    return out[:, :, :wo]


def _shifted_tap_products(
    x: torch.Tensor, w: torch.Tensor, kernel: tuple[int, int], dilation: tuple[int, int], ho: int, wo: int
) -> torch.Tensor:
    """The layout of :func:`_wide_tap_products` from one product of every input row with every tap's
    kernel (a 1x1 convolution, for oneDNN), each tap then read at its row shift: tap (i, j) of wide output
    row r is product row r + i*dy*Wp + j*dx, an affine function of (i, j), so one strided copy moves them
    all. The product is formed a few images, or for large maps a band of rows, at a time, so that it
    stays within :data:`SHIFT_MAX_BYTES` (a small product is still in cache when it is copied)."""
    b, hp, wp, c_in = x.shape
    kh, kw = kernel
    dy, dx = dilation
    c_out = w.shape[0]
    taps = kh * kw
    tc = taps * c_out
    all_taps = DERIVED.get("shift-w", (w,), lambda: w.permute(2, 3, 0, 1).reshape(tc, c_in).contiguous())
    out = x.new_empty(b, ho, wp, taps, c_out)
    strides = (wp * tc, tc, kw * c_out + dy * wp * tc, c_out + dx * tc, 1)  # (row, x, i, j, c) in the product
    row_bytes = wp * tc * x.element_size()  # the product of one padded input row
    halo = (kh - 1) * dy  # input rows a band of outputs reads below its last row
    if hp * row_bytes <= SHIFT_MAX_BYTES:
        step = max(1, SHIFT_MAX_BYTES // (hp * row_bytes))
        chunks = [(start, min(step, b - start), 0, ho) for start in range(0, b, step)]
    else:
        band = max(1, SHIFT_MAX_BYTES // row_bytes - halo)
        chunks = [(img, 1, r0, min(band, ho - r0)) for img in range(b) for r0 in range(0, ho, band)]
    for first, images, r0, rows in chunks:
        # input rows [r0, r0 + rows + halo) of each image; the chunk's last output row reads (kw-1)*dx
        # positions past them (for columns x >= W only, which are dropped): zeros
        part = x[first : first + images, r0 : r0 + rows + halo].reshape(-1, c_in)
        prod = gemm.conv_rows(F.pad(part, (0, 0, 0, (kw - 1) * dx)), all_taps)
        dst = out[first : first + images, r0 : r0 + rows].view(images, rows, wp, kh, kw, c_out)
        dst.copy_(prod.as_strided(dst.shape, (hp * wp * tc, *strides)))
    return out[:, :, :wo]


class _PhaseTap(NamedTuple):
    """Kernel tap (i, j) (row-major ``index``) reading its stride phase at offset (oy, ox)."""

    i: int
    j: int
    index: int
    oy: int
    ox: int


def _stride_phases(t: ConvTerm) -> dict[tuple[int, int], list[_PhaseTap]]:
    """Kernel taps grouped by the stride phase of the input they read: tap (i, j) at output q reads
    padded input (sy*q + i*dy, sx*q + j*dx), i.e. phase ((i*dy) % sy, (j*dx) % sx) at offset
    ((i*dy) // sy, (j*dx) // sx) within it. Phases no tap reads are absent."""
    (kh, kw), (sy, sx), (dy, dx) = t.kernel, t.stride, t.dilation
    phases: dict[tuple[int, int], list[_PhaseTap]] = {}
    for i in range(kh):
        for j in range(kw):
            tap = _PhaseTap(i, j, i * kw + j, (i * dy) // sy, (j * dx) // sx)
            phases.setdefault(((i * dy) % sy, (j * dx) % sx), []).append(tap)
    return phases


def _unfolded_tap_products(t: ConvTerm) -> torch.Tensor:
    """Dense kernels on maps not much larger than the kernel: one batched product over unfolded taps."""
    x = t.padded_input()
    b, c_in = x.shape[:2]
    kh, kw = t.kernel
    taps = kh * kw
    ho, wo = t.spatial()
    cols = F.unfold(x, (kh, kw), dilation=t.dilation, stride=t.stride).view(b, c_in, taps, ho * wo)
    cols = cols.permute(2, 0, 3, 1).reshape(taps, b * ho * wo, c_in)
    w = t.scaled_weight()
    per_tap = DERIVED.get("unfold-w", (w,), lambda: w.permute(2, 3, 1, 0).reshape(taps, c_in, w.shape[0]).contiguous())
    y = torch.bmm(cols, per_tap)  # (T, B*L, C_out)
    return y.view(taps, b, ho, wo, -1).permute(1, 2, 3, 0, 4)


def _grouped_tap_products(t: ConvTerm) -> torch.Tensor:
    """Grouped (not depthwise) kernels: batched products over unfolded taps."""
    x = t.padded_input()
    b = x.shape[0]
    kh, kw = t.kernel
    taps = kh * kw
    cols = F.unfold(x, (kh, kw), dilation=t.dilation, stride=t.stride)  # (B, C_in*T, L)
    length = cols.shape[-1]
    w = t.scaled_weight()
    c_out, c_in_g = w.shape[:2]
    groups = t.groups
    out_g = c_out // groups
    cols = cols.view(b, groups, c_in_g, taps, length).permute(3, 1, 2, 0, 4).reshape(taps, groups, c_in_g, b * length)
    wt = w.view(groups, out_g, c_in_g, taps).permute(3, 0, 1, 2)  # (T, g, out_g, in_g)
    y = torch.matmul(wt, cols).reshape(taps, c_out, b, length)
    ho, wo = t.spatial()
    return y.permute(2, 3, 0, 1).reshape(b, ho, wo, taps, c_out)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C) view when the tensor is stored channels-last, else a copy."""
    return x.permute(0, 2, 3, 1).contiguous()


GRAM_MAX_INPUT_CHANNELS = 4


def _use_gram(t: ConvTerm) -> bool:
    """A few input channels and many outputs (the RGB stem): form norms from a per-tap Gram matrix of the
    kernel instead of the taps (work grows with C_in^2 pairs, so only for a handful of channels)."""
    c_out, c_in = t.weight.shape[:2]
    return t.groups == 1 and t.taps > 1 and c_in <= GRAM_MAX_INPUT_CHANNELS and c_in * 4 <= c_out


def _gram_norms_dots(t: ConvTerm, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n_t and <C_t, z> as (B, H, W, T) without forming the taps, for kernels reading few channels:
    ||W_t a||^2 = a^T (W_t^T W_t) a and <W_t a, z> = <a, W_t^T z> (one matrix product for all taps).

    The input is read through a strided view (no im2col copy) one channel plane at a time, which keeps
    every element-wise pass over long contiguous rows even with three input channels.
    """
    xp = t.padded_input().contiguous()
    b, c_in = xp.shape[:2]
    kh, kw = t.kernel
    (sy, sx), (dy, dx) = t.stride, t.dilation
    ho, wo = t.spatial()
    sb, sc, sh, sw = xp.stride()
    cols = xp.as_strided((b, c_in, kh, kw, ho, wo), (sb, sc, dy * sh, dx * sw, sy * sh, sx * sw))
    w = t.scaled_weight()
    c_out = w.shape[0]
    w_rows = DERIVED.get(
        "gram-w", (w,), lambda: w.permute(1, 2, 3, 0).reshape(-1, c_out).contiguous()
    )  # (C_in*T, C_out)
    gram = DERIVED.get("gram-g", (w,), lambda: torch.einsum("ocij,odij->cdij", w, w))  # (C_in, C_in, kh, kw)
    # <a, W_t^T z> one image at a time: W^T z of one image (C_in*T planes) stays in cache while it is read.
    zf = z.reshape(b, ho * wo, c_out)
    per_image = []
    for k in range(b):
        back = (w_rows @ zf[k].t()).view(c_in, kh, kw, ho, wo)
        d = back[0] * cols[k, 0]  # back first: the result takes its contiguous layout, not the strided view's
        for c in range(1, c_in):
            d.addcmul_(cols[k, c], back[c])
        per_image.append(d)
    dots = per_image[0][None] if b == 1 else torch.stack(per_image)  # (B, kh, kw, H, W)
    # ||W_t a_p||^2 = sum_k g_t[k] * P_k[p] with P_k the products a_c * a_d of input channel pairs: combine the
    # few product planes per tap once at input resolution, then read each tap at its strided positions.
    pairs = [(c, d) for c in range(c_in) for d in range(c, c_in)]
    planes = torch.stack([xp[:, c] * xp[:, d] for c, d in pairs], 1)  # (B, P, Hp, Wp)
    coef = DERIVED.get(
        "gram-pairs",
        (w,),
        lambda: torch.stack([gram[c, d] * (1.0 if c == d else 2.0) for c, d in pairs], 0).reshape(len(pairs), -1),
    )  # (P, T)
    # A strided kernel reads each tap at one stride phase of the input: form each tap's squares only at
    # its phase (1/(sy*sx) of the positions), a 1x1 convolution per phase.
    squares = planes.new_empty(b, kh * kw, ho, wo)
    for (py, px), taps in _stride_phases(t).items():
        index = [tap.index for tap in taps]
        per_tap = F.conv2d(planes[:, :, py::sy, px::sx], coef[:, index].t()[:, :, None, None])  # (B, T_p, ., .)
        for k, tap in enumerate(taps):
            squares[:, tap.index] = per_tap[:, k, tap.oy : tap.oy + ho, tap.ox : tap.ox + wo]
    norms = squares.clamp_min_(0).sqrt_()  # (B, T, H, W)
    return norms.permute(0, 2, 3, 1), dots.reshape(b, kh * kw, ho, wo).permute(0, 2, 3, 1)


def _tap_dots(taps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """<C_t(q), z_q> for every tap: (B, H, W, T, C) x (B, H, W, C) -> (B, H, W, T).

    Written as z_q^T C_q^T per position: einsum's own choice (C_q z_q) runs 3-10x slower at batch 8."""
    b, h, w, t, c = taps.shape
    sb, sh, sw, st, sc = taps.stride()
    wide = sh // sw if sw else 0
    # Contiguous, or the wide layout of _wide_tap_products: rows of Wp >= W positions, each (T, C) contiguous.
    if not (z.is_contiguous() and sc == 1 and st == c and sw == t * c and sh == wide * sw and sb == h * sh):
        return torch.einsum("bhwtc,bhwc->bhwt", taps, z)
    if wide != w:
        z = F.pad(z, (0, 0, 0, wide - w))  # zeros at the columns x >= W
    rows = taps.as_strided((b * h * wide, t, c), (sw, st, sc))
    return torch.bmm(z.reshape(-1, 1, c), rows.transpose(1, 2)).view(b, h, wide, t)[:, :, :w]


class _TermStats:
    """Norms and dot products of one term's taps with z, as (B, H, W, T); ``carries`` marks where the path
    contributes anything (by default: where its dot product is not zero)."""

    def __init__(
        self, term: Term, norms: torch.Tensor | None, dots: torch.Tensor, carries: torch.Tensor | None = None
    ) -> None:
        self.term = term
        self.norms = norms
        self.dots = dots
        self.carries = carries


def _bias_dot(value: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """<beta, z_q> at every position: for a per-channel constant (a batch-norm shift) one matrix-vector
    product, instead of materialising the broadcast product of the whole map and summing it."""
    if value.shape[0] == 1 and value.shape[2:] == (1, 1) and z.is_contiguous():
        b, h, w, c = z.shape
        return (z.reshape(-1, c) @ value.reshape(c)).view(b, h, w)
    return torch.linalg.vecdot(value.permute(0, 2, 3, 1), z)


def stage_ratios(bundle: Affine) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
    """Return (z, mu, routes): the pre-activation map, the ratio of every path (B, T, H, W), and where
    each path comes from. Large batches are split so tap tensors stay within TAP_BUDGET_BYTES."""
    if bundle._reference_tensor().dtype == torch.float16:
        # ||z||^2 and the dot products pass float16's 65504 once a PFV's norm passes 256: compute the stage
        # in float32 (the sums then keep float32 precision too) and hand back float16.
        z, mu, routes = stage_ratios(_converted(bundle, torch.float32))
        return z.half(), mu.half(), routes
    per_image = _tap_bytes_per_image(bundle)
    chunk = max(1, int(TAP_BUDGET_BYTES // max(per_image, 1)))
    if bundle.batch <= chunk:
        return _stage_ratios(bundle)
    zs, mus = [], []
    routes: list[Route] = []
    for start in range(0, bundle.batch, chunk):
        z, mu, routes = _stage_ratios(_batch_slice(bundle, start, min(bundle.batch, start + chunk)))
        zs.append(z)
        mus.append(mu)
    return torch.cat(zs), torch.cat(mus), routes


def _converted(bundle: Affine, dtype: torch.dtype) -> Affine:
    """The bundle with every floating tensor in ``dtype`` (terms rebuilt from their fields, so no value
    cached from the old dtype survives). Kernels are converted once per parameter (the derived cache), so
    the kernels derived from them stay cached between calls too."""

    def to(name: str, v):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            return v
        if name == "weight":
            return DERIVED.get(f"as-{dtype}", (v,), lambda: v.to(dtype))
        return v.to(dtype)

    def rebuilt(obj):
        return type(obj)(**{f.name: to(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)})

    return replace(bundle, terms=[rebuilt(t) for t in bundle.terms], biases=[rebuilt(b) for b in bundle.biases])


def _tap_bytes_per_image(bundle: Affine) -> int:
    total = 0
    for t in bundle.terms:
        if isinstance(t, ConvTerm) and t.taps > 1 and not _use_gram(t):
            h, w = t.spatial()
            total += t.taps * t.channels * h * w * t.x.element_size()
    return total


def _batch_slice(bundle: Affine, start: int, stop: int) -> Affine:
    from ierf.srd.terms import replace

    def cut(v: torch.Tensor) -> torch.Tensor:
        return v[start:stop] if v.shape[0] > 1 else v

    terms = [replace(t, x=t.x[start:stop]) for t in bundle.terms]
    biases = [replace(b, value=cut(b.value)) for b in bundle.biases]
    return replace(bundle, terms=terms, biases=biases, batch=stop - start)


class _SharedKernel:
    """Single-tap convolutions with one kernel applied to several inputs (the max-pool window offsets
    feeding a 1x1 convolution). Their sum is one convolution of the summed inputs, <W x, z> = <x, W^T z>
    needs W^T z once, and ||W x||^2 = x^T (W^T W) x: no per-input copy of the wide output."""

    def __init__(self, members: list[ConvTerm]) -> None:
        self.members = members
        first = members[0]
        self._kernel = first.scaled_weight()
        self.weight = self._kernel[:, :, 0, 0]  # (C_out, C_in)
        self.stride = first.stride
        self.c0 = first.c0
        self.channels = first.channels

    def transposed(self) -> torch.Tensor:
        """W^T as a contiguous (C_in, C_out) kernel, kept between calls."""
        k = self._kernel
        return DERIVED.get("shared-wt", (k,), lambda: k[:, :, 0, 0].t().contiguous())

    def inputs(self) -> list[torch.Tensor]:
        sy, sx = self.stride
        return [_channels_last(m.x[:, :, ::sy, ::sx]) for m in self.members]

    @staticmethod
    def worth_it(members: list[ConvTerm], need_norm: bool) -> bool:
        c_out, c_in = members[0].weight.shape[:2]
        k = len(members)
        shared = 2 * c_in * c_out + k * (c_in * c_in if need_norm else 0) + 2 * k * c_in
        return shared < k * (c_in * c_out + 2 * c_out)


def _group_shared_kernels(terms: list[Term], shared_keys: set[int]) -> list[Term | _SharedKernel]:
    groups: dict[tuple, list[ConvTerm]] = {}
    for t in terms:
        if isinstance(t, ConvTerm) and t.taps == 1 and t.groups == 1 and t.pad == (0, 0, 0, 0):
            sig = (id(t.weight), id(t.out_scale), t.stride, t.c0, tuple(t.x.shape))
            groups.setdefault(sig, []).append(t)
    out: list[Term | _SharedKernel] = []
    done: set[int] = set()
    for t in terms:
        if id(t) in done:
            continue
        members = (
            groups.get((id(t.weight), id(t.out_scale), t.stride, t.c0, tuple(t.x.shape)))
            if isinstance(t, ConvTerm) and t.taps == 1 and t.groups == 1 and t.pad == (0, 0, 0, 0)
            else None
        )
        if members and len(members) > 1:
            need_norm = any(m.key in shared_keys for m in members)
            done.update(id(m) for m in members)
            if _SharedKernel.worth_it(members, need_norm):
                out.append(_SharedKernel(members))
            else:
                out.extend(materialise(m) for m in members)
            continue
        out.append(materialise(t) if isinstance(t, ConvTerm) and t.taps == 1 else t)
    return out


def _joint_tap_products(units: list) -> dict[int, torch.Tensor]:
    """Kernel taps of convolutions that share one kernel (the max-pool window offsets feeding a conv, or a
    fully connected layer after a max-pool) in one product over the stacked inputs: the weights are read
    once instead of once per input."""
    groups: dict[tuple, list[ConvTerm]] = {}
    for t in units:
        if isinstance(t, ConvTerm) and t.taps > 1 and not _use_gram(t):
            sig = (id(t.weight), id(t.out_scale), t.stride, t.dilation, t.pad, t.groups, tuple(t.x.shape))
            groups.setdefault(sig, []).append(t)
    out: dict[int, torch.Tensor] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        stacked = tap_products(replace(first, x=torch.cat([m.x for m in members], 0)))
        for m, taps in zip(members, stacked.chunk(len(members), 0), strict=True):
            out[id(m)] = taps
    return out


def _stage_ratios(bundle: Affine) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
    """Channels-last throughout: every reduction over channels runs over contiguous memory."""
    b, c, h, w = bundle.batch, bundle.channels, bundle.height, bundle.width
    _, taps_of_key, owned = _ownership(bundle)
    # Norms only matter where a bias is shared by several paths: a bias owned by one path simply joins it.
    shared_keys = set().union(*[o for _, o in owned if sum(taps_of_key[k] for k in o) > 1])

    # Single-tap convolutions (1x1) are one path per position: the library convolution is the fastest
    # way to form them, and their output is the contribution itself.
    units = _group_shared_kernels(bundle.terms, shared_keys)
    if _fusable(bundle, units):
        return _fused_stage_ratios(bundle, units, shared_keys)
    terms = [m for u in units for m in (u.members if isinstance(u, _SharedKernel) else [u])]
    z: torch.Tensor | None = None  # (B, H, W, C)
    writable = borrowed = False
    taps_of: dict[int, torch.Tensor] = {}
    parts: dict[int, torch.Tensor] = {}
    source_ids = {id(t) for t in bundle.terms if isinstance(t, DenseTerm)}  # tensors others may still read
    rest = _complement_path(bundle, units, terms, source_ids, shared_keys)
    if rest is not None:
        units = [rest, *(u for u in units if u is not rest)]  # z starts as its tensor, written in place
    carries: torch.Tensor | None = None
    taps_of.update(_joint_tap_products(units))
    for t in units:
        if isinstance(t, _SharedKernel):
            ins = t.inputs()
            pooled = ins[0] + ins[1]
            for v in ins[2:]:
                pooled.add_(v)
            part = gemm.channels_by_kernel(pooled, t.weight)
            parts[id(t)] = ins  # type: ignore[assignment]
        elif isinstance(t, ConvTerm) and not _use_gram(t):
            taps = taps_of.get(id(t))
            if taps is None:
                taps = taps_of[id(t)] = tap_products(t)  # (B, H, W, T, C)
            part = taps.sum(3)
        else:
            part = _channels_last(t.total())
        if isinstance(t, DenseTerm):
            parts[id(t)] = part
        if t is rest:
            # Its dot product comes from the others' (below), so z may start as its own tensor; where it
            # contributes nothing, its bias has nobody to go to (published rule), as for a zero dot product.
            if any(rest.key in owners for _, owners in owned):
                # Any nonzero channel: max > 0 or min < 0, two plain reductions (the inf-norm and
                # aminmax run 8-10x slower on CPU; a 2-norm's squares could underflow).
                carries = ((part.amax(-1) > 0) | (part.amin(-1) < 0))[..., None]
            z, writable = part, True
            continue
        full = t.c0 == 0 and t.channels == c
        if z is None and full:
            # A materialised path is read again for its dot product (or is an upstream PFV map that others
            # still read): z starts as that tensor but is never written in place; the first addition below
            # makes a new tensor (one pass, not a copy and then an in-place pass).
            z, writable = part, not isinstance(t, DenseTerm)
            borrowed = isinstance(t, DenseTerm) and (id(t) in source_ids or part.data_ptr() == t.x.data_ptr())
            continue
        if z is None:
            z, writable = part.new_zeros(b, h, w, c), True
        elif not writable:
            if full:
                z, writable = z + part, True
                continue
            z, writable = z.clone(), True
        z[..., t.c0 : t.c0 + t.channels].add_(part)  # not +=: that writes the slice back
    assert z is not None
    for bias in bundle.biases:
        value = bias.value.permute(0, 2, 3, 1)
        if writable:
            z[..., bias.c0 : bias.c0 + bias.channels].add_(value)
        else:
            z, writable = z + F.pad(value, (bias.c0, c - bias.c0 - bias.channels)), True
    if borrowed and not writable:
        z = z.clone()  # the activation may run in place on z

    zz = torch.linalg.vector_norm(z, dim=-1).square()  # (B, H, W): one reduction pass, no product tensor
    _note_range(zz)
    z_out = z.permute(0, 3, 1, 2)  # (B, C, H, W) stored channels-last
    routes = [r for t in terms for r in t.tap_routes()]
    if len(terms) == 1 and terms[0].taps == 1:
        # One path: its ratio is exactly 1 wherever it carries the PFV. With a bias the path also needs a
        # nonzero contribution, else the bias has nobody to be shared with (published rule).
        carried = zz > 0
        if bundle.biases:
            # max |C| > 0: one vectorised reduction (`(C != 0).any(-1)` runs 5-9x slower on CPU).
            carried = carried & (parts[id(terms[0])].abs().amax(-1) > 0)
        return z_out, carried.to(z.dtype)[:, None], routes

    stats: list[_TermStats] = []
    for u in units:
        if not isinstance(u, _SharedKernel):
            continue
        back = gemm.channels_by_kernel(z[..., u.c0 : u.c0 + u.channels], u.transposed())  # W^T z, (B, H, W, C_in)
        gram = u.weight.t() @ u.weight if any(m.key in shared_keys for m in u.members) else None  # symmetric
        for m, x in zip(u.members, parts[id(u)], strict=True):
            norms = None
            if gram is not None:
                norms = torch.linalg.vecdot(x, gemm.channels_by_kernel(x, gram)).clamp_min(0).sqrt()[..., None]
            stats.append(_TermStats(m, norms, torch.linalg.vecdot(x, back)[..., None]))
    grouped = {id(m) for u in units if isinstance(u, _SharedKernel) for m in u.members}
    for t in terms:
        if id(t) in grouped or t is rest:
            continue
        zc = z[..., t.c0 : t.c0 + t.channels]
        want_norm = t.key in shared_keys
        norms = None
        if isinstance(t, DenseTerm):
            x = parts[id(t)]
            if want_norm:
                norms = torch.linalg.vector_norm(x, dim=-1)[..., None]
            dots = torch.linalg.vecdot(x, zc)[..., None]
        elif id(t) in taps_of:
            y = taps_of[id(t)]
            if want_norm:
                norms = torch.linalg.vector_norm(y, dim=-1)
            dots = _tap_dots(y, zc)
        else:
            norms, dots = _gram_norms_dots(t, zc)
        stats.append(_TermStats(t, norms, dots))
    if rest is None:
        return _assemble(bundle, z, zz, stats, None)
    # The paths and biases sum to z, so their dot products with z sum to ||z||^2: the remaining path's is
    # what the others leave (one pass over per-position scalars instead of one over its channels).
    bias_dots = [_bias_dot(bias.value, z) for bias, _ in owned]
    left = zz - sum(st.dots.sum(-1) for st in stats) - sum(bias_dots)
    stats.append(_TermStats(rest, None, left[..., None], carries))
    return _assemble(bundle, z, zz, stats, bias_dots)


def _complement_path(
    bundle: Affine, units: list, terms: list[Term], source_ids: set[int], shared_keys: set[int]
) -> DenseTerm | None:
    """A path whose dot product with z can be taken from the others': a materialised 1x1 convolution (a
    residual block's last convolution) that needs no norm, in a stage where every path and bias spans all
    channels (so all of them sum to z) and there is at least one other path. Not under autograd, whose
    differentiated maps keep the direct form."""
    if len(terms) < 2 or any(t.c0 != 0 or t.channels != bundle.channels for t in terms):
        return None
    if any(b.c0 != 0 or b.channels != bundle.channels for b in bundle.biases):
        return None
    params = [v for t in terms if isinstance(t, ConvTerm) for v in (t.weight, t.out_scale) if v is not None]
    if _needs_grad(*(t.x for t in terms), *(b.value for b in bundle.biases), *params):
        return None
    for u in units:
        if isinstance(u, DenseTerm) and id(u) not in source_ids and u.key not in shared_keys:
            return u
    return None


def _assemble(
    bundle: Affine, z: torch.Tensor, zz: torch.Tensor, stats: list[_TermStats], bias_dots: list[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
    """Ratios from the statistics: z (B, H, W, C), ||z||^2, each path's dot products and norms, and
    <beta, z> per bias when already known."""
    b, h, w = zz.shape
    _, taps_of_key, owned = _ownership(bundle)
    # Bias shares: each bias goes to its owner paths in proportion to their contribution norms; a path
    # that contributes nothing (its dot product is exactly zero) cannot carry a bias (published rule).
    by_key = {s.term.key: s for s in stats}
    share: dict[int, torch.Tensor] = {}  # per path key: its bias share per unit of norm
    solo: dict[int, torch.Tensor] = {}
    for i, (bias, owners) in enumerate(owned):
        e = _bias_dot(bias.value, z[..., bias.c0 : bias.c0 + bias.channels]) if bias_dots is None else bias_dots[i]
        if sum(taps_of_key[k] for k in owners) == 1:
            (k,) = owners
            solo[k] = solo[k] + e if k in solo else e
            continue
        total_norm = sum(by_key[k].norms.sum(-1) for k in owners)
        per_norm = torch.where(total_norm > 0, e / torch.where(total_norm > 0, total_norm, 1), 0)
        for k in owners:
            share[k] = share[k] + per_norm if k in share else per_norm

    # Ratio 0 onto an all-zero pre-activation: its reciprocal norm is taken as 0. Each term's ratios are
    # written straight into their slice of the (B, T, H, W) result, whatever the layout they came in.
    positive = zz > 0
    inv_zz = torch.where(positive, torch.where(positive, zz, 1).reciprocal(), 0)[..., None]
    mu = z.new_empty(b, sum(st.dots.shape[-1] for st in stats), h, w)
    k0 = 0
    for st in stats:
        taps = st.dots.shape[-1]
        num = st.dots
        if st.norms is not None and st.term.key in share:
            num = torch.addcmul(num, st.norms, share[st.term.key][..., None])
        if st.term.key in solo:
            carries = st.dots != 0 if st.carries is None else st.carries
            num = num + torch.where(carries, solo[st.term.key][..., None], 0)
        dst = mu[:, k0 : k0 + taps].permute(0, 2, 3, 1)
        if _needs_grad(num, inv_zz):
            dst.copy_(num * inv_zz)  # out= has no autograd (maps differentiated in the input)
        else:
            torch.mul(num, inv_zz, out=dst)
        k0 += taps
    return z.permute(0, 3, 1, 2), mu, [r for st in stats for r in st.term.tap_routes()]


def _ownership(bundle: Affine) -> tuple[frozenset[int], dict[int, int], list[tuple[BiasTerm, frozenset[int]]]]:
    """Path keys, taps per key, and each bias with the keys that share it (every path when none of its
    owners reaches this stage)."""
    all_keys = frozenset(t.key for t in bundle.terms)
    taps_of_key = {t.key: t.taps for t in bundle.terms}
    return all_keys, taps_of_key, [(bias, (bias.owners & all_keys) or all_keys) for bias in bundle.biases]


def _fusable(bundle: Affine, units: list) -> bool:
    """The shape of stage the fused statistics cover: every path and bias spans all channels, biases are
    per-channel constants, no max-pool merge or Gram-matrix term, no autograd, and not a lone path
    without a bias (its z would be the upstream map itself)."""
    if not units or not fused.enabled(bundle.terms[0].x.device):
        return False
    c = bundle.channels
    for u in units:
        if isinstance(u, _SharedKernel) or u.c0 != 0 or u.channels != c:
            return False
        if isinstance(u, ConvTerm) and (u.taps == 1 or _use_gram(u)):
            return False
        params = (u.weight,) + (() if u.out_scale is None else (u.out_scale,)) if isinstance(u, ConvTerm) else ()
        if _needs_grad(u.x, *params):
            return False
    for bias in bundle.biases:
        v = bias.value
        if bias.c0 != 0 or bias.channels != c or v.shape[0] != 1 or v.shape[2:] != (1, 1) or _needs_grad(v):
            return False
    single = len(units) == 1 and isinstance(units[0], DenseTerm)
    return not (single and not bundle.biases)


def _fused_stage_ratios(
    bundle: Affine, units: list, shared_keys: set[int]
) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
    """The stage with its statistics through :mod:`ierf.srd.fused`."""
    b, c, h, w = bundle.batch, bundle.channels, bundle.height, bundle.width
    taps_of = _joint_tap_products(units)
    # Batch and rows merged (a view for contiguous and wide tap layouts alike): fewer dimensions, fewer
    # shape specialisations to compile.
    dense: list[torch.Tensor] = []
    taps: list[torch.Tensor] = []
    for u in units:
        if isinstance(u, DenseTerm):
            dense.append(_channels_last(u.total()).flatten(0, 1))  # (B*H, W, C)
        else:
            y = taps_of.get(id(u))
            taps.append((tap_products(u) if y is None else y).flatten(0, 1))  # (B*H, W, T, C)
    betas = [bias.value.reshape(c) for bias in bundle.biases]
    if len(units) == 1 and dense:
        z, carried = fused.run(fused.single_path_stats, dense[0], betas)
        return z.view(b, h, w, c).permute(0, 3, 1, 2), carried.view(b, 1, h, w), units[0].tap_routes()
    dense_terms = [u for u in units if isinstance(u, DenseTerm)]
    tap_terms = [u for u in units if not isinstance(u, DenseTerm)]
    z, zz, dense_dots, dense_norms, tap_dots, tap_norms, bias_dots = fused.run(
        fused.stage_stats,
        dense,
        taps,
        betas,
        tuple(u.key in shared_keys for u in dense_terms),
        tuple(u.key in shared_keys for u in tap_terms),
    )

    def per_position(v: torch.Tensor) -> torch.Tensor:  # (B*H, W[, T]) -> (B, H, W, T)
        return v.reshape(b, h, w, -1)

    by_id: dict[int, _TermStats] = {}
    for u, d, n in zip(dense_terms, dense_dots, dense_norms, strict=True):
        by_id[id(u)] = _TermStats(u, None if n is None else per_position(n), per_position(d))
    for u, d, n in zip(tap_terms, tap_dots, tap_norms, strict=True):
        by_id[id(u)] = _TermStats(u, None if n is None else per_position(n), per_position(d))
    stats = [by_id[id(u)] for u in units]
    e = [v.view(b, h, w) for v in bias_dots]
    _note_range(zz)
    return _assemble(bundle, z.view(b, h, w, c), zz.view(b, h, w), stats, e)

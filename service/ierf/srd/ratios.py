"""Sharing ratios of one stage: the channel-dimension work of SRD, done once per image.

For the pre-activation PFV z_q of a stage and every path t reaching it (spec §2.2, §2.5b):

    mu_t(q) = ( <C_t(q), z_q> + n_t(q) * sum_o <beta_o, z_q> / N_o(q) ) / ||z_q||^2

with n_t = ||C_t||, and N_o the summed norms of the paths sharing bias o. Everything after this is
channel-free: relevance moves as per-position scalars. Kernel taps are formed in the cheapest exact way
for the layer's shape: one batched matrix product over unfolded taps, an element-wise product for
depthwise kernels, or a per-tap Gram matrix when the input has few channels (the RGB stem).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ierf.srd.terms import Affine, ConvTerm, DenseTerm, Route, Term, materialise

# Largest tap tensor (bytes) formed at once; larger stages are processed a few images at a time.
TAP_BUDGET_BYTES = 256 * 2**20


def tap_products(t: ConvTerm) -> torch.Tensor:
    """Per-tap contributions of a convolution term, laid out (T, C_out, B, L), L = output positions."""
    x = t.padded_input()
    b, c_in = x.shape[:2]
    kh, kw = t.kernel
    taps = kh * kw
    cols = F.unfold(x, (kh, kw), dilation=t.dilation, stride=t.stride)  # (B, C_in*T, L)
    length = cols.shape[-1]
    w = t.scaled_weight()
    c_out, c_in_g = w.shape[:2]
    groups = t.groups
    if groups == c_in and c_in_g == 1 and c_out == c_in:  # depthwise: element-wise per tap
        cols = cols.view(b, c_in, taps, length).permute(2, 1, 0, 3)  # (T, C, B, L)
        return cols * w.view(c_out, taps).t()[:, :, None, None]
    out_g = c_out // groups
    cols = cols.view(b, groups, c_in_g, taps, length).permute(3, 1, 2, 0, 4).reshape(taps, groups, c_in_g, b * length)
    wt = w.view(groups, out_g, c_in_g, taps).permute(3, 0, 1, 2)  # (T, g, out_g, in_g)
    y = torch.matmul(wt, cols)  # (T, g, out_g, B*L)
    return y.reshape(taps, c_out, b, length)


def _use_gram(t: ConvTerm) -> bool:
    """Few input channels (the RGB stem): form norms from a per-tap Gram matrix instead of the taps."""
    return t.groups == 1 and t.taps > 1 and t.weight.shape[1] * 4 <= t.weight.shape[0]


def _gram_norms_dots(t: ConvTerm, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n_t and <C_t, z> via ||W_t a||^2 = a^T (W_t^T W_t) a and <W_t a, z> = <a, W_t^T z>."""
    x = t.padded_input()
    b, c_in = x.shape[:2]
    kh, kw = t.kernel
    taps = kh * kw
    cols = F.unfold(x, (kh, kw), dilation=t.dilation, stride=t.stride).view(b, c_in, taps, -1)
    w = t.scaled_weight().view(t.weight.shape[0], c_in, taps).permute(2, 0, 1)  # (T, C_out, C_in)
    gram = torch.matmul(w.transpose(1, 2), w)  # (T, C_in, C_in)
    g_cols = torch.einsum("tcd,bdtl->bctl", gram, cols)
    norms = (cols * g_cols).sum(1).clamp_min(0).sqrt()  # (B, T, L)
    wz = torch.einsum("toc,bol->bctl", w, z.flatten(2))
    dots = (cols * wz).sum(1)
    return norms, dots


class _TermStats:
    """Norms and dot products of one term's taps with z, as (B, T, H, W)."""

    def __init__(self, term: Term, norms: torch.Tensor | None, dots: torch.Tensor) -> None:
        self.term = term
        self.norms = norms
        self.dots = dots


def stage_ratios(bundle: Affine) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
    """Return (z, mu, routes): the pre-activation map, the ratio of every path (B, T, H, W), and where
    each path comes from. Large batches are split so tap tensors stay within TAP_BUDGET_BYTES."""
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


def _tap_bytes_per_image(bundle: Affine) -> int:
    total = 0
    for t in bundle.terms:
        if isinstance(t, ConvTerm) and not _use_gram(t):
            h, w = t.spatial()
            total += t.taps * t.channels * h * w * t.x.element_size()
    return total


def _batch_slice(bundle: Affine, start: int, stop: int) -> Affine:
    from dataclasses import replace

    def cut(v: torch.Tensor) -> torch.Tensor:
        return v[start:stop] if v.shape[0] > 1 else v

    terms = [replace(t, x=t.x[start:stop]) for t in bundle.terms]
    biases = [replace(b, value=cut(b.value)) for b in bundle.biases]
    return replace(bundle, terms=terms, biases=biases, batch=stop - start)


def _stage_ratios(bundle: Affine) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
    b, c, h, w = bundle.batch, bundle.channels, bundle.height, bundle.width
    # Single-tap convolutions (1x1) are one path per position: the library convolution is the fastest
    # way to form them, and their output is the contribution itself.
    terms = [materialise(t) if isinstance(t, ConvTerm) and t.taps == 1 else t for t in bundle.terms]
    z: torch.Tensor | None = None
    pending: list[tuple[ConvTerm, torch.Tensor]] = []
    for t in terms:
        if isinstance(t, ConvTerm) and not _use_gram(t):
            taps = tap_products(t)  # (T, C, B, L)
            pending.append((t, taps))
            part = taps.sum(0).view(t.channels, b, h, w).transpose(0, 1)
        else:
            part = t.total()
        if z is None and t.c0 == 0 and t.channels == c:
            z = part.clone() if isinstance(t, DenseTerm) else part.contiguous()
            continue
        if z is None:
            z = part.new_zeros(b, c, h, w)
        z[:, t.c0 : t.c0 + t.channels] += part
    assert z is not None
    for bias in bundle.biases:
        z[:, bias.c0 : bias.c0 + bias.channels] += bias.value

    zz = (z * z).sum(1)
    routes = [r for t in terms for r in t.tap_routes()]
    if len(terms) == 1 and terms[0].taps == 1:
        # One path: its ratio is exactly 1 wherever it carries the PFV. With a bias the path also needs a
        # nonzero contribution, else the bias has nobody to be shared with (published rule).
        carried = zz > 0
        if bundle.biases:
            carried = carried & (terms[0].total() != 0).any(1)
        return z, carried.to(z.dtype)[:, None], routes

    taps_of = {id(t): y for t, y in pending}
    all_keys = frozenset(t.key for t in terms)
    taps_of_key = {t.key: t.taps for t in terms}
    owned = [(bias, (bias.owners & all_keys) or all_keys) for bias in bundle.biases]
    # Norms only matter where a bias is shared by several paths: a bias owned by one path simply joins it.
    shared_keys = set().union(*[o for _, o in owned if sum(taps_of_key[k] for k in o) > 1])

    stats: list[_TermStats] = []
    for t in terms:
        zc = z[:, t.c0 : t.c0 + t.channels]
        want_norm = t.key in shared_keys
        norms = None
        if isinstance(t, DenseTerm):
            if want_norm:
                norms = (t.x * t.x).sum(1, keepdim=True).sqrt()
            dots = (t.x * zc).sum(1, keepdim=True)
        elif id(t) in taps_of:
            y = taps_of[id(t)]
            zt = zc.transpose(0, 1).reshape(t.channels, b, h * w)
            if want_norm:
                norms = (y * y).sum(1).sqrt().view(-1, b, h, w).transpose(0, 1)
            dots = (y * zt).sum(1).view(-1, b, h, w).transpose(0, 1)
        else:
            n, d = _gram_norms_dots(t, zc)
            norms, dots = n.view(b, -1, h, w), d.view(b, -1, h, w)
        stats.append(_TermStats(t, norms, dots))

    # Bias shares: each bias goes to its owner paths in proportion to their contribution norms; a path
    # that contributes nothing (its dot product is exactly zero) cannot carry a bias (published rule).
    by_key = {s.term.key: s for s in stats}
    share = {k: torch.zeros_like(zz) for k in all_keys}
    solo: dict[int, torch.Tensor] = {}
    for bias, owners in owned:
        e = (bias.value * z[:, bias.c0 : bias.c0 + bias.channels]).sum(1)
        if sum(taps_of_key[k] for k in owners) == 1:
            (k,) = owners
            solo[k] = solo[k] + e if k in solo else e
            continue
        total_norm = sum(by_key[k].norms.sum(1) for k in owners)
        per_norm = torch.where(total_norm > 0, e / torch.where(total_norm > 0, total_norm, 1), 0)
        for k in owners:
            share[k] = share[k] + per_norm

    safe_zz = torch.where(zz > 0, zz, torch.ones_like(zz))[:, None]
    mus = []
    for st in stats:
        num = st.dots
        if st.norms is not None:
            num = num + st.norms * share[st.term.key][:, None]
        if st.term.key in solo:
            num = num + torch.where(st.dots != 0, solo[st.term.key][:, None], 0)
        mus.append(num / safe_zz)
    mu = torch.cat(mus, 1) * (zz > 0)[:, None]
    return z, mu, routes

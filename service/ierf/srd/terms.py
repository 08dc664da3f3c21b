"""Affine bundles: a tensor written as a sum of per-path contributions of upstream PFV maps plus biases.

Between two activations every operation is affine once the instance's routing is frozen (max-pool
winners). SRD needs, for each pre-activation PFV z_q, the contribution vector of every upstream PFV
(every *path*: a kernel tap, a max-pool offset, a residual branch) and the biases with the set of paths
that share them. An :class:`Affine` carries exactly that, symbolically enough to stay cheap:

* :class:`DenseTerm` — a materialised contribution tensor (one path per position).
* :class:`ConvTerm` — a convolution not yet expanded into its kernel taps (one path per tap); the tap
  products are only formed where ratios are computed, in the cheapest way for the layer's shape.
* :class:`BiasTerm` — a constant, shared by norm among the paths that existed where it was added
  ("bias shared within each branch", as in the published code).

A :class:`Route` maps a position q of a term's tensor to the source position p = stride*q + offset,
so ratios can be scattered back without any index tensors.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ierf.errors import InputSizeError, UnsupportedModelError
from ierf.srd import gemm
from ierf.srd.derived import DERIVED

_keys = itertools.count(1)


def replace(obj, **changes):
    """A shallow copy with some fields changed: bundles are rebuilt on every op, so this stays cheap
    (built directly: ``copy.copy`` goes through ``__reduce_ex__``, 3-4x slower per call)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new


def new_key() -> int:
    """A fresh path identity; biases name the paths that share them by these keys."""
    return next(_keys)


@dataclass(frozen=True)
class Route:
    """Position q of a tensor corresponds to position stride*q + offset of PFV map ``source``."""

    source: int
    sy: int = 1
    sx: int = 1
    oy: int = 0
    ox: int = 0

    def then(self, sy: int, sx: int, oy: int, ox: int) -> Route:
        """Route of a tensor whose position q reads position (sy*q+oy, sx*q+ox) of this one."""
        return Route(self.source, self.sy * sy, self.sx * sx, self.sy * oy + self.oy, self.sx * ox + self.ox)


@dataclass
class DenseTerm:
    """Contribution ``x`` (B, C, H, W) to channels [c0, c0+C) of the node, one path per position."""

    x: torch.Tensor
    route: Route
    c0: int = 0
    key: int = field(default_factory=new_key)

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def taps(self) -> int:
        return 1

    def spatial(self) -> tuple[int, int]:
        return self.x.shape[2], self.x.shape[3]

    def total(self) -> torch.Tensor:
        return self.x

    def tap_routes(self) -> list[Route]:
        return [self.route]


# With BLAS chosen (ierf.srd.gemm), 1x1 convolutions over at most this many positions (batch x height x
# width) run as a matrix product; with oneDNN chosen they are always the library convolution.
MM_MAX_ROWS = 4096


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1, stride-1 convolution, returned channels-last. Over few positions (late stages, the class head)
    and with BLAS chosen it is one matrix product: where BLAS was chosen, the library convolution spent up
    to ~2x as long there (the 2048 -> 1000 head at 7x7: 6.6 vs 3.0 ms)."""
    b, c_in, h, w = x.shape
    if b * h * w > MM_MAX_ROWS or gemm.use_onednn(x):
        return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight)
    rows = x.permute(0, 2, 3, 1).reshape(-1, c_in)  # a view when x is stored channels-last
    return (rows @ weight.reshape(weight.shape[0], c_in).t()).view(b, h, w, -1).permute(0, 3, 1, 2)


@dataclass
class ConvTerm:
    """conv2d(pad(x), weight) * out_scale, kept unexpanded: one path per kernel tap.

    ``uniform`` marks a channel-uniform averaging kernel (average pooling): it commutes with any 1x1
    channel mixing, which keeps global-average-pool + linear heads cheap.
    """

    x: torch.Tensor
    route: Route
    weight: torch.Tensor  # (C_out, C_in/groups, kh, kw)
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    groups: int = 1
    out_scale: torch.Tensor | None = None  # (C_out,), folded batch-norm scales
    uniform: bool = False
    c0: int = 0
    key: int = field(default_factory=new_key)

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]

    @property
    def taps(self) -> int:
        kh, kw = self.kernel
        return kh * kw

    def spatial(self) -> tuple[int, int]:
        (kh, kw), (sy, sx), (dy, dx) = self.kernel, self.stride, self.dilation
        t, b, l, r = self.pad
        h = (self.x.shape[2] + t + b - dy * (kh - 1) - 1) // sy + 1
        w = (self.x.shape[3] + l + r - dx * (kw - 1) - 1) // sx + 1
        return h, w

    def scaled_weight(self) -> torch.Tensor:
        if self.out_scale is None:
            return self.weight
        w, s = self.weight, self.out_scale
        return DERIVED.get("scaled", (w, s), lambda: w * s.view(-1, 1, 1, 1))

    def padded_input(self) -> torch.Tensor:
        t, b, l, r = self.pad
        if t == b == l == r == 0:
            return self.x
        return F.pad(self.x, (l, r, t, b))

    def total(self) -> torch.Tensor:
        """The convolution, stored channels-last as SRD reads it (the input is converted if it is not:
        at the RGB stem, three channels instead of the output's 64)."""
        x = self.padded_input().contiguous(memory_format=torch.channels_last)
        w = self.scaled_weight()
        if self.kernel == (1, 1) and self.stride == (1, 1) and self.groups == 1:
            return pointwise_conv(x, w)
        return F.conv2d(x, w, None, self.stride, 0, self.dilation, self.groups)

    def tap_routes(self) -> list[Route]:
        """Routes in the (i, j) row-major tap order used by every tap computation."""
        (kh, kw), (sy, sx), (dy, dx) = self.kernel, self.stride, self.dilation
        t, _, l, _ = self.pad
        return [self.route.then(sy, sx, i * dy - t, j * dx - l) for i in range(kh) for j in range(kw)]


Term = DenseTerm | ConvTerm


@dataclass
class BiasTerm:
    """Constant added to channels [c0, c0+C); ``owners`` are the path keys that share it by norm.

    ``origin`` names the layer bias this constant is an image of: a biased map without an activation that
    feeds two branches gives one image per branch, and where the branches are added again the images are
    one bias again, shared among the paths of both (as the bias of that layer is in the published rule).
    """

    value: torch.Tensor  # broadcastable to (B, C, H, W)
    owners: frozenset[int]
    c0: int = 0
    origin: int = field(default_factory=new_key)

    @property
    def channels(self) -> int:
        return self.value.shape[1]


@dataclass
class Affine:
    """A node value written as sum(terms) + sum(biases); shape (B, channels, height, width).

    ``flat_from`` records a flatten of a (C, H, W) map, so that a following Linear layer can be read as
    a convolution whose kernel covers the whole map (VGG's first fully connected layer).
    """

    terms: list[Term]
    biases: list[BiasTerm]
    batch: int
    channels: int
    height: int
    width: int
    flat_from: tuple[int, int, int] | None = None
    is_vector: bool = False  # (B, C) rather than (B, C, H, W); H = W = 1 then
    # An adaptive average pooling with uneven windows not yet applied: (A (oh, H), B (ow, W), H, W), the
    # value being A x B^T per channel. Only flatten + Linear may consume it (they fold it into the kernel).
    pending_pool: tuple[torch.Tensor, torch.Tensor, int, int] | None = None

    # -- construction -------------------------------------------------------------------------------
    @staticmethod
    def of_source(x: torch.Tensor, source: int) -> Affine:
        if x.dim() == 2:
            return Affine(
                [DenseTerm(x[:, :, None, None], Route(source))],
                [],
                x.shape[0],
                x.shape[1],
                1,
                1,
                is_vector=True,
            )
        if x.dim() != 4:
            raise UnsupportedModelError(f"PFV maps must be (B, C, H, W) or (B, C); got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        return Affine([DenseTerm(x, Route(source))], [], b, c, h, w)

    def rekeyed(self) -> Affine:
        """Same value with fresh path keys: every op output is a new branch for bias ownership."""
        mapping = {t.key: new_key() for t in self.terms}
        terms = [replace(t, key=mapping[t.key]) for t in self.terms]
        biases = [replace(b, owners=frozenset(mapping.get(k, k) for k in b.owners)) for b in self.biases]
        return replace(self, terms=terms, biases=biases)

    def taps_split(self) -> Affine:
        """Same value with every convolution term split into one single-path term per kernel tap; a bias
        owned by a convolution is owned by all of its taps (shared by norm among them, as before)."""
        if all(isinstance(t, DenseTerm) for t in self.terms):
            return self
        terms: list[Term] = []
        keys_of: dict[int, list[int]] = {}
        for t in self.terms:
            pieces = split_taps(t) if isinstance(t, ConvTerm) else [t]
            keys_of[t.key] = [p.key for p in pieces]
            terms += pieces
        biases = [
            replace(b, owners=frozenset(k for owner in b.owners for k in keys_of.get(owner, [owner])))
            for b in self.biases
        ]
        return replace(self, terms=terms, biases=biases)

    def keys(self) -> frozenset[int]:
        return frozenset(t.key for t in self.terms)

    # -- value ----------------------------------------------------------------------------------------
    def total(self) -> torch.Tensor:
        """The node's actual value (B, C, H, W)."""
        if self.pending_pool is not None:
            rows, cols, h, w = self.pending_pool
            raw = replace(self, height=h, width=w, pending_pool=None).total()
            return torch.einsum("bchw,ih,jw->bcij", raw, rows, cols)
        ref = self._reference_tensor()
        out = ref.new_zeros(self.batch, self.channels, self.height, self.width)
        for t in self.terms:
            out[:, t.c0 : t.c0 + t.channels].add_(t.total())
        for b in self.biases:
            out[:, b.c0 : b.c0 + b.channels].add_(b.value)
        return out

    def value(self) -> torch.Tensor:
        out = self.total()
        return out.flatten(1) if self.is_vector or self.flat_from else out

    def _reference_tensor(self) -> torch.Tensor:
        if self.terms:
            return self.terms[0].x
        return self.biases[0].value

    def bias_map(self, bias: BiasTerm) -> torch.Tensor:
        """A bias expanded to (B or 1, C, H, W): needed before spatial ops change it at borders."""
        v = bias.value
        return v.expand(v.shape[0], v.shape[1], self.height, self.width)

    # -- linear ops -------------------------------------------------------------------------------------
    def scale_shift(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> Affine:
        """Per-channel affine map (folded batch norm): scales fold into terms, the shift is a new bias."""
        out = self.rekeyed()
        if scale is not None:
            terms: list[Term] = []
            for t in out.terms:
                s = scale if t.c0 == 0 and t.channels == scale.numel() else scale[t.c0 : t.c0 + t.channels]
                if isinstance(t, DenseTerm):
                    terms.append(replace(t, x=t.x * s.view(1, -1, 1, 1)))
                else:
                    new_scale = s if t.out_scale is None else t.out_scale * s
                    terms.append(replace(t, out_scale=new_scale))
            out.terms = terms
            out.biases = [
                replace(b, value=b.value * scale[b.c0 : b.c0 + b.channels].view(1, -1, 1, 1)) for b in out.biases
            ]
        if shift is not None:
            out.biases.append(BiasTerm(shift.view(1, -1, 1, 1), out.keys()))
        return out

    def channel_slice(self, lo: int, hi: int, where: str) -> Affine:
        """Channels [lo, hi) of a (B, C, H, W) value: each path keeps the part of its channels inside the
        range (a convolution term its matching output filters), biases likewise. Paths left with no
        channel drop out; the biases they shared go to the paths that remain."""
        if self.is_vector or self.flat_from is not None or self.pending_pool is not None:
            raise UnsupportedModelError(f"{where}: channel indexing of a flattened or pooled vector")
        terms: list[Term] = []
        for t in self.terms:
            a, b = max(lo, t.c0), min(hi, t.c0 + t.channels)
            if a >= b:
                continue
            part = slice(a - t.c0, b - t.c0)
            if isinstance(t, DenseTerm):
                terms.append(replace(t, x=t.x[:, part], c0=a - lo))
            elif t.groups != 1:
                raise UnsupportedModelError(f"{where}: channel indexing of a grouped convolution's output")
            else:
                scale = None if t.out_scale is None else t.out_scale[part]
                terms.append(replace(t, weight=t.weight[part], out_scale=scale, c0=a - lo))
        if not terms:
            raise UnsupportedModelError(f"{where}: channels {lo}..{hi - 1} of the value carry no feature map")
        biases = []
        for bias in self.biases:
            a, b = max(lo, bias.c0), min(hi, bias.c0 + bias.channels)
            if a < b:
                biases.append(replace(bias, value=bias.value[:, a - bias.c0 : b - bias.c0], c0=a - lo))
        return Affine(terms, biases, self.batch, hi - lo, self.height, self.width)

    def permute_channels(self, order: list[int], where: str) -> Affine:
        """Channel ``i`` of the result is channel ``order[i]`` of this value (a channel shuffle). Each path
        keeps its own contribution, now spread over the whole channel range with zeros elsewhere (a
        convolution term gets zero filters there), so its norms and dot products are unchanged."""
        if self.is_vector or self.flat_from is not None or self.pending_pool is not None:
            raise UnsupportedModelError(f"{where}: channel permutation of a flattened or pooled vector")
        c = self.channels
        order_digest = hashlib.sha1(str(order).encode()).hexdigest()  # names the permutation in cache keys
        new_of = torch.empty(c, dtype=torch.long)
        new_of[torch.tensor(order, dtype=torch.long)] = torch.arange(c)  # old channel -> new channel

        terms: list[Term] = []
        for t in self.terms:
            if isinstance(t, DenseTerm):
                terms.append(replace(t, x=_placed(t.x, new_of, t.c0, c, dim=1), c0=0))
            elif t.groups != 1:
                raise UnsupportedModelError(f"{where}: channel permutation of a grouped convolution's output")
            else:
                scale = None if t.out_scale is None else _placed(t.out_scale, new_of, t.c0, c, dim=0, fill=1.0)
                weight = DERIVED.get(
                    f"spread-{t.c0}-{c}-{order_digest}",
                    (t.weight,),
                    lambda t=t: _placed(t.weight, new_of, t.c0, c, dim=0),
                )
                # zero filters break channel uniformity: the term is an ordinary convolution now
                terms.append(replace(t, weight=weight, out_scale=scale, c0=0, uniform=False))
        biases = [replace(b, value=_placed(b.value, new_of, b.c0, c, dim=1), c0=0) for b in self.biases]
        return Affine(terms, biases, self.batch, c, self.height, self.width)

    def add_constant(self, const: torch.Tensor, where: str) -> Affine:
        """``value + const`` with torch's broadcasting against the value's real shape ((B, C), (B, C*H*W)
        when flattened, or (B, C, H, W)), kept as a bias of shape (1|B, C, 1|H, 1|W) so that each channel
        gets its own part: a (1,)-shaped constant reaches every channel, not only the first."""
        if self.pending_pool is not None:
            raise UnsupportedModelError(f"{where}: a constant added after uneven adaptive average pooling")
        if self.is_vector:
            shape: tuple[int, ...] = (self.batch, self.channels)
        elif self.flat_from is not None:
            shape = (self.batch, self.channels * self.height * self.width)
        else:
            shape = (self.batch, self.channels, self.height, self.width)
        try:
            full = torch.broadcast_shapes(tuple(const.shape), shape)
        except RuntimeError:
            full = None
        if full != shape:
            raise UnsupportedModelError(
                f"{where}: a constant of shape {tuple(const.shape)} added to a value of shape {shape} "
                "(it must broadcast to the value's shape without enlarging it)"
            )
        value = const.reshape((1,) * (len(shape) - const.dim()) + tuple(const.shape))
        if len(shape) == 2:  # one value per feature: expand, then lay the features out as (C, H, W)
            value = value.expand(value.shape[0], shape[1])
            value = value.reshape(value.shape[0], self.channels, self.height, self.width)
        else:
            value = value.expand(value.shape[0], self.channels, value.shape[2], value.shape[3])
        out = self.rekeyed()
        out.biases.append(BiasTerm(value, out.keys()))
        return out

    def conv(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        pad: tuple[int, int, int, int],
        dilation: tuple[int, int],
        groups: int,
        where: str,
    ) -> Affine:
        """Apply conv2d. Pending single-tap convolutions are materialised; a 1x1 conv after a k x k one is
        folded into it; two spreading kernels in a row (no activation between) are not supported."""
        src = self.rekeyed()
        kh, kw = weight.shape[2:]
        one_by_one = kh == kw == 1 and stride == (1, 1) and pad == (0, 0, 0, 0)
        terms: list[Term] = []
        for t in src.terms:
            terms.append(_conv_term(t, weight, stride, pad, dilation, groups, one_by_one, where))
        biases: list[BiasTerm] = []
        for b in src.biases:
            v = b.value
            if one_by_one and v.shape[2] == 1 and v.shape[3] == 1:
                w = _dense_slice(weight, groups, b.c0, b.channels)
                biases.append(BiasTerm(F.conv2d(v, w), b.owners, origin=b.origin))
            else:
                w = _dense_slice(weight, groups, b.c0, b.channels)
                t_, b_, l_, r_ = pad
                full = F.pad(src.bias_map(b), (l_, r_, t_, b_))
                biases.append(BiasTerm(F.conv2d(full, w, None, stride, 0, dilation), b.owners, origin=b.origin))
        out_h, out_w = _out_size(src.height, src.width, weight.shape[2:], stride, pad, dilation)
        keys = frozenset(t.key for t in terms)
        if bias is not None:
            biases.append(BiasTerm(bias.view(1, -1, 1, 1), keys))
        return Affine(terms, biases, src.batch, weight.shape[0], out_h, out_w)

    def avg_pool(
        self, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int, int, int], where: str
    ) -> Affine:
        """Average pooling (zero padding counted) as a channel-uniform depthwise convolution."""
        src = self.rekeyed()
        kh, kw = kernel
        ref = src._reference_tensor()
        terms: list[Term] = []
        for t in src.terms:
            w = _uniform_kernel(t.channels, kh, kw, ref.dtype, ref.device)
            if isinstance(t, ConvTerm) and t.taps == 1:
                t = materialise(t)
            elif isinstance(t, ConvTerm):
                if pad != (0, 0, 0, 0):
                    raise UnsupportedModelError(
                        f"{where}: padded average pooling directly after a {t.kernel} convolution (no activation "
                        "between) is not supported"
                    )
                folded = compose(t, _dense_slice(w, t.channels, 0, t.channels), stride, (1, 1))
                terms.append(replace(folded, c0=t.c0))
                continue
            terms.append(ConvTerm(t.x, t.route, w, stride, (1, 1), pad, t.channels, None, True, t.c0, t.key))
        biases = []
        for b in src.biases:
            full = F.pad(src.bias_map(b), (pad[2], pad[3], pad[0], pad[1]))
            biases.append(BiasTerm(F.avg_pool2d(full, kernel, stride), b.owners, b.c0, b.origin))
        out_h, out_w = _out_size(src.height, src.width, kernel, stride, pad, (1, 1))
        return Affine(terms, biases, src.batch, src.channels, out_h, out_w)

    def zero_pad(self, pad: tuple[int, int, int, int], where: str) -> Affine:
        """Constant-zero padding (TF "same" padding): padded positions hold no contribution."""
        src = self.rekeyed()
        t_, b_, l_, r_ = pad
        terms: list[Term] = []
        for t in src.terms:
            if isinstance(t, ConvTerm):
                if t.taps > 1:  # materialising would merge the k x k taps into one path: a wrong map
                    raise UnsupportedModelError(
                        f"{where}: zero padding of a {t.kernel[0]}x{t.kernel[1]} convolution's or pooling's output "
                        "before its activation is not supported; pad its input instead (its own padding=, or F.pad "
                        "before it)"
                    )
                t = materialise(t)
            terms.append(DenseTerm(F.pad(t.x, (l_, r_, t_, b_)), t.route.then(1, 1, -t_, -l_), t.c0, t.key))
        biases = [BiasTerm(F.pad(src.bias_map(b), (l_, r_, t_, b_)), b.owners, b.c0, b.origin) for b in src.biases]
        return Affine(terms, biases, src.batch, src.channels, src.height + t_ + b_, src.width + l_ + r_)

    def adaptive_avg_pool(self, out_h: int, out_w: int, where: str) -> Affine:
        """Adaptive average pooling whose windows do not tile the map (torchvision VGG at inputs other than
        224 or multiples: 7x5 -> 7x7). Separable and linear; kept pending until a flatten + Linear folds
        it into the Linear's weight, the form VGG's head takes."""
        if self.biases or self.pending_pool is not None or self.flat_from is not None:
            raise UnsupportedModelError(
                f"{where}: adaptive average pooling from {self.height}x{self.width} to {out_h}x{out_w} has uneven "
                "windows; supported only on a PFV map (no bias) that a flatten and a Linear layer then read"
            )
        ref = self._reference_tensor()
        rows = _adaptive_matrix(self.height, out_h, ref)
        cols = _adaptive_matrix(self.width, out_w, ref)
        return replace(self.rekeyed(), height=out_h, width=out_w, pending_pool=(rows, cols, self.height, self.width))

    def flatten(self) -> Affine:
        out = self.rekeyed()
        if self.height == 1 and self.width == 1:
            out.is_vector = True
        else:
            out.flat_from = (self.channels, self.height, self.width)
        return out

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None, where: str) -> Affine:
        """nn.Linear on a vector (1x1 conv) or on a flattened map (a conv covering the whole map)."""
        if self.pending_pool is not None:  # fold the uneven adaptive pooling into the weight
            c, oh, ow = self.flat_from
            rows, cols, h, w = self.pending_pool
            kernel = DERIVED.get(
                f"pooled-flat-kernel{self.flat_from}{(h, w)}",
                (weight,),
                lambda: torch.einsum("ocij,ih,jw->ochw", weight.view(weight.shape[0], c, oh, ow), rows, cols),
            )
            unflat = replace(self, flat_from=None, is_vector=False, pending_pool=None, height=h, width=w)
            out = unflat.conv(kernel, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, where)
            out.is_vector = True
            return out
        spatial = self.flat_from is None and not self.is_vector and (self.height, self.width) != (1, 1)
        if spatial:  # before the feature count: over the last dim of a map that count is the width, not C
            raise UnsupportedModelError(f"{where}: nn.Linear applied to a spatial map (use Conv2d 1x1)")
        features = self.channels * self.height * self.width if self.flat_from is not None else self.channels
        if weight.shape[1] != features:
            raise InputSizeError(
                f"{where}: nn.Linear expects {weight.shape[1]} input features but receives {features}"
                + (" (a flattened {}x{}x{} map)".format(*self.flat_from) if self.flat_from is not None else "")
            )
        if self.flat_from is not None:
            c, h, w = self.flat_from
            kernel = DERIVED.get(
                f"flat-kernel{self.flat_from}", (weight,), lambda: weight.view(weight.shape[0], c, h, w)
            )
        else:  # a vector, or a 1x1 map
            kernel = DERIVED.get("linear-kernel", (weight,), lambda: weight[:, :, None, None])
        unflat = replace(self, flat_from=None, is_vector=False)
        out = unflat.conv(kernel, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1, where)
        out.is_vector = True
        return out


def _adaptive_matrix(size: int, out: int, ref: torch.Tensor) -> torch.Tensor:
    """(out, size) averaging matrix of PyTorch's adaptive pooling: window i is [floor(i*size/out),
    ceil((i+1)*size/out))."""
    m = ref.new_zeros(out, size)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def add(a: Affine, b: Affine) -> Affine:
    """Residual sum: union of paths; each branch keeps its own biases, and the two images of one layer's
    bias (a biased map that forked into both branches) become that bias again, owned by both."""
    if (a.channels, a.height, a.width) != (b.channels, b.height, b.width):
        raise UnsupportedModelError(
            f"add of shapes {(a.channels, a.height, a.width)} and {(b.channels, b.height, b.width)} (broadcasting "
            "adds are not supported)"
        )
    if a is b:  # y + y is 2 * y: the same paths and bias, doubled (not two paths each with half the bias)
        return a.scale_shift(a._reference_tensor().new_full((a.channels,), 2.0), None)
    _check_recombined([a, b], "add")
    a, b = a.rekeyed(), b.rekeyed()
    return Affine(
        a.terms + b.terms,
        _merged_images(a.biases + b.biases),
        max(a.batch, b.batch),
        a.channels,
        a.height,
        a.width,
        is_vector=a.is_vector and b.is_vector,
    )


def _merged_images(biases: list[BiasTerm]) -> list[BiasTerm]:
    """Images of one layer's bias (one per branch it forked into) summed back into that bias: over the same
    channels (an add) or placed side by side (a concatenation; channels between them hold zero)."""
    groups: dict[int, list[BiasTerm]] = {}
    for bias in biases:
        groups.setdefault(bias.origin, []).append(bias)
    out: list[BiasTerm] = []
    for images in groups.values():
        if len(images) == 1:
            out.extend(images)
            continue
        lo = min(b.c0 for b in images)
        hi = max(b.c0 + b.channels for b in images)
        shape = [max(b.value.shape[d] for b in images) for d in (0, 2, 3)]
        value = images[0].value.new_zeros(shape[0], hi - lo, shape[1], shape[2])
        for b in images:
            value[:, b.c0 - lo : b.c0 - lo + b.channels] += b.value
        out.append(replace(images[0], value=value, c0=lo, owners=frozenset().union(*(b.owners for b in images))))
    return out


def cat_channels(parts: list[Affine]) -> Affine:
    """Channel concatenation (DenseNet): terms and biases move to their channel slice (images of one
    layer's bias, from branches it forked into, are that bias again)."""
    terms: list[Term] = []
    biases: list[BiasTerm] = []
    offset = 0
    h, w = parts[0].height, parts[0].width
    if any(p.flat_from is not None or p.pending_pool is not None for p in parts):
        # a flattened map's features interleave channels and positions; an uneven pooling not yet applied
        # is only folded into a flatten + Linear: neither is a channel slice of the result
        raise UnsupportedModelError(
            "torch.cat of flattened maps, or of maps under an uneven adaptive pooling: concatenate the maps "
            "along channels first, then pool and flatten"
        )
    _check_recombined(parts, "torch.cat")
    for p in parts:
        if (p.height, p.width) != (h, w):
            raise UnsupportedModelError("torch.cat of maps with different spatial sizes")
        p = p.rekeyed()
        terms += [replace(t, c0=t.c0 + offset) for t in p.terms]
        biases += [replace(b, c0=b.c0 + offset) for b in p.biases]
        offset += p.channels
    # torch concatenates tensors of one rank only: all parts are (B, C) vectors, or all are maps
    return Affine(terms, _merged_images(biases), parts[0].batch, offset, h, w, is_vector=parts[0].is_vector)


def _check_recombined(parts: list[Affine], op: str) -> None:
    """Refuse pieces of one path meeting again before an activation (channel slices of a convolution's
    output, concatenated or added) while a bias is shared by that path: each piece would become a path of
    its own, holding only its slice of the bias, where the published rule shares the whole bias among all
    paths through the layer by their norms. Pieces of a PFV map (no bias) recombine freely."""
    seen: set[int] = set()
    for part in parts:
        keys = part.keys()
        again = keys & seen
        if again and any(b.owners & again for p in parts for b in p.biases):
            raise UnsupportedModelError(
                f"{op} of channel slices of one convolution's output, with its bias, before an activation "
                "(each slice would take only its own part of the bias); put the activation first"
            )
        seen |= keys


def max_pool_routes(
    x: torch.Tensor,
    route: Route,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
) -> Affine:
    """Max pooling with the winners frozen: one masked term per window offset.

    The pooled PFV is the channel-wise mosaic of the input PFVs that won each channel; the term for window
    offset (i, j) keeps the channels won by the PFV at that offset (spec §2.4: merged into the next stage).
    """
    pooled, idx = F.max_pool2d(x, kernel, stride, pad, dilation, ceil_mode, return_indices=True)
    b, c, h, w = pooled.shape
    # Channels-last: the next stage reads these terms with channels innermost (no per-term copy there).
    pooled = pooled.contiguous(memory_format=torch.channels_last)
    idx = idx.contiguous(memory_format=torch.channels_last)
    offset, code = _window_offsets(idx, x.shape[3], kernel, stride, pad, dilation)
    return Affine(_split_by_offset(pooled, offset, code, route, 0, kernel, stride, pad, dilation), [], b, c, h, w)


def max_pool_of_paths(
    x: Affine,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
) -> Affine:
    """Max pooling of a value that is already a sum of paths (another max-pool's output, or such outputs
    side by side in a channel concatenation, as in GoogLeNet's inception blocks).

    Winners are taken on the value and frozen; each path is read at them and split by window offset, so a
    path becomes an (earlier path, window offset) pair, as the (kernel tap, window offset) pairs of a
    max-pool merged into a convolution are. With frozen winners the pooling is a gather, so the paths still
    sum to the pooled value exactly.
    """
    total = x.total()
    pooled, idx = F.max_pool2d(total, kernel, stride, pad, dilation, ceil_mode, return_indices=True)
    b, c, h, w = pooled.shape
    offset, code = _window_offsets(idx, total.shape[3], kernel, stride, pad, dilation)
    terms: list[Term] = []
    for t in x.terms:
        assert isinstance(t, DenseTerm)
        winners = idx[:, t.c0 : t.c0 + t.channels].flatten(2)
        read = t.x.expand(b, -1, -1, -1).flatten(2).gather(2, winners).view(b, t.channels, h, w)
        read = read.contiguous(memory_format=torch.channels_last)
        at = offset[:, t.c0 : t.c0 + t.channels]
        terms += _split_by_offset(read, at, code, t.route, t.c0, kernel, stride, pad, dilation)
    return Affine(terms, [], b, c, h, w)


def _split_by_offset(
    value: torch.Tensor,
    offset: torch.Tensor,
    code: list[list[int]],
    route: Route,
    c0: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
) -> list[Term]:
    """One term per window offset: the pooled ``value`` where that offset won, routed to its position."""
    (kh, kw), (sy, sx), (dy, dx), (py, px) = kernel, stride, dilation, pad
    zero = value.new_zeros(())
    return [
        DenseTerm(torch.where(offset == code[i][j], value, zero), route.then(sy, sx, i * dy - py, j * dx - px), c0)
        for i in range(kh)
        for j in range(kw)
    ]


def _window_offsets(
    idx: torch.Tensor,
    width_in: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, list[list[int]]]:
    """Each winner's window offset, as a code per output position, and the code of offset (i, j)."""
    _, _, h, w = idx.shape
    (kh, kw), (sy, sx), (dy, dx), (py, px) = kernel, stride, dilation, pad
    base_y = torch.arange(h, device=idx.device).view(1, 1, h, 1) * sy - py
    base_x = torch.arange(w, device=idx.device).view(1, 1, 1, w) * sx - px
    if (kw - 1) * dx < width_in:
        # The winner's flat index less its window origin's is i*dy*W + j*dx, distinct for every offset
        # while the window is narrower than the input: one subtraction, no integer division.
        return idx - (base_y * width_in + base_x), [[i * dy * width_in + j * dx for j in range(kw)] for i in range(kh)]
    offset = (idx // width_in - base_y) // dy * kw + (idx % width_in - base_x) // dx
    return offset, [[i * kw + j for j in range(kw)] for i in range(kh)]


# -- helpers -----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _uniform_kernel(channels: int, kh: int, kw: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The depthwise kernel of an average pooling: one object per shape, so kernels folded from it are kept
    between calls (never written to; an ordinary tensor even when first made under inference mode). One
    value expanded, not materialised: a global average pool's kernel is as large as the last feature map,
    and one per input size, kept process-wide, held hundreds of MB for images of varied sizes."""
    with torch.inference_mode(False):
        return torch.full((1, 1, 1, 1), 1.0 / (kh * kw), dtype=dtype, device=device).expand(channels, 1, kh, kw)


def _placed(
    value: torch.Tensor, new_of: torch.Tensor, c0: int, channels: int, dim: int, fill: float = 0.0
) -> torch.Tensor:
    """``value``'s channels ``c0, c0+1, ...`` (along ``dim``) placed at their new indices ``new_of`` in a
    tensor of ``channels`` along that dim, ``fill`` elsewhere (zero filters, or a scale of one)."""
    shape = list(value.shape)
    shape[dim] = channels
    full = value.new_full(shape, fill)
    index = new_of[c0 : c0 + value.shape[dim]].to(value.device)
    full.index_copy_(dim, index, value)
    return full


def _out_size(h, w, kernel, stride, pad, dilation) -> tuple[int, int]:
    kh, kw = kernel
    t, b, l, r = pad
    out = (
        (h + t + b - dilation[0] * (kh - 1) - 1) // stride[0] + 1,
        (w + l + r - dilation[1] * (kw - 1) - 1) // stride[1] + 1,
    )
    if min(out) < 1:
        raise InputSizeError(f"a {kh}x{kw} window over a {h}x{w} map leaves no output: the map is too small")
    return out


def materialise(t: ConvTerm) -> DenseTerm:
    """A single-tap convolution is one path per position: compute it once and keep the tensor."""
    sy, sx = t.stride
    top, _, left, _ = t.pad
    return DenseTerm(t.total(), t.route.then(sy, sx, -top, -left), t.c0, t.key)


def split_taps(t: ConvTerm) -> list[DenseTerm]:
    """A convolution's kernel taps as single-path terms, one per tap, each with a fresh key (their route is
    the tap's). Costs the tap tensors of the whole map: only for what must scale each tap's contribution
    per image, as a gate on the convolution's output does."""
    if t.taps == 1:
        return [replace(materialise(t), key=new_key())]
    xp = t.padded_input()
    w = t.scaled_weight()
    (kh, kw), (sy, sx), (dy, dx) = t.kernel, t.stride, t.dilation
    ho, wo = t.spatial()
    routes = t.tap_routes()
    out = []
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i * dy : i * dy + sy * (ho - 1) + 1, j * dx : j * dx + sx * (wo - 1) + 1]
            y = F.conv2d(window, w[:, :, i : i + 1, j : j + 1], None, t.stride, 0, 1, t.groups)
            out.append(DenseTerm(y, routes[i * kw + j], t.c0))
    return out


def _dense_slice(weight: torch.Tensor, groups: int, c0: int, channels: int) -> torch.Tensor:
    """The columns of a (grouped) conv weight that read input channels [c0, c0+channels), as a dense conv.
    Kept between calls (one object per kernel and slice), so kernels derived from it are kept too."""
    return DERIVED.get(
        f"dense-slice-{groups}-{c0}-{channels}", (weight,), lambda: _build_dense_slice(weight, groups, c0, channels)
    )


def _build_dense_slice(weight: torch.Tensor, groups: int, c0: int, channels: int) -> torch.Tensor:
    if groups == 1:
        return weight[:, c0 : c0 + channels]
    c_out, c_in_g = weight.shape[:2]
    c_in = c_in_g * groups
    dense = weight.new_zeros(c_out, c_in, *weight.shape[2:])
    out_g = c_out // groups
    for g in range(groups):
        dense[g * out_g : (g + 1) * out_g, g * c_in_g : (g + 1) * c_in_g] = weight[g * out_g : (g + 1) * out_g]
    return dense[:, c0 : c0 + channels]


def _conv_term(
    t: Term,
    weight: torch.Tensor,
    stride: tuple[int, int],
    pad: tuple[int, int, int, int],
    dilation: tuple[int, int],
    groups: int,
    one_by_one: bool,
    where: str,
) -> Term:
    if t.c0 == 0 and t.channels == weight.shape[1] * groups:
        w, term_groups = weight, groups
    else:  # the term feeds a channel slice (after torch.cat): only those weight columns apply
        w, term_groups = _dense_slice(weight, groups, t.c0, t.channels), 1
    if isinstance(t, ConvTerm):
        if t.taps == 1:
            t = materialise(t)
        elif one_by_one and t.uniform:
            # Averaging commutes with channel mixing: mix first, average after (cheap GAP+linear heads).
            dense = _dense_slice(w, term_groups, 0, w.shape[1] * term_groups)  # pointwise_conv mixes densely
            mixed = pointwise_conv(t.x, dense if t.out_scale is None else dense * t.out_scale.view(1, -1, 1, 1))
            uniform = mixed.new_full((mixed.shape[1], 1, *t.kernel), float(t.weight.flatten()[0]))
            return ConvTerm(mixed, t.route, uniform, t.stride, t.dilation, t.pad, mixed.shape[1], None, True, 0, t.key)
        elif pad == (0, 0, 0, 0):
            return compose(t, _dense_slice(w, term_groups, 0, w.shape[1] * term_groups), stride, dilation)
        else:
            raise UnsupportedModelError(
                f"{where}: a padded {tuple(weight.shape[2:])} convolution directly after a {t.kernel} spatial "
                "operation without an activation between them is not supported"
            )
    return ConvTerm(t.x, t.route, w, stride, dilation, pad, term_groups, None, False, 0, t.key)


def compose(t: ConvTerm, weight: torch.Tensor, stride: tuple[int, int], dilation: tuple[int, int]) -> ConvTerm:
    """Fold an unpadded convolution ``weight`` (dense) applied after ``t`` into one effective kernel.

    Exact because the second convolution never reads the first one's padding; paths then merge per
    source PFV, which is what the contribution of a PFV means when no routing separates them.
    """
    first = _dense_slice(t.scaled_weight(), t.groups, 0, t.x.shape[1])
    dy, dx = t.dilation
    sy, sx = t.stride
    step = (sy * dilation[0], sx * dilation[1])

    def effective_kernel() -> torch.Tensor:
        spelled = first
        if (dy, dx) != (1, 1):  # spell the first kernel's dilation out as zeros
            kh, kw = first.shape[2:]
            spelled = first.new_zeros(*first.shape[:2], dy * (kh - 1) + 1, dx * (kw - 1) + 1)
            spelled[:, :, ::dy, ::dx] = first
        # conv_transpose2d(second, first)[o, i] = sum_c sum_h second[o, c, h] * first[c, i, y - step*h]
        return F.conv_transpose2d(weight, spelled, stride=step)

    # Weights only: kept between calls (a ShuffleNet forward composed 39 kernels, 0.18 s, on every call).
    kernel = DERIVED.get(f"compose-{(dy, dx)}-{step}", (first, weight), effective_kernel)
    return ConvTerm(t.x, t.route, kernel, (sy * stride[0], sx * stride[1]), (1, 1), t.pad, 1, None, False, 0, t.key)

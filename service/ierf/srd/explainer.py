"""Public SRD API: :class:`SRD` (one per model) and :class:`Decomposition` (one per batch of images).

Sharing ratios depend on the image, not on the target or the seed, so :meth:`SRD.decompose` does the
channel-dimension work once; every saliency target and every iERF seed afterwards is a cheap scatter of
per-position scalars down the stages.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import textwrap
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ierf._memory import memory_available
from ierf.errors import TOO_SMALL_MESSAGES, InputSizeError, ModelChangedError, UnsupportedModelError
from ierf.methods import check_input, check_model_finite, register_method
from ierf.srd.derived import follow_running_statistics
from ierf.srd.graph import check_model_state
from ierf.srd.precision import full_float32
from ierf.srd.program import Head, Program, Stage
from ierf.srd.terms import Route

HeadMode = Literal["auto", "exact", "gradcam", "grad_x_act"]
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

HEAD_MODES = ("auto", "exact", "gradcam", "grad_x_act")
Contrast = str | int | torch.Tensor  # a rule, one class for every image, or (B,) classes, one per image
SCHEMA_VERSION = 1
# Working memory of one iERF relevance pass; more seeds than fit go in several passes (49 ResNet50 seeds
# at 224² take one).
SEED_BUDGET_BYTES = 256 * 2**20


def _check_fits_in_memory(nbytes: int, device: torch.device) -> None:
    """An answer larger than the memory left is refused here: allocating it would succeed (pages are lent
    lazily) and the kernel's OOM killer would end the process while it is filled."""
    if device.type != "cpu":
        return  # CUDA raises its own OutOfMemoryError
    available = memory_available()
    if available is not None and nbytes > available:
        raise MemoryError(
            f"the iERF maps need {nbytes / 2**30:.1f} GiB (batch x positions x height x width float32) but "
            f"{available / 2**30:.1f} GiB of memory is available: ask for fewer positions or images per call"
        )


def _scatter(dst: torch.Tensor, values: torch.Tensor, route: Route, factor: torch.Tensor | None = None) -> None:
    """dst[..., sy*q + oy, sx*q + ox] += values[..., q] (times ``factor[..., q]``, broadcast, when given) for
    every q landing inside dst (padding drops). The fused multiply-add never writes the product out."""
    h, w = values.shape[-2:]
    hs, ws = dst.shape[-2:]
    qy0, qx0 = max(0, -(route.oy // route.sy)), max(0, -(route.ox // route.sx))
    qy1 = min(h - 1, (hs - 1 - route.oy) // route.sy)
    qx1 = min(w - 1, (ws - 1 - route.ox) // route.sx)
    if qy1 < qy0 or qx1 < qx0:
        return
    ys, xs = route.sy * qy0 + route.oy, route.sx * qx0 + route.ox
    target = dst[..., ys : route.sy * qy1 + route.oy + 1 : route.sy, xs : route.sx * qx1 + route.ox + 1 : route.sx]
    inside = (..., slice(qy0, qy1 + 1), slice(qx0, qx1 + 1))
    if factor is None:
        target += values[inside]
    else:
        target.addcmul_(values[inside], factor[inside])


@dataclass(frozen=True)
class _Grid:
    """Consecutive routes ``start .. start + kh*kw`` into one source on a regular kernel grid: tap (i, j)
    sends position q to ``stride * q + offset + (i*dy, j*dx)`` (one convolution's taps, or the window
    offsets of a merged max-pool). Their scatters are done together (:func:`_scatter_grid`)."""

    start: int
    kh: int
    kw: int
    route: Route  # tap (0, 0)
    dy: int
    dx: int

    @property
    def taps(self) -> int:
        return self.kh * self.kw

    def tap(self, k: int) -> Route:
        """The route of tap k (row-major over the grid)."""
        i, j = divmod(k, self.kw)
        r = self.route
        return Route(r.source, r.sy, r.sx, r.oy + i * self.dy, r.ox + j * self.dx)


def _route_grids(routes: list[Route]) -> list[_Grid]:
    """Split a stage's routes into maximal kernel grids (single routes are 1x1 grids)."""
    grids: list[_Grid] = []
    n, k = len(routes), 0
    while k < n:
        r0 = routes[k]
        kw, dx = 1, 1
        if k + 1 < n and routes[k + 1].ox > r0.ox:
            dx = routes[k + 1].ox - r0.ox
            while _on_grid(routes, k + kw, r0, 0, kw * dx):
                kw += 1
        kh, dy = 1, 1
        if k + kw < n and routes[k + kw].oy > r0.oy:
            dy = routes[k + kw].oy - r0.oy
            while all(_on_grid(routes, k + kh * kw + j, r0, kh * dy, j * dx) for j in range(kw)):
                kh += 1
        grids.append(_Grid(k, kh, kw, r0, dy, dx))
        k += kh * kw
    return grids


def _on_grid(routes: list[Route], idx: int, r0: Route, oy: int, ox: int) -> bool:
    """Route ``idx`` exists and reads r0's source at r0's stride, offset by (oy, ox) from r0."""
    if idx >= len(routes):
        return False
    r = routes[idx]
    return (r.source, r.sy, r.sx, r.oy, r.ox) == (r0.source, r0.sy, r0.sx, r0.oy + oy, r0.ox + ox)


# Largest (B, seeds, taps, h, w) block scattered by one fold (col2im is a scalar loop: it wins where the
# per-tap scatters are dispatch-bound, i.e. few seeds); bigger ones go tap by tap.
FOLD_MAX_ELEMENTS = 1 << 17


def _scatter_grid(dst: torch.Tensor, grid: _Grid, r: torch.Tensor, mu: torch.Tensor) -> None:
    """Add tap k's share ``r * mu[:, k]`` of a grid into ``dst`` (B, P, H, W); padding drops.

    ``r`` (B, P, h, w) is the relevance of the sink positions, ``mu`` (B, T, h, w) the grid's ratios. Few
    seeds: one col2im over all taps. Many: tap by tap, so the (B, P, T, h, w) products never exist at once
    (at the ResNet50 stem with 49 seeds that would be 120 MB written and read back).
    """
    b, p, h, w = r.shape
    t = mu.shape[1]
    route = grid.route
    if t > 1 and b * p * t * h * w > FOLD_MAX_ELEMENTS and (route.sy, route.sx) != (1, 1):
        _scatter_by_phase(dst, grid, r, mu)
        return
    if t == 1 or b * p * t * h * w > FOLD_MAX_ELEMENTS:
        for k in range(t):
            _scatter(dst, r, grid.tap(k), mu[:, k : k + 1])
        return
    hb = route.sy * (h - 1) + grid.dy * (grid.kh - 1) + 1
    wb = route.sx * (w - 1) + grid.dx * (grid.kw - 1) + 1
    values = (r[:, :, None] * mu[:, None]).reshape(b, p * t, h * w)
    block = F.fold(values, (hb, wb), (grid.kh, grid.kw), dilation=(grid.dy, grid.dx), stride=(route.sy, route.sx))
    hs, ws = dst.shape[-2:]  # block[u] belongs at dst[u + offset]
    y0, x0 = max(0, route.oy), max(0, route.ox)
    y1, x1 = min(hs, route.oy + hb), min(ws, route.ox + wb)
    if y1 > y0 and x1 > x0:
        dst[..., y0:y1, x0:x1].add_(block[..., y0 - route.oy : y1 - route.oy, x0 - route.ox : x1 - route.ox])


def _scatter_by_phase(dst: torch.Tensor, grid: _Grid, r: torch.Tensor, mu: torch.Tensor) -> None:
    """Strided grids, many seeds: the taps of one stride phase all land on one sub-lattice of ``dst``, so
    they accumulate in a dense buffer (contiguous writes) that joins ``dst`` once per phase instead of
    once per tap through a strided view (the stem of ResNet50: 49 strided passes become 4)."""
    sy, sx = grid.route.sy, grid.route.sx
    h, w = r.shape[-2:]
    phases: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for k in range(mu.shape[1]):
        tap = grid.tap(k)
        phases.setdefault((tap.oy % sy, tap.ox % sx), []).append((k, tap.oy // sy, tap.ox // sx))
    for (py, px), taps in phases.items():
        uy0, ux0 = min(t[1] for t in taps), min(t[2] for t in taps)
        uy1, ux1 = max(t[1] for t in taps) + h, max(t[2] for t in taps) + w
        buf = r.new_zeros(*r.shape[:2], uy1 - uy0, ux1 - ux0)  # lattice rows/cols uy0..uy1, ux0..ux1
        for k, qy, qx in taps:
            buf[..., qy - uy0 : qy - uy0 + h, qx - ux0 : qx - ux0 + w].addcmul_(r, mu[:, k : k + 1])
        lattice = dst[..., py::sy, px::sx]  # dst row sy*u + py is lattice row u
        a0, a1 = max(0, uy0), min(lattice.shape[-2], uy1)
        c0, c1 = max(0, ux0), min(lattice.shape[-1], ux1)
        if a1 > a0 and c1 > c0:
            lattice[..., a0:a1, c0:c1].add_(buf[..., a0 - uy0 : a1 - uy0, c0 - ux0 : c1 - ux0])


SHAPE_CACHE_SIZES = 64  # input sizes whose layer shapes SRD.layer_shape keeps


class Decomposition:
    """Everything SRD knows about one batch of images that does not depend on the target."""

    def __init__(
        self,
        program: Program,
        logits: torch.Tensor,
        stages: list[Stage],
        shapes: dict[int, tuple[int, ...]],
        head: Head,
        activations: dict[int, torch.Tensor],
        head_mode: HeadMode = "auto",
    ) -> None:
        self._program = program
        self.logits = logits
        self.stages = stages
        self.shapes = shapes
        self.head = head
        self.activations = activations
        self.head_mode = head_mode
        self._grids: dict[int, list[_Grid]] = {}

    # -- queries ----------------------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.logits.shape[0]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.shapes[0][1], self.shapes[0][2]

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """(C, h, w) of a layer's PFV map for this input size ((C,) for vector layers)."""
        return self.shapes[self._program.source_id(layer)]

    def saliency(
        self, target: int | torch.Tensor, contrast: Contrast = "identity", head: HeadMode | None = None
    ) -> torch.Tensor:
        """Signed (B, H, W) float32 map at input resolution.

        With the identity contrast and an exact head, each map sums to the target logit (conservation).
        ``contrast``: "identity", "mean" (subtract the start map's spatial mean: sums to 0) or another class
        (target minus that class): an int for every image, or a (B,) integer tensor, one per image.
        """
        return self.relevance(target, contrast, head).float()

    def relevance(
        self, target: int | torch.Tensor, contrast: Contrast = "identity", head: HeadMode | None = None
    ) -> torch.Tensor:
        """Like :meth:`saliency` but in the computation dtype (float64 models stay float64)."""
        seeds = self._start(self._targets(target), contrast, self.head_mode if head is None else head)
        return self._propagate(seeds)[:, 0]

    def layer_relevance(
        self,
        layer: str,
        target: int | torch.Tensor,
        contrast: Contrast = "identity",
        head: HeadMode | None = None,
    ) -> torch.Tensor:
        """Relevance R^t of every PFV of ``layer`` (B, h, w) for the target: the hidden-layer saliency, in the
        computation dtype as :meth:`relevance` (float64 models stay float64)."""
        sid = self._program.source_id(layer)
        head = self.head_mode if head is None else head
        seeds = self._start(self._targets(target), contrast, head)
        start = max(seeds)
        if sid > start:  # relevance starts below this layer (a gradient head's start map): it never gets any
            raise ValueError(
                f"layer {layer!r} lies above the start map {self._program.names[start]!r} of the "
                f"{self._resolve_head(head)!r} head; pick it or a layer below it"
            )
        return self._propagate(seeds, stop=sid)[:, 0]

    def ierf(self, layer: str, positions: torch.Tensor) -> torch.Tensor:
        """(B, P, H, W) float32 iERFs of the PFVs at ``positions`` (P, 2) = (row, col) of ``layer``.

        Each map is zero outside the PFV's theoretical receptive field and sums to 1, less the relevance
        of pre-activation PFVs that no upstream PFV contributes to (all-zero inputs in their window, or a
        window only over padding): following the published rule, such a PFV is its bias alone, which has
        no contributor to be shared with, so its relevance stops there. All P seeds share one pass.
        """
        sid = self._program.source_id(layer)
        shape = self.shapes.get(sid)
        if shape is None:
            raise ValueError(f"layer {layer!r} is not computed for this input")
        h, w = pfv_grid(shape)
        pos = _check_positions(positions, h, w, layer).to(self.logits.device)
        count = pos.shape[0]
        chunk = self._seeds_per_pass()
        if count <= chunk:
            return self._propagate({sid: self._seeds(pos, h, w)}).float()
        # Seeds in chunks: the working maps of a pass are about twice its output, so all 12,544 stem PFVs
        # of one ResNet50 image took 7 GB beside the 2.5 GB answer. The answer itself is B·P·H·W floats.
        height, width = pfv_grid(self.shapes[0])
        _check_fits_in_memory(self.batch * count * height * width * 4, self.logits.device)
        out = self.logits.new_empty(self.batch, count, height, width, dtype=torch.float32)
        for start in range(0, count, chunk):
            out[:, start : start + chunk] = self._propagate({sid: self._seeds(pos[start : start + chunk], h, w)})
        return out

    def _seeds(self, pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
        seed = self.logits.new_zeros(self.batch, pos.shape[0], h, w)
        seed[:, torch.arange(pos.shape[0]), pos[:, 0], pos[:, 1]] = 1.0
        return seed

    def _seeds_per_pass(self) -> int:
        """How many iERF seeds one relevance pass takes: its working maps (about three of the largest
        PFV map per seed and image) stay within SEED_BUDGET_BYTES."""
        largest = max(math.prod(pfv_grid(shape)) for shape in self.shapes.values())
        per_seed = 3 * self.batch * largest * self.logits.element_size()
        return max(1, SEED_BUDGET_BYTES // max(per_seed, 1))

    # -- start maps -------------------------------------------------------------------------------------
    def _targets(self, target: int | torch.Tensor) -> torch.Tensor:
        if isinstance(target, numbers.Integral) and not isinstance(target, bool):
            target = int(target)  # also numpy integers
        if isinstance(target, bool) or not isinstance(target, int | torch.Tensor):
            raise TypeError(f"target must be an int or a LongTensor of shape (B,), got {type(target).__name__}")
        if isinstance(target, torch.Tensor):
            _check_values(target, "target")
            if target.dtype not in _INTEGER_DTYPES:
                raise TypeError(f"target tensor must hold integers, got dtype {target.dtype}")
        return self._classes_per_image(target, "target", "target")

    def _classes_per_image(self, value: int | torch.Tensor, what: str, plural: str) -> torch.Tensor:
        """An int class for every image, or a 0-d / (B,) integer tensor: a (B,) LongTensor on the logits'
        device, every class in range (targets and contrast classes alike)."""
        k = self.logits.shape[1]
        if isinstance(value, int):
            if not 0 <= value < k:  # before torch.full, which overflows past int64
                raise ValueError(f"{what} out of range: the model has {k} classes (0..{k - 1}), got {value}")
            return torch.full((self.batch,), value, dtype=torch.long, device=self.logits.device)
        if value.dim() == 0:
            value = value.expand(self.batch)
        if value.shape != (self.batch,):
            raise ValueError(f"{plural} must have shape ({self.batch},), got {tuple(value.shape)}")
        classes = value.to(device=self.logits.device, dtype=torch.long)
        if (classes < 0).any() or (classes >= k).any():
            raise ValueError(f"{what} out of range: the model has {k} classes (0..{k - 1}), got {classes.tolist()}")
        return classes

    def _resolve_head(self, mode: str) -> str:
        if mode not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {mode!r}")
        if mode != "auto":
            return mode
        # A fully connected stack (the head reads flattened PFVs) has one PFV per layer, so only a gradient
        # start stays class-specific; a head on a (B, C, h, w) map, even 1x1, is decomposed exactly.
        # A model with no spatial map before its fully connected layers (an MLP) starts at the input, where
        # a gradient start would be no PFV map at all: decompose it exactly.
        fully_connected = any(len(self.shapes[r.source]) != 3 for r in self.head.routes)
        return "gradcam" if fully_connected and self.start_layer() != 0 else "exact"

    def _inside(self, route: Route) -> bool:
        shape = self.shapes[route.source]
        h, w = pfv_grid(shape)
        return 0 <= route.oy < h and 0 <= route.ox < w

    def _is_spatial(self, sid: int) -> bool:
        s = self.shapes[sid]
        return len(s) == 3 and s[1] * s[2] > 1

    def start_layer(self) -> int:
        """The last spatial PFV map the head reads (through any fully connected stages)."""
        # Source ids follow execution order, so the latest spatial ancestor of the head is the largest id:
        # the same map the forward retains for gradient heads (``keep_last_spatial``).
        by_sink = {s.sink: s for s in self.stages}
        seen: set[int] = set()
        frontier = {r.source for r in self.head.routes}
        while frontier:
            seen |= frontier
            frontier = {r.source for s in frontier if s in by_sink for r in by_sink[s].routes} - seen
        spatial = [s for s in seen if self._is_spatial(s) or s == 0]
        if not spatial:
            raise ValueError("the head reads no spatial feature map")
        return max(spatial)

    def _contrast(self, contrast: object, target: torch.Tensor) -> str | torch.Tensor:
        """ "identity", "mean", or a (B,) LongTensor of classes, one per image (an int applies to all)."""
        if isinstance(contrast, str) and contrast in ("identity", "mean"):
            return contrast
        if isinstance(contrast, np.ndarray) and _is_integer_array(contrast):
            contrast = torch.from_numpy(contrast)  # classes picked with numpy (argsort's runner-up)
        if isinstance(contrast, numbers.Integral) and not isinstance(contrast, bool):
            classes = self._classes_per_image(int(contrast), "contrast class", "contrast classes")
        elif isinstance(contrast, torch.Tensor) and _is_integer(contrast.dtype):
            _check_values(contrast, "contrast")
            classes = self._classes_per_image(contrast, "contrast class", "contrast classes")
        else:
            raise ValueError(f"{_CONTRAST_FORMS}, got {contrast!r}")
        same = (classes == target).nonzero()
        if len(same):
            image = int(same[0, 0])
            raise ValueError(_contrast_is_target(int(classes[image]), image))
        return classes

    def _start(self, target: torch.Tensor, contrast: Contrast, head: str) -> dict[int, torch.Tensor]:
        mode = self._resolve_head(head)
        rule = self._contrast(contrast, target)
        if mode == "exact":
            return self._exact_start(target, rule)
        return self._gradient_start(target, rule, mode)

    def _exact_start(self, target: torch.Tensor, contrast: str | torch.Tensor) -> dict[int, torch.Tensor]:
        # The head's bias is shared equally among the paths that land on a real PFV (not on padding).
        inside = torch.tensor([self._inside(r) for r in self.head.routes], device=self.logits.device)
        n = int(inside.sum())

        def per_path(cls: torch.Tensor) -> torch.Tensor:  # (B, T)
            idx = cls.view(-1, 1, 1).expand(-1, 1, len(self.head.routes))
            c = self.head.contrib.gather(1, idx)[:, 0]
            b = self.head.bias.expand(self.batch, -1).gather(1, cls.view(-1, 1))
            return c + b / n * inside

        values = per_path(target)
        if isinstance(contrast, torch.Tensor):
            values = values - per_path(contrast)
        seeds: dict[int, torch.Tensor] = {}
        one = values.new_ones(self.batch, 1, 1, 1)
        for grid in self._route_grids(-1, self.head.routes):
            dst = seeds.setdefault(grid.route.source, self._zeros(grid.route.source, 1))
            _scatter_grid(dst, grid, one, values[:, grid.start : grid.start + grid.taps, None, None])
        if contrast == "mean":
            # The spatial mean of the start map, over its real positions: paths that land on padding carry
            # nothing and are dropped, so a mean over paths would not leave the map summing to zero. A head
            # that reads several maps is treated as one map made of all their positions.
            positions = sum(m[0].numel() for m in seeds.values())
            if positions == 1:
                raise ValueError(
                    "contrast='mean' subtracts the start map's spatial mean, which leaves nothing of a start "
                    "map with one position (a fully connected model, or a last feature map of 1x1 at this "
                    "input size); contrast with a class index instead"
                )
            total = sum(m.sum((1, 2, 3)) for m in seeds.values())
            mean = (total / positions).view(-1, 1, 1, 1)
            seeds = {sid: m - mean for sid, m in seeds.items()}
        return seeds

    def _gradient_start(self, target: torch.Tensor, contrast: str | torch.Tensor, mode: str) -> dict[int, torch.Tensor]:
        sid = self.start_layer()
        if sid == 0:  # no map with more than one position: the start would be the input, no PFV map
            raise ValueError(
                f"head {mode!r} starts on the last feature map with more than one position, and this model has "
                "none (a fully connected model, or maps of one position only): use head='exact'"
            )
        if sid not in self.activations:
            name = self._program.names[sid]
            raise ValueError(
                f"this decomposition was made without the start activation ({name!r}) that gradient heads need: "
                f"build ierf.SRD(model, head='gradcam' or 'grad_x_act'), or call decompose(x, keep=[{name!r}])"
            )
        act = self.activations[sid]
        head = self._program.head_module(sid)

        def start_map(cls: torch.Tensor) -> torch.Tensor:
            # inference_mode(False): under torch.inference_mode() the cached activation is an inference
            # tensor, which autograd cannot differentiate; its clone outside inference mode can be.
            with torch.inference_mode(False), torch.enable_grad(), full_float32(act.device):
                src = act.clone() if act.is_inference() else act
                a = src if src.requires_grad else src.detach().requires_grad_(True)
                logits = head(a)
                index = cls.clone() if cls.is_inference() else cls
                score = logits.gather(1, index.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, a, create_graph=act.requires_grad)
            if not act.requires_grad:
                a = act
            if mode == "gradcam":  # TorchRay-style Grad-CAM, ReLU-clamped (official VGG start)
                return torch.relu((grad.mean((2, 3), keepdim=True) * a).sum(1))
            return (grad * a).sum(1)  # gradient x activation per PFV, signed

        values = start_map(target)
        if contrast == "mean":
            values = values - values.mean((1, 2), keepdim=True)
        elif isinstance(contrast, torch.Tensor):
            values = values - start_map(contrast)
        return {sid: values[:, None]}

    # -- relevance flow ---------------------------------------------------------------------------------
    def _zeros(self, sid: int, seeds: int) -> torch.Tensor:
        shape = self.shapes[sid]
        h, w = pfv_grid(shape)
        return self.logits.new_zeros(self.batch, seeds, h, w)

    def _propagate(self, relevance: dict[int, torch.Tensor], stop: int = 0) -> torch.Tensor:
        """Push relevance down every stage (reverse topological order) until map ``stop`` is complete."""
        out = self.frontier(relevance, stop).get(stop)
        seeds = next(iter(relevance.values())).shape[1]
        if out is None:
            return self._zeros(stop, seeds)
        if not bool(torch.isfinite(out).all()):  # one reduction over the map: never hand back NaN silently
            raise ValueError(
                f"the map is not finite: this input's feature vectors are too large for {out.dtype} (their squared "
                "norms overflow); explain a float64 copy of the model and input, or rescale the input"
            )
        return out

    def frontier(self, relevance: dict[int, torch.Tensor], stop: int = 0) -> dict[int, torch.Tensor]:
        """Relevance of every PFV map once map ``stop`` is complete. In residual networks part of it may
        still sit on earlier maps reached by skip connections; the maps together conserve the total.
        The caller's tensors are left as they were (relevance is added into copies)."""
        relevance = {k: v.clone() for k, v in relevance.items()}
        seeds = next(iter(relevance.values())).shape[1]
        for stage in reversed(self.stages):
            if stage.sink <= stop:
                break
            r = relevance.pop(stage.sink, None)
            if r is None:
                continue
            for grid in self._route_grids(stage.sink, stage.routes):
                source = grid.route.source
                dst = relevance.get(source)
                if dst is None:
                    dst = relevance[source] = self._zeros(source, seeds)
                _scatter_grid(dst, grid, r, stage.mu[:, grid.start : grid.start + grid.taps])
        return relevance

    def _route_grids(self, key: int, routes: list[Route]) -> list[_Grid]:
        grids = self._grids.get(key)
        if grids is None:
            grids = self._grids[key] = _route_grids(routes)
        return grids

    # -- persistence ------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """What :meth:`state_dict`'s tensors hold (numel x element size, summed), without building them: a
        ResNet50's state takes ~1 ms to assemble, which a cache can then spend after its caller has the
        answer."""
        index = torch.empty((), dtype=torch.long).element_size()
        total = index * (1 + 5 * len(self.head.routes) + 4 * len(self.shapes))  # schema, head.routes, shapes
        total += sum(t.numel() * t.element_size() for t in (self.logits, self.head.contrib, self.head.bias))
        for st in self.stages:
            total += st.mu.numel() * st.mu.element_size() + index * (5 * len(st.routes) + 1)  # mu, routes, sink
        return total + sum(a.numel() * a.element_size() for a in self.activations.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors only, so caches can store raw bytes (never pickle)."""
        state: dict[str, torch.Tensor] = {
            "schema": torch.tensor([SCHEMA_VERSION]),
            "logits": self.logits,
            "head.contrib": self.head.contrib,
            "head.bias": self.head.bias,
            "head.routes": _routes_tensor(self.head.routes),
            "shapes": torch.tensor([[sid, *_pad3(s)] for sid, s in sorted(self.shapes.items())]),
        }
        for i, st in enumerate(self.stages):
            state[f"stage.{i}.mu"] = st.mu
            state[f"stage.{i}.routes"] = _routes_tensor(st.routes)
            state[f"stage.{i}.sink"] = torch.tensor([st.sink])
        for sid, a in self.activations.items():
            state[f"activation.{sid}"] = a
        return {k: v.detach() for k, v in state.items()}

    @classmethod
    def from_state(
        cls, program: Program, state: dict[str, torch.Tensor], head_mode: HeadMode = "auto"
    ) -> Decomposition:
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TypeError(f"a decomposition state is a dict of tensors, got {type(state).__name__}")
        _require_state_keys(state)
        if int(state["schema"][0]) != SCHEMA_VERSION:
            raise ValueError(f"decomposition schema {int(state['schema'][0])} != {SCHEMA_VERSION}")
        shapes = {int(r[0]): _unpad3(r[1:].tolist()) for r in state["shapes"]}
        stages = []
        i = 0
        while f"stage.{i}.mu" in state:
            stages.append(
                Stage(
                    int(state[f"stage.{i}.sink"][0]),
                    state[f"stage.{i}.mu"],
                    _routes_list(state[f"stage.{i}.routes"]),
                )
            )
            i += 1
        head = Head(state["head.contrib"], state["head.bias"], _routes_list(state["head.routes"]))
        acts = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("activation.")}
        return cls(program, state["logits"], stages, shapes, head, acts, head_mode)


def _check_state_structure(program: Program, state: dict[str, torch.Tensor]) -> None:
    """What a state must satisfy to be this program's at all, checked without a forward: one stage per
    PFV map in forward order, routes from earlier maps, tensors whose shapes agree with each other and
    with the maps they describe. A state of another model, with a stage missing or with routes to maps
    that do not exist is refused here; :class:`StateLayout` checks the rest (exact routes and values)."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"decomposition state does not fit this model ({type(program.model).__name__}): {problem}")

    _require_state_keys(state)
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    integral = {k for k in state if k not in floating}
    if {"logits", "head.contrib", "head.bias"} - floating.keys():
        raise bad("logits and head tensors must be floating point")
    if any(state[k].is_complex() for k in integral):
        raise bad("a complex tensor")
    logits = state["logits"]
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise bad(f"logits must be (B, classes), got {tuple(logits.shape)}")
    batch, classes = logits.shape
    if {v.dtype for v in floating.values()} != {logits.dtype}:
        raise bad(f"floating tensors of several dtypes: {sorted({str(v.dtype) for v in floating.values()})}")
    table = state["shapes"]
    sources = len(program.names)
    if table.dim() != 2 or table.shape[1] != 4 or table[:, 0].tolist() != list(range(sources)):
        raise bad(f"'shapes' must list the model's {sources} PFV maps (input included) in order")
    if (table[:, 1:] == 0).any() or (table[:, 1:] < -1).any():
        raise bad("'shapes' holds empty or negative sizes")
    shapes = {int(r[0]): _unpad3(r[1:].tolist()) for r in table}

    def routes_of(key: str, below: int) -> list[Route]:
        t = state[key]
        if t.dim() != 2 or t.shape[1] != 5 or t.shape[0] == 0:
            raise bad(f"{key!r} must be (paths, 5), got {tuple(t.shape)}")
        routes = _routes_list(t)
        for r in routes:
            if not 0 <= r.source < below or r.sy < 1 or r.sx < 1:
                raise bad(f"{key!r} has a path from map {r.source} with strides ({r.sy}, {r.sx})")
        return routes

    stage_keys = sorted(int(k.split(".")[1]) for k in state if k.startswith("stage.") and k.endswith(".mu"))
    if stage_keys != list(range(sources - 1)):
        raise bad(f"the model has {sources - 1} stages (one per PFV map); the state has {len(stage_keys)}")
    for i in stage_keys:
        sink, mu = state.get(f"stage.{i}.sink"), state[f"stage.{i}.mu"]
        if sink is None or f"stage.{i}.routes" not in state or sink.shape != (1,) or int(sink[0]) != i + 1:
            raise bad(f"stage {i} must end at map {i + 1} and name its routes")
        routes = routes_of(f"stage.{i}.routes", i + 1)
        grid = pfv_grid(shapes[i + 1])
        if tuple(mu.shape) != (batch, len(routes), *grid):
            raise bad(f"'stage.{i}.mu' is {tuple(mu.shape)}, not {(batch, len(routes), *grid)}")
    head_routes = routes_of("head.routes", sources)
    if tuple(state["head.contrib"].shape) != (batch, classes, len(head_routes)):
        raise bad(f"'head.contrib' is {tuple(state['head.contrib'].shape)}, not {(batch, classes, len(head_routes))}")
    if tuple(state["head.bias"].shape) != (1, classes):
        raise bad(f"'head.bias' is {tuple(state['head.bias'].shape)}, not {(1, classes)}")
    for key in state:
        if key.startswith("activation."):
            sid = key.split(".")[1]
            if not sid.isdigit() or not 0 <= int(sid) < sources:
                raise bad(f"{key!r} names no PFV map")
            if tuple(state[key].shape) != (batch, *shapes[int(sid)]):
                raise bad(f"{key!r} is {tuple(state[key].shape)}, not {(batch, *shapes[int(sid)])}")
        elif key not in _STATE_KEYS and not (key.startswith("stage.") and key.split(".")[1].isdigit()):
            raise bad(f"unexpected entry {key!r}")


_STATE_KEYS = frozenset({"schema", "logits", "head.contrib", "head.bias", "head.routes", "shapes"})


def _require_state_keys(state: dict[str, torch.Tensor]) -> None:
    missing = sorted(_STATE_KEYS - state.keys())
    if missing:
        raise ValueError(f"not a decomposition state: missing {missing} (see Decomposition.state_dict)")


@dataclass(frozen=True)
class StateLayout:
    """The structure of a decomposition's state: each tensor's dtype and shape, and the exact contents of
    its integer tensors (schema, shapes, stage sinks, routes). It depends on the model and the input
    size, never on the image, so one decomposition of a model describes every other at that size."""

    entries: dict[str, tuple[torch.dtype, tuple[int, ...], torch.Tensor | None]]

    @classmethod
    def of(cls, decomposition: Decomposition) -> StateLayout:
        entries = {}
        for key, v in decomposition.state_dict().items():
            values = None if v.is_floating_point() else v.detach().to("cpu", copy=True)
            entries[key] = (v.dtype, tuple(v.shape), values)
        return cls(entries)

    def check(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ValueError, naming the first difference, unless ``state`` has this layout and finite values."""
        if not isinstance(state, dict):
            raise ValueError(f"a decomposition state is a dict of tensors, got {type(state).__name__}")
        missing, extra = sorted(self.entries.keys() - state.keys()), sorted(state.keys() - self.entries.keys())
        if missing or extra:
            raise ValueError(f"decomposition state: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, (dtype, shape, values) in self.entries.items():
            v = state[key]
            if not isinstance(v, torch.Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"decomposition state {key!r}: expected {dtype} {shape}, got {got}")
            # A state read back from a cache is on the CPU: numpy checks its ~100 small tensors in ~0.5 ms,
            # where one torch op each took ~5 ms in all.
            host = v.device.type == "cpu" and v.dtype != torch.bfloat16 and not v.requires_grad
            if values is not None:
                same = v.numpy().tobytes() == self._integer_bytes[key] if host else torch.equal(v.cpu(), values)
                if not same:
                    raise ValueError(f"decomposition state {key!r}: its structure differs from this model's")
            elif not (bool(np.isfinite(v.numpy()).all()) if host else bool(torch.isfinite(v).all())):
                raise ValueError(f"decomposition state {key!r}: holds NaN or infinite values")

    @functools.cached_property
    def _integer_bytes(self) -> dict[str, bytes]:
        return {key: values.numpy().tobytes() for key, (_, _, values) in self.entries.items() if values is not None}


def pfv_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a layer's PFV grid from its shape without the batch: H x W of a (C, H, W) map, and
    one PFV, a 1x1 grid, for a fully connected layer's (C,) vector (VGG's classifier)."""
    return (shape[1], shape[2]) if len(shape) == 3 else (1, 1)


def _selects_channels(node: torch.fx.Node) -> bool:
    """Tensor indexing, chunks and concatenations: ops that can change the channel count before the first
    convolution (``x[:, k]`` re-normalising GoogLeNet's input; a size lookup ``x.shape[0]`` is not one)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[1], tuple)
    if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.chunk, torch.split):
        return True
    if node.op in ("call_function", "call_method") and getattr(node.target, "__name__", node.target) in _REDUCTIONS:
        return True  # x.mean(1, keepdim=True): a grey stem on an RGB input
    return node.op == "call_method" and node.target in ("chunk", "split")


_REDUCTIONS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm")


def _routes_tensor(routes: list[Route]) -> torch.Tensor:
    return torch.tensor([[r.source, r.sy, r.sx, r.oy, r.ox] for r in routes], dtype=torch.long).view(-1, 5)


def _routes_list(t: torch.Tensor) -> list[Route]:
    return [Route(*row) for row in t.tolist()]


def _pad3(shape: tuple[int, ...]) -> list[int]:
    return [*shape, -1, -1][:3] if len(shape) < 3 else list(shape)


def _unpad3(values: list[int]) -> tuple[int, ...]:
    return tuple(v for v in values if v >= 0)


def _is_size(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


_CONTRAST_FORMS = "contrast must be 'identity', 'mean' or a class index (an int, or an integer tensor of one per image)"


def _refuse_out_of_range(values: list[int], k: int | None, what: str, shown: object) -> None:
    """The decomposition's out-of-range message, before it: a negative class, or one past the class count
    ``k`` an earlier call saw (None: not known for the model's parameters as they are now)."""
    if any(v < 0 or (k is not None and v >= k) for v in values):
        span = f"{k} classes (0..{k - 1})" if k is not None else "classes 0 and up"
        shown = shown.tolist() if isinstance(shown, torch.Tensor) else shown
        raise ValueError(f"{what} out of range: the model has {span}, got {shown}")


def _contrast_is_target(contrast: int, image: int) -> str:
    return (
        f"contrast class {contrast} is the target of image {image}: target minus itself is zero everywhere; "
        "contrast with another class"
    )


def _is_integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _is_integer_array(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer)


def _check_values(t: torch.Tensor, what: str) -> None:
    """A tensor argument whose values SRD reads: dense, and on a device that holds values."""
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense tensor, got layout {t.layout}")
    if t.device.type == "meta":
        raise ValueError(f"{what} is on the meta device: it has no values")


def _check_magnitude(x: torch.Tensor) -> None:
    """Refuse inputs whose values sit so far from 1 that squared norms of the feature vectors they make leave
    the float range: sharing ratios and bias shares then lose relevance silently (a norm's squares underflow
    to 0, or overflow to inf) while the map stays finite. The cube root of the range leaves room for the
    weights and the squares; a forward's stages also flag what still leaves it (see ratios.RANGE_FLAGS)."""
    if x.numel() == 0 or x.device.type == "meta":
        return
    kind = torch.finfo(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
    low, high = kind.tiny ** (1 / 3), kind.max ** (1 / 3)
    largest = float(x.detach().abs().amax())
    if largest != 0 and not low <= largest <= high:
        raise ValueError(
            f"x's largest magnitude is {largest:.3g}: SRD computes in {kind.dtype} for inputs between ~{low:.1e} and "
            f"~{high:.1e} in magnitude (beyond, squared norms of the feature vectors leave the float range and "
            "relevance would be lost silently); rescale the input, or explain a float64 copy of the model and input"
        )


def _check_positions(positions: torch.Tensor, h: int, w: int, layer: str) -> torch.Tensor:
    pos = _position_rows(positions)
    bad = (pos[:, 0] < 0) | (pos[:, 0] >= h) | (pos[:, 1] < 0) | (pos[:, 1] >= w)
    if bad.any():
        first = pos[bad][0].tolist()
        raise ValueError(f"position {tuple(first)} is outside the {h}x{w} PFV grid of layer {layer!r}")
    return pos


def _position_rows(positions: torch.Tensor) -> torch.Tensor:
    """Positions as a (P, 2) LongTensor on the CPU, checked for everything but the grid's bounds."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a LongTensor of shape (P, 2), got {type(positions).__name__}")
    _check_values(positions, "positions")
    if positions.is_floating_point() or positions.dtype == torch.bool:
        raise TypeError(f"positions must hold integers, got dtype {positions.dtype}")
    if positions.dim() != 2 or positions.shape[1] != 2 or positions.shape[0] == 0:
        raise ValueError(f"positions must have shape (P, 2) with P >= 1, got {tuple(positions.shape)}")
    return positions.long().cpu()


def _usable_device(device: torch.device | str | int) -> torch.device:
    """``device`` as a torch.device this process can hold tensors on, else ValueError: torch raised its
    RuntimeError for a name it does not know ("tpu"), a backend it was built without or a GPU that is not
    there, part-way through moving a state."""
    if isinstance(device, bool) or not isinstance(device, torch.device | str | int):
        raise TypeError(f"device must be a torch.device, a string or a GPU index, got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    if parsed.type == "meta":  # ended in .item() on a meta tensor
        raise ValueError("device is the meta device: a decomposition there would have no values")
    try:
        torch.empty(0, device=parsed)
    # no driver, no such GPU index, a backend not built in ("xpu": AssertionError; "hpu": ModuleNotFoundError)
    except (RuntimeError, AssertionError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"device {device!r} is not available in this process: {reason}") from None
    return parsed


@register_method("srd")
class SRD:
    """Sharing Ratio Decomposition over any supported model graph.

    ``head`` picks the start map: "exact" decomposes the logit through the head (for global-average-pool
    + linear heads: CAM + b_y/HW, the published ResNet start), "gradcam" is the published VGG start
    (ReLU-clamped Grad-CAM on the last spatial PFV map), "grad_x_act" its signed per-PFV variant, and
    "auto" picks "gradcam" for fully connected heads (the head reads flattened PFVs) and "exact" otherwise.
    """

    name = "srd"
    version = "1.0"

    def __init__(self, model: nn.Module, head: HeadMode = "auto") -> None:
        if head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
        self.model = model
        self.program = Program(model)
        self.head = head

    @property
    def layers(self) -> list[str]:
        """Names accepted as ``layer``: every post-activation PFV map, in forward order."""
        return list(self.program.names[1:])

    def layer_shape(self, layer: str, input_hw: tuple[int, int] = (224, 224)) -> tuple[int, ...]:
        """(C, h, w) of ``layer`` for an input of size ``input_hw`` (one forward, cached)."""
        sid = self.program.source_id(layer)
        sizes = tuple(input_hw) if isinstance(input_hw, tuple | list) else ()
        if len(sizes) != 2 or not all(_is_size(v) for v in sizes):
            raise ValueError(f"input_hw must be two positive ints (height, width), got {input_hw!r}")
        input_hw = (int(sizes[0]), int(sizes[1]))
        cache = self.__dict__.setdefault("_shape_cache", {})
        stamp = self._settings_stamp()
        if input_hw not in cache or cache[input_hw][0] != stamp:
            p = next(self.model.parameters(), None)  # a model without parameters computes in the default dtype
            dtype, device = (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), torch.device("cpu"))
            x = torch.zeros(1, self._input_channels() or 3, *input_hw, dtype=dtype, device=device)
            with torch.no_grad():
                shapes = self._forward(x).shapes
            cache.pop(input_hw, None)
            if len(cache) >= SHAPE_CACHE_SIZES:  # a caller sweeping sizes: the oldest goes (small dicts each)
                cache.pop(next(iter(cache)))
            cache[input_hw] = (stamp, shapes)
        return cache[input_hw][1][sid]

    def _settings_stamp(self) -> tuple:
        """What map shapes depend on besides the input size and the traced graph: the settings of torch.nn's
        modules, which the forward reads when it runs (a stride, padding or pooling window set in place after
        the explainer was built: decompositions follow it, so the shapes must too), and the parameters' shapes."""
        settings = tuple(m.extra_repr() for m in self.model.modules() if type(m).__module__.startswith("torch.nn"))
        return settings, self._parameter_stamp()

    def _input_channels(self) -> int | None:
        """In-channels of the first convolution the forward runs (registration order may differ), read off its
        weight as the convolution itself does (a grayscale adaptation may replace the weight in place and
        leave ``in_channels`` as it was); None when the graph starts otherwise (a fully connected model),
        where the forward itself checks."""
        if "_first_conv" not in self.__dict__:  # the graph is fixed; replaced submodules are refused
            self._first_conv = self._find_first_conv()
        if self._first_conv is None:
            return None
        path, groups = self._first_conv
        if groups is None:
            conv = self.model.get_submodule(path)
            return int(conv.weight.shape[1]) * conv.groups
        return int(self.program.attribute(path).shape[1]) * groups

    def _find_first_conv(self) -> tuple[str, int | None] | None:
        """(module path, None) for an ``nn.Conv2d``, (weight attribute, groups) for ``F.conv2d``."""
        modules = dict(self.model.named_modules())
        for node in self.program.graph.nodes:
            if _selects_channels(node):
                return None  # the first convolution may read only some of the input's channels
            if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Conv2d):
                return str(node.target), None
            if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
                weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
                if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and isinstance(groups, int):
                    return str(weight.target), groups
                return None
        return None

    def decompose(self, x: torch.Tensor, keep: list[str] | None = None) -> Decomposition:
        """Run the cached forward and take every stage's ratios; ``keep`` names activations to retain.

        Differentiable with respect to ``x`` when ``x.requires_grad`` (explanation-manipulation attacks).
        """
        parameters = [p for p in check_model_state(self.model, self.program.built_from) if not p.is_inference()]
        follow_running_statistics(self.model)
        p = next(self.model.parameters(), None)
        check_input(x, p.dtype if p is not None else x.dtype)
        if p is not None and p.device != x.device:
            raise ValueError(f"x is on {x.device} but the model is on {p.device}")
        expected = self._input_channels()
        if expected is not None and x.shape[1] != expected:
            raise ValueError(f"x must have {expected} channels, got {x.shape[1]}")
        _check_magnitude(x)
        if isinstance(keep, str):
            keep = [keep]  # one name, not its letters
        keep_ids = {self.program.source_id(name) for name in keep or []}
        versions = [p._version for p in parameters]
        dec = self._run(x, keep_ids)
        gradient_head = self.head != "exact" and dec._resolve_head(self.head) != "exact"
        if gradient_head and dec.start_layer() not in dec.activations:
            # Safety net: the forward retains the last spatial map it executes, which is the head's start
            # map in any network whose activations all feed the output. Otherwise run again, keeping it.
            dec = self._run(x, keep_ids | {dec.start_layer()})
        if not gradient_head:
            # "auto" resolved to the exact head: the gradient start map's activation is not needed
            dec.activations = {sid: a for sid, a in dec.activations.items() if sid in keep_ids}
        if [p._version for p in parameters] != versions:
            raise ModelChangedError(
                "the model's parameters were written while SRD explained it (another thread loading weights or "
                "stepping an optimiser?): its stages would mix the old and the new weights; call again"
            )
        return dec

    def _run(self, x: torch.Tensor, keep_ids: set[int]) -> Decomposition:
        with full_float32(x.device):
            # the model's own logits first, on their own: the peak memory stays that of the decomposition
            eager = None if self.__dict__.get("_reproduces") else self._own_logits(x)
            with torch.set_grad_enabled(x.requires_grad and torch.is_grad_enabled()):
                run = self._forward(x, frozenset(keep_ids), keep_last_spatial=self.head != "exact")
        self._check_finite(run.logits)
        if eager is not None:
            self._check_reproduces(eager, run.logits)
        return Decomposition(self.program, run.logits, run.stages, run.shapes, run.head, run.activations, self.head)

    def _check_finite(self, logits: torch.Tensor) -> None:
        """A finite input (checked) that gives NaN or infinite logits: the model's own numbers are broken (a
        diverged fine-tune's NaN weights, an overflow), and every map and ratio would be NaN."""
        if not bool(torch.isfinite(logits).all()):
            check_model_finite(self.model, "the model's output")

    def _own_logits(self, x: torch.Tensor) -> Any:
        """The model's own output for ``x``, or the exception it raises: an input the model cannot take is
        then refused by the program's run, with the error SRD words; if the program runs all the same, the
        model itself is broken (see :meth:`_check_reproduces`). Running out of memory says nothing about the
        model: None, and the check waits for a call that works."""
        try:
            with torch.no_grad():
                # on a copy: a model whose first op is in place (nn.SiLU(inplace=True)) writes its input, and
                # the decomposition that follows must read the caller's image, which must stay as it was
                return self.model(x.detach().clone())
        except (MemoryError, torch.OutOfMemoryError):
            return None
        except Exception as exc:
            return exc

    def _check_reproduces(self, eager: Any, logits: torch.Tensor) -> None:
        """Once per explainer, the first decomposition's logits against the model's own forward (one more
        forward pass, run first). torch.fx records ``x += t`` as a new value, so an alias of ``x`` read
        afterwards holds the old one in the traced graph; that, and other Python the tracer cannot see, would
        make SRD explain another function while its maps still sum to its own logits."""
        if isinstance(eager, Exception):
            first = (str(eager).strip().splitlines() or [""])[0]
            raise UnsupportedModelError(
                f"the model's own forward raises {type(eager).__name__} ({textwrap.shorten(first, 200)}) on this "
                "input, while SRD's replay of its traced graph does not meet the failure (a .view of a transposed "
                "map without .contiguous(), say): SRD would explain what the model cannot compute; fix the model "
                "so that it runs"
            ) from eager
        if not isinstance(eager, torch.Tensor):
            return  # the program already refuses outputs other than one logits tensor
        if eager.shape != logits.shape:
            raise UnsupportedModelError(
                f"the model's traced forward does not reproduce its output (logits of shape {tuple(logits.shape)}, "
                f"the model's own {tuple(eager.shape)}), so SRD would explain another function: Python the tracer "
                "cannot see (a flag read in forward, set after the explainer was built?) changed what it returns"
            )
        eager = eager.to(torch.float64)
        ours = logits.detach().to(torch.float64)
        tolerance = max(1e-3, 50 * torch.finfo(logits.dtype).eps) * max(float(eager.abs().max()), 1e-30)
        gap = float((ours - eager).abs().max())
        if not gap <= tolerance:  # NaN counts as a gap
            raise UnsupportedModelError(
                f"the model's traced forward does not reproduce its output (logits differ by up to {gap:.3g}, "
                f"{gap / max(float(eager.abs().max()), 1e-30):.2%} of the largest), so SRD would explain another "
                "function. Usual cause: an in-place operation (x += t, x.mul_(c), inplace=True) on a value that is "
                "read again afterwards, which torch.fx records as a new value; write it out of place"
            )
        self._reproduces = True

    def _forward(self, x: torch.Tensor, keep: frozenset[int] = frozenset(), keep_last_spatial: bool = False):
        """The program's forward, with an input that does not fit the model reported as a ValueError."""
        try:
            return self.program.run(x, keep, keep_last_spatial=keep_last_spatial)
        except (RuntimeError, InputSizeError) as exc:  # a window larger than the map it reaches, a wrong size
            message = str(exc)
            if isinstance(exc, InputSizeError) or any(p in message for p in TOO_SMALL_MESSAGES):
                first = message.strip().splitlines()[0]
                problem = "is too small for" if "too small" in first else "does not fit"
                raise InputSizeError(f"input {x.shape[-2]}x{x.shape[-1]} {problem} this model: {first}") from None
            raise

    def load_decomposition(
        self,
        state: dict[str, torch.Tensor],
        like: StateLayout | None = None,
        device: torch.device | str | None = None,
    ) -> Decomposition:
        """A decomposition from :meth:`Decomposition.state_dict` tensors. ``like``: the layout the state
        must have (:meth:`StateLayout.of` a decomposition of this model at the same input size), checked
        exactly: routes, shapes, finite values. Without it the state is checked for structure only (another
        architecture's state, a missing stage or a route to no map is refused); states read back from a shared
        store should always be checked with ``like``. A state holds no weights fingerprint: one made with other
        weights of this architecture is not told apart, so stores key states by the weights too. ``device``:
        where the decomposition lives, the state moved there after its check (a state read from a store is on
        the CPU, where checking is fastest)."""
        if device is not None:
            device = _usable_device(device)
        if like is not None:
            like.check(state)  # exact: implies the structure
        elif isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            _check_state_structure(self.program, state)
        if device is not None and isinstance(state, dict):  # anything else: from_state says what is wrong
            state = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return Decomposition.from_state(self.program, state, self.head)

    def saliency(self, x: torch.Tensor, target: int | torch.Tensor, contrast: Contrast = "identity") -> torch.Tensor:
        """Signed (B, H, W) float32 class saliency at input resolution."""
        stamp = self._parameter_stamp()
        seen = self.__dict__.get("_classes")
        classes = seen[0] if seen is not None and seen[1] == stamp else None  # known from an earlier call
        self._check_target_early(target, classes)
        self._check_contrast_early(contrast, target, classes)
        decomposition = self.decompose(x)
        self._classes = (int(decomposition.logits.shape[1]), stamp)
        return decomposition.saliency(target, contrast)

    def _parameter_stamp(self) -> tuple:
        """The parameters as objects and shapes: a head grown by new Parameters (class-incremental surgery,
        no module replaced) changes the class count without any module changing."""
        return tuple((id(p), tuple(p.shape)) for p in self.model.parameters())

    def _check_target_early(self, target: object, classes: int | None) -> None:
        """A target that is certainly wrong, refused before the decomposition (seconds on a large batch) with
        the message the decomposition would give: a bool or other non-integer, a negative class, or one past
        the class count an earlier call saw. Everything else is checked by the decomposition itself."""
        if isinstance(target, numbers.Integral) and not isinstance(target, bool):
            values = [int(target)]
        elif isinstance(target, torch.Tensor) and target.dtype in _INTEGER_DTYPES and target.device.type != "meta":
            values = [int(target.min()), int(target.max())] if target.numel() else []
        elif isinstance(target, bool) or not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be an int or a LongTensor of shape (B,), got {type(target).__name__}")
        else:
            return
        _refuse_out_of_range(values, classes, "target", values[0] if isinstance(target, numbers.Integral) else target)

    def _check_contrast_early(self, contrast: object, target: object, classes: int | None) -> None:
        """A contrast that is certainly wrong, refused before the decomposition as a wrong target is: an
        unknown rule or a non-integer, a class out of the range an earlier call saw, or one int class equal to
        one int target. Everything else is checked by the decomposition itself, with the same messages."""
        if isinstance(contrast, str | bool | float) or contrast is None:
            if contrast not in ("identity", "mean"):
                raise ValueError(f"{_CONTRAST_FORMS}, got {contrast!r}")
            return
        if isinstance(contrast, numbers.Integral):
            _refuse_out_of_range([int(contrast)], classes, "contrast class", int(contrast))
            if isinstance(target, numbers.Integral) and int(target) == int(contrast):
                raise ValueError(_contrast_is_target(int(contrast), 0))

    def ierf(self, x: torch.Tensor, layer: str, positions: torch.Tensor) -> torch.Tensor:
        """(B, P, H, W) float32 iERFs of PFVs at ``positions`` of ``layer``; each sums to 1."""
        self.program.source_id(layer)  # fail fast on a bad name before the forward
        self._check_positions_early(x, layer, positions)
        return self.decompose(x).ierf(layer, positions)

    def _check_positions_early(self, x: object, layer: str, positions: object) -> None:
        """Positions refused before the decomposition of a batch (seconds for a large one): their type and
        shape always; the grid's bounds where knowing the grid costs less than the batch (its size's grid
        is cached, or the batch holds more than one image: the grid takes one forward of one image)."""
        _position_rows(positions)  # type: ignore[arg-type]
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() and x.device.type != "meta"):
            return  # the decomposition says what is wrong with x
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        if x.shape[0] < 2 and hw not in self.__dict__.get("_shape_cache", {}):
            return
        shape = self.layer_shape(layer, hw)
        if len(shape) == 3:
            _check_positions(positions, shape[1], shape[2], layer)  # type: ignore[arg-type]

"""A slow, obviously-correct SRD, written independently of the fast path (for tests and audits).

It shares only the stage boundaries with :mod:`ierf.srd.program` and nothing of its arithmetic:

* every stage is re-evaluated with the model's own modules, in float64, once per *path* through the
  stage's graph (a residual branch, a concat input) and per max-pool window offset, on a batch of inputs
  that each keep a single upstream PFV — a brute-force Jacobian, one PFV at a time;
* each bias is measured by running the stage on zero input with only that layer's bias switched on, and
  is shared by norm among the paths that pass through that layer;
* ratios follow the definition mu = <C + b, z> / ||z||^2 literally, and relevance moves by explicit
  sums over (source PFV, target PFV) pairs.

Use small models and inputs: cost grows with (positions)^2.
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import Normalize
from torchvision.transforms.v2 import Normalize as NormalizeV2

from ierf.srd.program import Program

# Modules whose shift is a bias of its own: measured alone, and zeroed on the paths. An input normalisation
# ``(x - mean) / std`` (torchvision's Normalize in front of a model) shifts by ``-mean / std``.
_NORMALIZE = (Normalize, NormalizeV2)
_BIAS_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, *_NORMALIZE)
# Functional layers whose shift (bias; batch norm's -mean * scale too) comes in as arguments: name ->
# the positions and keywords of those arguments, replaced by None (no bias) or zeros (no mean) on the paths.
_FUNCTIONAL_SHIFTS: dict[object, tuple[tuple[int, str, str], ...]] = {
    F.conv2d: ((2, "bias", "none"),),
    torch.conv2d: ((2, "bias", "none"),),
    F.linear: ((2, "bias", "none"),),
    F.batch_norm: ((1, "running_mean", "zeros"), (4, "bias", "none")),
}
_ADDITIVE_FUNCTIONS = (operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, torch.subtract)


@dataclass
class RefStage:
    sink: int  # source id of the activation output
    # per source id: ratio tensor (paths, P_src, Q) where P_src, Q are flattened positions
    ratios: dict[int, list[torch.Tensor]]
    z: torch.Tensor  # (C, Q)


def _zero_biases(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
            m.bias.data.zero_()
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            if m.bias is not None:
                m.bias.data.zero_()
            m.running_mean.zero_()
        if isinstance(m, _NORMALIZE):
            m.mean = [0.0] * torch.as_tensor(m.mean).numel()


def _is_shape(node: fx.Node) -> bool:
    """A size or arithmetic on sizes (``b, c, h, w = x.size()``; ``c // groups``): no path runs through it."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return True
    shape_ops = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub)
    inputs = node.all_input_nodes
    return node.op == "call_function" and node.target in shape_ops and bool(inputs) and all(map(_is_shape, inputs))


def _before_reshapes(node: fx.Node | None) -> fx.Node | None:
    """The node a gate is read from before it is reshaped for its product (``y.view(b, c, 1, 1)``,
    ``y.unsqueeze(-1)``, ``y[:, :, None, None]``, ``y.expand_as(x)``)."""
    while isinstance(node, fx.Node) and node.args:
        methods = node.op == "call_method" and node.target in ("view", "reshape", "unsqueeze", "expand", "expand_as")
        functions = node.op == "call_function" and (
            node.target in (torch.unsqueeze, torch.reshape)
            or (
                node.target is operator.getitem
                and isinstance(node.args[1], tuple)
                and any(i is None for i in node.args[1])
            )
        )
        if not (methods or functions):
            break
        node = node.args[0]
    return node


class ReferenceSRD:
    """Brute-force SRD for one image (batch 1) of a small float model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).double().eval()
        self.program = Program(self.model)
        self.graph = self.program.graph
        self.linear_model = copy.deepcopy(self.model)
        _zero_biases(self.linear_model)
        self.modules = dict(self.model.named_modules())
        self.lin_modules = dict(self.linear_model.named_modules())
        self.on_map: set[fx.Node] = set()  # nodes computed from the input (the rest are constants)
        for node in self.graph.nodes:
            # expand_as reads its second operand's shape only: a constant expanded as a map stays a constant
            read = node.all_input_nodes if node.target != "expand_as" else node.args[:1]
            if node.op == "placeholder" or any(d in self.on_map for d in read if isinstance(d, fx.Node)):
                self.on_map.add(node)

    @staticmethod
    def _functional_shift(node: fx.Node) -> bool:
        """A functional layer called with a bias (or batch norm's running mean): a bias of its own."""
        if node.op != "call_function" or node.target not in _FUNCTIONAL_SHIFTS:
            return False
        for index, name, _ in _FUNCTIONAL_SHIFTS[node.target]:
            value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
            if value is not None:
                return True
        return False

    @staticmethod
    def _without_shift(node: fx.Node, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``args``/``kwargs`` of a functional layer with its bias (and running mean) taken out."""
        args, kwargs = list(args), dict(kwargs)
        for index, name, fill in _FUNCTIONAL_SHIFTS[node.target]:
            if len(args) > index:
                value = args[index]
                args[index] = None if fill == "none" or value is None else torch.zeros_like(value)
            elif kwargs.get(name) is not None:
                kwargs[name] = None if fill == "none" else torch.zeros_like(kwargs[name])
        return tuple(args), kwargs

    def _constant_addend(self, node: fx.Node) -> int | None:
        """For ``map + c`` or ``c + map`` (also ``-``) with c a constant (a number, a buffer, a tensor made in
        forward): the index of c. Such a constant is a bias of its own: paths run without it, and it is
        measured alone, like a layer's bias."""
        additive = node.op == "call_function" and node.target in _ADDITIVE_FUNCTIONS
        additive = additive or (node.op == "call_method" and node.target in ("add", "add_", "sub", "sub_", "subtract"))
        if not additive or _is_shape(node) or len(node.args) < 2:
            return None
        on_map = [isinstance(a, fx.Node) and a in self.on_map for a in node.args[:2]]
        return on_map.index(False) if sum(on_map) == 1 else None

    # ---- plain forward with recorded routing ------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
        values: dict[fx.Node, torch.Tensor] = {}
        self.pool_index: dict[fx.Node, torch.Tensor] = {}
        for node in self.graph.nodes:
            if node.op == "placeholder":
                values[node] = x
            elif node.op == "output":
                values[node] = values[node.args[0]]
            else:
                values[node] = self._eval(node, values, self.model, record=True)
        return values

    def _eval(
        self,
        node: fx.Node,
        values,
        model: nn.Module,
        record: bool = False,
        pool_offset=None,
        without_constants: bool = False,
        keep_constant: fx.Node | None = None,
    ):
        if without_constants and node is not keep_constant and (k := self._constant_addend(node)) is not None:
            operand = values[node.args[1 - k]]
            subtract = getattr(node.target, "__name__", str(node.target)).lstrip("_").startswith(("sub", "isub"))
            if k == 1:  # map + c, map - c
                return operand
            alpha = node.kwargs.get("alpha", 1)
            return -alpha * operand if subtract else alpha * operand  # c + alpha * map, c - alpha * map
        args = fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
        if node.op == "get_attr":
            target = str(node.target)
            if target in self.program.constants:  # a tensor the forward creates: kept by the program
                return self.program.constants[target]
            return functools.reduce(getattr, target.split("."), model)
        if node.op == "call_module":
            m = model.get_submodule(str(node.target))
            if isinstance(m, nn.MaxPool2d):
                return self._pool(
                    node,
                    args[0],
                    m.kernel_size,
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.ceil_mode,
                    record,
                    pool_offset,
                )
            if getattr(m, "inplace", False) is True:  # ReLU6, Hardswish, SiLU, ... must not overwrite z
                return m(args[0].clone(), *args[1:], **kwargs)
            return m(*args, **kwargs)
        if node.op == "call_function":
            if without_constants and node is not keep_constant and self._functional_shift(node):
                args, kwargs = self._without_shift(node, args, kwargs)
            if node.target in (F.max_pool2d, torch.max_pool2d):
                x, k = args[0], args[1] if len(args) > 1 else kwargs["kernel_size"]
                s = args[2] if len(args) > 2 else kwargs.get("stride")
                s = k if s is None or s == [] or s == () else s
                p = args[3] if len(args) > 3 else kwargs.get("padding", 0)
                d = args[4] if len(args) > 4 else kwargs.get("dilation", 1)
                ceil_mode = args[5] if len(args) > 5 else kwargs.get("ceil_mode", False)
                return self._pool(node, x, k, s, p, d, ceil_mode, record, pool_offset)
            if node.target in (operator.iadd,):
                return args[0] + args[1]
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
            if getattr(node.target, "__name__", "").endswith("_") and args and isinstance(args[0], torch.Tensor):
                args = (args[0].clone(), *args[1:])  # torch.relu_ and the like: on a copy
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.startswith("_"):  # an in-place method: on a copy
                return getattr(args[0].clone(), name)(*args[1:], **kwargs)
            return getattr(args[0], name)(*args[1:], **kwargs)
        raise AssertionError(node.op)

    def _pool(self, node, x, k, s, p, d, ceil_mode, record, offset):
        k = (k, k) if isinstance(k, int) else tuple(k)
        s = k if s is None else ((s, s) if isinstance(s, int) else tuple(s))
        p = (p, p) if isinstance(p, int) else tuple(p)
        d = (d, d) if isinstance(d, int) else tuple(d)
        if record:
            out, idx = F.max_pool2d(x, k, s, p, d, ceil_mode, return_indices=True)
            self.pool_index[node] = idx
            return out
        idx = self.pool_index[node].expand(x.shape[0], -1, -1, -1)
        b, c, h, w = idx.shape
        out = x.flatten(2).gather(2, idx.flatten(2)).view(b, c, h, w)
        if offset is not None:
            width = x.shape[3]
            wy, wx = idx // width, idx % width
            by = torch.arange(h).view(1, 1, h, 1) * s[0] - p[0]
            bx = torch.arange(w).view(1, 1, 1, w) * s[1] - p[1]
            keep = (wy - by == offset[0] * d[0]) & (wx - bx == offset[1] * d[1])
            out = out * keep
        return out

    # ---- one stage -------------------------------------------------------------------------------------
    def _stage_nodes(self, sink_input: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
        """Nodes between upstream sources and the sink (topological order), and the sources."""
        inside: set[fx.Node] = set()
        sources: set[fx.Node] = set()
        stack = [sink_input]
        while stack:
            n = stack.pop()
            if n in inside or n in sources:
                continue
            if n.op == "placeholder" or n in self.program.source_of:
                sources.add(n)
                continue
            if n.op == "get_attr":
                continue
            inside.add(n)
            stack.extend(n.all_input_nodes)
        order = [n for n in self.graph.nodes if n in inside]
        return order, [n for n in self.graph.nodes if n in sources]

    def _gate(self, node: fx.Node) -> fx.Node | None:
        """For a product of two maps (squeeze-excitation), the operand that gates: a PFV map computed from
        the other operand. Gates are frozen at their value for this image: no path runs through them, and
        every path through the product keeps them as they are."""
        native = self.program.gate_branches.gates.get(node)
        if native is not None:  # a gate the fast path computes as the model does: the same product, found once
            return node.args[native]
        products = (operator.mul, operator.imul, torch.mul, torch.multiply)
        if not (node.op == "call_function" and node.target in products) and not (
            node.op == "call_method" and node.target in ("mul", "mul_", "multiply")
        ):
            return None
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            return None

        def ancestors(n: fx.Node) -> set[fx.Node]:
            seen: set[fx.Node] = set()
            stack = list(n.all_input_nodes)
            while stack:
                m = stack.pop()
                if m not in seen:
                    seen.add(m)
                    stack.extend(m.all_input_nodes)
            return seen

        a_from, b_from = _before_reshapes(a), _before_reshapes(b)
        gate = b if a_from in ancestors(b_from) else a if b_from in ancestors(a_from) else None
        return gate if gate is not None and _before_reshapes(gate) in self.program.source_of else None

    def _paths(self, order: list[fx.Node], sources: list[fx.Node], sink_input: fx.Node) -> list[list[fx.Node]]:
        inside = set(order)
        paths: list[list[fx.Node]] = []

        def walk(node: fx.Node, trail: list[fx.Node]) -> None:
            if node in sources:
                paths.append([node, *reversed(trail)])
                return
            gate = self._gate(node)
            for dep in dict.fromkeys(node.all_input_nodes):
                if dep is not gate and not _is_shape(dep) and (dep in inside or dep in sources):
                    walk(dep, [*trail, node])

        walk(sink_input, [])
        return paths

    def _run_path(self, path: list[fx.Node], order, source_value: torch.Tensor, values, offsets) -> torch.Tensor:
        """Evaluate the bias-free stage along one path only; other operands of adds/concats are zero."""
        on = set(path)
        # Each op on the path reads only the previous node of the path; its other operands are zero, also
        # one that lies earlier on the path (``a + conv(a)``: the path through the convolution must not
        # also carry the skip, which is a path of its own).
        live = dict(zip(path[1:], path[:-1], strict=True))
        local: dict[fx.Node, torch.Tensor] = dict(values)
        local[path[0]] = source_value
        resized: set[fx.Node] = set()
        for node in self.graph.nodes:  # x.shape[0] read off the model's input: this run's batch
            if node.op == "placeholder" and node is not path[0]:
                local[node] = values[node].expand(source_value.shape[0], *values[node].shape[1:])
                resized.add(node)
        for n in order:
            if n not in on:
                if _is_shape(n) and any(d in on or d in resized for d in n.all_input_nodes):
                    # shape arithmetic (x.size() and what is computed from it) sees this run's batch of inputs
                    local[n] = self._eval(n, local, self.linear_model)
                    resized.add(n)
                continue
            gate = self._gate(n)
            for dep in n.all_input_nodes:
                if dep is gate:
                    local[dep] = values[dep]  # frozen at this image's value (broadcasts over the batch)
                elif dep is not live.get(n) and dep in self.on_map and isinstance(values.get(dep), torch.Tensor):
                    # another path's map: zero here (a constant computed in forward, gamma.view(...), stays)
                    local[dep] = torch.zeros(source_value.shape[0], *values[dep].shape[1:], dtype=torch.float64)
            local[n] = self._eval(n, local, self.linear_model, pool_offset=offsets.get(n), without_constants=True)
        return local[path[-1]]

    def _bias_vector(self, node: fx.Node, order, sources, values) -> torch.Tensor:
        """The sink value with zero sources and only ``node``'s bias switched on: a layer's own bias, or the
        constant that ``node`` adds."""
        # Only this node runs with its shift: a module called twice (one conv on two maps) has two biases,
        # one per call, and switching the module's bias on would switch on both.
        local = dict(values)
        gates = {_before_reshapes(self._gate(n)) for n in order} - {None}
        for s in sources:
            if s not in gates:
                local[s] = torch.zeros_like(values[s])
        for n in order:
            if n in self.program.gate_branches.native:
                local[n] = values[n]  # a gate's branch: held at this image's value, as on every path
                continue
            model = self.model if n is node and n.op == "call_module" else self.linear_model
            local[n] = self._eval(n, local, model, without_constants=True, keep_constant=node)
        return local[order[-1]]

    def _pool_kernel(self, n: fx.Node, values) -> tuple[int, int] | None:
        if n.op == "call_module" and isinstance(self.modules[str(n.target)], nn.MaxPool2d):
            k = self.modules[str(n.target)].kernel_size
        elif n.op == "call_function" and n.target in (F.max_pool2d, torch.max_pool2d):
            k = n.args[1] if len(n.args) > 1 else n.kwargs["kernel_size"]
            k = fx.node.map_arg(k, lambda m: values[m])  # a size computed in forward (a global max-pool)
        else:
            return None
        return (k, k) if isinstance(k, int) else tuple(int(v) for v in k)

    def _pool_offsets(self, path: list[fx.Node], values) -> list[dict[fx.Node, tuple[int, int]]]:
        """One path per combination of window offsets of the max-pools along it (a max-pool of a max-pool
        gives (first offset, second offset) pairs)."""
        combos: list[dict[fx.Node, tuple[int, int]]] = [{}]
        for n in path:
            k = self._pool_kernel(n, values)
            if k is not None:
                combos = [{**c, n: (i, j)} for c in combos for i in range(k[0]) for j in range(k[1])]
        return combos

    def _contributions(self, sink_input: fx.Node, values):
        order, sources = self._stage_nodes(sink_input)
        paths = self._paths(order, sources, sink_input)
        z = values[sink_input][0]
        z = z.reshape(z.shape[0], -1) if z.dim() == 3 else z.reshape(-1, 1)
        items = []  # (path index, source node, contributions (P, C, Q))
        for pi, path in enumerate(paths):
            a = values[path[0]][0]
            flat = a.reshape(a.shape[0], -1) if a.dim() == 3 else a.reshape(-1, 1)
            n_pos = flat.shape[1]
            one_hot = torch.zeros(n_pos, *a.shape, dtype=torch.float64)
            view = one_hot.view(n_pos, a.shape[0], -1)
            for p in range(n_pos):
                view[p, :, p] = flat[:, p]
            for offsets in self._pool_offsets(path, values):
                out = self._run_path(path, order, one_hot, values, offsets)
                items.append((pi, path[0], out.reshape(n_pos, z.shape[0], -1)))
        biases = []
        for n in order:
            constant = self._constant_addend(n) is not None or self._functional_shift(n)
            if constant or (n.op == "call_module" and isinstance(self.modules[str(n.target)], _BIAS_MODULES)):
                beta = self._bias_vector(n, order, sources, values)[0]
                owners = {pi for pi, p in enumerate(paths) if n in p}
                biases.append((beta.reshape(z.shape[0], -1), owners))
        return z, items, biases

    def _ratios(self, z, items, biases) -> dict[fx.Node, list[torch.Tensor]]:
        zz = (z * z).sum(0)
        norms = [c.norm(dim=1) for _, _, c in items]
        share = [torch.zeros_like(zz) for _ in items]
        for beta, owners in biases:
            e = (beta * z).sum(0)
            total = sum(norms[i].sum(0) for i, (pi, _, _) in enumerate(items) if pi in owners)
            if not torch.is_tensor(total):
                continue
            per = torch.where(total > 0, e / torch.where(total > 0, total, 1), 0)
            for i, (pi, _, _) in enumerate(items):
                if pi in owners:
                    share[i] = share[i] + per
        out: dict[fx.Node, list[torch.Tensor]] = {}
        for i, (_, src, c) in enumerate(items):
            dots = torch.einsum("pcq,cq->pq", c, z)
            mu = torch.where(zz > 0, (dots + norms[i] * share[i]) / torch.where(zz > 0, zz, 1), 0)
            out.setdefault(src, []).append(mu)
        return out

    # ---- public ------------------------------------------------------------------------------------------
    def decompose(self, x: torch.Tensor) -> dict:
        """Ratios of every stage (keyed by sink source id) plus logits and head contributions."""
        assert x.shape[0] == 1, "the reference handles one image at a time"
        x = x.double()
        with torch.no_grad():
            values = self._forward(x)
            stages: list[RefStage] = []
            for node in self.graph.nodes:
                if node not in self.program.source_of:
                    continue
                sink_input = node.args[0]
                z, items, biases = self._contributions(sink_input, values)
                ratios = {self._sid(src): mus for src, mus in self._ratios(z, items, biases).items()}
                stages.append(RefStage(self.program.source_of[node], ratios, z))
            out_node = next(n for n in self.graph.nodes if n.op == "output").args[0]
            z, items, biases = self._contributions(out_node, values)
            head_bias = sum(b for b, _ in biases)[:, 0] if biases else torch.zeros(z.shape[0], dtype=torch.float64)
        return {
            "values": values,
            "stages": stages,
            "head_items": items,
            "head_bias": head_bias,
            "logits": z[:, 0],
        }

    def _sid(self, node: fx.Node) -> int:
        return 0 if node.op == "placeholder" else self.program.source_of[node]

    def _shape(self, values, sid: int) -> tuple[int, ...]:
        node = next(n for n in self.graph.nodes if n.op == "placeholder") if sid == 0 else self.program.node_of[sid]
        return tuple(values[node].shape[1:])

    def propagate(self, dec: dict, seeds: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Relevance per source id (flattened positions) after pushing ``seeds`` down every stage."""
        rel = {k: v.clone().double() for k, v in seeds.items()}
        for stage in reversed(dec["stages"]):
            r = rel.get(stage.sink)
            if r is None:
                continue
            for sid, mus in stage.ratios.items():
                acc = rel.setdefault(sid, torch.zeros(mus[0].shape[0], dtype=torch.float64))
                for mu in mus:
                    acc += mu @ r
        return rel

    def saliency(self, x: torch.Tensor, target: int) -> torch.Tensor:
        """(H, W) map with the exact head: each path's share of the logit plus an equal share of its bias."""
        dec = self.decompose(x)
        items = dec["head_items"]
        n_taps = sum(c.shape[0] for _, _, c in items)
        seeds: dict[int, torch.Tensor] = {}
        for _, src, c in items:
            sid = self._sid(src)
            acc = seeds.setdefault(sid, torch.zeros(c.shape[0], dtype=torch.float64))
            acc += c[:, target, 0] + dec["head_bias"][target] / n_taps
        rel = self.propagate(dec, seeds)
        return rel[0].view(x.shape[2], x.shape[3])

    def ierf(self, x: torch.Tensor, layer: str, position: tuple[int, int]) -> torch.Tensor:
        dec = self.decompose(x)
        sid = self.program.source_id(layer)
        shape = self._shape(dec["values"], sid)
        h, w = (shape[1], shape[2]) if len(shape) == 3 else (1, 1)
        seed = torch.zeros(h * w, dtype=torch.float64)
        seed[position[0] * w + position[1]] = 1.0
        rel = self.propagate(dec, {sid: seed})
        return rel[0].view(x.shape[2], x.shape[3])

"""A model compiled for SRD: its traced graph with a rule per node, run as one cached forward.

The forward computes every stage's pre-activation from its paths (so kernel taps are formed once and
their sum *is* the convolution), takes the sharing ratios there, then applies the model's own activation.
The result is target-independent: logits, per-stage ratios and what the head needs.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ierf.errors import InputSizeError, UnsupportedModelError
from ierf.interrupt import checkpoint
from ierf.methods import refuse_wrapped
from ierf.srd.graph import check_model_state, head_subgraph, module_identities, name_activations, rule_type, trace
from ierf.srd.ratios import RANGE_FLAGS, out_of_range, stage_ratios, tap_products
from ierf.srd.rules import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    OPAQUE_FUNCTIONS,
    Broadcast,
    ChannelGroups,
    GateBranches,
    Source,
    VectorColumn,
    as_affine,
    gate_branches,
    is_activation,
    known_module_types,
)
from ierf.srd.terms import Affine, ConvTerm, Route


@dataclass
class Stage:
    """Ratios of the paths into one PFV map: ``mu`` (B, T, H, W), ``routes`` (T) to upstream maps."""

    sink: int
    mu: torch.Tensor
    routes: list[Route]


@dataclass
class Head:
    """Logit decomposition over the head's paths: ``contrib`` (B, K, T), shared ``bias`` (B|1, K)."""

    contrib: torch.Tensor
    bias: torch.Tensor
    routes: list[Route]


@dataclass
class RunResult:
    logits: torch.Tensor
    stages: list[Stage]
    shapes: dict[int, tuple[int, ...]]
    head: Head
    activations: dict[int, torch.Tensor]


class Program:
    """Compile once per model; :meth:`run` is the per-image work."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_wrapped(model, "SRD")
        self.model = model
        known = known_module_types()
        self.built_from = module_identities(model)
        check_model_state(model, self.built_from)  # hooks would also run, on fx proxies, while tracing
        traced = trace(model, known, tuple(OPAQUE_FUNCTIONS))
        self.graph = traced.graph
        self.constants = traced.constants
        self.steps: list[tuple[fx.Node, Callable[..., Any] | None, nn.Module | None]] = []
        activations: list[fx.Node] = []
        self.gate_branches: GateBranches = gate_branches(self.graph, model)
        try:
            self._build_steps(model, known, activations)
        except UnsupportedModelError as exc:
            lacking = _lacking_rules(model)  # only for a refusal: a walk over every module
            if lacking and lacking not in str(exc):
                raise UnsupportedModelError(f"{exc} ({lacking})") from None
            raise
        placeholders = sum(node.op == "placeholder" for node in self.graph.nodes)
        if placeholders != 1:
            raise UnsupportedModelError(f"SRD needs a model with exactly one input; this one takes {placeholders}")
        self._finish(traced, activations)

    def _build_steps(self, model: nn.Module, known: Any, activations: list[fx.Node]) -> None:
        for node in self.graph.nodes:
            module = None
            rule: Callable[..., Any] | None = None
            if node in self.gate_branches.native:
                module = model.get_submodule(str(node.target)) if node.op == "call_module" else None
                self.steps.append((node, _run_native, module))
                continue
            if node.op == "call_module":
                module = model.get_submodule(str(node.target))
                cls = rule_type(module, known)
                if cls is None:
                    raise UnsupportedModelError(
                        f"no SRD rule for {type(module).__name__} at module '{node.target}' (if it is an element-wise "
                        f"activation, declare it: ierf.srd.register_activation({type(module).__name__}))"
                    )
                rule = MODULE_RULES[cls]
            elif node.op == "call_function":
                rule = FUNCTION_RULES.get(node.target)
                if rule is None:
                    raise UnsupportedModelError(
                        f"no SRD rule for function {getattr(node.target, '__name__', node.target)} "
                        f"in {self._scope(node)}"
                    )
            elif node.op == "call_method":
                rule = METHOD_RULES.get(str(node.target))
                if rule is None:
                    raise UnsupportedModelError(f"no SRD rule for method .{node.target}() in {self._scope(node)}")
            if is_activation(node, module):
                activations.append(node)
            self.steps.append((node, rule, module))

    def _finish(self, traced: Any, activations: list[fx.Node]) -> None:
        self.read_after_change = _read_after_change(self.steps)
        passes = frozenset(node for node, rule, _ in self.steps if getattr(rule, "pending_pool_role", None) == "pass")
        self.module_names = {name for name, _ in self.model.named_modules() if name}
        names = name_activations(traced, activations, passes, frozenset(self.module_names))
        self.repeated_blocks = names.repeated
        self.source_of: dict[fx.Node, int] = {node: i + 1 for i, node in enumerate(activations)}
        self.node_of: dict[int, fx.Node] = {i: n for n, i in self.source_of.items()}
        self.names: list[str] = ["input"] + [names.canonical[n] for n in activations]
        self.lookup: dict[str, int] = {name: self.source_of[n] for name, n in names.lookup.items()}
        self._head_modules: dict[int, fx.GraphModule] = {}

    # -- naming ---------------------------------------------------------------------------------------
    def _scope(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "the model's top-level forward"
        path, cls = list(stack.values())[-1]
        return f"module '{path}' ({getattr(cls, '__name__', cls)})"

    def where(self, node: fx.Node) -> _Where:
        """Where a node sits, for error messages; formatted only if an error is actually raised."""
        return _Where(self, node)

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.model.get_submodule(str(node.target))).__name__})"
        return f"'{node.name}' in {self._scope(node)}"

    def source_id(self, layer: str) -> int:
        """Resolve a layer name to its PFV map, with an error that says what is valid."""
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a string, got {type(layer).__name__}")
        if layer in self.lookup:
            return self.lookup[layer]
        sample = (
            ", ".join([*self.names[1:6], "…", *self.names[-3:]]) if len(self.names) > 9 else ", ".join(self.names[1:])
        )
        runs = [name for name in self.lookup if name.startswith(f"{layer}:") and name[len(layer) + 1 :].isdigit()]
        if runs:
            raise ValueError(
                f"layer {layer!r} runs {len(runs)} times in one forward (a reused activation module): name one "
                f"run, {', '.join(sorted(runs, key=lambda n: int(n.rsplit(':', 1)[1])))}"
            )
        if layer in self.repeated_blocks:
            calls = self.repeated_blocks[layer]
            raise ValueError(
                f"layer {layer!r} runs {len(calls)} times in one forward (a block called more than once): name "
                f"one run, {', '.join(calls)}"
            )
        called = {str(n.target): n in self.gate_branches.native for n in self.graph.nodes if n.op == "call_module"}
        inside = [gated for name, gated in called.items() if name == layer or name.startswith(f"{layer}.")]
        if inside and all(inside):  # every module called at or under `layer` computes a gate
            raise ValueError(
                f"layer {layer!r} lies in a gate's branch (a squeeze-excitation or attention computing a product's "
                "factor from the map it scales): SRD holds a gate at its value, so no PFV map is decomposed there. "
                f"Valid layers: {sample} (all: SRD.layers; `ierf layers` on the command line)"
            )
        if layer in self.module_names:
            kind = type(self.model.get_submodule(layer)).__name__
            raise ValueError(
                f"layer {layer!r} ({kind}) is not a stage boundary: its output is not a post-activation PFV map. "
                f"Valid layers: {sample} (all: SRD.layers; `ierf layers` on the command line)"
            )
        raise ValueError(
            f"unknown layer {layer!r}. Valid layers: {sample} (all: SRD.layers; `ierf layers` on the command line)"
        )

    # -- the forward ------------------------------------------------------------------------------------
    def run(self, x: torch.Tensor, keep: frozenset[int] = frozenset(), keep_last_spatial: bool = False) -> RunResult:
        """``keep_last_spatial`` retains the last spatial PFV map: the start layer of gradient heads."""
        interp = _Interpreter(self, keep)
        squared_norms: list[torch.Tensor] = []
        token = RANGE_FLAGS.set(squared_norms)
        try:
            out = interp.execute(x)
        finally:
            RANGE_FLAGS.reset(token)
        if out_of_range(squared_norms):
            kind = torch.finfo(torch.float32 if x.dtype == torch.float16 else x.dtype)  # float16 stages: float32
            raise ValueError(
                f"this input's pre-activation vectors leave the range of {kind.dtype} for their squared norms "
                f"(above ~{kind.max**0.5:.1e} or below ~{kind.tiny**0.5:.1e}), where "
                "sharing ratios would silently lose relevance: rescale the input, or explain a float64 copy of "
                "the model and input"
            )
        if keep_last_spatial and interp.last_spatial is not None:
            sid, tensor = interp.last_spatial
            interp.kept.setdefault(sid, tensor)
        if isinstance(out, Source) and out.id != 0 and out.tensor.dim() == 2:
            # An output activation (a multi-label model's Sigmoid) is a PFV boundary like any other: the logits
            # below it would become a one-position stage, and every class the same map up to a scale.
            name = self.names[out.id]
            module = dict(self.model.named_modules()).get(name.split(":")[0])
            kind = f", {type(module).__name__}" if module is not None else ""
            raise UnsupportedModelError(
                f"the model's output is an activation's ({name!r}{kind}): SRD decomposes logits, the "
                "values before an output activation (Sigmoid, Tanh, …); explain the model without it (for "
                "nn.Sequential(net, nn.Sigmoid()): net), whose maps then sum to each class's logit"
            )
        if isinstance(out, Source):
            out = as_affine(out, "model output")
        if isinstance(out, dict):
            raise UnsupportedModelError(
                f"the model must return one logits tensor, but returns a dict with keys {sorted(map(str, out))}: "
                "wrap it in a module whose forward returns the logits (e.g. model(x)['logits'])"
            )
        if not isinstance(out, Affine):
            raise UnsupportedModelError(f"the model must return one logits tensor, got {type(out).__name__}")
        logits = out.value()
        if logits.dim() != 2:
            raise UnsupportedModelError(f"the model must return (B, num_classes) logits, got {tuple(logits.shape)}")
        head = _head(out)
        return RunResult(logits, interp.stages, interp.shapes, head, interp.kept)

    def attribute(self, target: str) -> Any:
        """What a ``get_attr`` node reads: a tensor the forward created (kept by the program, not on the
        caller's module), or a parameter, buffer or attribute of the model."""
        if target in self.constants:
            return self.constants[target]
        return functools.reduce(getattr, target.split("."), self.model)

    def head_module(self, source: int) -> fx.GraphModule:
        """The model's own head from PFV map ``source`` to logits (for gradient start maps)."""
        if source not in self._head_modules:
            self._head_modules[source] = head_subgraph(self.graph, self.node_of[source], self.model, self.attribute)
        return self._head_modules[source]


class _Where:
    __slots__ = ("node", "program")

    def __init__(self, program: Program, node: fx.Node) -> None:
        self.program = program
        self.node = node

    def __str__(self) -> str:
        return self.program.describe(self.node)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class _Interpreter:
    def __init__(self, program: Program, keep: frozenset[int]) -> None:
        self.program = program
        self.keep = keep
        self.stages: list[Stage] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.kept: dict[int, torch.Tensor] = {}
        self.last_spatial: tuple[int, torch.Tensor] | None = None

    def where(self, node: fx.Node) -> _Where:
        return self.program.where(node)

    def activation(self, node: fx.Node, value: Any, apply: Callable[[torch.Tensor], torch.Tensor]) -> Source:
        bundle = as_affine(value, self.where(node))
        if bundle.flat_from is not None:
            raise UnsupportedModelError(f"{self.where(node)}: activation on a flattened map")
        z, mu, routes = stage_ratios(bundle)
        a = apply(z)
        if bundle.is_vector:
            a = a.flatten(1)
        sid = self.program.source_of[node]
        self.stages.append(Stage(sid, mu, routes))
        self.shapes[sid] = tuple(a.shape[1:])
        if sid in self.keep:
            self.kept[sid] = a
        if a.dim() == 4 and a.shape[2] * a.shape[3] > 1:
            self.last_spatial = (sid, a)
        return Source(a, sid)

    def execute(self, x: torch.Tensor) -> Any:
        env: dict[fx.Node, Any] = {}
        self.shapes[0] = tuple(x.shape[1:])
        if 0 in self.keep:
            self.kept[0] = x
        for node, rule, module in self.program.steps:
            checkpoint()  # between nodes: a server stops here for a caller who has gone
            if node.op == "placeholder":
                env[node] = Source(x, 0)
                continue
            if node.op == "get_attr":
                env[node] = self.program.attribute(str(node.target))
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "output":
                return args[0]
            first = module if node.op == "call_module" else node.target
            later = self.program.read_after_change.get(node)
            if later is not None and args and isinstance(args[0], Source | Affine):
                raise UnsupportedModelError(
                    f"{self.where(node)}: an in-place operation changes a feature map that "
                    f"{self.program.describe(later)} reads afterwards, where the traced graph still holds it as "
                    "it was before the change (SRD would explain another function): use the out-of-place "
                    "form (inplace=False, y = x + t rather than x += t)"
                )
            if "out" in kwargs:
                raise UnsupportedModelError(f"{self.where(node)}: out= writes into a tensor; use the returned value")
            try:
                env[node] = rule(self, node, first, *args, **kwargs)
            except (UnsupportedModelError, InputSizeError) as exc:
                raise _located(exc, self.where(node)) from None
            except TypeError as exc:
                if not kwargs:
                    raise
                # the rules take the common arguments positionally (torch.add(input=y, other=a) reached one as
                # keywords it does not name): a refusal naming the op, not an internal TypeError
                raise UnsupportedModelError(
                    f"{self.where(node)}: called with keyword arguments {sorted(kwargs)} that SRD's rule does not "
                    f"take ({exc}); pass them positionally"
                ) from None
            for dead in _last_uses(self.program, node):
                env.pop(dead, None)
        raise UnsupportedModelError("the traced graph has no output")


def _run_native(ctx: _Interpreter, node: fx.Node, first: Any, *args: Any, **kwargs: Any) -> Any:
    """A node of a gate's branch, run as the model runs it on plain tensors (feature maps read as their
    values): the gate is held at this value, so nothing needs its decomposition."""
    where = ctx.where(node)

    def plain(v: Any) -> Any:
        if isinstance(v, Source):
            return v.tensor
        if isinstance(v, Affine):
            return v.value()
        if isinstance(v, ChannelGroups | VectorColumn | Broadcast):  # views only the rules' own ops read
            raise UnsupportedModelError(f"{where}: a gate's branch reads a {type(v).__name__}")
        return v

    changes_input = _changes_first_operand(node, first if node.op == "call_module" else None)
    if changes_input and args and isinstance(args[0], Source):
        args = (args[0].tensor.clone(), *args[1:])  # the PFV map itself stays as it is
    args = fx.node.map_aggregate(args, plain)
    kwargs = fx.node.map_aggregate(kwargs, plain)
    try:
        if node.op == "call_method":
            return getattr(args[0], str(first))(*args[1:], **kwargs)
        return first(*args, **kwargs)
    except RuntimeError as exc:  # the model's own op fails on this input (a kernel larger than its map)
        raise InputSizeError(f"{where}: the model's own forward fails here on this input: {exc}") from None


def _lacking_rules(model: nn.Module) -> str:
    """What a refusal adds for a model with layers SRD has no rules for at all (attention, LayerNorm), so a
    ViT is not sent to rewrite the first op the trace met (its patch embedding's permute)."""
    found = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, nn.LayerNorm | nn.MultiheadAttention) or type(m).__name__ == "LayerNorm2d"
        }
    )
    if not found:
        return ""
    return (
        f"the model also has {', '.join(found)}, which SRD has no rules for yet: attention and LayerNorm "
        "(ViT, Swin, ConvNeXt) come later"
    )


_IN_PLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _changes_first_operand(node: fx.Node, module: nn.Module | None) -> bool:
    """An operation that writes into its first operand: ``x += t``, ``x.mul_(c)``, an activation module or
    function with ``inplace=True`` (dropout excepted: in eval it writes nothing)."""
    if node.op == "call_module":
        return getattr(module, "inplace", False) is True and not isinstance(module, nn.modules.dropout._DropoutNd)
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_") and name != "requires_grad_"
    if node.op != "call_function":
        return False
    if node.target in _IN_PLACE_FUNCTIONS:
        return True
    name = getattr(node.target, "__name__", "")
    if "dropout" in name:
        return False
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature, or arguments it would refuse
        return node.kwargs.get("inplace") is True
    return bound.arguments.get("inplace") is True


def _read_after_change(steps: list[tuple[fx.Node, Any, nn.Module | None]]) -> dict[fx.Node, fx.Node]:
    """In-place operations whose operand is read again after them, with the first such reader. Eager
    PyTorch reads the changed values there; the traced graph's later readers still name the node from
    before the change, so applying the operation as a new value (as the rules do) would decompose another
    function (a pre-activation block's ``identity`` after ``nn.ReLU(inplace=True)``)."""
    order = {node: i for i, (node, _, _) in enumerate(steps)}
    found: dict[fx.Node, fx.Node] = {}
    for node, _, module in steps:
        if not node.args or not isinstance(node.args[0], fx.Node) or not _changes_first_operand(node, module):
            continue
        later = [user for user in node.args[0].users if order.get(user, -1) > order[node]]
        if later:
            found[node] = min(later, key=order.__getitem__)
    return found


def _located(exc: ValueError, where: _Where) -> ValueError:
    """The refusal with the operation that raised it named: a rule names its node itself, but the shared
    term algebra (adds, concatenations, windows) cannot know where it was called from."""
    place = str(where)
    if place in str(exc):
        return exc
    return type(exc)(f"{place}: {exc}")


def _last_uses(program: Program, node: fx.Node) -> list[fx.Node]:
    table = program.__dict__.get("_last_use_table")
    if table is None:
        table = {}
        seen: set[fx.Node] = set()
        for n in reversed(list(program.graph.nodes)):
            for dep in n.all_input_nodes:
                if dep not in seen:
                    seen.add(dep)
                    table.setdefault(n, []).append(dep)
        program.__dict__["_last_use_table"] = table
    return table.get(node, [])


def _head(out: Affine) -> Head:
    """Split the logits into per-path contributions; biases are shared equally among the paths, as the
    published code does for the global-average-pool head (CAM + b_y / HW)."""
    b, k = out.batch, out.channels
    parts: list[torch.Tensor] = []
    routes: list[Route] = []
    for t in out.terms:
        if isinstance(t, ConvTerm):
            y = tap_products(t)  # (B, 1, 1, T, C)
            c = y[:, 0, 0].transpose(1, 2)  # (B, C, T)
        else:
            c = t.x.reshape(t.x.shape[0], t.x.shape[1], 1)
        full = c.new_zeros(c.shape[0], k, c.shape[2])
        full[:, t.c0 : t.c0 + t.channels] = c
        parts.append(full.expand(b, k, c.shape[2]))
        routes += t.tap_routes()
    contrib = torch.cat(parts, 2)
    bias = contrib.new_zeros(1, k)
    for bt in out.biases:
        bias = bias + torch.nn.functional.pad(
            bt.value.reshape(bt.value.shape[0], bt.channels), (bt.c0, k - bt.c0 - bt.channels)
        )
    return Head(contrib, bias, routes)

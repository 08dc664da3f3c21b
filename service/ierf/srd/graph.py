"""The model's own graph, traced with torch.fx, and the names of its PFV maps.

Tracing never touches the caller's module: no hooks, no replaced submodules. Modules that have a
decomposition rule are kept as leaves; a subclass that overrides ``forward`` (e.g. a convolution with
its own "same" padding) is traced through, so its real arithmetic is what gets decomposed.
"""

from __future__ import annotations

import itertools
import sys
import threading
import types
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ierf._transient import is_transient_hook
from ierf.errors import UnsupportedModelError

# Methods a stock module's forward calls to do its arithmetic: a subclass or an instance that replaces one
# (weight standardisation in Conv2d._conv_forward, a circular "seamless tiling" patch) computes something else.
_ARITHMETIC_HELPERS = ("_conv_forward",)


def patched_methods(module: nn.Module) -> tuple[str, ...]:
    """The forward or arithmetic helpers set on this instance itself, shadowing its class's."""
    own = vars(module)
    return tuple(name for name in ("forward", *_ARITHMETIC_HELPERS) if name in own)


def rule_type(module: nn.Module, known: tuple[type, ...]) -> type | None:
    """The registered class whose arithmetic ``module`` performs, if any: the same forward and helpers as
    that class, none of them replaced by a subclass or on the instance (its own code is traced then)."""
    kind = type(module)
    for cls in kind.__mro__:
        if cls in known:
            same = kind.forward is cls.forward and all(
                getattr(kind, name, None) is getattr(cls, name, None) for name in _ARITHMETIC_HELPERS
            )
            return cls if same and not patched_methods(module) else None
    return None


class _Tracer(fx.Tracer):
    def __init__(self, known: tuple[type, ...], opaque_functions: tuple[Callable[..., object], ...] = ()) -> None:
        super().__init__(autowrap_functions=opaque_functions)
        self.known = known
        # fx keeps such a function opaque only where it is called by a global name; a call through its
        # package (``torchvision.ops.stochastic_depth(...)``) would be traced into, and the error would
        # then name whatever the function does inside (``torch.empty``) instead of the function itself.
        search = getattr(self, "_autowrap_search", None)
        if isinstance(search, list):
            search.extend(_packages_exporting(opaque_functions))
        self.module_outputs: dict[str, list[object]] = defaultdict(list)  # path -> value of each call

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if rule_type(m, self.known) is not None:
            return True
        if patched_methods(m):  # the instance's own forward or helper: traced as written
            return False
        if type(m).forward is not nn.Module.forward and type(m).__module__.startswith("torch.nn"):
            # Stock torch.nn modules without a rule stay opaque so the error names them.
            return not isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict)
        return False

    def call_module(self, m: nn.Module, forward, args, kwargs):
        before = len(self.graph.nodes)
        out = super().call_module(m, forward, args, kwargs)
        # What the module returns (not merely its last node), when computed by this call: a pass-through
        # (nn.Identity, a 1x1 conv's "same" padding) returns a value that belongs to someone else.
        created = len(self.graph.nodes) - before
        made_here = isinstance(out, fx.Proxy) and out.node in itertools.islice(reversed(self.graph.nodes), created)
        self.module_outputs[self.path_of_module(m)].append(out if made_here else None)
        return out


def _packages_exporting(functions: tuple[Callable[..., object], ...]) -> list[types.ModuleType]:
    """The module of each function and its parent packages that export it under its own name."""
    found: list[types.ModuleType] = []
    for fn in functions:
        parts = getattr(fn, "__module__", "").split(".")
        for depth in range(len(parts), 0, -1):
            module = sys.modules.get(".".join(parts[:depth]))
            if module is not None and vars(module).get(fn.__name__) is fn and module not in found:
                found.append(module)
    return found


# torch.fx patches nn.Module.__call__ process-wide while it traces: two traces at once corrupt each other.
TRACE_LOCK = threading.Lock()  # also held by LRP (ierf.baselines.lrp), which traces with its own tracer


@dataclass
class Traced:
    graph: fx.Graph
    module_outputs: dict[str, fx.Node]  # modules called exactly once -> the node their forward returned
    constants: dict[str, torch.Tensor]  # tensors the forward creates (``torch.tensor(...)``), by get_attr name
    # modules called more than once -> the node each call returned (None: a value made elsewhere)
    repeated_outputs: dict[str, list[fx.Node | None]] = field(default_factory=dict)


def trace(
    model: nn.Module, known: tuple[type, ...], opaque_functions: tuple[Callable[..., object], ...] = ()
) -> Traced:
    """Trace ``model`` (one at a time). The patching is process-wide, so a model being run by another
    thread while an SRD is built may misbehave: build explainers before serving threads start.
    ``opaque_functions`` (plain Python functions with a rule) become single nodes, not their insides."""
    tracer = _Tracer(known, opaque_functions)
    with TRACE_LOCK:
        saved = _attributes(model)
        containers = _contents(model)
        graph = None
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types; the user needs to know tracing is the problem
            raise UnsupportedModelError(
                f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); SRD needs "
                "a model whose forward has no data-dependent control flow"
            ) from exc
        finally:
            read = set() if graph is None else {str(n.target) for n in graph.nodes if n.op == "get_attr"}
            # Tensors the forward creates are set on the root by fx (``_tensor_constant<k>``): the graph
            # keeps them itself, so the caller's module gains nothing. Buffers the forward registers on
            # its first call (lazy modules) are the model's own and stay.
            before = saved[0][2]
            constants = {
                name: value
                for name, value in vars(model).items()
                if name in read and name not in before and isinstance(value, torch.Tensor)
            }
            _restore_attributes(saved, read - constants.keys())
            _restore_contents(containers)
    _canonical_spellings(graph)
    outputs = {
        path: values[0].node
        for path, values in tracer.module_outputs.items()
        if len(values) == 1 and isinstance(values[0], fx.Proxy)
    }
    repeated = {
        path: [v.node if isinstance(v, fx.Proxy) else None for v in values]
        for path, values in tracer.module_outputs.items()
        if len(values) > 1
    }
    return Traced(graph, outputs, constants, repeated)


# NumPy spellings torch accepts as aliases: ``x.mean(axis=(2, 3), keepdims=True)`` is ``x.mean(dim=(2, 3),
# keepdim=True)`` and ``torch.concatenate`` is ``torch.cat``. The rules read torch's own names, so the graph
# is rewritten to them once here; a torch op that does not take the alias fails in the model's own forward,
# which the first decomposition runs and refuses with its error.
_KEYWORD_ALIASES = {"axis": "dim", "keepdims": "keepdim"}
_FUNCTION_ALIASES = {torch.concatenate: torch.cat}


def _canonical_spellings(graph: fx.Graph) -> None:
    """Rewrite torch's NumPy-style aliases in ``graph`` to the canonical op and keyword names, so that a
    rule sees ``dim`` where the model wrote ``axis`` (read as "every dimension" before, and refused so)."""
    for node in graph.nodes:
        if node.op == "call_function":
            if not str(getattr(node.target, "__module__", "") or "").startswith("torch"):
                continue  # a user's or Python's own function: its keywords mean what it says
            node.target = _FUNCTION_ALIASES.get(node.target, node.target)
        elif node.op != "call_method":
            continue
        if any(alias in node.kwargs for alias in _KEYWORD_ALIASES):
            kwargs = dict(node.kwargs)
            for alias, name in _KEYWORD_ALIASES.items():
                if alias in kwargs and name not in kwargs:
                    kwargs[name] = kwargs.pop(alias)
            node.kwargs = kwargs


_REGISTRIES = ("_parameters", "_buffers", "_modules")


def _attributes(model: nn.Module) -> list[tuple[str, nn.Module, dict, dict]]:
    """Every module's path and attributes (and the contents of its parameter, buffer and child registries)."""
    return [
        (path, m, dict(vars(m)), {k: dict(v) for k, v in vars(m).items() if k in _REGISTRIES})
        for path, m in model.named_modules(remove_duplicate=False)
    ]


def _restore_attributes(saved: list[tuple[str, nn.Module, dict, dict]], keep: set[str]) -> None:
    """Undo what a traced forward wrote on the caller's modules (``self.features = h`` would otherwise
    leave an fx Proxy there, and ``self.calls += 1`` a changed counter): tracing runs the forward.
    Attributes and registry entries named in ``keep`` (qualified paths the graph reads) stay as the trace
    left them."""
    # A module shared under several paths is one object: keep what the graph reads through any of them.
    kept: dict[int, set[str]] = {}
    for path, module, _, _ in saved:
        prefix = f"{path}." if path else ""
        kept.setdefault(id(module), set()).update(name[len(prefix) :] for name in keep if name.startswith(prefix))
    for _, module, attrs, registries in saved:
        names = kept[id(module)]
        current = vars(module)
        for key in [k for k in current if k not in attrs and k not in names]:
            del current[key]
        for key, value in attrs.items():
            if key not in _REGISTRIES and key not in names and current.get(key, _MISSING) is not value:
                current[key] = value
        for key, contents in registries.items():
            registry = current[key]
            wanted = {**contents, **{k: v for k, v in registry.items() if k in names}}
            if registry.keys() != wanted.keys() or any(registry[k] is not v for k, v in wanted.items()):
                registry.clear()
                registry.update(wanted)


_MISSING = object()
_CONTAINERS = (list, dict, set)
# nn.Module's own bookkeeping (hook tables, the non-persistent buffer set, ...): the attribute and registry
# restore handles those; a buffer the forward registers on its first call must stay as registered.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
# A container this large is not walked (a lookup table, a dataset index): a forward that changes one in
# place while traced keeps the change. Walking a 2M-entry dict took ~4 s.
_MAX_CONTAINER_ITEMS = 100_000

_Saved = tuple[list | dict | set, list]


def _contents(model: nn.Module) -> list[_Saved]:
    """Each list, dict and set the modules hold (nested ones, also inside tuples, included) with a
    shallow copy of its items: a traced forward that appends to ``self.features`` or counts calls in
    ``self.stats["calls"]`` changes those objects in place, which putting attributes back cannot undo."""
    found: list[_Saved] = []
    seen: set[int] = set()
    pending = [v for m in model.modules() for k, v in vars(m).items() if k not in _MODULE_INTERNALS]
    while pending:
        value = pending.pop()
        if not isinstance(value, (*_CONTAINERS, tuple)) or id(value) in seen or len(value) > _MAX_CONTAINER_ITEMS:
            continue
        seen.add(id(value))
        items = list(value.items()) if isinstance(value, dict) else list(value)
        if not isinstance(value, tuple):
            found.append((value, items))
        if isinstance(value, dict):
            pending.extend(v for _, v in items)
        else:
            pending.extend(items)
    return found


def _restore_contents(saved: list[_Saved]) -> None:
    """Put back the items of each container :func:`_contents` found, where the trace changed them
    (compared by identity: items and keys may be tensors, whose ``==`` is elementwise)."""
    for container, items in saved:
        if isinstance(container, dict):
            now = list(container.items())
            changed = len(now) != len(items) or any(
                (k1 is not k2 and not _same_key(k1, k2)) or v1 is not v2
                for (k1, v1), (k2, v2) in zip(now, items, strict=True)
            )
            if changed:
                container.clear()
                container.update(items)
        elif isinstance(container, list):
            if len(container) != len(items) or any(a is not b for a, b in zip(container, items, strict=True)):
                container[:] = items
        elif {id(v) for v in container} != {id(v) for v in items}:
            container.clear()
            container.update(items)


def _same_key(a: object, b: object) -> bool:
    """Equal dict keys that are different objects (two equal strings, ints): never tensors."""
    return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b


@dataclass
class LayerNames:
    """Canonical name per activation node plus every alias a user may type."""

    canonical: dict[fx.Node, str]
    lookup: dict[str, fx.Node]
    # a block called several times, each call ending in an activation -> the names of those activations
    repeated: dict[str, list[str]] = field(default_factory=dict)


def name_activations(
    traced: Traced,
    activations: list[fx.Node],
    passes: frozenset[fx.Node] = frozenset(),
    modules: frozenset[str] = frozenset(),
) -> LayerNames:
    """Name each activation output.

    * an activation module called once: its qualified name (``features.29``, ``relu``);
    * a module called several times (ResNet blocks reuse ``relu``): ``name:k``, k = call order from 0;
    * a functional activation: ``<enclosing module>.<function>`` (``:k`` when repeated there), with ``()``
      appended when that is the path of one of the ``modules`` (a top-level ``F.relu`` beside a block
      registered as ``relu``: ``relu()``), so a module's path always means that module;
    * a container whose forward returns this activation (``layer1.0``, ``layer4``) is an alias, and is the
      canonical name when one exists (the deepest such container). Nodes in ``passes`` (eval-mode dropout,
      ``nn.Identity``) hand their input on, so a block ending in one still returns its activation.
    """
    base: dict[fx.Node, str] = {}
    counts: dict[str, int] = defaultdict(int)
    keys: dict[fx.Node, str] = {}
    # a functional named like an activation module that runs shares its counted name (path:k, call order)
    activation_modules = {str(n.target) for n in activations if n.op == "call_module"}
    for node in activations:
        if node.op == "call_module":
            key = str(node.target)
        else:
            scope = _innermost_scope(node)
            fname = getattr(node.target, "__name__", str(node.target)).strip("_")
            key = f"{scope}.{fname}" if scope else fname
            if key in modules and key not in activation_modules:
                key += "()"
        keys[node] = key
        counts[key] += 1
    seen: dict[str, int] = defaultdict(int)
    for node in activations:
        key = keys[node]
        base[node] = key if counts[key] == 1 else f"{key}:{seen[key]}"
        seen[key] += 1

    act_set = set(activations)

    def returned(out: fx.Node | None) -> fx.Node | None:
        while out is not None and out in passes and out.args and isinstance(out.args[0], fx.Node):
            out = out.args[0]
        return out if out in act_set else None

    aliases: dict[fx.Node, list[str]] = defaultdict(list)
    for path, out in traced.module_outputs.items():
        if out in passes and out.op == "call_module" and str(out.target) == path:
            continue  # an identity module (eval dropout after a ReLU) is not a name of the map it hands on
        node = returned(out)
        if node is not None and path != base[node] and path:
            aliases[node].append(path)
    repeated: dict[str, list[str]] = {}
    for path, outs in traced.repeated_outputs.items():
        nodes = [returned(out) for out in outs]
        if path and all(n is not None for n in nodes) and path not in keys.values():
            repeated[path] = [base[n] for n in nodes]  # type: ignore[index]
    canonical: dict[fx.Node, str] = {}
    lookup: dict[str, fx.Node] = {}
    for node in activations:
        for name in [base[node], *aliases[node]]:
            if lookup.setdefault(name, node) is not node:  # not reachable by the rules above: never silently
                raise UnsupportedModelError(f"two feature maps would both be named {name!r}")
        containers = sorted(aliases[node], key=lambda p: p.count("."), reverse=True)
        canonical[node] = containers[0] if containers else base[node]
    return LayerNames(canonical, lookup, repeated)


def _innermost_scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


def head_subgraph(
    graph: fx.Graph, start: fx.Node, owner: nn.Module, attribute: Callable[[str], object]
) -> fx.GraphModule:
    """A module computing the graph output from the value of ``start`` (for gradient-based start maps);
    ``attribute`` resolves what its get_attr nodes read. It shares the owner's submodules and tensors."""
    downstream: set[fx.Node] = {start}
    for node in graph.nodes:
        if any(a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: new.placeholder("start")}
    for node in graph.nodes:
        if node is start or (node not in downstream and node.op != "get_attr"):
            continue
        if node.op == "output":
            new.output(env[node.args[0]])
            break
        for dep in node.all_input_nodes:  # get_attr nodes were copied above: they precede their users
            if dep not in env:
                raise UnsupportedModelError(
                    f"the head after '{start.name}' also reads '{dep.name}'; a gradient start map needs a "
                    "head that depends on the last feature map only"
                )
        env[node] = new.node_copy(node, lambda n: env[n])
    # Flat names of the module's own: nested ones ("fc.scale" beside "fc") made GraphModule install the
    # attribute on the caller's own submodule.
    parts: dict[str, object] = {}
    for n in new.nodes:
        if n.op in ("get_attr", "call_module"):
            target = str(n.target)
            flat = f"_{n.op}_{len(parts)}"
            parts[flat] = attribute(target) if n.op == "get_attr" else owner.get_submodule(target)
            n.target = flat
    return fx.GraphModule(parts, new)


def module_identities(model: nn.Module) -> tuple[tuple[str, int, tuple[int, ...]], ...]:
    """What the traced program was built from: every submodule's name and object identity, and the methods
    patched onto it (a forward replaced after the explainer was built changes what the model computes)."""
    return tuple(
        (name, id(m), tuple(id(vars(m)[attr]) for attr in patched_methods(m))) for name, m in model.named_modules()
    )


_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.RReLU)


def check_model_state(model: nn.Module, built_from: tuple[tuple[str, int, tuple[int, ...]], ...]) -> list[torch.Tensor]:
    """Refuse to explain a model that no longer computes what the traced program computes: in training
    mode (dropout, batch statistics, ``self.training`` branches were traced as in eval), with forward hooks
    (the traced graph does not run them), or with submodules replaced since the explainer was built.
    Returns the model's parameters (gathered in the same pass), whose versions tell a write during the call."""
    training, hooked, parameters, lazy = [], [], [], []
    for name, m in model.named_modules():
        parameters += [p for p in m._parameters.values() if p is not None]
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            lazy.append(name or type(model).__name__)
        # Batch norm and dropout change with the mode, and so may any code outside torch.nn that reads
        # self.training (it was traced in eval); stock activations and containers do not.
        if m.training and (isinstance(m, _MODE_DEPENDENT) or not type(m).__module__.startswith("torch.nn")):
            training.append(name or type(model).__name__)
        if (m._forward_hooks or m._forward_pre_hooks) and not all(  # ierf's own (CAM in another thread) pass
            map(is_transient_hook, [*m._forward_hooks.values(), *m._forward_pre_hooks.values()])
        ):
            hooked.append(name or type(model).__name__)
    if training:
        raise ValueError(
            f"model must be in eval mode (call model.eval()); modules in training mode: {', '.join(training[:5])}"
        )
    if lazy:  # their initialisation pre-hooks would otherwise be reported as the caller's hooks
        raise ValueError(
            f"the model has uninitialised lazy modules ({', '.join(repr(n) for n in lazy[:5])}): run one forward "
            "pass first, so that their shapes are known"
        )
    global_hooks = getattr(nn.modules.module, "_global_forward_hooks", {}) or getattr(
        nn.modules.module, "_global_forward_pre_hooks", {}
    )
    if hooked or global_hooks:
        where = f"on {', '.join(repr(n) for n in hooked[:5])}" if hooked else "registered globally"
        from torch.nn.utils.weight_norm import WeightNorm

        old_weight_norm = any(
            isinstance(h, WeightNorm) for _, m in model.named_modules() for h in m._forward_pre_hooks.values()
        )
        way_out = (
            "the old torch.nn.utils.weight_norm works by such a hook: use "
            "torch.nn.utils.parametrizations.weight_norm, which SRD follows"
            if old_weight_norm
            else "remove them while explaining"
        )
        raise ValueError(
            f"the model has forward hooks ({where}): SRD decomposes the model's traced forward, which does not "
            f"run hooks, so the maps would not explain what the hooked model computes; {way_out}"
        )
    if module_identities(model) != built_from:
        raise ValueError(
            "the model's modules changed after this explainer was built (a submodule was replaced, added or "
            "removed, or a forward was patched): build a new ierf.SRD(model)"
        )
    return parameters

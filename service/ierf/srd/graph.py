"""The model's own graph, traced with torch.fx, and the names of its PFV maps.

Tracing never touches the caller's module: no hooks, no replaced submodules. Modules that have a
decomposition rule are kept as leaves; a subclass that overrides ``forward`` (e.g. a convolution with
its own "same" padding) is traced through, so its real arithmetic is what gets decomposed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from ierf.errors import UnsupportedModelError


def rule_type(module: nn.Module, known: tuple[type, ...]) -> type | None:
    """The registered class whose arithmetic ``module`` performs, if any (exact forward match)."""
    for cls in type(module).__mro__:
        if cls in known:
            return cls if type(module).forward is cls.forward else None
    return None


class _Tracer(fx.Tracer):
    def __init__(self, known: tuple[type, ...]) -> None:
        super().__init__()
        self.known = known

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        if rule_type(m, self.known) is not None:
            return True
        if type(m).forward is not nn.Module.forward and type(m).__module__.startswith("torch.nn"):
            # Stock torch.nn modules without a rule stay opaque so the error names them.
            return not isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict)
        return False


def trace(model: nn.Module, known: tuple[type, ...]) -> fx.Graph:
    try:
        return _Tracer(known).trace(model)
    except Exception as exc:  # fx raises many types; the user needs to know tracing is the problem
        raise UnsupportedModelError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); SRD needs a "
            "model whose forward has no data-dependent control flow"
        ) from exc


@dataclass
class LayerNames:
    """Canonical name per activation node plus every alias a user may type."""

    canonical: dict[fx.Node, str]
    lookup: dict[str, fx.Node]


def name_activations(graph: fx.Graph, activations: list[fx.Node], model: nn.Module) -> LayerNames:
    """Name each activation output.

    * an activation module called once: its qualified name (``features.29``, ``relu``);
    * a module called several times (ResNet blocks reuse ``relu``): ``name:k``, k = call order from 0;
    * a functional activation: ``<enclosing module>.<function>`` (``:k`` when repeated there);
    * a container whose forward returns this activation (``layer1.0``, ``layer4``) is an alias, and is the
      canonical name when one exists (the deepest such container).
    """
    base: dict[fx.Node, str] = {}
    counts: dict[str, int] = defaultdict(int)
    keys: dict[fx.Node, str] = {}
    for node in activations:
        if node.op == "call_module":
            key = str(node.target)
        else:
            scope = _innermost_scope(node)
            fname = getattr(node.target, "__name__", str(node.target)).strip("_")
            key = f"{scope}.{fname}" if scope else fname
        keys[node] = key
        counts[key] += 1
    seen: dict[str, int] = defaultdict(int)
    for node in activations:
        key = keys[node]
        base[node] = key if counts[key] == 1 else f"{key}:{seen[key]}"
        seen[key] += 1

    aliases: dict[fx.Node, list[str]] = defaultdict(list)
    act_set = set(activations)
    for path, last in _scope_outputs(graph).items():
        if last in act_set and path != base[last] and path:
            aliases[last].append(path)
    canonical: dict[fx.Node, str] = {}
    lookup: dict[str, fx.Node] = {}
    for node in activations:
        names = [base[node], *aliases[node]]
        for name in names:
            lookup[name] = node
        containers = sorted(aliases[node], key=lambda p: p.count("."), reverse=True)
        canonical[node] = containers[0] if containers else base[node]
    return LayerNames(canonical, lookup)


def _innermost_scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path


def _scope_outputs(graph: fx.Graph) -> dict[str, fx.Node]:
    """For every module call scope, the last computing node inside it (its output in practice)."""
    last: dict[str, fx.Node] = {}
    repeated: set[str] = set()
    for node in graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if "@" in key:
                repeated.add(path)
            last[path] = node
    # A module called several times has no single output: it is never an alias.
    return {path: node for path, node in last.items() if path not in repeated}


def head_subgraph(graph: fx.Graph, start: fx.Node, owner: nn.Module) -> fx.GraphModule:
    """A module computing the graph output from the value of ``start`` (for gradient-based start maps)."""
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
        for dep in node.all_input_nodes:
            if dep not in env:
                if dep.op == "get_attr":
                    env[dep] = new.node_copy(dep, lambda n: env[n])
                else:
                    raise UnsupportedModelError(
                        f"the head after '{start.name}' also reads '{dep.name}'; a gradient start map needs a "
                        "head that depends on the last feature map only"
                    )
        env[node] = new.node_copy(node, lambda n: env[n])
    return fx.GraphModule(owner, new)


def module_of(model: nn.Module, target: str) -> nn.Module:
    return model.get_submodule(target)


def ensure_eval(model: nn.Module) -> None:
    """Batch norm and dropout behave differently in training mode; SRD decomposes the eval model."""
    stateful = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    training = [
        name or type(model).__name__ for name, m in model.named_modules() if m.training and isinstance(m, stateful)
    ]
    if training:
        raise ValueError(
            f"model must be in eval mode (call model.eval()); modules in training mode: {', '.join(training[:5])}"
        )

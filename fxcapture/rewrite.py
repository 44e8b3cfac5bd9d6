"""Stage 4: graph passes that turn a traced model into an extractor.

Each pass is a plain function over an ``fx.Graph``:

* :func:`protect_from_inplace` clones a captured value only if a later in-place
  op (``relu_``, ``nn.ReLU(inplace=True)``, ``x[i] = v``, ``out=``) writes into it
  or into a view of it; otherwise captured tensors are returned without a copy.
* :func:`add_feature_outputs` makes the graph return ``(output, {key: value})``.
* :func:`prune` drops everything the new outputs do not need.
"""

from __future__ import annotations

import inspect
import operator
from functools import lru_cache
from typing import Any, Callable

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from .catalogue import value_nodes
from .tracing import INPLACE_FUNCTIONS

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
}  # fmt: skip
_INPLACE_OPERATORS |= set(INPLACE_FUNCTIONS.values())  # x += y (fxcapture.tracing)

# Ops whose result may share memory with their first argument.
_VIEW_NAMES = {
    "view", "view_as", "reshape", "reshape_as", "transpose", "transpose_", "permute",
    "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "narrow",
    "select", "t", "unbind", "split", "chunk", "tensor_split", "contiguous", "detach",
    "as_strided", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims", "unfold",
    "real", "imag", "__getitem__", "getitem", "type_as", "to", "float", "half",
    "double", "bfloat16", "type", "view_as_real", "view_as_complex", "align_as",
    "value_after_writes", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout",  # return their input when not training
    "squeeze_", "unsqueeze_", "identity",
}  # fmt: skip
_VIEW_MODULES = (
    torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Dropout,
    torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
)  # fmt: skip
# Functions whose results never share memory with their arguments unless named in
# _VIEW_NAMES; a function from anywhere else ran unseen (``torch.fx.wrap``, a leaf)
# and may return its argument (torchvision's ``stochastic_depth`` in eval does).
_KNOWN_FUNCTION_MODULES = {
    "torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._linalg",
    "torch._C._fft", "torch._C._special", "torch._C._VariableFunctions", "_operator",
    "operator", "builtins", "math", "fxcapture.tracing",
}  # fmt: skip


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target.rpartition(".")[2]
    return getattr(node.target, "__name__", "")


@lru_cache(maxsize=None)
def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _inplace_flag(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    sig = _signature(node.target)
    if sig is None or "inplace" not in sig.parameters:
        return False
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def mutated_input(node: fx.Node, modules: dict[str, torch.nn.Module]) -> fx.Node | None:
    """The node whose tensor ``node`` writes into, if it is an in-place op."""
    first = node.args[0] if node.args else None
    if node.op == "call_function":
        if isinstance(node.kwargs.get("out"), fx.Node):
            return node.kwargs["out"]
        name = _target_name(node)
        if (
            node.target in _INPLACE_OPERATORS
            or (name.endswith("_") and not name.startswith("_"))
            or _inplace_flag(node)
        ):
            return first if isinstance(first, fx.Node) else None
    elif node.op == "call_method":
        name = node.target
        if name.endswith("_") and not name.endswith("__") or name == "__setitem__":
            return first if isinstance(first, fx.Node) else None
    elif node.op == "call_module":
        if getattr(modules.get(node.target), "inplace", False) is True:
            return first if isinstance(first, fx.Node) else None
    return None


def value_after_writes(value: Any, *writes: Any) -> Any:
    """Graph op: ``value`` itself, read once ``writes`` (earlier nodes) have run."""
    return value


def value_at(
    node: fx.Node,
    point: fx.Node | None,
    modules: dict[str, torch.nn.Module],
    aliasing: tuple[dict[fx.Node, set[fx.Node]], list[tuple[fx.Node, fx.Node]]] | None = None,
) -> fx.Node:
    """The node holding ``node``'s tensor as it is once the graph has run up to ``point``.

    A local's value is read when its function returns: in-place ops on it before then
    (``nn.ReLU(inplace=True)`` on ``x`` in ``return self.act(x)``, ``y.add_(1)``) are
    part of it. Each such op returns the tensor it wrote, so the last one stands for
    the value. Writes that return no such node (``x[i] = v``, ``x[:, :3].mul_(-1)``)
    get a :func:`value_after_writes` node inserted after the last of them.
    ``aliasing``: :func:`alias_groups` of the graph, computed once by the caller.
    """
    if point is None or point is node:
        return node
    chain, current = {node}, node
    cursor = node.next
    while cursor.op != "root":
        target = mutated_input(cursor, modules)
        if target in chain and cursor.target not in (operator.setitem, "__setitem__"):
            chain.add(cursor)
            current = cursor
        if cursor is point:
            break
        cursor = cursor.next
    group, writes = aliasing if aliasing is not None else alias_groups(node.graph, modules)
    members = group.get(current, {current})
    others = [op for op, target in writes if target in members and op not in chain]
    if not others:
        return current
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    later = [op for op in others if order[current] < order[op] <= order[point]]
    if not later:
        return current
    last = max(later, key=order.__getitem__)
    for user in current.users:  # the same local in an outer frame: one read
        if user.target is value_after_writes and user.args == (current, last):
            return user
    with node.graph.inserting_after(last):
        read = node.graph.call_function(value_after_writes, (current, last))
    read.meta["fxcapture_read"] = True  # not a value of the model: no `%` key
    members.add(read)
    group[read] = members
    return read


def written_bases(node: fx.Node, modules: dict[str, torch.nn.Module]) -> list[fx.Node]:
    """``node`` and the nodes whose tensor it is: what an in-place op or a
    :func:`value_after_writes` read returns is its first argument's tensor."""
    bases = [node]
    while True:
        base = node.args[0] if node.target is value_after_writes else mutated_input(node, modules)
        if not isinstance(base, fx.Node) or base in bases:
            return bases
        bases.append(base)
        node = base


def _is_view(node: fx.Node, modules: dict[str, torch.nn.Module]) -> bool:
    """May ``node``'s result share memory with its first argument?"""
    if node.op == "call_method":
        return _target_name(node) in _VIEW_NAMES
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or "torch"
        return _target_name(node) in _VIEW_NAMES or module not in _KNOWN_FUNCTION_MODULES
    if node.op == "call_module":
        module = modules.get(node.target)
        # a leaf of the user's (or a library's) own class ran unseen: it may return its input
        return isinstance(module, _VIEW_MODULES) or not type(module).__module__.startswith("torch.nn")
    return False


def alias_groups(
    graph: fx.Graph, modules: dict[str, torch.nn.Module]
) -> tuple[dict[fx.Node, set[fx.Node]], list[tuple[fx.Node, fx.Node]]]:
    """Groups of nodes that may share memory, and the (in-place op, target) pairs."""
    aliasing = nx.Graph()
    writes: list[tuple[fx.Node, fx.Node]] = []
    for node in graph.nodes:
        target = mutated_input(node, modules)
        if target is not None:
            writes.append((node, target))
        if target is not None or _is_view(node, modules):
            # An in-place op returns its (mutated) input: the result aliases it too.
            for arg in node.all_input_nodes[:1]:
                aliasing.add_edge(node, arg)
    group: dict[fx.Node, set[fx.Node]] = {}
    for component in nx.connected_components(aliasing):
        for n in component:
            group[n] = component
    return group, writes


def protect_from_inplace(
    graph: fx.Graph, captured: list[fx.Node], modules: dict[str, torch.nn.Module]
) -> dict[fx.Node, fx.Node]:
    """Clone each captured node that a later in-place op overwrites.

    Returns ``{captured node: clone node}`` for the nodes that needed a copy.
    """
    group, writes = alias_groups(graph, modules)
    if not writes:
        return {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    clones: dict[fx.Node, fx.Node] = {}
    for node in dict.fromkeys(captured):
        members = group.get(node, {node})
        if any(order[op] > order[node] and target in members for op, target in writes):
            with graph.inserting_after(node):
                clones[node] = graph.call_function(torch.clone, (node,))
    return clones


def add_feature_outputs(
    graph: fx.Graph, features: dict[str, Any], keep_output: bool = True
) -> None:
    """Make ``graph`` return ``(original output or None, {key: value})``."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    original = output.args[0] if keep_output else None
    output.args = ((original, dict(features)),)
    output.type = None


def substitute(value: Any, replacements: dict[fx.Node, fx.Node]) -> Any:
    return map_aggregate(value, lambda v: replacements.get(v, v) if isinstance(v, fx.Node) else v)


def prune(graph: fx.Graph, modules: dict[str, torch.nn.Module]) -> None:
    """Remove every node the outputs do not need.

    An in-place op is needed when it writes into memory that a needed node shares
    (fx's own dead-code elimination would drop ``x.relu_()`` whose result is unused).
    """
    group, writes = alias_groups(graph, modules)
    live: set[fx.Node] = set()

    def keep(node: fx.Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.all_input_nodes)

    for node in graph.nodes:
        if node.op in ("placeholder", "output") or (
            node.op == "call_function" and node.is_impure()
        ):
            keep(node)
    grew = True
    while grew:
        grew = False
        for op, target in writes:
            if op not in live and live & group.get(target, {target}):
                keep(op)
                grew = True
    for node in reversed(graph.nodes):
        if node not in live:
            graph.erase_node(node)
    graph.lint()


__all__ = [
    "add_feature_outputs",
    "alias_groups",
    "mutated_input",
    "protect_from_inplace",
    "prune",
    "substitute",
    "value_after_writes",
    "value_at",
    "value_nodes",
    "written_bases",
]

"""In-place analysis of a graph: which nodes may share memory, and which ops write.

Computed once per graph (:class:`Aliasing`) and shared by the passes that need it:
reading a local after the writes its function made (:func:`value_at`), cloning
captured values that a later in-place op overwrites, and pruning without dropping a
write into a needed tensor.

Example::

    >>> aliasing = Aliasing(graph, dict(model.named_modules()))
    >>> aliasing.group(node)      # every node that may share node's memory
    >>> aliasing.writes           # [(in-place op, node it writes into)]
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from .._util.internals import TORCH_FUNCTION_MODULES, OpOverload
from .trace import INPLACE_FUNCTIONS

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul, operator.setitem,
}  # fmt: skip
_INPLACE_OPERATORS |= set(INPLACE_FUNCTIONS.values())  # x += y (fxcapture.core.trace)

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
_KNOWN_FUNCTION_MODULES = TORCH_FUNCTION_MODULES | {
    "operator", "builtins", "math", "fxcapture.core.trace", "fxcapture.core.aliasing",
}  # fmt: skip


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target.rpartition(".")[2]
    return getattr(node.target, "__name__", "")


@functools.lru_cache(maxsize=1024)
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


def _schema_alias(node: fx.Node, write: bool) -> fx.Node | None:
    """For an ATen op (a running trace's graph): the argument its schema says it
    writes into (``write``), or that its result is a view of."""
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        info = arg.alias_info
        if info is not None and info.is_write == write:
            if not write and not any(r.alias_info is not None for r in schema.returns):
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, fx.Node) else None
    return None


def mutated_input(node: fx.Node, modules: dict[str, torch.nn.Module]) -> fx.Node | None:
    """The node whose tensor ``node`` writes into, if it is an in-place op."""
    first = node.args[0] if node.args else None
    # an ATen op (a running trace)
    if node.op == "call_function" and isinstance(node.target, OpOverload):
        return _schema_alias(node, write=True)
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
    if node.op == "call_function" and isinstance(node.target, OpOverload):
        return _schema_alias(node, write=False) is not None
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or "torch"
        return _target_name(node) in _VIEW_NAMES or module not in _KNOWN_FUNCTION_MODULES
    if node.op == "call_module":
        module = modules.get(node.target)
        # a leaf of the user's (or a library's) own class ran unseen: it may return its input
        return isinstance(module, _VIEW_MODULES) or not type(module).__module__.startswith("torch.nn")
    return False



class Aliasing:
    """Groups of nodes that may share memory, and the (in-place op, target) pairs.

    Nodes added later (reads from :func:`value_at`) join their group with :meth:`join`.
    """

    def __init__(self, graph: fx.Graph, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules
        self.writes: list[tuple[fx.Node, fx.Node]] = []
        parent: dict[fx.Node, fx.Node] = {}

        def find(n: fx.Node) -> fx.Node:
            root = n
            while parent[root] is not root:
                root = parent[root]
            while n is not root:  # path compression
                parent[n], n = root, parent[n]
            return root

        for node in graph.nodes:
            target = mutated_input(node, modules)
            if target is not None:
                self.writes.append((node, target))
            if target is not None or _is_view(node, modules):
                # An in-place op returns its (mutated) input: the result aliases it too.
                for arg in node.all_input_nodes[:1]:
                    parent.setdefault(node, node)
                    parent.setdefault(arg, arg)
                    parent[find(node)] = find(arg)
        self._groups: dict[fx.Node, set[fx.Node]] = {}
        for n in parent:
            self._groups.setdefault(find(n), set()).add(n)
        for root, members in list(self._groups.items()):
            for n in members:
                self._groups[n] = members

    def group(self, node: fx.Node) -> set[fx.Node]:
        """Every node that may share ``node``'s memory (``{node}`` if none)."""
        return self._groups.get(node, {node})

    def join(self, node: fx.Node, like: fx.Node) -> None:
        """Put a new ``node`` into the group of ``like``."""
        members = self._groups.setdefault(like, {like})
        members.add(node)
        self._groups[node] = members

    def overwritten_after(self, node: fx.Node, order: dict[fx.Node, int]) -> bool:
        """Does an op after ``node`` write into memory ``node`` shares?"""
        members = self.group(node)
        return any(order[op] > order[node] and target in members for op, target in self.writes)


def value_at(node: fx.Node, point: fx.Node | None, aliasing: Aliasing) -> fx.Node:
    """The node holding ``node``'s tensor as it is once the graph has run up to ``point``.

    A local's value is read when its function returns: in-place ops on it before then
    (``nn.ReLU(inplace=True)`` on ``x`` in ``return self.act(x)``, ``y.add_(1)``) are
    part of it. Each such op returns the tensor it wrote, so the last one stands for
    the value. Writes that return no such node (``x[i] = v``, ``x[:, :3].mul_(-1)``)
    get a :func:`value_after_writes` node inserted after the last of them.
    """
    if point is None or point is node:
        return node
    modules = aliasing.modules
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
    members = aliasing.group(current)
    others = [op for op, target in aliasing.writes if target in members and op not in chain]
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
    aliasing.join(read, current)
    return read

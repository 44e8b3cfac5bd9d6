"""Graph passes that turn a traced model into an extractor.

Each pass takes the ``fx.Graph`` (and the graph's :class:`~.aliasing.Aliasing` where
in-place ops matter) and changes it in place, like ``torch.fx.passes``:

* :func:`protect_from_inplace` clones a captured value only if a later in-place
  op (``relu_``, ``nn.ReLU(inplace=True)``, ``x[i] = v``, ``out=``) writes into it
  or into a view of it; otherwise captured tensors are returned without a copy.
* :func:`add_feature_outputs` makes the graph return ``(output, {key: value})``.
* :func:`prune` drops everything the new outputs do not need (with the model's output
  kept, only pure ATen ops nothing uses: the masks transformers builds under tracing).

Example::

    >>> aliasing = Aliasing(graph, modules)
    >>> clones = protect_from_inplace(graph, [node], aliasing)
    >>> add_feature_outputs(graph, {"layer1": clones.get(node, node)})
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .._util.tree import children, map_nodes, registered_child
from .aliasing import Aliasing, mutated_input
from .._util.internals import OpOverload, output_spec, pytree, set_output_spec, tree_spec
from .pytrees import compilable_spec


def protect_from_inplace(
    graph: fx.Graph, captured: list[fx.Node], aliasing: Aliasing
) -> dict[fx.Node, fx.Node]:
    """Clone each captured node that a later in-place op overwrites.

    Returns ``{captured node: clone node}`` for the nodes that needed a copy.
    """
    if not aliasing.writes:
        return {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    clones: dict[fx.Node, fx.Node] = {}
    for node in dict.fromkeys(captured):
        if aliasing.overwritten_after(node, order):
            with graph.inserting_after(node):
                clones[node] = graph.call_function(torch.clone, (node,))
    return clones


def add_feature_outputs(
    graph: fx.Graph, features: dict[str, Any], keep_output: bool = True
) -> None:
    """Make ``graph`` return ``(original output or None, {key: value})``.

    A graph from ``torch.export`` returns flat outputs that its code generator
    unflattens with an output spec: the features join the flat list and the spec.
    """
    output = graph.output_node()
    output.type = None
    spec = output_spec(graph)  # export's graphs unflatten their flat outputs with it
    if spec is None:
        original = output.args[0] if keep_output else None
        with graph.inserting_before(output):
            values = {key: graph_value(graph, value) for key, value in features.items()}
        output.args = ((original, values),)
        return
    with graph.inserting_before(output):  # a dataclass is a leaf of torch's pytree: one node
        features = {key: graph_value(graph, value) for key, value in features.items()}
    flat = list(output.args[0]) if keep_output else [None]  # one leaf: None
    # compilable: transformers' Cache nodes rebuilt without importing (see .pytrees)
    out_spec = compilable_spec(spec) if keep_output else pytree.tree_structure(0)
    feature_leaves, feature_spec = pytree.tree_flatten(
        dict(features), is_leaf=lambda v: isinstance(v, fx.Node)
    )
    set_output_spec(graph, tree_spec(tuple, None, [out_spec, feature_spec]))
    output.args = (tuple(flat + feature_leaves),)


def graph_value(graph: fx.Graph, value: Any) -> Any:
    """``value`` as fx code can pass it: a namedtuple, a dataclass or a dict subclass
    (a module's return value) is rebuilt by a node calling its type."""
    parts = children(value) if not isinstance(value, fx.Node) else None
    if parts is None or parts[0] and parts[0][0][0] is registered_child:
        return value  # a registered pytree (a transformers Cache): export's codegen flattens it
    steps, items, _ = parts
    items = [graph_value(graph, v) for v in items]
    if type(value) in (tuple, list):
        return type(value)(items)
    if type(value) is dict:
        return dict(zip(value, items))
    if isinstance(value, tuple):  # a namedtuple
        return graph.call_function(type(value), tuple(items))
    # a dict subclass or a dataclass: keyword arguments
    return graph.call_function(type(value), (), {key: v for (_, key), v in zip(steps, items)})


def substitute(value: Any, replacements: dict[fx.Node, fx.Node]) -> Any:
    """``value`` with each node replaced by ``replacements[node]`` where there is one."""
    return map_nodes(lambda v: replacements.get(v, v), value)


def _needed_anyway(node: fx.Node, aliasing: Aliasing, whole_model: bool) -> bool:
    """Inputs, outputs, side effects. An ATen op (a running trace) is needed when it
    writes into the model's state or an input; its random ops (dropout), checks and
    writes into dead tensors go with the values they would make. With ``whole_model``
    (the model's output is kept) every op but a pure ATen one stays, random ops
    included: the model draws the same random numbers as it does eagerly. fxcapture's
    own reads (copies of constants, reads after writes) stay only where a value uses them."""
    if node.op in ("placeholder", "output"):
        return True
    if node.meta.get("fxcapture_read"):
        return False
    if node.op != "call_function":
        return whole_model and node.op in ("call_module", "call_method")
    if isinstance(node.target, OpOverload):  # see core.aliasing
        if whole_model and torch.Tag.nondeterministic_seeded in node.target.tags:
            return True
        target = mutated_input(node, aliasing.modules)
        return target is not None and target.op in ("get_attr", "placeholder")
    return whole_model or node.is_impure()


def prune(graph: fx.Graph, aliasing: Aliasing, whole_model: bool = False) -> None:
    """Remove every node the outputs do not need (``whole_model``: only the pure ATen
    ops, see :func:`_needed_anyway`).

    An in-place op is needed when it writes into memory that a needed node shares
    (fx's own dead-code elimination would drop ``x.relu_()`` whose result is unused).
    """
    live: set[fx.Node] = set()

    def keep(node: fx.Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.all_input_nodes)

    for node in graph.nodes:
        if _needed_anyway(node, aliasing, whole_model):
            keep(node)
    grew = True
    while grew:
        grew = False
        for op, target in aliasing.writes:
            if op not in live and live & aliasing.group(target):
                keep(op)
                grew = True
    for node in reversed(graph.nodes):
        if node not in live:
            graph.erase_node(node)
    graph.lint()

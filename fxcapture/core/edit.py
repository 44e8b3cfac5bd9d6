"""Interventions: replace intermediate values inside the graph, by the names of capture.

``capture(model, names, edit={selector: edit})`` rewrites the traced graph so that
every value a selector picks (a module output, a local variable, a graph node; the
selectors of :func:`fxcapture.capture`) goes through its edit, and everything
downstream uses what the edit returns. An edit is

* a callable ``fn(value, key) -> new value``: ``value`` is the selected value (for a
  module returning a tuple or dict, the whole structure; return one of the same
  structure), ``key`` its canonical key (``"blocks.3.attn:attn"``, ``"layer1@0"``);
  it must return the replacement and should not modify ``value`` in place;
* a tensor: a constant replacement, broadcast to the value's shape and cast to its
  dtype and device (a mean over the batch, ``mean[None]``, mean-ablates).

The edit becomes a ``call_function`` node of the graph, so the edited extractor
compiles with ``torch.compile(fullgraph=True)`` like any other. The model is never
changed: the model, or an extractor built without ``edit``, gives the original
output. A captured value that is edited is returned edited. Several edits that select
the same value apply in the order of the ``edit`` dict.

Example (zero-ablate head 2 of block 3's attention, before it multiplies ``v``)::

    >>> def zero_head(attn, key):
    ...     mask = torch.ones(attn.shape[1], 1, 1, device=attn.device)
    ...     mask[2] = 0
    ...     return attn * mask
    >>> ex = capture(vit, "blocks.3.attn:attn", edit={"blocks.3.attn:attn": zero_head})
    >>> out, feats = ex(images)   # out: the ablated model's output
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Union

import torch
import torch.fx as fx

from .._util.tree import children, map_nodes, nodes, paths
from .aliasing import Aliasing, written_bases
from .passes import graph_value, protect_from_inplace
from .records import Catalogue, NameInfo
from .select import Selector, match, unknown_selector_error

Edit = Union[Callable[[Any, str], Any], torch.Tensor]
Edits = Mapping[Selector, Edit]


# -- the run-time side: one edit applied to one value ---------------------------------
def _broadcast_constant(constant: torch.Tensor, value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the edit of {key!r} is a tensor, which can only replace a tensor, but "
            f"{key!r} is a {type(value).__name__}: pass a function fn(value, key) instead."
        )
    try:
        return torch.broadcast_to(constant.to(value), value.shape)
    except RuntimeError as e:
        raise ValueError(
            f"the tensor given to edit {key!r} has shape {tuple(constant.shape)}, which "
            f"does not broadcast to the value's shape {tuple(value.shape)}."
        ) from e


def _check_structure(new: Any, value: Any, key: str) -> None:
    if new is None:
        raise ValueError(
            f"the edit of {key!r} returned None: return the replacement value "
            "(e.g. `value * mask`) instead of modifying `value` in place."
        )
    if isinstance(value, (tuple, list)) and not (
        isinstance(new, (tuple, list)) and len(new) == len(value)
    ):
        raise ValueError(
            f"{key!r} is a {type(value).__name__} of {len(value)}, so its edit must return "
            f"a tuple or list of {len(value)} too, got {type(new).__name__}."
        )
    if isinstance(value, torch.Tensor) and isinstance(new, torch.Tensor) and new.shape != value.shape:
        raise ValueError(
            f"the edit of {key!r} changed its shape from {tuple(value.shape)} to {tuple(new.shape)}: "
            "the layers after it expect the original shape, so return a value of that shape "
            "(e.g. zero entries with a mask instead of dropping them)."
        )
    if isinstance(value, dict) and not (isinstance(new, dict) and set(new) >= set(value)):
        raise ValueError(
            f"{key!r} is a dict with keys {sorted(value)}, so its edit must return a dict "
            f"with those keys too, got {type(new).__name__}."
        )
    if not isinstance(value, (tuple, list, dict)) and children(value) is not None and type(new) is not type(value):
        raise ValueError(
            f"{key!r} is a {type(value).__name__}, so its edit must return one too "
            f"(e.g. dataclasses.replace(value, ...)), got {type(new).__name__}."
        )


def apply_edit(edit: Edit, value: Any, key: str) -> Any:
    """The replacement of ``value`` (key ``key``) under ``edit``, checked.

    The one place that gives an edit its meaning, shared by the graph and by the
    run-time fallback (forward hooks that return ``apply_edit(edit, output, key)``).

    Example::

        >>> apply_edit(lambda v, k: v * 0, torch.ones(2), "fc")
        tensor([0., 0.])
    """
    if isinstance(edit, torch.Tensor):
        return _broadcast_constant(edit, value, key)
    new = edit(value, key)
    _check_structure(new, value, key)
    return new


def check_edit(edit: Any, selector: Any) -> Edit:
    """``edit`` if it is a valid edit (a callable or a tensor), else a ``TypeError``."""
    if isinstance(edit, torch.Tensor) or callable(edit):
        return edit
    raise TypeError(
        f"the edit for {selector!r} must be a function fn(value, key) returning the new "
        f"value, or a tensor to put in its place; got {type(edit).__name__}."
    )


def _graph_function(edit: Edit, key: str) -> Callable[[Any], Any]:
    """A module-level-like function for one edit: fx puts it in the code's globals."""

    def edit_value(value: Any) -> Any:
        return apply_edit(edit, value, key)

    # The name becomes the global's name in the generated code: keep it readable.
    edit_value.__name__ = edit_value.__qualname__ = "edit_" + re.sub(r"\W", "_", key)
    return edit_value


# -- the graph side ----------------------------------------------------------------------
def resolve_edits(
    catalogue: Catalogue,
    edits: Edits,
    root: torch.nn.Module | None = None,
    leaves: set[str] = frozenset(),
) -> list[tuple[NameInfo, Edit]]:
    """``[(record, edit)]`` for every value each selector of ``edits`` selects.

    In the order of ``edits``, then execution order within one selector. A selector
    that selects nothing raises the same ``ValueError`` as an unknown capture name.
    """
    if not isinstance(edits, Mapping):
        raise TypeError(
            "edit must be a dict {selector: fn(value, key) or tensor}, "
            f"got {type(edits).__name__}"
        )
    pairs = []
    for selector, edit in edits.items():
        check_edit(edit, selector)
        found = match(catalogue, selector)
        if not found:
            if callable(selector):
                raise ValueError(f"the edit predicate {selector!r} selected no value.")
            raise unknown_selector_error(catalogue, selector, root, leaves)
        pairs += [(info, edit) for info in found]
    return pairs


def _rewire_after(node: fx.Node, new: fx.Node, position: dict[fx.Node, int]) -> None:
    """Make every user of ``node`` that runs after ``new`` use ``new`` instead."""
    start = position[new]
    node.replace_all_uses_with(
        new, delete_user_cb=lambda user: user is not new and position.get(user, -1) > start
    )


def _insertion_point(graph: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    """The node after which an edit of ``nodes`` goes: after all of them, past placeholders."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(nodes, key=order.__getitem__)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if placeholders and order[placeholders[-1]] > order[last]:
        last = placeholders[-1]
    return last


def _insert_edit(
    graph: fx.Graph, value: Any, edit: Edit, key: str, modules: dict[str, torch.nn.Module]
) -> dict[fx.Node, fx.Node]:
    """Insert one edit of ``value``; returns ``{original node: replacement node}``."""
    leaves = paths(value, fx.Node)
    if not leaves:
        raise ValueError(f"{key!r} holds no graph value to edit")
    after = _insertion_point(graph, [n for _, n in leaves])
    with graph.inserting_before(after.next):  # in order, after `after`
        edited = graph.call_function(_graph_function(edit, key), (graph_value(graph, value),))
        if isinstance(value, fx.Node):
            parts = {value: edited}
        else:  # a structure of nodes: pick each part out of the edited structure
            parts = {}
            for steps, node in leaves:
                part = edited
                for read, index in steps:
                    part = graph.call_function(read, (part, index))
                parts[node] = part
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node, part in parts.items():
        # a local after in-place writes is the tensor of an earlier node (`c` after
        # `c.relu_()`): the code after the edit uses that node
        for base in written_bases(node, modules):
            _rewire_after(base, edited if part is edited else part, position)
    return parts


def _protect_replacements(
    graph: fx.Graph, replaced: dict[fx.Node, fx.Node], modules: dict[str, torch.nn.Module]
) -> dict[fx.Node, fx.Node]:
    """Copy a replacement that a later in-place op writes into.

    An edit may return a tensor it keeps (a constant, a stored activation): the
    model's own ``out += identity`` or ``relu_`` must not write into it.
    """
    replacements = list(dict.fromkeys(replaced.values()))
    clones = protect_from_inplace(graph, replacements, Aliasing(graph, modules))
    for replacement, clone in clones.items():
        replacement.replace_all_uses_with(clone, delete_user_cb=lambda user: user is not clone)
    return {orig: clones.get(new, new) for orig, new in replaced.items()}


def apply_edits(
    graph: fx.Graph,
    catalogue: Catalogue,
    edits: Edits,
    root: torch.nn.Module,
    leaves: set[str] = frozenset(),
) -> dict[fx.Node, fx.Node]:
    """Insert the ``edits`` into ``graph``; returns ``{original node: replacement}``.

    Every user of an original node that runs after the edit now uses the
    replacement (users inside a module that returned a tuple, before its last part,
    keep the original). Called by :func:`fxcapture.core.build.build_program`.
    """
    modules = dict(root.named_modules())
    replaced: dict[fx.Node, fx.Node] = {}
    for info, edit in resolve_edits(catalogue, edits, root, leaves):
        # A value edited before (two selectors, or a module output that is also a
        # local) is edited again where it now is: edits compose in dict order.
        value = map_nodes(lambda v: replaced.get(v, v), info.value)
        parts = _insert_edit(graph, value, edit, info.key, modules)
        for original in nodes(info.value):
            current = replaced.get(original, original)
            if current in parts:
                replaced[original] = parts[current]
    replaced = _protect_replacements(graph, replaced, modules)
    graph.lint()
    return replaced


__all__ = ["Edit", "Edits", "apply_edit", "apply_edits", "check_edit", "resolve_edits"]

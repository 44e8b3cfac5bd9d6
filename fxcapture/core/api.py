"""The public entry points: :func:`capture` and :func:`list_names`."""

from __future__ import annotations

import html
from typing import Any, Callable, Iterable, Mapping

import torch

from .build import choose_trace
from .extractor import Extractor
from .records import NameInfo
from .select import Names, check_module_paths, match, unknown_selector_error
from .spec import CaptureSpec, as_call, as_module, check_concrete_args, check_example_inputs, check_leaf_paths


def capture(
    model: torch.nn.Module,
    names: Names,
    *,
    leaf_modules: Iterable[Any] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    keep_output: bool = True,
    attention: str | None = None,
    edit: dict[Any, Callable[[Any, str], Any]] | None = None,
    fallback: str = "auto",
    example_inputs: Any = None,
) -> Extractor:
    """Build an extractor that returns the model output and chosen intermediates.

    Args:
        model: the model. It is traced with ``torch.fx`` and never modified.
        names: a selector, a list of selectors, or ``{alias: selector}``. A selector
            is a module path (``"layer4"``: the value its forward returns), a local
            variable (``"attn"`` in every module, ``"blocks.3.attn:attn"`` in one,
            ``":x"`` in the root forward), a graph node (``"%add_3"``), a glob over
            those keys (``"blocks.*.attn:attn"``, ``"layer?"``) or a predicate on
            :class:`NameInfo`. A module or local producing k values in one forward
            gives keys ``key@0`` ... ``key@k-1``.
        leaf_modules: module classes or paths not to trace into.
        autowrap_functions: functions to record as single graph nodes.
        concrete_args: arguments of ``forward`` to fix while tracing (see ``torch.fx``).
        keep_output: if False, the graph is pruned after the last captured value and
            ``out`` is ``None``.
        attention: ``"weights"`` rewrites fused attention
            (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) into its
            explicit form so that the probabilities can be captured as ``attn_probs``
            (see :mod:`fxcapture.core.attention`). A selector (or edit) naming
            ``attn_probs`` turns it on by itself; otherwise the fused kernels stay.
        edit: ``{selector: fn(value, key) -> new value}``: everything downstream of
            the selected values uses what ``fn`` returns (see :mod:`fxcapture.core.edit`).
        fallback: ``"auto"``: what no tracer can follow runs eagerly and its values
            are captured at run time (hooks, a profile function; see
            :mod:`fxcapture.core.runtime`); ``"never"``: raise the trace error;
            ``"always"``: capture everything at run time.
        example_inputs: inputs like the real ones (a tuple of positional arguments,
            a dict of keyword arguments, or one tensor). Where torch.fx cannot trace
            the model exactly (transformers models, buffer updates in Python, random
            tensors, ``no_grad``/``autocast`` blocks, custom autograd functions), the
            model is traced by running it (``torch.export``); without
            ``example_inputs`` that happens on the first call.

    Returns:
        an :class:`Extractor` (an ``nn.Module`` sharing the model's parameters):
        ``out, feats = extractor(*args, **kwargs)``, with ``out`` exactly
        ``model(*args, **kwargs)`` and ``feats`` ordered as ``extractor.names``.

    Example::

        >>> model = torchvision.models.resnet18()
        >>> extractor = capture(model, ["layer4", "layer1.0.relu@0"])
        >>> out, feats = extractor(torch.randn(2, 3, 224, 224))
        >>> feats["layer4"].shape
        torch.Size([2, 512, 7, 7])
    """
    model = as_module(model, "capture")
    check_example_inputs(example_inputs)
    spec = CaptureSpec(
        names,
        leaf_modules=leaf_modules,
        autowrap_functions=autowrap_functions,
        concrete_args=concrete_args,
        keep_output=keep_output,
        attention=attention,
        edit=edit,
        fallback=fallback,
    )
    check_concrete_args(model, spec)
    check_leaf_paths(model, spec)
    check_module_paths(names, model)  # before any trace: a misspelled path fails at once
    if isinstance(edit, Mapping):
        check_module_paths(list(edit), model)
    return Extractor(model, spec, example_inputs)


class NameTable(list):
    """A list of :class:`NameInfo` that shows itself as an aligned table: ``print(table)``
    in a script, the bare value in a REPL, an HTML table in a notebook.

    Example::

        >>> table = list_names(model, "layer4*")
        >>> table.keys()[:2]
        ['layer4', 'layer4.0']
    """

    _HEADER = ("key", "kind", "module", "op")

    def _rows(self) -> list[tuple[str, str, str, str]]:
        return [(r.key, r.kind, r.module or "(root)", str(r.op)) for r in self]

    def __str__(self) -> str:
        rows = [self._HEADER] + self._rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._HEADER))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{self}\n({len(self)} names)"

    def _repr_html_(self) -> str:
        cell = lambda tag, text: f"<{tag}>{html.escape(text)}</{tag}>"  # noqa: E731
        head = "".join(cell("th", h) for h in self._HEADER)
        body = "".join("<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in self._rows())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def keys(self) -> list[str]:
        return [r.key for r in self]


def list_names(
    model: torch.nn.Module,
    pattern: str | None = None,
    *,
    kinds: Iterable[str] = ("module", "local", "node"),
    leaf_modules: Iterable[Any] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    attention: str | None = None,
    example_inputs: Any = None,
    how_to_list: str | None = None,
) -> NameTable:
    """Every capturable name of ``model``, in execution order.

    A ``pattern`` naming ``attn_probs`` turns on ``attention="weights"`` (as in
    :func:`capture`); a pattern that matches nothing raises ``ValueError`` with the
    closest keys (``how_to_list`` is how that message says to list them all).

    Example::

        >>> print(list_names(model, "blocks.0.*", kinds=["local"]))
        key                  kind   module         op
        ...
    """
    model = as_module(model, "list_names")
    check_example_inputs(example_inputs)
    spec = CaptureSpec(() if pattern is None else pattern, leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions, concrete_args=concrete_args,
                       attention=attention)  # fmt: skip
    check_concrete_args(model, spec)
    check_leaf_paths(model, spec)
    if pattern is not None:
        check_module_paths(pattern, model, how_to_list)
    example = as_call(example_inputs) if example_inputs is not None else None
    trace = choose_trace(model, spec.replace(names=()), example, listing=True)
    if trace is None:
        raise ValueError(
            "torch.fx cannot trace this model exactly, so its names come from running it: "
            "pass example_inputs= (a tuple of arguments, a dict of keyword arguments or "
            "one tensor), e.g. list_names(model, example_inputs={'input_ids': ids})."
        )
    catalogue = trace.catalogue
    if catalogue is None:
        raise ValueError(
            "no tracer can follow this model, so its names are known only at run time: "
            "capture(model, names) and call it once; extractor.explain() then lists them "
            f"({trace.untraced.get('')})."
        )
    kinds = set(kinds)
    found = catalogue.records if pattern is None else match(catalogue, pattern)
    table = NameTable(r for r in found if r.kind in kinds)
    if pattern is not None and not table:
        raise unknown_selector_error(catalogue, pattern, model, how_to_list=how_to_list)
    return table


__all__ = ["capture", "list_names", "NameInfo", "NameTable"]

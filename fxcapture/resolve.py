"""Stage 3: match the user's selectors against the catalogue.

Selectors (see :func:`fxcapture.capture`):

* a module path, ``"layer4"`` (every call of the module, ``"layer4@1"`` for one);
* a qualified local, ``"blocks.3.attn:attn"``, or a bare local name, ``"attn"``
  (that local in every module that has it);
* a graph node, ``"%add_3"`` (or ``"add_3"`` when no module or local has that name);
* a glob over keys, ``"blocks.*.attn:attn"``, ``"layer?"``;
* a callable ``predicate(info: NameInfo) -> bool``.

Example::

    >>> resolve(catalogue, {"a": "attn"})  # -> {"a@0": info, "a@1": info, ...}
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from .catalogue import LOCAL, MODULE, NODE, Catalogue, NameInfo

Selector = Union[str, Callable[[NameInfo], bool]]
Names = Union[Selector, Sequence[Selector], Mapping[str, Selector]]

_GLOB_CHARS = set("*?[")


class SelectorPairs(list):
    """An already split ``[(alias, selector)]`` list (see :func:`selector_pairs`)."""


def _is_glob(selector: str) -> bool:
    return any(c in _GLOB_CHARS for c in selector)


def match(catalogue: Catalogue, selector: Selector) -> list[NameInfo]:
    """All records a single selector selects, in execution order."""
    if callable(selector):
        return [r for r in catalogue if selector(r)]
    if not isinstance(selector, str):
        raise TypeError(f"a selector must be a string or a callable, got {selector!r}")

    if selector in catalogue.by_key and "@" in selector:
        return [catalogue.by_key[selector]]
    base = catalogue.aliases.get(selector, selector)
    if base in catalogue.by_base:
        return list(catalogue.by_base[base])

    if _is_glob(selector):
        bare = not any(c in selector for c in ".:%")
        found = []
        for r in catalogue:
            if r.kind == NODE and not selector.startswith("%"):
                continue
            if fnmatch.fnmatchcase(r.base, selector) or (
                bare and r.kind == LOCAL and fnmatch.fnmatchcase(r.variable, selector)
            ):
                found.append(r)
        return found

    if ":" not in selector and "." not in selector:
        found = [r for r in catalogue if r.kind == LOCAL and r.variable == selector]
        if found:
            return found
        node = catalogue.by_key.get(f"%{selector}")
        if node is not None:
            return [node]
    return []


def _unknown_selector_error(
    catalogue: Catalogue, selector: Selector, root: torch.nn.Module | None, leaves: set[str]
) -> ValueError:
    if callable(selector):
        return ValueError(
            f"the predicate {selector!r} selected no value; "
            "use fxcapture.list_names(model) to see what there is."
        )
    hint = ""
    if root is not None and not _is_glob(selector):
        path = selector.partition(":")[0].partition("@")[0]
        modules = dict(root.named_modules())
        inside = [leaf for leaf in leaves if leaf and path.startswith(leaf + ".")]
        if inside:
            hint = (
                f" '{path}' is inside the leaf module '{inside[0]}', which is not traced "
                f"into: capture '{inside[0]}' instead, or trace through it."
            )
        elif path in modules and ":" not in selector:
            hint = f" The module '{path}' exists but its forward is not called by the model."
    candidates = {r.base for r in catalogue if r.kind != NODE}
    candidates |= {r.variable for r in catalogue if r.kind == LOCAL}
    candidates |= {r.key for r in catalogue if r.kind == NODE}
    candidates |= set(catalogue.aliases)
    close = difflib.get_close_matches(selector, sorted(candidates), n=5, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    what = "matches nothing" if _is_glob(selector) else "is not a capturable name"
    return ValueError(
        f"{selector!r} {what}.{hint}{suggestion} "
        f"Use fxcapture.list_names(model) to list all {len(catalogue)} names "
        "(module paths, 'module:local' variables and '%node' graph nodes)."
    )


def selector_pairs(names: Names) -> list[tuple[str | None, Selector]]:
    """``names`` as a list of ``(alias or None, selector)``."""
    if isinstance(names, str) or callable(names):
        return [(None, names)]
    if isinstance(names, Mapping):
        return [(str(alias), sel) for alias, sel in names.items()]
    if isinstance(names, Sequence):
        return [(None, sel) for sel in names]
    raise TypeError(
        f"names must be a string, a list of selectors or a dict {{alias: selector}}, got {names!r}"
    )


def resolve(
    catalogue: Catalogue,
    names: Names,
    root: torch.nn.Module | None = None,
    leaves: set[str] = frozenset(),
) -> dict[str, NameInfo]:
    """Map each output key to the record it captures.

    Plain selectors give canonical keys; for ``{alias: selector}`` the key is the
    alias, or ``alias@i`` when the selector matches several values. Keys come in
    execution order, whatever the order of the selectors.
    """
    pairs = names if isinstance(names, SelectorPairs) else selector_pairs(names)
    resolved: dict[str, NameInfo] = {}
    for alias, selector in pairs:
        found = match(catalogue, selector)
        if not found:
            raise _unknown_selector_error(catalogue, selector, root, leaves)
        if alias is None:
            for r in found:
                resolved.setdefault(r.key, r)
        elif len(found) == 1:
            resolved[alias] = found[0]
        else:
            for i, r in enumerate(found):
                resolved[f"{alias}@{i}"] = r
    position = {r.key: i for i, r in enumerate(catalogue)}  # execution order
    return dict(sorted(resolved.items(), key=lambda item: position[item[1].key]))

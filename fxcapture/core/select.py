"""Stage 3: match the user's selectors against the catalogue.

Selectors (see :func:`fxcapture.capture`):

* a module path, ``"layer4"`` (every call of the module, ``"layer4@1"`` for one);
* a qualified local, ``"blocks.3.attn:attn"``, or a bare local name, ``"attn"``
  (that local in every module that has it);
* a graph node, ``"%add_3"`` (or ``"add_3"`` when no module or local has that name);
* a glob over keys: ``*`` and ``?`` within one component of the key (never across
  ``.``, ``:`` or ``@``), ``**`` across them: ``"blocks.*"`` (the blocks),
  ``"blocks.*.attn:attn"``, ``"layer?"``, ``"blocks.**:attn"``;
* a callable ``predicate(info: NameInfo) -> bool``.

Example::

    >>> resolve(catalogue, {"a": "attn"})  # -> {"a@0": info, "a@1": info, ...}
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from .records import LOCAL, NODE, Catalogue, NameInfo

PROBS_NAMES = ("attn_probs", "attn_probs_mean")

Selector = Union[str, Callable[[NameInfo], bool]]
Names = Union[Selector, Sequence[Selector], Mapping[str, Selector]]

_GLOB_CHARS = set("*?[")
# a selector asking for attention probabilities: hint at fused attention when missing
_ATTENTION_WORDS = ("attn", "attention")


class UnknownSelectorError(ValueError):
    """A selector that selects nothing; ``.selector`` is the selector.

    Example::

        >>> try: capture(resnet18(), "layr4")
        ... except UnknownSelectorError as err: err.selector
        'layr4'
    """

    def __init__(self, selector: Any, message: str) -> None:
        super().__init__(message)
        self.selector = selector


class SelectorPairs(list):
    """An already split ``[(alias, selector)]`` list (see :func:`selector_pairs`)."""


def is_glob(selector: Any) -> bool:
    """Is ``selector`` a glob pattern (``*``, ``**``, ``?``, ``[...]``)?"""
    return isinstance(selector, str) and any(c in _GLOB_CHARS for c in selector)


@functools.lru_cache(maxsize=256)
def glob_regex(pattern: str) -> re.Pattern:
    """A shell-style glob over keys as a regex: ``*`` and ``?`` stay within one
    component (they never cross ``.``, ``:`` or ``@``), ``**`` crosses them.

    Example::

        >>> bool(glob_regex("blocks.*").match("blocks.3"))
        True
        >>> bool(glob_regex("blocks.*").match("blocks.3.attn"))
        False
        >>> bool(glob_regex("blocks.**").match("blocks.3.attn:attn"))
        True
    """
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.:@]*")
        elif c == "?":
            out.append(r"[^.:@]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(pattern: str, key: str) -> bool:
    """Does the key match the glob (see :func:`glob_regex`)?"""
    return glob_regex(pattern).match(key) is not None


def match_record(info: NameInfo, selector: Selector, catalogue: Catalogue | None = None) -> bool:
    """Does ``selector`` select one record (the rules of :func:`match`)?"""
    if callable(selector):
        return bool(selector(info))
    if not isinstance(selector, str):
        raise TypeError(f"a selector must be a string or a callable, got {selector!r}")
    aliases = catalogue.aliases if catalogue is not None else {}
    if "@" in selector and selector == info.key:
        return True
    base = aliases.get(selector, selector)
    if base == info.base:
        return True
    if is_glob(selector):
        if info.kind == NODE and not selector.startswith("%"):
            return False
        bare = not any(c in selector for c in ".:%")
        return glob_match(selector, info.base) or (
            bare and info.kind == LOCAL and glob_match(selector, info.variable)
        )
    if ":" not in selector and "." not in selector:
        return (info.kind == LOCAL and info.variable == selector) or (
            info.kind == NODE and info.key == f"%{selector}"
        )
    return False


def match(catalogue: Catalogue, selector: Selector) -> list[NameInfo]:
    """All records a single selector selects, in execution order.

    A bare name (``"attn"``) selects that local in every module; when no local has
    the name, the graph node ``%attn``. A key with ``@i`` selects one call.
    """
    if callable(selector):
        return [r for r in catalogue if selector(r)]
    if not isinstance(selector, str):
        raise TypeError(f"a selector must be a string or a callable, got {selector!r}")
    if selector in catalogue.by_key and "@" in selector:
        return [catalogue.by_key[selector]]
    base = catalogue.aliases.get(selector, selector)
    if base in catalogue.by_base:
        return list(catalogue.by_base[base])
    found = [r for r in catalogue if match_record(r, selector, catalogue)]
    if not is_glob(selector) and ":" not in selector and "." not in selector:
        locals_ = [r for r in found if r.kind == LOCAL]
        return locals_ or found
    return found


# op names of run-time records (function names) that compute fused attention
_FUSED_OPS = ("scaled_dot_product_attention", "sdpa", "flash_attention", "flex_attention")


def fused_attention_sites(catalogue: Catalogue, root: torch.nn.Module | None) -> list[str]:
    """Where the model computes attention without materialising the map: fused
    ``F.scaled_dot_product_attention`` graph nodes, run-time sdpa helpers (transformers),
    modules with ``fused_attn=True`` (timm) and ``nn.MultiheadAttention``.

    Example::

        >>> fused_attention_sites(catalogue, vit)[:1]
        ['blocks.0.attn (Attention, fused_attn=True)']
    """
    sites: dict[str, str] = {}
    for r in catalogue:
        op = str(r.op)
        if any(name in op for name in _FUSED_OPS):
            sites.setdefault(r.module, op.rpartition(" ")[2])
    if root is not None:
        for path, module in root.named_modules():
            if getattr(module, "fused_attn", False) is True:
                sites.setdefault(path, f"{type(module).__name__}, fused_attn=True")
            elif isinstance(module, torch.nn.MultiheadAttention):
                sites.setdefault(path, "MultiheadAttention")
    return [f"{path or '(root)'} ({how})" for path, how in sites.items()]


def _attention_hint(selector: str, catalogue: Catalogue, root: torch.nn.Module | None) -> str:
    if not any(word in selector for word in _ATTENTION_WORDS) or selector.endswith(PROBS_NAMES):
        return ""
    sites = fused_attention_sites(catalogue, root)
    if not sites:
        return ""
    more = f" and {len(sites) - 2} more" if len(sites) > 2 else ""
    return (
        f" The model computes attention with a fused kernel ({', '.join(sites[:2])}{more}), "
        "so the attention map never exists as a tensor: capture 'attn_probs' instead "
        "(the probabilities of every attention layer, e.g. '<module>:attn_probs'), which "
        "computes those layers explicitly."
    )


def _module_path(selector: Any) -> str | None:
    """The module path an exact selector names (``"blocks.0"``, ``"layer1.0.relu@1"``);
    ``None`` for locals, graph nodes, globs, bare names and predicates."""
    if not isinstance(selector, str) or is_glob(selector) or any(c in selector for c in ":%"):
        return None
    path = selector.partition("@")[0]
    return path if "." in path else None


def _prefix_hint(path: str, modules: Mapping[str, Any]) -> str:
    """The module ``path`` meant when it carries a prefix the model lacks (``transformer.h.1``
    on a base model: ``h.1``) or lacks one it has (``h.1`` on a model with a head)."""
    parts = path.split(".")
    dropped = [".".join(parts[i:]) for i in range(1, len(parts)) if ".".join(parts[i:]) in modules]
    added = sorted((m for m in modules if m.endswith("." + path)), key=len)
    close = (dropped + added)[:3]
    if not close:
        return ""
    return f" Did you mean {', '.join(map(repr, close))}? (the same module under another prefix)"


def check_module_paths(names: Names, root: torch.nn.Module, how_to_list: str | None = None) -> None:
    """Refuse, before any trace, an exact module path that is not a submodule of ``root``
    (a misspelling, a prefix of another model class): the cheap half of selection.

    Example::

        >>> check_module_paths(["layer4", "layr1.0"], resnet18())
        ValueError: 'layr1.0' is not a module of ResNet. Did you mean 'layer1.0'? ...
    """
    modules = dict(root.named_modules(remove_duplicate=False))
    for _, selector in selector_pairs(names):
        path = _module_path(selector)
        if path is None or path in modules:
            continue
        hint = _prefix_hint(path, modules)
        owner, _, attr = path.rpartition(".")
        if not hint and owner in modules and attr in dict(modules[owner].named_parameters(recurse=False)) | dict(
            modules[owner].named_buffers(recurse=False)
        ):
            hint = f" It is a tensor the model holds, not one it computes: capture the module {owner!r}."
        if not hint:
            close = difflib.get_close_matches(path, list(modules), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownSelectorError(
            selector,
            f"{selector!r} is not a module of {type(root).__name__}.{hint} Use "
            f"{how_to_list or HOW_TO_LIST.get()} to list every capturable name.",
        )


def _path_hint(selector: str, catalogue: Catalogue, root: torch.nn.Module, leaves) -> str:
    """Why a module path in ``selector`` gives nothing: inside a leaf, or did not run."""
    path = selector.partition(":")[0].partition("@")[0]
    modules = dict(root.named_modules())
    if path and path not in modules and "." in path:
        return _prefix_hint(path, modules)
    inside = [leaf for leaf in leaves if leaf and path.startswith(leaf + ".")]
    if inside:
        leaf = modules.get(inside[0])
        if leaf is not None and type(leaf).__module__.startswith("torch.nn"):
            probs = (
                f", or its attention probabilities '{inside[0]}.**:attn_probs'"
                if any(isinstance(m, torch.nn.MultiheadAttention) for m in leaf.modules())
                else ""
            )
            return (
                f" '{path}' is inside '{inside[0]}' ({type(leaf).__name__}), a torch.nn module "
                f"that runs as one op: capture '{inside[0]}' instead{probs}."
            )
        return (
            f" '{path}' is inside '{inside[0]}', which runs as one op (a leaf module): "
            f"capture '{inside[0]}' instead, or leave it out of leaf_modules."
        )
    if path and path in modules and not any(r.module == path for r in catalogue):
        return (
            f" The module '{path}' exists but did not run on the traced input "
            "(its forward was not called)."
        )
    return ""


# How an error tells the user to list every name; the CLI sets "fxcapture names MODEL".
HOW_TO_LIST: contextvars.ContextVar[str] = contextvars.ContextVar(
    "fxcapture_how_to_list", default="fxcapture.list_names(model)"
)


def unknown_selector_error(
    catalogue: Catalogue,
    selector: Selector,
    root: torch.nn.Module | None = None,
    leaves: set[str] = frozenset(),
    how_to_list: str | None = None,
) -> "UnknownSelectorError":
    """An :class:`UnknownSelectorError` saying why ``selector`` selects nothing, with close keys.

    ``how_to_list`` defaults to :data:`HOW_TO_LIST` (``fxcapture.list_names(model)``).
    """
    how_to_list = how_to_list or HOW_TO_LIST.get()
    if callable(selector):
        return UnknownSelectorError(
            selector,
            f"the predicate {selector!r} selected no value; "
            f"use {how_to_list} to see what there is."
        )
    hint = ""
    if root is not None and not is_glob(selector):
        hint = _path_hint(selector, catalogue, root, leaves)
    if isinstance(selector, str):
        hint += _attention_hint(selector, catalogue, root)
    candidates = {r.base for r in catalogue if r.kind != NODE}
    candidates |= {r.variable for r in catalogue if r.kind == LOCAL}
    candidates |= {r.key for r in catalogue if r.kind == NODE}
    candidates |= set(catalogue.aliases) | catalogue.unselected
    candidates |= {base.rpartition(":")[2] for base in catalogue.unselected}
    close = difflib.get_close_matches(selector, sorted(candidates), n=5, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    what = "matches nothing" if is_glob(selector) else "is not a capturable name"
    return UnknownSelectorError(
        selector,
        f"{selector!r} {what}.{hint}{suggestion} "
        f"Use {how_to_list} to list every name "
        "(module paths, 'module:local' variables and '%node' graph nodes)."
    )


def wanted_locals(selectors: Iterable[Selector]) -> Callable[[str], bool] | None:
    """Which local variables ``selectors`` can select, as a test of the variable's name;
    ``None`` when any local may be (a predicate, a ``**`` glob). A tracer keeps the values
    of the others out of its graph (they stay listed by name, see ``Catalogue.unselected``).

    Example::

        >>> wanted = wanted_locals(["layer4", "blocks.*:attn", "q*"])
        >>> wanted("attn"), wanted("qkv"), wanted("x")
        (True, True, False)
    """
    exact: set[str] = set()
    patterns: list[re.Pattern] = []
    for selector in selectors:
        if not isinstance(selector, str) or "**" in selector:
            return None
        if selector.startswith("%") or (":" not in selector and "." in selector):
            continue  # a graph node or a module path
        name = selector.rpartition(":")[2].partition("@")[0]
        if is_glob(name):
            patterns.append(glob_regex(name))
        else:
            exact.add(name)
    return lambda name: name in exact or any(p.match(name) for p in patterns)


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
            raise unknown_selector_error(catalogue, selector, root, leaves)
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

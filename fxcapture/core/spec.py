"""What :func:`fxcapture.capture` is asked for, in one frozen value.

:class:`CaptureSpec` is the single description of a capture request: the public
functions build one and every stage reads it. A spec checks its own options, so
that a bad option fails at once with a message naming it.

Example::

    >>> spec = CaptureSpec(["attn", "layer4"], leaf_modules=[MyBlock])
    >>> spec.with_names(["layer1"]).names
    ['layer1']
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
from typing import Any, Callable, Mapping

import torch

from .._util.tree import leaves
from .attention import check_mode
from .select import PROBS_NAMES, Names, glob_match, is_glob, selector_pairs

FALLBACKS = ("auto", "never", "always")
INPUT = "<graph input>"  # an optional argument given a tensor: a graph input, not a constant


class CaptureError(ValueError):
    """A capture request that cannot be met as asked; the message says what to change."""


class TraceFailure(RuntimeError):
    """torch.fx could not trace the model and ``fallback="never"`` was asked for."""


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """Everything :func:`fxcapture.capture` was asked for, to trace again on demand.

    See :func:`fxcapture.capture` for the meaning of each field.
    """

    names: Names
    leaf_modules: tuple = ()
    autowrap_functions: tuple = ()
    concrete_args: dict[str, Any] | None = None
    keep_output: bool = True
    attention: str | None = None  # "weights": decompose fused attention (core.attention)
    edit: Any = None  # {selector: fn(value, key)} (core.edit)
    fallback: str = "auto"
    # per call pattern: ((name, value) or (name, INPUT)) for optional arguments that a
    # call gives a value other than their default (see Extractor._specialization)
    specialization: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        object.__setattr__(self, "autowrap_functions", tuple(self.autowrap_functions))
        if self.fallback not in FALLBACKS:
            raise CaptureError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.attention is not None:
            check_mode(self.attention)
        elif asks_for_probabilities(self.names) or (
            isinstance(self.edit, Mapping) and asks_for_probabilities([s for s in self.edit if isinstance(s, str)])
        ):
            object.__setattr__(self, "attention", "weights")
        for leaf in self.leaf_modules:
            if not isinstance(leaf, (type, str)):
                raise CaptureError(
                    f"leaf_modules entries must be module classes or module paths, got {leaf!r}"
                )
        for fn in self.autowrap_functions:
            if not callable(fn):
                raise CaptureError(f"autowrap_functions entries must be functions, got {fn!r}")
        if self.concrete_args is not None and not isinstance(self.concrete_args, Mapping):
            raise CaptureError(
                f"concrete_args must be a dict {{argument name: value}}, got {self.concrete_args!r}"
            )
        if self.edit is not None and not isinstance(self.edit, Mapping):
            raise CaptureError(
                "edit must be a dict {selector: fn(value, key) or tensor}, "
                f"got {type(self.edit).__name__}"
            )

    def replace(self, **changes: Any) -> "CaptureSpec":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _local_part(selector: str) -> str | None:
    """The part of a selector that is matched against local variable names, if any."""
    if ":" in selector:
        return selector.rpartition(":")[2].partition("@")[0]
    if "." not in selector and "%" not in selector:
        return selector.partition("@")[0]  # a bare local name (or bare glob)
    if "**" in selector:  # crosses components: may end in ':attn_probs'
        return re.split(r"[.:@]", selector)[-1]
    return None


def asks_for_probabilities(names: Any) -> bool:
    """Does a string selector name ``attn_probs``/``attn_probs_mean``, or a glob that
    could match them? Then fused attention must be made explicit (``attention="weights"``).

    Example::

        >>> asks_for_probabilities(["layer4", "blocks.3.attn:attn_probs"])
        True
        >>> asks_for_probabilities("blocks.*.attn:attn")
        False
    """
    try:
        pairs = selector_pairs(names)
    except TypeError:
        return False  # a bad ``names`` is reported where it is resolved
    for _, selector in pairs:
        if not isinstance(selector, str):
            continue
        local = _local_part(selector)
        if local is None:
            continue
        if local in PROBS_NAMES or (is_glob(local) and any(glob_match(local, p) for p in PROBS_NAMES)):
            return True
    return False


class FunctionModule(torch.nn.Module):
    """Holds a plain function so that it can be captured like a model."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def as_module(model: Any, caller: str = "capture") -> torch.nn.Module:
    """``model`` itself, or a :class:`FunctionModule` holding a plain function; a clear
    ``TypeError`` (naming ``caller``) for a class, a name or a path, or anything else.

    Example::

        >>> as_module(torchvision.models.resnet18, "extract")   # the constructor, not a model
        TypeError: extract() got the function resnet18, which builds a model ...
    """
    if isinstance(model, torch.nn.Module):
        return model
    if isinstance(model, type):
        raise TypeError(
            f"{caller}() got the class {model.__name__}, not a model: build one first, "
            f"e.g. {caller}({model.__name__}(...), ...)"
        )
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"{caller}() got the {type(model).__name__} {str(model)!r}, not a model: build the model "
            "in Python first (torchvision.models.resnet18(), transformers.AutoModel.from_pretrained(path)); "
            "the command line builds models by name (fxcapture extract --model torchvision:resnet18)"
        )
    if callable(model):
        return FunctionModule(model)
    raise TypeError(f"{caller}() needs an nn.Module or a function, got {type(model).__name__}")


def as_call(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of example inputs: a tuple is the positional arguments, a dict
    the keyword arguments, anything else the one positional argument."""
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return (example_inputs,), {}


def check_example_inputs(example_inputs: Any) -> None:
    """``example_inputs`` must hold a tensor: one tensor, a tuple of arguments or a dict of
    keyword arguments (a string, a number or a numpy array is refused by name)."""
    if example_inputs is None or leaves(example_inputs):
        return
    hint = ", convert it with torch.from_numpy" if type(example_inputs).__module__ == "numpy" else ""
    raise CaptureError(
        f"example_inputs holds no tensor (got {type(example_inputs).__name__}{hint}): give one tensor, a "
        "tuple of positional arguments (x,) or a dict of keyword arguments {'input_ids': ids}"
    )


def forward_function(model: torch.nn.Module) -> Callable:
    """The function whose signature and code a trace follows."""
    return model.fn if isinstance(model, FunctionModule) else model.forward


def traced_root(model: torch.nn.Module) -> torch.nn.Module | Callable:
    """What torch.fx traces: the model, or a plain function where ``forward`` takes no
    ``self`` (a :class:`FunctionModule`, a ``@staticmethod forward``), since fx would
    pass the module as its first argument."""
    if isinstance(model, FunctionModule) or isinstance(inspect.getattr_static(type(model), "forward", None), staticmethod):
        return forward_function(model)
    return model


def constant_defaults(model: torch.nn.Module) -> tuple[list[str], dict[str, Any]]:
    """``forward``'s parameter names, in the order of the graph's inputs (keyword-only
    ones last, as fx makes them), and those with a constant default.

    Returns ``([], {})`` for a forward with ``*args``/``**kwargs`` (fx cannot bind
    those by name).

    Example::

        >>> constant_defaults(model)  # def forward(self, x, mask=None, *, scale=2.0)
        (['x', 'mask', 'scale'], {'mask': None, 'scale': 2.0})
    """
    try:
        parameters = list(inspect.signature(forward_function(model)).parameters.values())
    except (TypeError, ValueError):
        return [], {}
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return [], {}
    defaults = {
        p.name: p.default
        for p in parameters
        if p.default is not p.empty
        and (p.default is None or type(p.default) in (bool, int, float, str))
    }
    return [p.name for p in parameters], defaults


def check_concrete_args(model: torch.nn.Module, spec: CaptureSpec) -> None:
    """Every ``concrete_args`` entry must name a parameter of ``forward``."""
    if not spec.concrete_args:
        return
    try:
        known = set(inspect.signature(forward_function(model)).parameters)
    except (TypeError, ValueError):
        return
    unknown = sorted(set(spec.concrete_args) - known)
    if unknown:
        raise CaptureError(
            f"concrete_args names {unknown}, which forward() does not take; "
            f"its parameters are {sorted(known)}"
        )


def check_leaf_paths(model: torch.nn.Module, spec: CaptureSpec) -> None:
    """Every ``leaf_modules`` path must name a submodule of the model."""
    paths = [leaf for leaf in spec.leaf_modules if isinstance(leaf, str)]
    if not paths:
        return
    modules = dict(model.named_modules())
    for path in paths:
        if path not in modules:
            close = difflib.get_close_matches(path, list(modules), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise CaptureError(f"leaf_modules names {path!r}, which is not a submodule of the model.{hint}")

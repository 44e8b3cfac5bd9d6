"""Every use of private torch and CPython machinery, in one place.

fxcapture leans on a few things torch does not promise: the pytree module, the output
spec of an exported graph's code generator, export's operators for ``torch.no_grad()``
and ``torch.autocast`` regions, the hook dicts of ``nn.Module``, the code objects of the
grad-mode context managers, and frame watching (``sys.settrace``, ``sys.monitoring``).
Each is reached only through this module; each function names the torch version it was
checked on, and ``tests/core/test_internals.py`` pins each assumption, so that a torch
that moves fails those tests (and, where a wrong answer would follow,
:class:`InternalsChanged` at run time) instead of giving missing values or wrong
gradients.

Example::

    >>> spec = output_spec(exported.module().graph)   # the unflattening spec of its outputs
    >>> [op.__name__ for op in region_ops()]
    ['wrap_with_set_grad_enabled', 'wrap_with_autocast']
"""

from __future__ import annotations

import importlib
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.modules.module as _module
import torch.utils._pytree as pytree  # the module export flattens inputs and outputs with (torch 2.14.1)
from torch.fx import _symbolic_trace

CHECKED_ON = "2.14.1"  # the torch version every assumption below was checked on


class InternalsChanged(RuntimeError):
    """Private torch machinery fxcapture relies on is not what it was on :data:`CHECKED_ON`."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"fxcapture relies on {what} (checked on torch {CHECKED_ON}); this torch "
            f"({torch.__version__}) differs. Use torch {CHECKED_ON}, or report it to fxcapture "
            "with both versions."
        )


# -- pytrees ---------------------------------------------------------------------------
# ``pytree`` (re-exported): tree_flatten / tree_unflatten / tree_map / register_pytree_node /
# TreeSpec / SUPPORTED_NODES, export's own container walk (torch 2.14.1).
OpOverload = torch._ops.OpOverload  # the type of ATen ops in an exported graph (torch 2.14.1)


def tree_spec(kind: type, context: Any, children: list) -> pytree.TreeSpec:
    """A pytree spec built by hand: ``TreeSpec(type, context, children)`` (torch 2.14.1)."""
    return pytree.TreeSpec(kind, context, children)


def flatten_fn(kind: type) -> Callable:
    """The flatten function registered for pytree node type ``kind`` (torch 2.14.1)."""
    return pytree.SUPPORTED_NODES[kind].flatten_fn


def unflatten_fn(kind: type) -> Callable:
    """The unflatten function registered for pytree node type ``kind`` (torch 2.14.1)."""
    return pytree.SUPPORTED_NODES[kind].unflatten_fn


# -- graphs ----------------------------------------------------------------------------
def output_spec(graph: fx.Graph) -> pytree.TreeSpec | None:
    """The spec unflattening the outputs of an exported (unlifted) graph, ``None`` for a
    plain fx graph. An exported graph's code generator is a ``_PyTreeCodeGen`` holding
    ``pytree_info.out_spec`` (torch 2.14.1); one without it raises instead of returning a
    graph whose outputs would be unflattened with the wrong spec."""
    codegen = graph._codegen
    if type(codegen) is fx.graph.CodeGen:
        return None
    info = getattr(codegen, "pytree_info", None)
    if info is None or not hasattr(info, "out_spec"):
        raise InternalsChanged("an exported graph's code generator holding pytree_info.out_spec")
    return info.out_spec


def set_output_spec(graph: fx.Graph, spec: pytree.TreeSpec) -> None:
    """Make an exported graph unflatten its outputs with ``spec`` (torch 2.14.1)."""
    output_spec(graph)  # checks the code generator
    graph._codegen.pytree_info = graph._codegen.pytree_info._replace(out_spec=spec)


def region_ops() -> tuple[Any, ...]:
    """The higher-order ops non-strict export wraps ``torch.no_grad()`` /
    ``torch.set_grad_enabled`` and ``torch.autocast`` regions into; the values made
    inside live in their subgraphs (torch 2.14.1). Raises if torch no longer has them."""
    names = ("wrap_with_set_grad_enabled", "wrap_with_autocast")
    ops = tuple(getattr(torch.ops.higher_order, name, None) for name in names)
    if None in ops:
        raise InternalsChanged(f"export's region ops torch.ops.higher_order.{{{', '.join(names)}}}")
    return ops


def export_quietly(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> Any:
    """``torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=...)`` without
    its print of a failed attempt's partial graph to ``sys.stderr``.

    ``torch.export.export`` runs ``_export_for_training`` (torch 2.14.1: the training-IR
    path it takes for ``pre_dispatch=True``), whose logging wrapper prints
    ``error.partial_fx_graph`` with ``print(..., file=sys.stderr)``, not through a logger.
    The function under that wrapper (its ``__wrapped__``) does the export itself; torch's
    log records still go through its loggers (held by :mod:`.quiet`).
    """
    # loaded on first use, as torch.export.export loads them (they import networkx)
    trace = importlib.import_module("torch.export._trace")
    resolve = importlib.import_module("torch.fx.experimental.dynamic_spec")._resolve_dynamic_shapes
    inner = getattr(trace._export_for_training, "__wrapped__", None)
    if inner is None:
        raise InternalsChanged("torch.export._trace._export_for_training under a logging wrapper (__wrapped__)")
    return inner(model, args, kwargs, resolve(model, dynamic_shapes), strict=False)


def is_fx_tracing() -> bool:
    """Is a ``torch.fx`` symbolic trace running (torch 2.14.1)?"""
    return _symbolic_trace._get_is_fx_tracing()


# The modules torch's functions report as ``__module__`` (torch 2.14.1): a function of
# one of them is torch's own, not a model's.
TORCH_FUNCTION_MODULES = frozenset({
    "torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._linalg",
    "torch._C._fft", "torch._C._special", "torch._C._VariableFunctions", "_operator",
})  # fmt: skip
# ``F.scaled_dot_product_attention`` and its ``torch._C._nn`` twin (torch 2.14.1)
SDPA_FUNCTIONS = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def tensor_version(t: torch.Tensor) -> int:
    """The in-place write counter of ``t`` (``Tensor._version``, torch 2.14.1)."""
    return t._version


# -- hooks -----------------------------------------------------------------------------
# nn.Module's own hook dicts (torch 2.14.1). Forward hooks are replayed by hand
# (:func:`forward_hooks`); the other dicts only say that hooks are there.
MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# The flags of forward hooks, keyed by hook id; :func:`forward_hooks` reads them all.
FORWARD_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")
# Global module hooks (``register_module_forward_hook`` & co) in torch.nn.modules.module;
# the ``*_with_kwargs`` / ``*_always_called`` dicts only flag hooks of these.
GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                     "_global_backward_pre_hooks")  # fmt: skip


def module_hooks(module: torch.nn.Module) -> list[Any]:
    """Every forward, pre-forward and backward hook registered on ``module``."""
    return [hook for name in MODULE_HOOK_DICTS for hook in getattr(module, name, {}).values()]


def global_hooks() -> bool:
    """Are global module hooks registered (``register_module_forward_hook`` & co)?"""
    return any(getattr(_module, name, None) for name in GLOBAL_HOOK_DICTS)


def forward_pre_hooks(module: torch.nn.Module) -> list[tuple[Callable, bool]]:
    """``(hook, with_kwargs)`` of the module's forward pre-hooks, in call order."""
    with_kwargs = module._forward_pre_hooks_with_kwargs
    return [(hook, hook_id in with_kwargs) for hook_id, hook in list(module._forward_pre_hooks.items())]


def forward_hooks(module: torch.nn.Module) -> list[tuple[Callable, bool, bool]]:
    """``(hook, with_kwargs, always_call)`` of the module's forward hooks, in call order."""
    with_kwargs, always = module._forward_hooks_with_kwargs, module._forward_hooks_always_called
    return [(hook, hook_id in with_kwargs, hook_id in always) for hook_id, hook in list(module._forward_hooks.items())]


def non_persistent_buffers(module: torch.nn.Module) -> set[str]:
    """Names of the module's buffers left out of its ``state_dict`` (torch 2.14.1)."""
    return module._non_persistent_buffers_set


# -- grad mode -------------------------------------------------------------------------
def grad_mode_codes() -> dict[Any, str]:
    """The code objects whose call means a grad-mode or autocast region begins.

    torch 2.14.1 implements these context managers in Python, so a profile function sees
    their ``__enter__`` (``__init__`` for ``set_grad_enabled``) called. One that became C
    code would make no Python call and its region would go unseen (a graph without it:
    wrong gradients), so that raises here.
    """
    entries = {
        "torch.no_grad()": torch.no_grad.__enter__,
        "torch.enable_grad()": torch.enable_grad.__enter__,
        "torch.set_grad_enabled()": torch.set_grad_enabled.__init__,
        "torch.inference_mode()": torch.inference_mode.__enter__,
        "torch.autocast": torch.autocast.__enter__,
    }
    codes = {name: getattr(fn, "__code__", None) for name, fn in entries.items()}
    missing = [name for name, code in codes.items() if code is None]
    if missing:
        raise InternalsChanged(f"Python-level __enter__ methods of {', '.join(missing)}")
    return {code: name for name, code in codes.items()}


# -- frames ----------------------------------------------------------------------------
def caller_frame(depth: int = 1) -> Any:
    """The frame ``depth`` calls above the caller of this function (``sys._getframe``)."""
    return sys._getframe(depth + 1)


_TOOL_IDS = (4, 3)  # sys.monitoring ids no standard tool claims (Python 3.12)
_TOOL_LOCK = threading.Lock()


@contextmanager
def watch_returns(watches: Callable[[Any], bool], on_return: Callable[[Any], None]) -> Iterator[None]:
    """Call ``on_return(frame)`` when a frame of code that ``watches(code)`` returns (or
    yields), in this thread, until the block ends.

    Python 3.12+: a ``sys.monitoring`` tool. ``PY_START`` is enabled everywhere once and
    disabled at the first start of each code object, so foreign code costs one event per
    code object; ``PY_RETURN``/``PY_YIELD`` are enabled on the watched code objects only.
    Python 3.11, or when every free tool id is taken: a trace function that returns
    ``None`` at once for unwatched frames (a profile function if a debugger or coverage
    already traces).
    """
    monitoring = getattr(sys, "monitoring", None)
    tool = _claim_tool(monitoring) if monitoring is not None else None
    if tool is None:
        with _watch_by_tracing(watches, on_return):
            yield
        return
    try:
        with _watch_by_monitoring(monitoring, tool, watches, on_return):
            yield
    finally:
        with _TOOL_LOCK:
            monitoring.free_tool_id(tool)


def _claim_tool(monitoring: Any) -> int | None:
    with _TOOL_LOCK:
        for tool in _TOOL_IDS:
            if monitoring.get_tool(tool) is None:
                monitoring.use_tool_id(tool, "fxcapture")
                return tool
    return None


@contextmanager
def _watch_by_monitoring(monitoring: Any, tool: int, watches: Callable, on_return: Callable) -> Iterator[None]:
    events, thread = monitoring.events, threading.get_ident()
    local = events.PY_RETURN | events.PY_YIELD
    enabled: list[Any] = []

    def start(code: Any, offset: int) -> Any:
        if watches(code):
            monitoring.set_local_events(tool, code, local)
            enabled.append(code)
        return monitoring.DISABLE

    def returned(code: Any, offset: int, value: Any) -> None:
        if threading.get_ident() == thread:  # events are process-wide: other threads pass
            on_return(sys._getframe(1))

    monitoring.register_callback(tool, events.PY_START, start)
    monitoring.register_callback(tool, events.PY_RETURN, returned)
    monitoring.register_callback(tool, events.PY_YIELD, returned)
    monitoring.set_events(tool, events.PY_START)
    try:
        yield
    finally:
        monitoring.set_events(tool, 0)
        for code in enabled:
            monitoring.set_local_events(tool, code, 0)
        for event in (events.PY_START, events.PY_RETURN, events.PY_YIELD):
            monitoring.register_callback(tool, event, None)


@contextmanager
def _watch_by_tracing(watches: Callable, on_return: Callable) -> Iterator[None]:
    if sys.gettrace() is not None:  # a debugger or coverage: a profile function beside it
        previous_profile = sys.getprofile()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "return" and watches(frame.f_code):
                on_return(frame)

        sys.setprofile(chain_profile(profile, previous_profile))
        try:
            yield
        finally:
            sys.setprofile(previous_profile)
        return

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "return":
            on_return(frame)
        return local

    decided: dict[Any, bool] = {}  # code -> watched; lives as long as this block
    known = decided.get

    def trace(frame: Any, event: str, arg: Any) -> Any:
        # called for every frame export runs (millions): one dict lookup, no further call
        code = frame.f_code
        watched = known(code)
        if watched is None:
            watched = decided[code] = watches(code)
        if not watched:
            return None
        frame.f_trace_lines = False
        return local

    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(None)


def chain_profile(handler: Callable, previous: Any) -> Callable:
    """A profile function calling ``handler`` then a Python profile function that was
    active (a C-level profiler such as cProfile cannot be chained on Python 3.11)."""
    if not callable(previous):
        return handler

    def both(frame: Any, event: str, arg: Any) -> Any:
        handler(frame, event, arg)
        return previous(frame, event, arg)

    return both

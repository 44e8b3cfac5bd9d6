"""Stage 5: the extractor module, built from a rewritten graph per train/eval mode."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.graph_module import _forward_from_src

from .catalogue import Catalogue, NameInfo, build_catalogue, value_nodes
from .fallback import RuntimeCapture
from .resolve import (
    Names,
    SelectorPairs,
    _is_glob,
    _unknown_selector_error,
    match,
    resolve,
    selector_pairs,
)
from .rewrite import add_feature_outputs, protect_from_inplace, prune, substitute
from .tracing import CaptureTracer, TraceResult

FALLBACKS = ("auto", "never", "always")


@dataclass(frozen=True)
class CaptureSpec:
    """Everything :func:`fxcapture.capture` was asked for, to re-trace on demand."""

    names: Names
    leaf_modules: tuple = ()
    autowrap_functions: tuple = ()
    concrete_args: dict[str, Any] | None = None
    keep_output: bool = True
    attention: str | None = None  # "weights": decompose fused attention (fxcapture.attention)
    edit: Any = None  # {selector: fn(value, key)} (fxcapture.edit)
    fallback: str = "auto"
    # per call pattern: ((name, value) or (name, INPUT)) for optional arguments that a
    # call gives a value other than their default (see Extractor._specialization)
    specialization: tuple = ()


INPUT = "<graph input>"  # an optional argument given a tensor: a graph input, not a constant


@dataclass
class Program:
    """One compiled graph (or the eager model) and what it returns."""

    graph: fx.Graph | None
    forward: Callable[..., Any]
    code: str
    features: dict[str, NameInfo]
    catalogue: Catalogue | None
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    cloned: set[str] = field(default_factory=set)  # keys copied before an in-place op
    runtime: RuntimeCapture | None = None  # captures inside untraced regions
    untraced: dict[str, str] = field(default_factory=dict)  # module path -> why


class FunctionModule(torch.nn.Module):
    """Holds a plain function so that it can be captured like a model."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class TraceFailure(RuntimeError):
    """torch.fx could not trace the model and ``fallback="never"`` was asked for."""


def constant_defaults(model: torch.nn.Module) -> tuple[list[str], dict[str, Any]]:
    """``forward``'s positional parameter names, and those with a constant default.

    Returns ``([], {})`` for a forward with ``*args``/``**kwargs`` or keyword-only
    parameters (fx cannot bind those by name anyway).
    """
    forward = model.fn if isinstance(model, FunctionModule) else model.forward
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return [], {}
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters):
        return [], {}
    defaults = {
        p.name: p.default
        for p in parameters
        if p.default is not p.empty
        and (p.default is None or type(p.default) in (bool, int, float, str))
    }
    return [p.name for p in parameters], defaults


def _concrete_args(model: torch.nn.Module, spec: CaptureSpec) -> dict:
    """Fix ``forward`` arguments whose default is a constant (``mask=None``, ``flag=False``).

    fx would otherwise turn them into graph inputs and trace ``if mask is not None``
    down the wrong branch. A call that passes another value gets its own graph
    (``spec.specialization``); fx asserts at run time that fixed arguments hold.
    """
    concrete = dict(constant_defaults(model)[1])
    concrete.update(spec.concrete_args or {})
    for name, value in spec.specialization:
        if value == INPUT:
            concrete.pop(name, None)
        else:
            concrete[name] = value
    return concrete


def trace(
    model: torch.nn.Module, spec: CaptureSpec, extra_leaves: Iterable[str] = ()
) -> tuple[TraceResult, Catalogue]:
    """Trace ``model`` (a plain function held by :class:`FunctionModule` too)."""
    tracer = CaptureTracer(tuple(spec.leaf_modules) + tuple(extra_leaves), spec.autowrap_functions)
    root = model.fn if isinstance(model, FunctionModule) else model
    try:
        result = tracer.trace_model(root, _concrete_args(model, spec))
    except Exception as err:
        err.fxcapture_failed_module = tracer.failed_module  # type: ignore[attr-defined]
        raise
    if spec.attention is not None:
        from .attention import expose_attention_weights

        expose_attention_weights(result, model, mode=spec.attention)
    return result, build_catalogue(result, model)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def trace_with_fallback(
    model: torch.nn.Module, spec: CaptureSpec
) -> tuple[TraceResult | None, Catalogue | None, dict[str, str]]:
    """Trace as much as fx can; return the modules that must run eagerly, with why.

    Each failure names the innermost module being traced; it becomes a leaf and the
    trace is retried. A failure outside every submodule leaves the whole model eager.
    """
    if spec.fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {spec.fallback!r}")
    if spec.attention is not None:
        from .attention import check_mode

        check_mode(spec.attention)  # a bad mode is the caller's error, not a trace failure
    if spec.fallback == "always":
        return None, None, {"": "fallback='always'"}
    untraced: dict[str, str] = {}
    while True:
        try:
            result, catalogue = trace(model, spec, untraced)
            return result, catalogue, untraced
        except Exception as err:
            failed = getattr(err, "fxcapture_failed_module", None)
            where = f"module {failed!r} ({type(model.get_submodule(failed)).__name__})" if failed else "the model's own forward"
            if spec.fallback == "never":
                leaf_hint = f"leaf_modules=[{failed!r}] to run it as one op, " if failed else ""
                raise TraceFailure(
                    f"torch.fx could not trace {where}: {_first_line(err)}. Pass "
                    f"{leaf_hint}concrete_args= to fix arguments that steer Python control "
                    "flow, or fallback='auto' to capture the untraceable part at run time."
                ) from err
            if not failed or failed in untraced:
                return None, None, {"": _first_line(err)}
            untraced[failed] = _first_line(err)


def _is_exact(selector: Any) -> bool:
    return isinstance(selector, str) and not _is_glob(selector) and (
        ":" in selector or "." in selector or "%" in selector
    )


def _call_model(self: "Extractor", *args: Any, **kwargs: Any) -> tuple[Any, dict]:
    out = self._model(*args, **kwargs)
    return (out if self._spec.keep_output else None), {}


def build_program(model: torch.nn.Module, spec: CaptureSpec) -> Program:
    """Trace ``model``, resolve ``spec.names`` and rewrite the graph to return them."""
    result, catalogue, untraced = trace_with_fallback(model, spec)
    pairs = selector_pairs(spec.names)
    edits = dict(spec.edit or {})
    if result is None:  # nothing traced: everything is captured at run time
        runtime = RuntimeCapture(model, untraced, pairs, edits, attention=spec.attention)
        return Program(None, _call_model, "", {}, None, runtime=runtime, untraced=untraced)

    graph_pairs, runtime_pairs = SelectorPairs(), []
    for alias, selector in pairs:
        found = match(catalogue, selector)
        if found:
            graph_pairs.append((alias, selector))
        if untraced and (not found or not _is_exact(selector)):
            runtime_pairs.append((alias, selector))
        elif not found:
            raise _unknown_selector_error(catalogue, selector, model, result.leaf_paths)
    features = resolve(catalogue, graph_pairs, model, result.leaf_paths)
    graph_edits = {s: fn for s, fn in edits.items() if match(catalogue, s)}
    runtime_edits = {s: fn for s, fn in edits.items() if s not in graph_edits}
    if runtime_edits and not untraced:
        unknown = next(iter(runtime_edits))
        raise _unknown_selector_error(catalogue, unknown, model, result.leaf_paths)

    graph = result.graph
    modules = dict(model.named_modules())
    edited: dict[fx.Node, fx.Node] = {}
    if graph_edits:
        from .edit import apply_edits

        # {original node: replacement}; downstream nodes already use the replacement
        edited = apply_edits(graph, catalogue, graph_edits, model, result.leaf_paths)
    values = {key: substitute(info.value, edited) for key, info in features.items()}
    captured = [n for value in values.values() for n in value_nodes(value)]
    clones = protect_from_inplace(graph, captured, modules)
    outputs = {key: substitute(value, clones) for key, value in values.items()}
    add_feature_outputs(graph, outputs, keep_output=spec.keep_output)
    if not spec.keep_output:
        prune(graph, modules)
    graph.lint()
    code = graph.python_code(root_module="self")
    runtime = None
    if runtime_pairs or runtime_edits:
        in_graph = [sel for _, sel in graph_pairs]
        runtime = RuntimeCapture(
            model, untraced, runtime_pairs, runtime_edits, set(features), optional=in_graph,
            attention=spec.attention,
        )
    return Program(
        graph=graph,
        forward=_forward_from_src(code.src, code.globals),
        code=code.src,
        features=features,
        catalogue=catalogue,
        constants=result.constants,
        cloned={k for k, v in values.items() if set(value_nodes(v)) & set(clones)},
        runtime=runtime,
        untraced=untraced,
    )


def share_state(model: torch.nn.Module, into: torch.nn.Module) -> None:
    """Register ``model``'s children, parameters and buffers on ``into`` (the same
    objects), so that ``into.state_dict()`` has the model's keys and shares its tensors."""
    for name, child in model.named_children():
        into.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        into.register_parameter(name, param)
    non_persistent = getattr(model, "_non_persistent_buffers_set", set())
    for name, buf in model.named_buffers(recurse=False):
        into.register_buffer(name, buf, persistent=name not in non_persistent)


class Extractor(torch.nn.Module):
    """The model's forward, rewritten to return ``(output, {key: value})``.

    It shares the model's submodules, parameters and buffers (``state_dict()`` keys
    are the model's), so weight changes show in both. ``train()``/``eval()`` switch
    between graphs traced in each mode. Build it with :func:`fxcapture.capture`.
    """

    def __init__(self, model: torch.nn.Module, spec: CaptureSpec) -> None:
        super().__init__()
        # The model itself is kept out of the module tree: its children are ours.
        object.__setattr__(self, "_model", model)
        self._spec = spec
        share_state(model, self)
        self.training = model.training
        self._params, self._defaults = constant_defaults(model)
        self._programs: dict[tuple[bool, tuple], Program] = {}
        self._activate(self.training)

    # -- graphs per mode ---------------------------------------------------------
    def _activate(self, mode: bool) -> None:
        program = self._program_for(mode, ())
        self._program = program
        self._forward = program.forward
        self._runtime = program.runtime

    def _program_for(self, mode: bool, specialization: tuple) -> Program:
        program = self._programs.get((mode, specialization))
        if program is None:
            program = self._programs[(mode, specialization)] = self._build(mode, specialization)
        return program

    def _build(self, mode: bool, specialization: tuple = ()) -> Program:
        model = self._model
        previous = model.training
        model.training = mode  # forwards that branch on self.training see this mode
        try:
            spec = replace(self._spec, specialization=specialization)
            program = build_program(model, spec)
        finally:
            model.training = previous
        self._attach_attributes(program)
        return program

    def _specialization(self, args: tuple, kwargs: dict) -> tuple[tuple, list]:
        """Which optional arguments this call sets, and all arguments by position."""
        values = dict(zip(self._params, args))
        for name, value in kwargs.items():
            if name not in self._params:
                raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
            values[name] = value
        specialization = []
        for name, default in self._defaults.items():
            value = values.get(name, default)
            if isinstance(value, torch.Tensor) or (default is None and value is not None):
                specialization.append((name, INPUT))
            elif value != default:
                specialization.append((name, value))
        positional = [values.get(n, self._defaults.get(n)) for n in self._params]
        return tuple(specialization), positional

    def _attach_attributes(self, program: Program) -> None:
        """Make every ``get_attr`` of the graph resolve on this module."""
        if program.graph is None:
            return
        for node in program.graph.nodes:
            if node.op != "get_attr":
                continue
            head = node.target.split(".")[0]
            if hasattr(self, head):
                continue
            value = program.constants.get(head)
            if value is None:
                value = getattr(self._model, head)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                self.register_buffer(head, value, persistent=False)
            else:
                setattr(self, head, value)

    def train(self, mode: bool = True) -> "Extractor":
        super().train(mode)
        self._activate(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        forward, runtime = self._forward, self._runtime
        if self._defaults and (kwargs or len(args) > len(self._params) - len(self._defaults)):
            # optional arguments given: the graph traced for this call pattern
            specialization, args = self._specialization(args, kwargs)
            program = self._program_for(self.training, specialization)
            forward, runtime, kwargs = program.forward, program.runtime, {}
        if runtime is None:
            return forward(self, *args, **kwargs)
        with runtime.session() as session:
            out, feats = forward(self, *args, **kwargs)
        feats.update(runtime.collect(session))
        return out, feats

    # -- introspection -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The keys of the feature dict, in execution order (graph values first).

        Values captured at run time are known after the first call.
        """
        runtime = self._program.runtime
        return list(self._program.features) + (list(runtime.features) if runtime else [])

    @property
    def graph(self) -> fx.Graph | None:
        """The rewritten fx graph of the current mode (``None`` if nothing traced)."""
        return self._program.graph

    @property
    def code(self) -> str:
        """The Python source of the current mode's forward."""
        return self._program.code

    @property
    def catalogue(self) -> Catalogue | None:
        return self._program.catalogue

    @property
    def untraced(self) -> dict[str, str]:
        """``{module path: why fx failed}`` for the modules that run eagerly."""
        return dict(self._program.untraced)

    def graph_nx(self, *example_inputs: Any) -> Any:
        """The current graph as a ``networkx.DiGraph`` (see :func:`fxcapture.graph.to_networkx`)."""
        from .graph import to_networkx

        return to_networkx(self, example_inputs or None)

    def explain(self) -> str:
        """How each key is captured (graph / leaf hook / run-time local) and what fell back.

        Example::

            >>> print(capture(gpt2, ["attn_weights"]).explain())
            untraced: '' (the model's own forward): ValueError: code: co_varnames is too small
            transformer.h.0.attn:attn_weights: run-time local (profile function)
        """
        lines = [
            f"untraced: {path!r} ({'the whole model' if not path else 'runs eagerly'}): {why}"
            for path, why in self._program.untraced.items()
        ]
        for key, info in self._program.features.items():
            cloned = key in self._program.cloned
            via = "graph, cloned before a later in-place op" if cloned else "graph"
            lines.append(f"{key}: {info.kind} {info.key} ({info.op}) <- {via}")
        runtime = self._program.runtime
        if runtime is not None:
            if not runtime.discovered:
                pending = ", ".join(repr(s) for _, s in runtime.selectors)
                lines.append(f"run-time selectors {pending}: resolved on the first call")
            for key in runtime.features:
                lines.append(f"{key} <- {runtime.how(key)}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"names={self.names}"

    # -- copy / pickle: graphs hold generated code, so rebuild them from the model ----
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_programs"] = {}
        for key in ("_program", "_forward", "_runtime"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._activate(self.training)


def make_spec(
    names: Names,
    leaf_modules: Iterable[Any] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    keep_output: bool = True,
    attention: str | None = None,
    edit: Any = None,
    fallback: str = "auto",
) -> CaptureSpec:
    return CaptureSpec(
        names=names,
        leaf_modules=tuple(leaf_modules),
        autowrap_functions=tuple(autowrap_functions),
        concrete_args=concrete_args,
        keep_output=keep_output,
        attention=attention,
        edit=edit,
        fallback=fallback,
    )

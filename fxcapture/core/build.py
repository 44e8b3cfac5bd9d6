"""Build a program: trace, make the records, select, run the passes.

:func:`build_program` turns a model and a :class:`~.spec.CaptureSpec` into a
:class:`Program`: an ``fx.GraphModule`` returning ``(output, {key: value})`` plus, for
code that no tracer can follow, a :class:`~.runtime.RuntimeCapture`.

Example::

    >>> program = build_program(model, CaptureSpec(["layer4"]))
    >>> out, feats = program.module(images)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
import torch.fx as fx

from .._util.tree import nodes
from .aliasing import Aliasing
from .attention import expose_attention_weights
from .edit import apply_edits
from .guards import InputGuard, ModelGuard
from .hazards import has_hooks, hooked_modules
from .._util.internals import global_hooks, output_spec, pytree
from .policy import LATER, RAISE, RUN_TIME, RUNNING, Attempt, decide
from .pytrees import StateOutput, write_back
from .passes import add_feature_outputs, protect_from_inplace, prune, substitute
from .records import Catalogue, NameInfo, build_catalogue, nested
from .running import trace_by_running
from .runtime import RuntimeCapture
from .select import SelectorPairs, is_glob, match, resolve, selector_pairs, unknown_selector_error, wanted_locals
from .spec import INPUT, CaptureSpec, TraceFailure, constant_defaults, traced_root
from .trace import CaptureTracer, TraceResult


@dataclass
class Program:
    """One graph (or the eager model) of an extractor, and what it returns."""

    module: torch.nn.Module | None  # fx.GraphModule returning (output, {key: value})
    features: dict[str, NameInfo]
    catalogue: Catalogue | None
    tracer: str  # "symbolic", "running" or "run time"
    cloned: set[str] = field(default_factory=set)  # keys copied before an in-place op
    runtime: RuntimeCapture | None = None  # captures inside untraced regions
    untraced: dict[str, str] = field(default_factory=dict)  # module path -> why
    guard: InputGuard | None = None  # the inputs a running trace holds for (None: all)
    model_guard: ModelGuard | None = None  # what the graph assumed about the model (None: nothing)
    notes: list[str] = field(default_factory=list)  # why this tracer
    codes: frozenset = frozenset()  # the model's code objects the trace ran (what its guards watch)

    _flat: tuple | None = field(default=None, repr=False)  # (graph taking flat inputs, output spec)

    def accepts(self, args: tuple, kwargs: dict) -> bool:
        return self.guard is None or self.guard.accepts(args, kwargs)

    def run_flat(self, flat: list, given: list | None = None) -> tuple[Any, dict]:
        """Run the graph on inputs its input guard flattened already
        (:meth:`~.guards.InputGuard.flat_inputs`): a decoding step flattens its cache once.
        ``given``: the call's state objects (:meth:`~.guards.InputGuard.states`), which the
        output holds updated, as the model's own output does (:func:`~.pytrees.write_back`).

        Example::

            >>> flat = program.guard.flat_inputs((), {"input_ids": next_id, "cache": cache})
            >>> out, feats = program.run_flat(flat, [cache])     # out.cache is cache
        """
        if self._flat is None:  # made on first use: only programs called with a guard need it
            graph = copy.deepcopy(self.module.graph)
            spec = output_spec(graph)
            graph.set_codegen(fx.graph.CodeGen())  # inputs flat, outputs a flat tuple
            state = StateOutput.of(spec) if spec is not None else None
            self._flat = (fx.GraphModule(self.module, graph, class_name="ExtractedFlat"), spec, state)
        module, spec, state = self._flat
        out = module(*flat)
        if spec is None:
            return out
        if given and state is not None:
            return state(list(out), given)
        out, feats = pytree.tree_unflatten(list(out), spec)
        return (write_back(given, out) if given else out), feats

    @property
    def graph(self) -> fx.Graph | None:
        return self.module.graph if isinstance(self.module, fx.GraphModule) else None

    @property
    def code(self) -> str:
        return self.module.code if isinstance(self.module, fx.GraphModule) else ""


def concrete_args(model: torch.nn.Module, spec: CaptureSpec) -> dict:
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


def trace_symbolic(
    model: torch.nn.Module, spec: CaptureSpec, extra_leaves: Iterable[str] = ()
) -> TraceResult:
    """Trace ``model`` with torch.fx (a plain function or a static ``forward`` too)."""
    tracer = CaptureTracer(tuple(spec.leaf_modules) + tuple(extra_leaves), spec.autowrap_functions)
    try:
        result = tracer.trace_model(traced_root(model), concrete_args(model, spec))
    except Exception as err:
        err.fxcapture_failed_module = tracer.failed_module  # type: ignore[attr-defined]
        raise
    if spec.attention is not None:
        expose_attention_weights(result, model, mode=spec.attention)
    return result


def first_line(err: BaseException) -> str:
    """``"TypeError: first line of the message"``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def attempt_symbolic(
    model: torch.nn.Module, spec: CaptureSpec, has_example: bool = False
) -> tuple[Attempt, TraceResult | None, BaseException | None]:
    """Trace with fx and say what it saw (:class:`~.policy.Attempt`), with the graph.

    Modules with hooks are leaves from the start; each submodule fx fails on, or that
    calls a custom ``autograd.Function``, becomes a leaf and the trace is retried. With
    ``fallback="never"`` the first failure ends it (the :class:`TraceFailure` is returned).
    """
    seen = Attempt(spec.fallback, hooks=hooked_modules(model), root_hooks=has_hooks(model),
                   global_hooks=global_hooks(), has_example=has_example)  # fmt: skip
    if spec.fallback == "always" or seen.global_hooks:
        return seen, None, None
    failed: dict[str, str] = {}
    custom: dict[str, str] = {}
    while True:
        try:
            result = trace_symbolic(model, spec, [*seen.hooks, *failed, *custom])
        except Exception as err:
            where = getattr(err, "fxcapture_failed_module", None)
            if spec.fallback != "never" and where and where not in failed:
                failed[where] = first_line(err)
                continue
            error = _trace_failure(model, where, err)
            error.__cause__ = err
            return replace(seen, failure=first_line(err), failed=failed, eager_calls=custom), None, error
        new = {p: fn for p, fn in result.eager_modules.items() if p not in custom}
        custom.update(new)
        if not new or "" in new:
            return replace(seen, traced=True, failed=failed, hazards=tuple(result.hazards),
                           eager_calls=custom), result, None  # fmt: skip


def _trace_failure(model: torch.nn.Module, failed: str | None, err: BaseException) -> TraceFailure:
    where = (
        f"module {failed!r} ({type(model.get_submodule(failed)).__name__})"
        if failed
        else "the model's own forward"
    )
    leaf_hint = f"leaf_modules=[{failed!r}] to run it as one op, " if failed else ""
    return TraceFailure(
        f"torch.fx could not trace {where}: {first_line(err)}. Pass "
        f"{leaf_hint}concrete_args= to fix arguments that steer Python control "
        "flow, example_inputs= to trace by running the model, or fallback='auto' to "
        "capture the untraceable part at run time."
    )


def _is_exact(selector: Any) -> bool:
    return isinstance(selector, str) and not is_glob(selector) and (
        ":" in selector or "." in selector or "%" in selector
    )


class _RegionNames:
    """The names inside a program's eager leaves, listed by tracing each leaf on its own
    when a selector is not in the graph, so that an unknown name is refused when the
    extractor is built. A leaf fx cannot trace may hold any name (known at the first call)."""

    def __init__(self, model: torch.nn.Module, spec: CaptureSpec, regions: dict[str, str]) -> None:
        self.model, self.spec, self.regions = model, spec, regions
        self._catalogues: list[Catalogue] | None = None

    def may_hold(self, selector: Any) -> bool:
        if self._catalogues is None:
            self._catalogues = self._list()
        if any(c is None for c in self._catalogues):
            return True
        return any(match(c, selector) for c in self._catalogues)

    def _list(self) -> list[Catalogue | None]:
        catalogues = []
        for path in self.regions:
            module = self.model.get_submodule(path)
            own = self.spec.replace(specialization=(), concrete_args=None)  # the leaf's own arguments
            try:  # as the whole model is traced: its hooked modules are leaves, attention exposed
                result = trace_symbolic(module, own, hooked_modules(module))
            except Exception:  # no tracer follows it: its names are known at run time only
                catalogues.append(None)
                continue
            catalogues.append(nested(build_catalogue(result, module), path) if path else None)
        return catalogues


class EagerModel(torch.nn.Module):
    """The model run as it is, returning ``(output or None, {})``: the program of a
    model that no tracer follows (its values come from run-time capture)."""

    def __init__(self, model: torch.nn.Module, keep_output: bool) -> None:
        super().__init__()
        object.__setattr__(self, "model", model)  # not a child: no second state_dict
        self.keep_output = keep_output

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
        out = self.model(*args, **kwargs)
        return (out if self.keep_output else None), {}


def graph_module(model: torch.nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    """An ``fx.GraphModule`` running ``graph`` on the model's own submodules and tensors.

    fx copies each attribute the graph reads from the root (the very objects, not
    copies); tensors the trace met outside the model come from ``constants``.
    """
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        head = node.target.split(".")[0]
        if hasattr(root, head):  # a module, tensor or attribute already copied
            continue
        value = constants[head] if head in constants else getattr(model, head)
        if isinstance(value, torch.nn.Module):
            root.add_module(head, value)
        elif isinstance(value, torch.nn.Parameter):
            root.register_parameter(head, value)
        elif isinstance(value, torch.Tensor):
            root.register_buffer(head, value, persistent=False)
        else:
            setattr(root, head, value)
    return fx.GraphModule(root, graph, class_name="Extracted")


def build_program(
    model: torch.nn.Module, spec: CaptureSpec, example: tuple[tuple, dict] | None = None
) -> Program | None:
    """Trace ``model``, resolve ``spec.names`` and rewrite the graph to return them.

    The tracer: symbolic fx where it is exact; the running tracer (needs ``example``,
    ``(args, kwargs)``; without one, returns ``None``: build again at the first call)
    where fx fails or would change what the model does; run-time capture for what
    neither can trace.
    """
    trace = choose_trace(model, spec, example)
    if trace is None:
        return None
    return program_from_trace(model, spec, trace)


@dataclass
class Trace:
    """A traced model, whichever tracer made it."""

    result: TraceResult | None
    catalogue: Catalogue | None
    untraced: dict[str, str]  # module path -> why it runs eagerly
    tracer: str  # "symbolic", "running" or "run time"
    guard: InputGuard | None = None
    notes: list[str] = field(default_factory=list)  # why the running tracer was used


def needs_running(model: torch.nn.Module) -> bool:
    """Models known to need the running tracer: transformers' ``PreTrainedModel`` (its
    forward reads configs, caches and masks that symbolic fx cannot follow)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__
    )


def _trace_known_running(
    model: torch.nn.Module, spec: CaptureSpec, example: tuple[tuple, dict] | None, wants: Any
) -> Trace | None:
    """A model known to need the running tracer (:func:`needs_running`), without hooks:
    traced by running with no symbolic attempt first (it would fail or be rejected).
    ``None`` when that does not apply or fails: :func:`choose_trace`'s policy decides, and
    says why."""
    if example is None or spec.fallback == "always" or not needs_running(model):
        return None
    if global_hooks() or has_hooks(model) or hooked_modules(model):  # the policy makes hooked modules leaves
        return None
    try:
        running, guard = trace_by_running(model, *example, attention=spec.attention, wants=wants)
    except (OSError, MemoryError):  # the machine's trouble (a timeout, a full disk), not the model's
        raise
    except Exception:
        return None
    why = (f"the model: {type(model).__name__} is a transformers model, whose forward (wrapped by "
           "decorators, reading its config, caches and masks) fx cannot follow; fx is not tried")
    return Trace(running, build_catalogue(running, model), {}, RUNNING, guard, [why])


def choose_trace(
    model: torch.nn.Module, spec: CaptureSpec, example: tuple[tuple, dict] | None = None, *, listing: bool = False
) -> Trace | None:
    """Trace ``model`` with the tracer :func:`~.policy.decide` picks (see
    :func:`build_program`); ``None`` when that is the running tracer and no example
    inputs are given. The records are made once, for the chosen trace.

    The running tracer keeps only the locals the selectors and edits of ``spec`` can
    select (each kept value costs the export an op); ``listing=True`` keeps every one.
    """
    wants = None if listing else wanted_locals([s for _, s in selector_pairs(spec.names)] + list(spec.edit or {}))
    direct = _trace_known_running(model, spec, example, wants)
    if direct is not None:
        return direct
    attempt, result, error = attempt_symbolic(model, spec, example is not None)
    decision, guard = decide(attempt), None
    if decision.tracer == RUNNING:
        try:
            result, guard = trace_by_running(model, *example, attention=spec.attention, wants=wants)
        except (OSError, MemoryError):  # the machine's trouble (a timeout, a full disk), not the model's
            raise
        except Exception as err:
            if error is None:
                error = _trace_failure(model, None, err)
                error.__cause__ = err
            decision = decide(replace(attempt, running_failure=first_line(err)))
    if decision.tracer == RAISE:
        raise error
    if decision.tracer == LATER:
        return None
    if decision.tracer == RUN_TIME:
        result = None
    catalogue = build_catalogue(result, model) if result is not None else None
    return Trace(result, catalogue, decision.eager_leaves, decision.tracer, guard, [decision.reason])


def program_from_trace(model: torch.nn.Module, spec: CaptureSpec, trace: Trace) -> Program:
    """Select ``spec.names`` in a trace and make the program returning them."""
    result, catalogue, untraced = trace.result, trace.catalogue, trace.untraced
    pairs = selector_pairs(spec.names)
    edits = dict(spec.edit or {})
    if result is None:  # nothing traced: everything is captured at run time
        runtime = RuntimeCapture(model, untraced, pairs, edits, attention=spec.attention)
        return Program(EagerModel(model, spec.keep_output), {}, None, "run time", runtime=runtime,
                       untraced=untraced, notes=trace.notes)  # fmt: skip

    graph_pairs, runtime_pairs = SelectorPairs(), []
    inside = _RegionNames(model, spec, untraced)
    for alias, selector in pairs:
        found = match(catalogue, selector)
        if found:
            graph_pairs.append((alias, selector))
        if untraced and (not found or not _is_exact(selector)) and (found or inside.may_hold(selector)):
            runtime_pairs.append((alias, selector))
        elif not found:
            raise unknown_selector_error(catalogue, selector, model, result.leaf_paths)
    features = resolve(catalogue, graph_pairs, model, result.leaf_paths)
    graph_edits = {s: fn for s, fn in edits.items() if match(catalogue, s)}
    runtime_edits = {s: fn for s, fn in edits.items() if s not in graph_edits}
    if runtime_edits and not untraced:
        unknown = next(iter(runtime_edits))
        raise unknown_selector_error(catalogue, unknown, model, result.leaf_paths)

    graph = result.graph
    modules = dict(model.named_modules())
    edited: dict[fx.Node, fx.Node] = {}
    if graph_edits:
        # {original node: replacement}; downstream nodes already use the replacement
        edited = apply_edits(graph, catalogue, graph_edits, model, result.leaf_paths)
    values = {key: substitute(info.value, edited) for key, info in features.items()}
    captured = [n for value in values.values() for n in nodes(value)]
    aliasing = Aliasing(graph, modules)
    clones = protect_from_inplace(graph, captured, aliasing)
    outputs = {key: substitute(value, clones) for key, value in values.items()}
    add_feature_outputs(graph, outputs, keep_output=spec.keep_output)
    prune(graph, aliasing, whole_model=spec.keep_output)
    graph.lint()
    runtime = None
    if runtime_pairs or runtime_edits:
        in_graph = [sel for _, sel in graph_pairs]
        runtime = RuntimeCapture(
            model, untraced, runtime_pairs, runtime_edits, set(features), optional=in_graph,
            attention=spec.attention,
        )
    root = result.root if result.root is not None else model
    return Program(
        module=graph_module(root, graph, result.constants),
        features=features,
        catalogue=catalogue,
        tracer=trace.tracer,
        cloned={k for k, v in values.items() if set(nodes(v)) & set(clones)},
        runtime=runtime,
        untraced=untraced,
        guard=trace.guard,
        notes=trace.notes,
        codes=frozenset(result.codes),
    )

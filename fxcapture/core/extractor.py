"""The extractor: an ``nn.Module`` that runs the model and returns what was asked for.

:class:`Extractor` shares the model's submodules, parameters and buffers and runs one
:class:`~.build.Program` per training mode and call pattern, built on first use.

Example::

    >>> ex = Extractor(model, CaptureSpec(["layer4"]))
    >>> out, feats = ex(images)
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.fx as fx

from .build import Program, build_program
from .generation import GeneratedFeatures, generate
from .guards import ModelGuard, names_read
from .._util.internals import forward_hooks, forward_pre_hooks, non_persistent_buffers
from .pytrees import write_back
from .records import Catalogue
from .runtime import TRACE_UNDER_COMPILE, refuse_under_compile
from .spec import INPUT, CaptureSpec, as_call, constant_defaults

MAX_TRACES = 8  # graphs kept per mode and call pattern (one per set of guards)


def _follows(program: Program) -> bool:
    """Does the graph still hold for the model (its :class:`~.guards.ModelGuard`)?
    Inside ``torch.compile`` dynamo guards the model itself."""
    guard = program.model_guard
    return guard is None or torch.compiler.is_dynamo_compiling() or guard.holds()


def run_pre_hooks(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The model's own forward pre-hooks, as ``nn.Module.__call__`` runs them."""
    for hook, with_kwargs in forward_pre_hooks(model):
        if with_kwargs:
            result = hook(model, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(model, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def run_hooks(model: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
    """The model's own forward hooks, as ``nn.Module.__call__`` runs them."""
    for hook, with_kwargs, _ in forward_hooks(model):
        if with_kwargs:
            result = hook(model, args, kwargs, out)
        else:
            result = hook(model, args, out)
        if result is not None:
            out = result
    return out


def share_state(model: torch.nn.Module, into: torch.nn.Module) -> None:
    """Register ``model``'s children, parameters and buffers on ``into`` (the same
    objects), so that ``into.state_dict()`` has the model's keys and shares its tensors."""
    for name, child in model.named_children():
        into.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        into.register_parameter(name, param)
    non_persistent = non_persistent_buffers(model)
    for name, buf in model.named_buffers(recurse=False):
        into.register_buffer(name, buf, persistent=name not in non_persistent)


# What fx's errors mean for the model, in words a user can act on (a substring of the
# error -> why fx stops there); the error itself follows in parentheses.
FX_FAILURES = {
    "co_varnames is too small": "its forward is wrapped by a decorator taking *args/**kwargs, "
    "which fx cannot call with graph inputs",
    "cannot be used as inputs to control flow": "its forward branches (an `if` or a loop) on a tensor",
    "object cannot be iterated": "its forward iterates over a tensor",
    "GuardOnDataDependentSymNode": "its forward branches on the values inside a tensor",
}
HOW = {  # how each tracer captures, said after the reasons it was chosen
    "symbolic": "torch.fx traced the rest",
    "running": "torch.export traced it by running it on the first call's inputs",
    "run time": "the model runs as it is and values are captured while it runs",
}


def plain_reason(why: str) -> str:
    """``why`` a tracer failed, led by what it means when it is a known fx failure.

    Example::

        >>> plain_reason("ValueError: code: co_varnames is too small")
        'its forward is wrapped by a decorator taking *args/**kwargs, ... (ValueError: code: co_varnames is too small)'
    """
    meaning = next((m for error, m in FX_FAILURES.items() if error in why), None)
    return f"{meaning} ({why})" if meaning else why


def tracer_line(tracer: str, notes: list[str]) -> str:
    """The first line of :meth:`Extractor.explain`: the tracer, and why when fx could
    not trace the model itself.

    Example::

        >>> tracer_line("running", ["the model: TraceError: ... cannot be used as inputs to control flow"])
        'tracer: running (fx cannot trace this model: its forward branches (an `if` or a loop) on a tensor
        (TraceError: ...); torch.export traced it by running it on the first call's inputs)'
    """
    parts = [part for note in notes for part in note.split("; ") if part]
    if not parts:
        return f"tracer: {tracer}"
    if parts == [EXACT]:
        return f"tracer: {tracer} ({EXACT})"
    return f"tracer: {tracer} ({'; '.join([_reason(part) for part in parts] + [HOW.get(tracer, tracer)])})"


EXACT = "torch.fx traces it exactly"  # the policy's reason when nothing needs saying


def _reason(part: str) -> str:
    """One of the policy's reasons (``"where: why"``, a hazard, the eager leaves) in words."""
    where, _, why = part.partition(": ")
    if where == "the model":
        return f"fx cannot trace this model: {plain_reason(why)}"
    if where == "torch.export":
        return f"torch.export cannot trace it either: {plain_reason(why)}"
    if why and " " not in where:  # a module path
        return f"fx cannot trace {where!r}: {plain_reason(why)}"
    if part.startswith((EXACT, "eager leaves", "fallback=", "global module hooks")) or "runs it" in part:
        return part  # already says what runs how
    return f"a graph from fx would differ from the model ({part})"  # a hazard: what fx would get wrong


class Extractor(torch.nn.Module):
    """The model's forward, rewritten to return ``(output, {key: value})``.

    It shares the model's submodules, parameters and buffers (``state_dict()`` keys
    are the model's), so weight changes show in both. ``train()``/``eval()`` switch
    the model and the extractor together, between graphs traced in each mode. Build
    it with :func:`fxcapture.capture`.
    """

    def __init__(
        self, model: torch.nn.Module, spec: CaptureSpec, example_inputs: Any = None
    ) -> None:
        super().__init__()
        # The model itself is kept out of the module tree: its children are ours.
        object.__setattr__(self, "_model", model)
        self._spec = spec
        share_state(model, self)
        self.training = model.training
        self._params, self._defaults = constant_defaults(model)
        # graphs per (mode, call pattern), newest first; [None]: this pattern traces by running
        self._programs: dict[tuple[bool, tuple], list[Program | None]] = {}
        self._running: dict[bool, list[Program]] = {True: [], False: []}  # newest first
        self._build_lock = threading.RLock()
        self._compiled: dict[str, Callable] = {}  # compiled_call's, newest first
        self._program = self._program_for(model.training, ())  # the latest one used
        if self._program is None and example_inputs is not None:
            self._program = self._running_program(*as_call(example_inputs))[0]

    # -- programs per mode, call pattern and guard set -----------------------------
    def _program_for(self, mode: bool, specialization: tuple) -> Program | None:
        """The symbolic graph of this mode and call pattern that holds for the model as
        it is now, traced again if none does; ``None``: this pattern traces by running."""
        key = (mode, specialization)
        programs = self._programs.get(key, [])
        for program in programs:
            if program is None or _follows(program):
                return program
        with self._build_lock:
            programs = self._programs.get(key, [])
            for program in programs:  # another thread traced it meanwhile
                if program is None or _follows(program):
                    return program
            program = self._build(specialization, stale=programs)
            self._programs[key] = [program] + programs[: MAX_TRACES - 1] if program is not None else [None]
        return program

    def _running_program(self, args: tuple, kwargs: dict) -> tuple[Program, list | None]:
        """The running trace of this mode that holds for these inputs and the model as
        it is now, traced now if none does (at most ``MAX_TRACES`` per mode are kept);
        with the inputs flat when a kept trace took them (``None`` after a new trace)."""
        mode = self._model.training
        for program in self._running[mode]:
            if program.guard is None:  # run-time capture: holds for every input
                if _follows(program):
                    return program, None
                continue
            flat = program.guard.flat_inputs(args, kwargs)
            if flat is not None and _follows(program):
                return program, flat
        # dynamo tracing this call; not is_compiling(), whose export flag is process-wide:
        # another thread tracing by running would make this thread refuse
        if torch.compiler.is_dynamo_compiling():
            refuse_under_compile(TRACE_UNDER_COMPILE)
        with self._build_lock:
            traces = self._running[mode]
            stale = [p for p in traces if p.accepts(args, kwargs)]
            for program in stale:
                if _follows(program):
                    return program, None
            program = self._build((), example=(args, kwargs), stale=stale)
            self._running[mode] = [program] + traces[: MAX_TRACES - 1]
        return program, None

    def _build(self, specialization: tuple = (), example: tuple | None = None,
               stale: list | None = None) -> Program | None:  # fmt: skip
        """Trace the model as it is now, and guard what the trace read of it. ``stale``:
        programs of this pattern that the model no longer matches (said in ``explain()``)."""
        model = self._model
        program = build_program(model, self._spec.replace(specialization=specialization), example)
        if program is None:
            return None
        # what a graph assumed about the model; run-time capture: which modules it hooks
        read = names_read(program.codes) if "" not in program.untraced else frozenset()
        program.model_guard = ModelGuard(model, read, eager=program.untraced, dtypes=program.tracer == "running")
        changed = next((p.model_guard.changes() for p in stale or () if p and p.model_guard), None)
        if changed:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            program.notes = program.notes + [f"traced again: the model changed ({'; '.join(changed[:3])}{more})"]
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

    def train(self, mode: bool = True) -> "Extractor":
        """Switch the extractor and the model to training (or eval) mode, together.

        The program of the new mode is built at once: if that fails, nothing switched.
        """
        modules = [self, *self._model.modules()]
        flags = [m.training for m in modules]
        super().train(mode)
        self._model.training = mode
        try:
            self._program = self._program_for(mode, ())
        except BaseException:
            for m, flag in zip(modules, flags):
                m.training = flag
            raise
        return self

    def _select(self, program: Program | None, args: tuple, kwargs: dict) -> tuple[Program, tuple, dict, list | None]:
        """The program for this call (traced now if none holds), and the arguments as it
        takes them (and flat, when its input guard flattened them)."""
        flat = None
        if program is None or program.guard is not None:  # traced by running, per guard set
            program, flat = self._running_program(args, kwargs)
        elif self._defaults and (kwargs or len(args) > len(self._params) - len(self._defaults)):
            # optional arguments given: the graph traced for this call pattern
            specialization, positional = self._specialization(args, kwargs)
            program = self._program_for(self._model.training, specialization)
            if program is None:
                program, flat = self._running_program(args, kwargs)
            elif program.tracer == "symbolic":  # fx's forward takes every argument by position
                args, kwargs = tuple(positional), {}
        return program, args, kwargs, flat

    def prepare(self, *args: Any, **kwargs: Any) -> "Extractor":
        """Trace now, without running, whatever a call with these inputs would trace: a
        compiled caller then finds its graph (torch.compile cannot trace by running).

        Example::

            >>> compiled = torch.compile(ex.prepare(next_id, cache=cache, use_cache=True))
        """
        self._select(self._program_for(self._model.training, ()), args, kwargs)
        return self

    def compiled_call(self, **compile_options: Any) -> Callable[..., tuple[Any, dict[str, Any]]]:
        """``torch.compile(self.__call__, **compile_options)``, kept on the extractor (the
        latest two option sets), so that every ``generate`` with transformers' compiled
        decoding reuses its graphs."""
        key = repr(sorted(compile_options.items()))
        with self._build_lock:
            compiled = self._compiled.pop(key, None) or torch.compile(self.__call__, **compile_options)
            self._compiled = {key: compiled, **dict(list(self._compiled.items())[:1])}
        return compiled

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        model = self._model
        program = self._program_for(model.training, ())  # the model's mode now
        # fx calls the root's forward itself: its hooks are ours to run (a running trace
        # and the eager model go through nn.Module.__call__, which runs them)
        root_hooks = program is not None and program.tracer == "symbolic"
        if root_hooks:
            args, kwargs = run_pre_hooks(model, args, kwargs)
        program, args, kwargs, flat = self._select(program, args, kwargs)
        if program is not self._program:  # what names, explain() and graph show
            self._program = program
        runtime, guard = program.runtime, program.guard
        given = guard.states(args, kwargs) if guard is not None else []  # the caller's caches
        if runtime is None and flat is not None and not torch.compiler.is_dynamo_compiling():
            out, feats = program.run_flat(flat, given)  # flattened once; the caches updated in place
        else:
            if runtime is None:
                out, feats = program.module(*args, **kwargs)
            else:
                with runtime.session() as session:
                    out, feats = program.module(*args, **kwargs)
                feats.update(runtime.collect(session))
            if given:
                out = write_back(given, out)
        if root_hooks:
            out = run_hooks(model, args, kwargs, out)
        return out, feats

    def generate(self, *args: Any, **generate_kwargs: Any) -> tuple[Any, GeneratedFeatures]:
        """The model's own ``generate`` with this extractor as the forward of every step
        (edits included): ``(what model.generate returns, feats)``, ``feats[key]`` one
        value per step, step 0 the prompt (layout: :mod:`fxcapture.core.generation`).

        Example::

            >>> sequences, feats = capture(gpt2, ["transformer.h.0"]).generate(ids, max_new_tokens=8)
            >>> feats.aligned("transformer.h.0").shape  # (batch, prompt + 8 - 1, hidden)
        """
        return generate(self._model, self, *args, **generate_kwargs)

    # -- introspection -------------------------------------------------------------
    def _current(self) -> Program | None:
        """The program of the latest call (or the one built first; the latest running
        trace of the model's mode), if any."""
        if self._program is not None:
            return self._program
        traces = self._running[self._model.training]
        return traces[0] if traces else None

    @property
    def names(self) -> list[str]:
        """The keys of the feature dict, in execution order (graph values first).

        A model traced by running, and values captured at run time, have their names
        after the first call (or with ``capture(..., example_inputs=...)``).
        """
        program = self._current()
        if program is None:
            return []
        runtime = program.runtime
        return list(program.features) + (list(runtime.features) if runtime else [])

    @property
    def tracer(self) -> str | None:
        """``"symbolic"``, ``"running"`` or ``"run time"``: how the current mode is captured."""
        program = self._current()
        return program.tracer if program is not None else None

    @property
    def graph(self) -> fx.Graph | None:
        """The rewritten fx graph of the current mode (``None`` if nothing traced)."""
        program = self._current()
        return program.graph if program is not None else None

    @property
    def code(self) -> str:
        """The Python source of the current mode's forward."""
        program = self._current()
        return program.code if program is not None else ""

    @property
    def catalogue(self) -> Catalogue | None:
        program = self._current()
        return program.catalogue if program is not None else None

    @property
    def untraced(self) -> dict[str, str]:
        """``{module path: why}`` for the modules that run eagerly."""
        program = self._current()
        return dict(program.untraced) if program is not None else {}

    def explain(self) -> str:
        """Which tracer captures each key, and why; what runs eagerly.

        Example::

            >>> print(capture(gpt2, ["attn_weights"]).explain())
            tracer: running (fx cannot trace this model: its forward branches (an `if` or a loop)
            on a tensor (TraceError: ...); torch.export traced it by running it ...)
            transformer.h.0.attn:attn_weights: local ... <- graph (running)
        """
        program = self._current()
        if program is None:
            return (
                "tracer: running, on the first call (fx cannot trace this model exactly, so "
                "torch.export traces it by running it; pass example_inputs= to trace now)"
            )
        lines = [tracer_line(program.tracer, program.notes)]
        lines += [
            f"untraced: {path!r} ({'the whole model' if not path else 'runs eagerly'}): {plain_reason(why)}"
            for path, why in program.untraced.items()
        ]
        for key, info in program.features.items():
            via = f"graph ({program.tracer})"
            if key in program.cloned:
                via += ", cloned before a later in-place op"
            lines.append(f"{key}: {info.kind} {info.key} ({info.op}) <- {via}")
        runtime = program.runtime
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
        state["_running"] = {True: [], False: []}
        state["_compiled"] = {}
        for key in ("_program", "_build_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._build_lock = threading.RLock()
        self._program = self._program_for(self._model.training, ())

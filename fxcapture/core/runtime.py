"""Capture at run time inside code that no tracer can follow.

A model (or a submodule) with data-dependent Python control flow runs eagerly as an
"untraced region"; inside a region, values are captured while it runs:

* module outputs with forward hooks registered for one call and removed in ``finally``;
* locals with a profile function (per thread, chained to one already active) that is
  on only while a region runs and reads ``frame.f_locals`` when a watched function
  returns. No function's ``__code__`` is ever rewritten.

Run-time capture only observes: module outputs and locals become
:class:`~.records.Observation` s of the call, keyed by the same
:func:`~.records.key_observations` as a graph's and selected by the same
:func:`~.select.match` / :func:`~.select.resolve`, so the keys, their ``@i`` and
their order are the graph tracers' (a clock on torch functions orders the values as
a graph orders its nodes). The first call *discovers* which functions and modules
hold the selected values and which values a later in-place op overwrites (those are
cloned from then on); later calls watch only those. A module called a data-dependent
number of times gives that call's ``key@0..k-1``; a selected module that did not run
on a call is missing from that call with a warning.

Everything a call installs belongs to that call: two threads sharing one extractor
never see each other's values.

Example::

    >>> ex = capture(model_with_data_dependent_loop, ["refine", "refine:delta"])
    >>> out, feats = ex(x)
    >>> print(ex.explain())
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .._util.tree import holds_tensors, leaves, tree_map
from .attention import PROBS, PROBS_MEAN, ExplicitAttentionMode
from .edit import apply_edit
from .frames import FrameFilter
from .._util.internals import chain_profile, tensor_version
from .records import LOCAL, MODULE, Catalogue, NameInfo, Observation, key_observations
from .select import Selector, SelectorPairs, match, match_record, resolve, unknown_selector_error

_ACTIVE = threading.local()  # the session of the extractor call running in this thread


def _clone(value: Any) -> Any:
    return tree_map(torch.Tensor.clone, value)


def _same(a: Any, b: Any) -> bool:
    ta, tb = leaves(a), leaves(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb)
    )


def _is_torch_leaf(module: torch.nn.Module) -> bool:
    """A torch.nn module that ``torch.fx`` records as one node (its ``Tracer.is_leaf_module``)."""
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn")) and type(module) is not torch.nn.Sequential


class _Clock(torch.overrides.TorchFunctionMode):
    """Execution order at run time: each tensor a torch function returns gets the next
    tick (as a graph numbers its nodes), so run-time observations sort like the graph's."""

    def __init__(self) -> None:
        super().__init__()
        self.tick = 0
        self._ticks: dict[int, tuple[int, weakref.ref]] = {}
        self._writes: dict[int, tuple[int, weakref.ref]] = {}  # by base tensor: the last in-place write

    def __torch_function__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        version = tensor_version(first) if isinstance(first, torch.Tensor) else None
        out = func(*args, **(kwargs or {}))
        written = version is not None and tensor_version(first) != version
        if out is first and not written:
            return out  # an identity (eval dropout): the graph's same node, no new tick
        self.tick += 1
        for t in leaves(out):
            self._ticks[id(t)] = (self.tick, weakref.ref(t))
        if written:  # `x[i] = v`, `view.mul_(2)`: every view of the base now reads this write
            base = first if first._base is None else first._base
            self._writes[id(base)] = (self.tick, weakref.ref(base))
        return out

    def settle(self, output: Any, inputs: Any) -> None:
        """Give the tensors ``output`` made (not among ``inputs``) one new tick: what a graph
        sees of a leaf module, one node whose outputs come after it (``getitem`` nodes)."""
        given = {id(t) for t in leaves(inputs)}
        fresh = [t for t in leaves(output) if id(t) not in given]
        if len(fresh) > 1:
            self.tick += 1
            for t in fresh:
                self._ticks[id(t)] = (self.tick, weakref.ref(t))

    def position(self, value: Any) -> int:
        """The latest tick of the tensors in ``value`` (-1: none made during this call)."""
        found = [-1]
        for t in leaves(value):
            base = t if t._base is None else t._base
            for ticks, held in ((self._ticks, t), (self._writes, base)):
                tick, ref = ticks.get(id(held), (-1, None))
                found.append(tick if ref is not None and ref() is held else -1)
        return max(found)


@dataclass
class _Seen:
    """An observed value: as the model holds it (its identity keys it) and as kept."""

    value: Any
    kept: Any
    code: Any = None  # the code object of the frame holding a local


@dataclass
class _Plan:
    """What the first call learned about one selected run-time value."""

    info: NameInfo
    codes: set = field(default_factory=set)  # code objects of the frames holding a local
    clone: bool = False


@dataclass
class _Session:
    """Everything of one call: what it observed and what it installed."""

    capture: "RuntimeCapture"
    discovering: bool
    observations: list[Observation] = field(default_factory=list)
    clock: _Clock = field(default_factory=_Clock)
    previous_profile: Any = None
    depth: int = 0  # region forwards running (the profile function is on while > 0)
    stack: list[str] = field(default_factory=list)  # paths of the modules being called
    edit_calls: dict[str, int] = field(default_factory=dict)

    def is_current(self) -> bool:
        return getattr(_ACTIVE, "session", None) is self


def _parts(seen: _Seen) -> list[Any]:
    return leaves(seen.value)


class RuntimeCapture:
    """Run-time capture inside the untraced regions of one extractor.

    It only observes: module outputs (forward hooks) and locals at return (a profile
    function) become :class:`~.records.Observation` s of the call, which
    :func:`~.records.key_observations` keys as it keys a graph's, and
    :func:`~.select.match` selects from. Every call has its own :class:`_Session`.

    Args:
        root: the model.
        regions: ``{module path: why}`` for the modules that run eagerly (``""``
            when the whole model does).
        selectors: ``[(alias, selector)]`` the graph could not resolve.
        edits: ``{selector: fn(value, key)}`` applied to module outputs at run time.
        known: keys the graph already captures (the run-time side skips them).
        optional: selectors that already matched in the graph (no error if they
            match nothing at run time).
        attention: ``"weights"``: fused attention in the regions is computed
            explicitly and its probabilities are the local ``attn_probs`` of the
            calling module (as in the graph, :mod:`.attention`).
    """

    def __init__(
        self,
        root: torch.nn.Module,
        regions: dict[str, str],
        selectors: list[tuple[str | None, Selector]],
        edits: dict[Any, Callable[[Any, str], Any]] | None = None,
        known: set[str] = frozenset(),
        optional: list[Selector] = (),
        attention: str | None = None,
    ) -> None:
        self.regions = regions
        self.selectors = selectors
        self.edits = dict(edits or {})
        self.known = set(known)
        self.optional = list(optional)
        self.attention = attention
        self.frames = FrameFilter(root)
        self.modules: dict[str, torch.nn.Module] = {  # the modules inside the regions
            path: module for path, module in root.named_modules()
            if any(path == r or path.startswith(r + ".") or r == "" for r in regions)
        }  # fmt: skip
        # set once, by the first call (under the lock); read-only afterwards
        self.discovered = False
        self.catalogue: list[NameInfo] = []  # every run-time value seen by the first call
        self.aliases: dict[str, str] = {}
        self.plans: dict[str, _Plan] = {}  # base -> plan, for the selected bases
        self.local_codes: dict[Any, set[str]] = {}
        self.calls: dict[str, int] = {}  # module path -> calls on the first call (edit keys)
        # what the latest call returned, for names and explain() only
        self.features: dict[str, NameInfo] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._check_edits()

    # -- explain ---------------------------------------------------------------------
    def how(self, key: str) -> str:
        plan = self.plans[self.features[key].base]
        where = "run-time local (profile function)" if plan.info.kind == LOCAL else "leaf hook"
        return where + (", cloned" if plan.clone else "")

    # -- one call ----------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[_Session]:
        if torch.compiler.is_dynamo_compiling():  # not is_compiling(): its export flag is process-wide
            refuse_under_compile(RUN_TIME_UNDER_COMPILE.format(where=_describe(self.regions)))
        with self._lock:
            discovering = not self.discovered
        session = _Session(self, discovering)
        handles: list[Any] = []
        outer = getattr(_ACTIVE, "session", None)
        _ACTIVE.session = session
        try:
            handles = self._install(session)
            with session.clock, self._attention_mode(session):
                yield session
        finally:
            for h in handles:
                h.remove()
            if session.depth:
                sys.setprofile(session.previous_profile)
            _ACTIVE.session = outer
        if discovering:
            self._finish_discovery(session)

    def _install(self, session: _Session) -> list[Any]:
        handles = []
        if session.discovering or self.local_codes or self.attention is not None:
            for path, module in self.modules.items():  # the owner of each frame, as fx's
                enter, leave = self._stack_hooks(session, path)
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave, always_call=True))
        if session.discovering:
            targets = [p for p in self.modules if p not in self.regions]
        else:
            targets = [p.info.module for p in self.plans.values() if p.info.kind == MODULE]
            targets += [p for p in self.modules if self._edits_for(p)]
        for path in dict.fromkeys(targets):
            handles.append(self.modules[path].register_forward_hook(self._module_hook(session, path)))
        return handles

    def _attention_mode(self, session: _Session):
        if self.attention is None:
            return contextlib.nullcontext()

        def observer(name: str) -> Callable[[torch.Tensor], None]:
            def observe(probs: torch.Tensor, function: str) -> None:
                if session.depth and session.is_current():  # inside an untraced region
                    owner = session.stack[-1] if session.stack else ""
                    self._observe(session, LOCAL, owner, function, name, probs)

            return observe

        return ExplicitAttentionMode(observer(PROBS), observer(PROBS_MEAN))

    def _edits_for(self, path: str) -> list[Any]:
        """The edits selecting the output of module ``path``, in dict order."""
        info = NameInfo(path, MODULE, path, "", path)
        return [edit for selector, edit in self.edits.items() if match_record(info, selector)]

    def _check_edits(self) -> None:
        """Every edit must select a module output: locals cannot be replaced at run time."""
        for selector in self.edits:
            if not any(match_record(NameInfo(p, MODULE, p, "", p), selector) for p in self.modules):
                raise ValueError(
                    f"cannot edit {selector!r}: it runs inside {_describe(self.regions)}, "
                    "which no tracer can follow, and a local variable cannot be replaced "
                    "at run time. Edit the output of the enclosing module instead (a module "
                    "path such as 'transformer.h.1'), or make the module traceable."
                )

    def _stack_hooks(self, session: _Session, path: str) -> tuple[Callable, Callable]:
        """The modules being called (a frame's owner is the innermost, as in the graph
        tracers), and the profile function on while a region runs (nested ones counted)."""
        region = path in self.regions

        def enter(module, args):
            if session.is_current():
                session.stack.append(path)
                if region:
                    if session.depth == 0:
                        session.previous_profile = sys.getprofile()
                        sys.setprofile(chain_profile(self._on_profile_event, session.previous_profile))
                    session.depth += 1

        def leave(module, args, output):
            if session.is_current() and session.stack and session.stack[-1] == path:
                session.stack.pop()
                if region and session.depth:
                    session.depth -= 1
                    if session.depth == 0:
                        sys.setprofile(session.previous_profile)

        return enter, leave

    def _module_hook(self, session: _Session, path: str) -> Callable:
        edits = self._edits_for(path)

        def hook(module, args, output):
            if not session.is_current():
                return None
            if edits:
                call = session.edit_calls[path] = session.edit_calls.get(path, -1) + 1
                key = path if self.calls.get(path, 1) <= 1 else f"{path}@{call}"
                for edit in edits:
                    output = apply_edit(edit, output, key)
            if _is_torch_leaf(module):  # ordered as the symbolic graph orders what it returns
                session.clock.settle(output, args)
            self._observe(session, MODULE, path, type(module).__name__, "", output)
            return output if edits else None

        return hook

    def _on_profile_event(self, frame, event: str, arg: Any) -> None:
        if event != "return":
            return
        session = getattr(_ACTIVE, "session", None)
        if session is None or session.capture is not self:
            return
        code = frame.f_code
        if session.discovering:
            if not self.frames.watches(frame.f_code):
                return
            names = None
        else:
            names = self.local_codes.get(code)
            if not names:
                return
        owner = session.stack[-1] if session.stack else ""
        function = getattr(code, "co_qualname", code.co_name)
        for name, value in frame.f_locals.items():
            if names is not None and name not in names:
                continue
            if name == "self" or name.startswith((".", "__")) or not holds_tensors(value):
                continue
            self._observe(session, LOCAL, owner, function, name, value, code)

    # -- observing -------------------------------------------------------------------
    def _observe(self, session: _Session, kind: str, module: str, op: str, name: str, value: Any,
                 code: Any = None) -> None:  # fmt: skip
        obs = Observation(kind, module, op, name, None, session.clock.position(value))
        if session.discovering:
            wanted = any(match_record(NameInfo(obs.base, kind, module, op, obs.base), s) for _, s in self.selectors)
            obs.value = _Seen(value, _clone(value) if wanted else None, code)
        else:
            plan = self.plans.get(obs.base)
            if plan is None or (code is not None and code not in plan.codes):
                return
            obs.value = _Seen(value, _clone(value) if plan.clone else value, code)
        session.observations.append(obs)

    def _finish_discovery(self, session: _Session) -> None:
        records, aliases = key_observations(session.observations, _parts)
        catalogue = Catalogue(records, aliases)
        plans: dict[str, _Plan] = {}
        for _, selector in self.selectors:
            found = match(catalogue, selector)
            path = selector if isinstance(selector, str) else None
            if not found and path in self.modules and path not in self.regions:  # exists, did not run
                plans[path] = _Plan(NameInfo(path, MODULE, path, type(self.modules[path]).__name__, path))
            elif not found and not any(selector is o for o in self.optional):
                raise unknown_selector_error(catalogue, selector)
            for r in found:
                plan = plans.setdefault(r.base, _Plan(r))
                plan.codes.add(r.value.code)
                plan.clone |= r.value.kept is not None and not _same(r.value.kept, r.value.value)
        local_codes: dict[Any, set[str]] = defaultdict(set)
        for base, plan in plans.items():
            plan.codes.discard(None)
            for code in plan.codes:
                local_codes[code].add(base.rpartition(":")[2])
        calls: dict[str, int] = defaultdict(int)
        for r in records:
            calls[r.module] += r.kind == MODULE
        with self._lock:
            if self.discovered:
                return
            self.catalogue, self.aliases, self.plans = records, aliases, plans
            self.local_codes, self.calls = dict(local_codes), dict(calls)
            self.discovered = True

    def collect(self, session: _Session) -> dict[str, Any]:
        """The selected values of one call, keyed like the graph's features (the same
        keying, :func:`~.records.key_observations`, and the same selection)."""
        records, _ = key_observations(session.observations, _parts)
        catalogue = Catalogue(records, self.aliases)
        pairs = SelectorPairs((a, s) for a, s in self.selectors if match(catalogue, s))
        features = {k: r for k, r in resolve(catalogue, pairs).items() if k not in self.known}
        self._warn_missing({r.base for r in records})
        self.features = features
        return {key: r.value.kept for key, r in features.items()}

    def _warn_missing(self, produced: set[str]) -> None:
        with self._lock:
            missing = [b for b in self.plans if b not in produced and b not in self._warned]
            self._warned.update(missing)
        for base in missing:
            warnings.warn(
                f"fxcapture: {base!r} produced no value on this call (its module did not "
                "run or its function did not return); it is missing from this call's "
                "features.",
                stacklevel=4,
            )


RUN_TIME_UNDER_COMPILE = (
    "fxcapture: these values are captured at run time inside modules that no tracer can "
    "follow ({where}), and torch.compile cannot see run-time captures. Compile the model "
    "without capture, make those modules traceable (leaf_modules=, concrete_args=), or "
    "capture only values of the traced part."
)


TRACE_UNDER_COMPILE = (
    "fxcapture: this extractor traces the model by running it on the first call with new "
    "kinds of inputs, which cannot happen inside torch.compile: call the extractor once "
    "before compiling it, or pass capture(..., example_inputs=...)."
)


@torch.compiler.assume_constant_result
def refuse_under_compile(message: str) -> None:
    """Raise ``RuntimeError(message)``, also while torch.compile traces the caller.

    Marked as a constant for torch.compile, dynamo runs it while tracing and the message
    is the first line of the error it raises (a ``raise`` dynamo traces would surface as
    "Observed exception", the message hidden in its debug context).
    """
    raise RuntimeError(message)


def _describe(regions: dict[str, str]) -> str:
    return ", ".join(repr(r) if r else "the model's forward" for r in regions)

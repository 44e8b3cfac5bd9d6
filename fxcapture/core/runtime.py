"""Capture at run time inside code that no tracer can follow.

A model (or a submodule) with data-dependent Python control flow runs eagerly as an
"untraced region"; inside a region, values are captured while it runs:

* module outputs with forward hooks registered for one call and removed in ``finally``;
* locals with a profile function (per thread, chained to one already active) that is
  on only while a region runs and reads ``frame.f_locals`` when a watched function
  returns. No function's ``__code__`` is ever rewritten.

Keys follow the graph's scheme (:mod:`.records`). The first call *discovers* the
run-time names: it records every module output and local in the regions, resolves
the selectors the graph could not, and notes which values a later in-place op
overwrote (those are cloned from then on). Later calls watch only the modules and
functions that hold the selected values, and key what each call produced: a module
called a data-dependent number of times gives that call's ``key@0..k-1``; a selected
module that did not run on a call is missing from that call with a warning.

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
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .._util.tree import leaves, tree_map
from .attention import ExplicitAttentionMode
from .edit import apply_edit
from .frames import FrameFilter
from .internals import caller_frame, chain_profile
from .records import LOCAL, MODULE, Catalogue, NameInfo
from .select import Selector, match_record, unknown_selector_error

_ACTIVE = threading.local()  # the session of the extractor call running in this thread


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list, dict)) and bool(leaves(value))


def _clone(value: Any) -> Any:
    return tree_map(torch.Tensor.clone, value)


def _same(a: Any, b: Any) -> bool:
    ta, tb = leaves(a), leaves(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb)
    )


@dataclass
class _Plan:
    """What the first call learned about one selected run-time value."""

    info: NameInfo
    codes: set = field(default_factory=set)  # code objects of the frames holding a local
    clone: bool = False


@dataclass
class _Session:
    """Values recorded during one call, and what that call installed."""

    capture: "RuntimeCapture"
    discovering: bool
    values: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    previous_profile: Any = None
    depth: int = 0
    edit_calls: dict[str, int] = field(default_factory=dict)
    # discovery only
    originals: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    seen: dict[tuple, str] = field(default_factory=dict)
    keep_alive: list[Any] = field(default_factory=list)
    infos: dict[str, NameInfo] = field(default_factory=dict)
    codes: dict[str, set] = field(default_factory=lambda: defaultdict(set))

    def is_current(self) -> bool:
        return getattr(_ACTIVE, "session", None) is self


class RuntimeCapture:
    """Run-time capture inside the untraced regions of one extractor.

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
        self.paths: dict[int, str] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        for path, module in root.named_modules():
            if any(path == r or path.startswith(r + ".") or r == "" for r in regions):
                self.paths.setdefault(id(module), path)
                self.modules.setdefault(path, module)
        self.region_modules = [root.get_submodule(r) if r else root for r in regions]
        self.discovered = False
        self.catalogue: list[NameInfo] = []  # every run-time value seen by the first call
        # per selector: (alias, [(base, call or None for every call)])
        self.selection: list[tuple[str | None, list[tuple[str, int | None]]]] = []
        self.plans: dict[str, _Plan] = {}  # base -> plan, for the selected bases
        self.local_codes: dict[Any, set[str]] = {}
        self.features: dict[str, tuple[str, int]] = {}  # keys of the latest call -> (base, call)
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._check_edits()

    # -- explain ---------------------------------------------------------------------
    def how(self, key: str) -> str:
        plan = self.plans[self.features[key][0]]
        where = "run-time local (profile function)" if plan.info.kind == LOCAL else "leaf hook"
        return where + (", cloned" if plan.clone else "")

    # -- one call ----------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[_Session]:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "fxcapture: these values are captured at run time inside modules that no "
                f"tracer can follow ({_describe(self.regions)}), and torch.compile cannot "
                "see run-time captures. Compile the model without capture, make those "
                "modules traceable (leaf_modules=, concrete_args=), or capture only values "
                "of the traced part."
            )
        with self._lock:
            discovering = not self.discovered
        session = _Session(self, discovering)
        handles: list[Any] = []
        outer = getattr(_ACTIVE, "session", None)
        _ACTIVE.session = session
        try:
            handles = self._install(session)
            with self._attention_mode(session):
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
            enter, leave = self._region_hooks(session)
            for module in self.region_modules:
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

        def on_probs(probs: torch.Tensor) -> None:
            if session.depth and session.is_current():  # inside an untraced region
                owner = self._owner(caller_frame())
                self._record(session, f"{owner}:attn_probs", LOCAL, "scaled_dot_product_attention", probs, None)

        return ExplicitAttentionMode(on_probs)

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

    def _region_hooks(self, session: _Session) -> tuple[Callable, Callable]:
        """Profile function on/off around region forwards (nested regions are counted)."""

        def enter(module, args):
            if session.is_current():
                if session.depth == 0:
                    session.previous_profile = sys.getprofile()
                    sys.setprofile(chain_profile(self._on_profile_event, session.previous_profile))
                session.depth += 1

        def leave(module, args, output):
            if session.is_current() and session.depth:
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
                calls = session.edit_calls[path] = session.edit_calls.get(path, -1) + 1
                count = len(self.features_of(path)) or 1
                key = path if count == 1 else f"{path}@{calls}"
                for edit in edits:
                    output = apply_edit(edit, output, key)
            self._record(session, path, MODULE, type(module).__name__, output, None)
            return output if edits else None

        return hook

    def features_of(self, base: str) -> list[str]:
        return [k for k, (b, _) in self.features.items() if b == base]

    def _on_profile_event(self, frame, event: str, arg: Any) -> None:
        if event != "return":
            return
        session = getattr(_ACTIVE, "session", None)
        if session is None or session.capture is not self:
            return
        code = frame.f_code
        if session.discovering:
            if not self.frames.watches(code):
                return
            names = None
        else:
            names = self.local_codes.get(code)
            if not names:
                return
        owner = self._owner(frame)
        function = getattr(code, "co_qualname", code.co_name)
        for name, value in frame.f_locals.items():
            if names is not None and name not in names:
                continue
            if name == "self" or name.startswith((".", "__")) or not _holds_tensors(value):
                continue
            self._record(session, f"{owner}:{name}", LOCAL, function, value, code)

    def _owner(self, frame) -> str:
        """Path of the innermost module whose method (or a helper it called) is running."""
        f = frame
        while f is not None:
            owner = f.f_locals.get("self")
            if owner is not None:
                path = self.paths.get(id(owner))
                if path is not None:
                    return path
            f = f.f_back
        return ""

    # -- recording -----------------------------------------------------------------
    def _record(self, session: _Session, base: str, kind: str, op: str, value: Any, code) -> None:
        if not session.discovering:
            plan = self.plans.get(base)
            if plan is not None and (code is None or code in plan.codes):
                session.values[base].append(_clone(value) if plan.clone else value)
            return
        tensors = leaves(value)
        if kind == LOCAL:
            identity = (base.rpartition(":")[2], tuple(id(t) for t in tensors))
            if session.seen.get(identity) is not None:
                return  # same value in an outer frame: keyed where it was created
            session.seen[identity] = base
        session.keep_alive.append(tensors)
        module = base.rpartition(":")[0] if kind == LOCAL else base
        info = session.infos.setdefault(base, NameInfo(base, kind, module, op, base))
        if code is not None:
            session.codes[base].add(code)
        if self._wanted(info):
            session.values[base].append(_clone(value))
            session.originals[base].append(value)
        else:
            session.values[base].append(None)

    def _wanted(self, info: NameInfo) -> bool:
        return any(match_record(info, sel) for _, sel in self.selectors)

    def _finish_discovery(self, session: _Session) -> None:
        catalogue = []
        for base, values in session.values.items():
            info = session.infos[base]
            for i in range(len(values)):
                key = base if len(values) == 1 else f"{base}@{i}"
                call = None if len(values) == 1 else i
                catalogue.append(NameInfo(key, info.kind, info.module, info.op, base, call))
        selection, plans = [], {}
        for alias, selector in self.selectors:
            found = [r for r in catalogue if match_record(r, selector)]
            if not found:
                path = selector if isinstance(selector, str) else None
                if path in self.modules and path not in self.regions:  # exists, did not run
                    plans[path] = _Plan(NameInfo(path, MODULE, path, type(self.modules[path]).__name__, path))
                    selection.append((alias, [(path, None)]))
                    continue
                if any(selector is o for o in self.optional):
                    continue
                raise unknown_selector_error(Catalogue(catalogue, {}), selector)
            exact_call = isinstance(selector, str) and "@" in selector
            entries = list(dict.fromkeys(
                (r.base, r.call if exact_call else None) for r in found
            ))  # fmt: skip
            selection.append((alias, entries))
            for r in found:
                if r.base not in plans:
                    mutated = any(
                        not _same(c, o)
                        for c, o in zip(session.values[r.base], session.originals[r.base])
                    )
                    plans[r.base] = _Plan(session.infos[r.base], set(session.codes.get(r.base, ())), mutated)
        local_codes: dict[Any, set[str]] = defaultdict(set)
        for base, plan in plans.items():
            for code in plan.codes:
                local_codes[code].add(base.rpartition(":")[2])
        with self._lock:
            if self.discovered:
                return
            self.catalogue, self.selection, self.plans = catalogue, selection, plans
            self.local_codes = dict(local_codes)
            self.features = self._keys(session.values)
            self.discovered = True

    def _keys(self, values: dict[str, list[Any]]) -> dict[str, tuple[str, int]]:
        """Output key -> (base, index into that base's values) for one call's values."""
        keys: dict[str, tuple[str, int]] = {}
        for alias, entries in self.selection:
            picked = []
            for base, call in entries:
                count = len(values.get(base, ()))
                if call is None:
                    picked += [(base, i, count) for i in range(count)]
                elif call < count:
                    picked.append((base, call, count))
            for j, (base, i, count) in enumerate(picked):
                if alias is None:
                    key = base if count == 1 else f"{base}@{i}"
                else:
                    key = alias if len(picked) == 1 else f"{alias}@{j}"
                if key not in self.known:
                    keys.setdefault(key, (base, i))
        return keys

    def collect(self, session: _Session) -> dict[str, Any]:
        """The selected values of one call, keyed like the graph's features."""
        keys = self._keys(session.values)
        missing = [b for b in self.plans if not session.values.get(b)]
        for base in missing:
            if base not in self._warned:
                self._warned.add(base)
                warnings.warn(
                    f"fxcapture: {base!r} produced no value on this call (its module did not "
                    "run or its function did not return); it is missing from this call's "
                    "features.",
                    stacklevel=3,
                )
        self.features = keys
        return {key: session.values[base][i] for key, (base, i) in keys.items()}


def _describe(regions: dict[str, str]) -> str:
    return ", ".join(repr(r) if r else "the model's forward" for r in regions)

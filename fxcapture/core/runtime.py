"""Stage 4b: capture at run time inside code that torch.fx cannot trace.

A model that does not trace whole is traced with its failing submodules as leaves
("untraced regions"); inside a region, values are captured while it runs:

* module outputs with forward hooks registered for one call and removed in ``finally``;
* locals with a profile function (``sys.setprofile``, per thread) that is active only
  while a region runs and reads ``frame.f_locals`` when a watched function returns.
  No function's ``__code__`` is ever rewritten.

Keys follow the graph's scheme (:mod:`fxcapture.catalogue`). The first call
*discovers* the run-time names: it records every module output and local in the
regions, resolves the selectors the graph could not, and notes which values a later
in-place op overwrote (those are cloned from then on). Later calls hook only the
modules and functions that hold the selected values.

Example::

    >>> ex = capture(gpt2, ["attn_weights", "transformer.h.1"])  # fx fails on GPT-2
    >>> out, feats = ex(input_ids)
    >>> print(ex.explain())
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .._util.tree import leaves, tree_map
from .attention import ExplicitAttentionMode
from .edit import apply_edit
from .records import LOCAL, MODULE, Catalogue, NameInfo
from .select import Selector, match_record, unknown_selector_error
from .trace import chain_profile, watches_code

_ACTIVE = threading.local()  # the session of the extractor call running in this thread


def _tensors(value: Any) -> list[torch.Tensor]:
    return leaves(value)


def _holds_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list, dict)) and bool(_tensors(value))


def _clone(value: Any) -> Any:
    return tree_map(torch.Tensor.clone, value)


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb)
    )


@dataclass
class _Pending:
    """What the first call learns about one selected run-time value."""

    info: NameInfo
    code: Any = None  # code object of the frame that created a local
    clone: bool = False


@dataclass
class _Session:
    """Values recorded during one call."""

    capture: "RuntimeCapture"
    values: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    previous_profile: Any = None
    depth: int = 0
    # discovery only
    originals: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    seen: dict[tuple, str] = field(default_factory=dict)
    keep_alive: list[Any] = field(default_factory=list)
    infos: dict[str, NameInfo] = field(default_factory=dict)
    codes: dict[str, Any] = field(default_factory=dict)
    edit_calls: dict[str, int] = field(default_factory=dict)


class RuntimeCapture:
    """Run-time capture inside the untraced regions of one extractor.

    Args:
        root: the model.
        regions: ``{module path: why fx failed}`` for the modules that run eagerly
            (``""`` when the root itself does not trace).
        selectors: ``[(alias, selector)]`` the graph could not resolve.
        edits: ``{selector: fn(value, key)}`` applied to module outputs at run time.
        known: keys the graph already captures (the run-time side skips them).
        optional: selectors that already matched in the graph (no error if they
            match nothing at run time).
        attention: ``"weights"``: fused attention in the regions is computed
            explicitly and its probabilities are the local ``attn_probs`` of the
            calling module (as in the graph, :mod:`fxcapture.attention`).
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
        self.paths: dict[int, str] = {}
        self.modules: dict[str, torch.nn.Module] = {}
        for path, module in root.named_modules():
            if any(path == r or path.startswith(r + ".") or r == "" for r in regions):
                self.paths.setdefault(id(module), path)
                self.modules.setdefault(path, module)
        self.region_modules = [root.get_submodule(r) if r else root for r in regions]
        self.discovered = False
        self.catalogue: list[NameInfo] = []  # every run-time value seen by the first call
        self.features: dict[str, tuple[str, int | None]] = {}  # out key -> (base, call)
        self.plans: dict[str, _Pending] = {}  # base -> plan, for the selected bases
        self.counts: dict[str, int] = {}
        self.local_codes: dict[Any, set[str]] = {}
        self._lock = threading.Lock()
        self._check_edits()

    # -- explain ---------------------------------------------------------------------
    def how(self, key: str) -> str:
        base = self.features[key][0]
        plan = self.plans[base]
        where = "run-time local (profile function)" if plan.info.kind == LOCAL else "leaf hook"
        return where + (", cloned" if plan.clone else "")

    # -- one call ----------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[_Session]:
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "fxcapture: these values are captured at run time inside modules that "
                f"torch.fx could not trace ({_describe(self.regions)}), "
                "and torch.compile cannot see run-time captures. Compile the model "
                "without capture, make those modules traceable (leaf_modules=, "
                "concrete_args=), or capture only values of the traced part."
            )
        with self._lock:
            discovering = not self.discovered
        session = _Session(self)
        handles = []
        outer = getattr(_ACTIVE, "session", None)
        _ACTIVE.session = session
        try:
            handles = self._install(session, discovering)
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

    def _install(self, session: _Session, discovering: bool) -> list[Any]:
        handles = []
        profile_needed = discovering or bool(self.local_codes)
        if profile_needed:
            for module in self.region_modules:
                handles.append(module.register_forward_pre_hook(self._enter_region))
                handles.append(module.register_forward_hook(self._leave_region, always_call=True))
        if discovering:
            targets = [p for p in self.modules if p not in self.regions]
        else:
            targets = [self.plans[b].info.module for b in self.plans if self.plans[b].info.kind == MODULE]
            targets += [p for p in self._edited_paths() if p not in targets]
        for path in dict.fromkeys(targets):
            hook = self._module_hook(path)
            handles.append(self.modules[path].register_forward_hook(hook))
        return handles

    def _attention_mode(self, session: _Session):
        if self.attention is None:
            return contextlib.nullcontext()

        def on_probs(probs: torch.Tensor) -> None:
            if session.depth:  # inside an untraced region
                owner = self._owner(sys._getframe(1))
                self._record(session, f"{owner}:attn_probs", LOCAL, "scaled_dot_product_attention", probs, None)

        return ExplicitAttentionMode(on_probs)

    def _edited_paths(self) -> list[str]:
        return [p for p in self.modules if self._edits_for(p)]

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
                    "which torch.fx could not trace, and a local variable cannot be replaced "
                    "at run time. Edit the output of the enclosing module instead (a module "
                    "path such as 'transformer.h.1'), or make the module traceable."
                )

    # profile function on/off around region forwards (nested regions are counted)
    def _enter_region(self, module, args):
        session = getattr(_ACTIVE, "session", None)
        if session is None or session.capture is not self:
            return None
        if session.depth == 0:
            session.previous_profile = sys.getprofile()
            sys.setprofile(self._on_profile_event)
        session.depth += 1
        return None

    def _leave_region(self, module, args, output):
        session = getattr(_ACTIVE, "session", None)
        if session is None or session.capture is not self or session.depth == 0:
            return None
        session.depth -= 1
        if session.depth == 0:
            sys.setprofile(session.previous_profile)
        return None

    def _module_hook(self, path: str):
        edits = self._edits_for(path)

        def hook(module, args, output):
            session = getattr(_ACTIVE, "session", None)
            if session is None or session.capture is not self:
                return None
            if edits:
                calls = session.edit_calls[path] = session.edit_calls.get(path, -1) + 1
                count = self.counts.get(path, 1)
                key = path if count == 1 else f"{path}@{calls}"
                for edit in edits:
                    output = apply_edit(edit, output, key)
            self._record(session, path, MODULE, type(module).__name__, output, None)
            return output if edits else None

        return hook

    def _on_profile_event(self, frame, event: str, arg: Any) -> None:
        if event != "return":
            return
        session = getattr(_ACTIVE, "session", None)
        if session is None or session.capture is not self:
            return
        code = frame.f_code
        if self.discovered:
            names = self.local_codes.get(code)
            if not names:
                return
        elif not watches_code(code):
            return
        else:
            names = None
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
        if self.discovered:
            plan = self.plans.get(base)
            if plan is not None:
                session.values[base].append(_clone(value) if plan.clone else value)
            return
        tensors = _tensors(value)
        if kind == LOCAL:
            identity = (base.rpartition(":")[2], tuple(id(t) for t in tensors))
            origin = session.seen.get(identity)
            if origin is not None:
                return  # same value in an outer frame: keyed where it was created
            session.seen[identity] = base
        session.keep_alive.append(tensors)
        module = base.rpartition(":")[0] if kind == LOCAL else base
        info = NameInfo(base, kind, module, op, base)
        session.infos.setdefault(base, info)
        if code is not None:
            session.codes.setdefault(base, code)
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
            self.counts[base] = len(values)
            for i in range(len(values)):
                key = base if len(values) == 1 else f"{base}@{i}"
                catalogue.append(
                    NameInfo(key, info.kind, info.module, info.op, base, None if len(values) == 1 else i)
                )
        with self._lock:
            if self.discovered:
                return
            self.catalogue = catalogue
            features: dict[str, tuple[str, int | None]] = {}
            for alias, selector in self.selectors:
                found = [r for r in catalogue if match_record(r, selector)]
                if not found:
                    if any(selector is o for o in self.optional):
                        continue
                    raise self._unknown(selector)
                for i, r in enumerate(found):
                    key = r.key if alias is None else (alias if len(found) == 1 else f"{alias}@{i}")
                    if key not in self.known:
                        features.setdefault(key, (r.base, r.call))
            plans = {}
            for base, call in features.values():
                info = session.infos[base]
                mutated = any(
                    not _same(c, o) for c, o in zip(session.values[base], session.originals[base])
                )
                plans[base] = _Pending(info, session.codes.get(base), clone=mutated)
            self.features, self.plans = features, plans
            self.local_codes = defaultdict(set)
            for base, plan in plans.items():
                if plan.info.kind == LOCAL:
                    self.local_codes[plan.code].add(base.rpartition(":")[2])
            self.local_codes = dict(self.local_codes)
            self.discovered = True

    def _unknown(self, selector: Selector) -> ValueError:
        return unknown_selector_error(Catalogue(self.catalogue, {}), selector)

    def collect(self, session: _Session) -> dict[str, Any]:
        """The selected values of one call, keyed like the graph's features."""
        feats = {}
        for key, (base, call) in self.features.items():
            values = session.values.get(base, [])
            index = 0 if call is None else call
            if index < len(values):
                feats[key] = values[index]
        return feats


def _describe(regions: dict[str, str]) -> str:
    return ", ".join(repr(r) if r else "the model's forward" for r in regions)



"""Conformance checker shared by the zoo tests and ``benchmarks/zoo_report.py``.

For one model and one input it checks, against references that do not use
fxcapture's graph:

* the extractor's output is ``torch.equal`` to the plain model's (eval);
* each captured module (every direct child that runs, plus a seeded sample of 20
  deeper module paths) equals what a forward hook on that module saw, call by call;
* each local of one attention/block forward equals the value the local had when the
  function returned in an eager run (read from the frame by a profile function);
* in train mode, with the same RNG seed, the extractor gives the output of a deep
  copy of the model, and updates the buffers (BatchNorm running stats) the same way.

Example::

    >>> model, x = torchvision_models.build_torchvision("resnet18")
    >>> result = check_model(model, x, name="resnet18")
    >>> result.status, result.tracer, result.problems
    ('pass', 'symbolic / symbolic', [])
"""

from __future__ import annotations

import copy
import random
import re
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

import fxcapture

SAMPLE_DEEP = 20
SEED = 0
BATCH = 2

# -- zoo parameters --------------------------------------------------------------------

# "zoo:model" -> the engine bug it hits (reported to the lead with a reproducer). Shared
# with benchmarks/zoo_report.py; the full `-m zoo` tests expect these to fail (strict
# xfail); the CI subsets never use them.
KNOWN_ISSUES: dict[str, str] = {}

def zoo_params(names: list[str], zoo: str) -> list[Any]:
    """pytest params for ``names``, known failures as strict xfails with their plan."""
    import pytest

    params = []
    for name in names:
        issue = KNOWN_ISSUES.get(f"{zoo}:{name}")
        marks = [pytest.mark.xfail(reason=issue, strict=True)] if issue else []
        params.append(pytest.param(name, marks=marks))
    return params


def make_input(size: int, seed: int = SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, size, size, generator=generator)


# -- structure-wise comparison ----------------------------------------------------------

def detach_clone(value: Any) -> Any:
    """A deep copy of every tensor in a (nested) value; other leaves unchanged."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: detach_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [detach_clone(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _same(actual: torch.Tensor, expected: torch.Tensor, tol) -> bool:
    """``torch.equal`` with NaNs in the same places (random weights can overflow);
    ``tol=(rtol, atol)`` only where the eager model itself is nondeterministic."""
    if tol is not None:
        return torch.allclose(actual, expected, rtol=tol[0], atol=tol[1], equal_nan=True)
    if actual.is_floating_point() or actual.is_complex():
        both_nan = actual.isnan() & expected.isnan()
        return bool(((actual == expected) | both_nan).all())
    return torch.equal(actual, expected)


def differences(actual: Any, expected: Any, where: str = "", tol=None) -> list[str]:
    """Structure-wise ``torch.equal`` (see ``_same``): one message per leaf that differs."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return [f"{where}: expected a tensor, got {type(actual).__name__}"]
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            return [f"{where}: {tuple(actual.shape)} {actual.dtype} != "
                    f"{tuple(expected.shape)} {expected.dtype}"]  # fmt: skip
        if not _same(actual, expected, tol):
            gap = (actual.float() - expected.float()).abs().max().item()
            return [f"{where}: values differ (max abs diff {gap:.3g})"]
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or list(actual) != list(expected):
            return [f"{where}: keys {list(actual) if isinstance(actual, dict) else type(actual).__name__}"
                    f" != {list(expected)}"]  # fmt: skip
        return [d for k in expected for d in differences(actual[k], expected[k], f"{where}[{k!r}]", tol)]
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return [f"{where}: expected a sequence of {len(expected)}, got {type(actual).__name__}"]
        return [d for i, (a, e) in enumerate(zip(actual, expected))
                for d in differences(a, e, f"{where}[{i}]", tol)]  # fmt: skip
    if actual != expected:
        return [f"{where}: {actual!r} != {expected!r}"]
    return []


# -- independent references: hooks and frames ------------------------------------------------

def module_calls(model: nn.Module, run: Callable[[], Any], paths=None) -> dict[str, list[Any]]:
    """``{path: [output of each call]}`` seen by forward hooks (outputs cloned at once,
    since an in-place op may overwrite them later)."""
    calls: dict[str, list[Any]] = defaultdict(list)
    handles = []
    for path, module in model.named_modules():
        if paths is not None and path not in paths:
            continue

        def hook(_module, _args, output, path=path):
            calls[path].append(detach_clone(output) if paths is not None else None)

        handles.append(module.register_forward_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return dict(calls)


def frame_locals(model: nn.Module, path: str, run: Callable[[], Any]) -> dict[tuple[str, str], list[Any]]:
    """``{(function qualname, variable): [value at each return]}`` for the Python
    functions that return while ``path`` is the innermost running module (eager run,
    read with ``sys.setprofile``; tensors cloned at once)."""
    stack: list[str] = []
    found: dict[tuple[str, str], list[Any]] = defaultdict(list)
    handles = []

    def enter(path):
        return lambda module, args: stack.append(path)

    def leave(module, args, output):
        stack.pop()  # a hook that returns something replaces the output

    for p, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(p)))
        handles.append(module.register_forward_hook(leave))

    def profile(frame, event, arg):
        if event != "return" or not stack or stack[-1] != path:
            return
        code = frame.f_code
        function = getattr(code, "co_qualname", code.co_name)
        for name, value in frame.f_locals.items():
            if name != "self" and not name.startswith((".", "__")):
                found[(function, name)].append(detach_clone(value))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(previous)
        for handle in handles:
            handle.remove()
    return found


# -- choosing what to capture ---------------------------------------------------------------

def _inside_torch_leaf(model: nn.Module, path: str) -> bool:
    """True if a proper ancestor of ``path`` is a ``torch.nn`` layer that fx does not
    trace into (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``...)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        module = model.get_submodule(".".join(parts[:i]))
        if type(module).__module__.startswith("torch.nn") and not isinstance(module, nn.Sequential):
            return True
    return False


@dataclass
class Plan:
    children: list[str]
    deep: list[str]
    skipped: dict[str, str]  # path -> why it is not captured
    locals_module: str | None
    local_keys: list[str]


_ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)
_BLOCK = re.compile(r"block|layer(?!norm)|bottleneck|cell|stage|residual|inverted|mbconv|fire|"
                    r"inception|stem", re.IGNORECASE)  # fmt: skip


def plan_captures(model: nn.Module, x: torch.Tensor, **capture_kwargs: Any) -> Plan:
    """Which modules and locals to capture (seeded, so the same on every run)."""
    with torch.no_grad():
        called = module_calls(model, lambda: model(x))
    skipped: dict[str, str] = {}
    children = []
    for name, _ in model.named_children():
        if name in called:
            children.append(name)
        else:
            skipped[name] = "not called by forward in eval mode"
    deeper = [p for p in called if "." in p and not _inside_torch_leaf(model, p)]
    inside_leaf = [p for p in called if "." in p and _inside_torch_leaf(model, p)]
    for p in inside_leaf:
        skipped[p] = "inside a torch.nn layer that fx keeps whole (capture the layer)"
    rng = random.Random(SEED)
    deep = sorted(rng.sample(deeper, min(SAMPLE_DEEP, len(deeper))), key=list(called).index)

    locals_module, local_keys = None, []
    table = fxcapture.list_names(model, kinds=["local"], **capture_kwargs)
    by_module: dict[str, list[str]] = defaultdict(list)
    for info in table:
        by_module[info.module].append(info.key)
    modules = dict(model.named_modules())
    for pattern in (_ATTENTION, _BLOCK):
        for path in by_module:
            if path and pattern.search(type(modules[path]).__name__):
                locals_module, local_keys = path, by_module[path]
                break
        if locals_module is not None:
            break
    return Plan(children, deep, skipped, locals_module, local_keys)


# -- the check ---------------------------------------------------------------------------------

@dataclass
class Result:
    name: str
    status: str = "fail"  # "pass" | "fail"
    reason: str = ""
    tracer: str = ""  # ex.tracer in eval (and "/ train" where trained)
    tolerance: str = "exact"
    problems: list[str] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    n_modules: int = 0
    n_locals: int = 0
    locals_module: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    seconds_eval: float = 0.0  # capture and first eval call (includes the trace)
    seconds: float = 0.0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _module_keys(extractor_names: list[str], path: str) -> list[str]:
    return [k for k in extractor_names if k == path or re.fullmatch(re.escape(path) + r"@\d+", k)]


def check_modules(model, x, feats, names, paths) -> list[str]:
    with torch.no_grad():
        hooked = module_calls(model, lambda: model(x), set(paths))
    return module_differences(feats, names, paths, hooked, "module")


def module_differences(feats, names, paths, hooked, label: str, tol=None) -> list[str]:
    """Each module's captured calls (``path``, ``path@i``) against what its hooks saw."""
    problems = []
    for path in paths:
        keys = _module_keys(names, path)
        expected = hooked.get(path, [])
        if len(keys) != len(expected):
            problems.append(f"{label} {path}: {len(keys)} captured calls, hooks saw {len(expected)}")
            continue
        for key, value in zip(keys, expected):
            problems += differences(feats[key], value, f"{label} {key}", tol)
    return problems


def check_locals(model, x, extractor, feats, module_path, keys) -> list[str]:
    with torch.no_grad():
        eager = frame_locals(model, module_path, lambda: model(x))
    catalogue = extractor.catalogue
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in keys:
        info = catalogue.by_key[key]
        groups[(info.op, info.variable)].append(key)
    problems = []
    for (function, variable), group in groups.items():
        expected = eager.get((function, variable))
        if expected is None:
            problems.append(f"local {group[0]}: {function} never returned with {variable!r} eagerly")
            continue
        if len(expected) != len(group):
            # One frame value may be keyed elsewhere (same value in an outer frame):
            # each capture must still equal one of the eager values.
            for key in group:
                if all(differences(feats[key], e) for e in expected):
                    problems.append(f"local {key}: equals none of the {len(expected)} eager values")
            continue
        for key, value in zip(group, expected):
            problems += differences(feats[key], value, f"local {key}")
    return problems


def check_train(model, x, extractor, names) -> list[str]:
    """Train mode: with the same seed, the extractor gives the output, the module
    values (hooks) and the buffer updates (BatchNorm stats) of a deep copy."""
    reference = copy.deepcopy(model).train()
    extractor.train()

    def run_reference():
        torch.manual_seed(SEED + 1)
        run_reference.out = reference(x)

    try:
        with torch.no_grad():
            hooked = module_calls(reference, run_reference, set(names))
            torch.manual_seed(SEED + 1)
            out, feats = extractor(x)
        check_train.tracer = extractor.tracer
    finally:
        extractor.eval()
    problems = differences(out, run_reference.out, "train output")
    problems += module_differences(feats, extractor.names, names, hooked, "train module")
    buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        if name in buffers:
            problems += differences(buf, buffers[name], f"train buffer {name}")
    return problems


def check_model(model: nn.Module, x: torch.Tensor, name: str = "", **capture_kwargs: Any) -> Result:
    """Run every check on ``model`` (in eval mode, random weights) with input ``x``."""
    result = Result(name=name, input_shape=tuple(x.shape))
    start = time.perf_counter()
    stage = "plan"
    try:
        model.eval()
        plan = plan_captures(model, x, **capture_kwargs)
        result.skipped = plan.skipped
        result.locals_module = plan.locals_module
        paths = plan.children + plan.deep
        result.n_modules, result.n_locals = len(paths), len(plan.local_keys)
        stage = "capture"
        extractor = fxcapture.capture(model, paths + plan.local_keys, **capture_kwargs)
        stage = "eval forward"
        with torch.no_grad():
            expected = model(x)
            out, feats = extractor(x)
        stage = "compare"
        problems = differences(out, expected, "output")
        problems += check_modules(model, x, feats, extractor.names, paths)
        if plan.locals_module is not None:
            problems += check_locals(model, x, extractor, feats, plan.locals_module, plan.local_keys)
        result.tracer = extractor.tracer
        result.seconds_eval = time.perf_counter() - start
        stage = "train mode"
        problems += check_train(model, x, extractor, plan.children)
        result.tracer += f" / {check_train.tracer}"
        settle(result, problems)
    except Exception as err:  # noqa: BLE001 - the report lists every failure
        result.reason = f"{stage}: {_first_line(err)}"
        result.problems = [traceback.format_exc(limit=-3)]
    finally:
        model.eval()
    result.seconds = time.perf_counter() - start
    return result


def settle(result, problems: list) -> None:
    """Record a model's mismatches on its row: pass when there are none."""
    result.problems = problems
    if problems:
        result.reason = f"{len(problems)} mismatches, first: {problems[0]}"
    else:
        result.status = "pass"


def assert_conforms(model, x, name: str) -> None:
    """``check_model`` passes, with module captures, in a graph (not at run time)."""
    result = check_model(model, x, name=name)
    assert result.status == "pass", "\n".join([result.reason] + result.problems[:10])
    assert result.n_modules > 0
    assert "run time" not in result.tracer, f"captured at run time: {result.tracer}"

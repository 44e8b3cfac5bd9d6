"""A sample of timm models across every family, and the three checks of issue 14.

The sample (``sample_names()``) takes every family prefix of ``timm.list_models()``
(``resnet``, ``vit``, ``levit``, ...: 161 in timm 1.0.31) and its smallest-named model
(two for families of 15 or more), built with ``pretrained=False`` at 64 px
(``img_size=64`` where the model fixes its size) or, where it cannot run that small,
at its own input size.

Per model, against the eager model itself (never against fxcapture):

* eval: ``capture(model, feature_modules)`` returns ``model(x)`` (``torch.equal``);
* the modules of ``model.feature_info`` equal forward hooks on the model;
* three SGD steps of the extractor equal an eager deep copy trained beside it with the
  same data and seeds: outputs, captured modules, gradients and buffers at each step.

Example::

    >>> model, x = build_timm("resnet18")
    >>> check_timm(model, x, "resnet18").status
    'pass'
"""

from __future__ import annotations

import copy
import re
import time
import traceback
from typing import Any

import torch
import torch.nn as nn

import fxcapture
import zoo_checker as zc
from fxcapture._util.tree import leaves

STEPS = 3
TRAIN_BATCH = 2
MAX_PARAMS = 60e6

# The CI subset (default `pytest tests/zoo`): BatchNormAct2d (mobilenetv3, efficientnet),
# LeViT's attention_bias_cache, ViTs with fused attention (DeiT distilled: a tuple in
# train mode), Swin, plain convnets.
CI_TIMM = [
    "resnet10t", "mobilenetv3_small_050", "efficientnet_b0", "levit_128s", "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "convnext_atto", "deit_tiny_distilled_patch16_224",
]  # fmt: skip

# Build arguments and input size of the CI models (the sample's entries win).
_CI_BUILD: dict[str, tuple[dict[str, Any], int]] = {
    "resnet10t": ({}, 32),
    "mobilenetv3_small_050": ({}, 32),
    "efficientnet_b0": ({}, 32),
    "levit_128s": ({"img_size": 64}, 64),
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, 64),
    "convnext_atto": ({}, 32),
    "deit_tiny_distilled_patch16_224": ({"img_size": 32}, 32),
}



def family(name: str) -> str:
    """The family prefix: ``resnet18d`` -> ``resnet``, ``vit_tiny_patch16_224`` -> ``vit``."""
    head = name.split("_")[0]
    letters = re.match(r"[a-z]+", head)
    return letters.group(0) if letters else head


def build_timm(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A timm model with random weights (eval mode) and its small input (batch 2)."""
    import timm

    kwargs, size = smallest_build(name)
    torch.manual_seed(zc.SEED)
    model = timm.create_model(name, pretrained=False, **kwargs)
    return model.eval(), zc.make_input(size)


def feature_modules(model: nn.Module) -> list[str]:
    """The module paths of ``model.feature_info`` (``stages_0`` spelled ``stages.0``).

    Example::

        >>> feature_modules(timm.create_model("resnet18"))
        ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    """
    found = dict(model.named_modules())
    paths = []
    for info in getattr(model, "feature_info", []) or []:
        path = info["module"]
        if not path:  # the model itself: its output is checked already
            continue
        if path not in found and path.replace("_", ".") in found:
            path = path.replace("_", ".")
        if path in found and path not in paths:
            paths.append(path)
    return paths


def _called_features(model: nn.Module, called: dict) -> tuple[list[str], dict[str, str]]:
    """Feature modules whose forward runs; a container that never runs (a ModuleList
    iterated by its parent) stands for its last child that runs."""
    paths, skipped = [], {}
    for path in feature_modules(model):
        if path not in called:
            inner = [p for p in called if p.startswith(path + ".") and p.count(".") == path.count(".") + 1]
            skipped[path] = f"never runs itself (a container): {inner[-1] if inner else 'nothing'} checked"
            path = inner[-1] if inner else None
        if path is not None and path not in paths:
            paths.append(path)
    return paths, skipped


def _loss(out: Any) -> torch.Tensor:
    return sum(t.float().square().mean() for t in leaves(out) if t.is_floating_point())


def _eager_is_deterministic(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
    return not zc.differences(a, b)


def check_eval(model, x, paths, tol) -> tuple[list[str], str]:
    """Eval: output and feature modules against the model and its hooks."""
    ex = fxcapture.capture(model, paths)
    with torch.no_grad():
        torch.manual_seed(1)
        out, feats = ex(x)

        def run():
            torch.manual_seed(1)
            run.out = model(x)

        hooked = zc.module_calls(model, run, set(paths))
    problems = zc.differences(out, run.out, "eval output", tol)
    problems += zc.module_differences(feats, ex.names, paths, hooked, "eval feature", tol)
    return problems, ex.tracer


def check_train_steps(model, paths, size, tol) -> tuple[list[str], str]:
    """STEPS SGD steps of the extractor beside an eager deep copy (same data, seeds)."""
    reference = copy.deepcopy(model).train()
    ex = fxcapture.capture(model, paths).train()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=0.01)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.01)
    problems: list[str] = []
    for step in range(STEPS):
        x = torch.randn(TRAIN_BATCH, 3, size, size, generator=torch.Generator().manual_seed(step))
        torch.manual_seed(step)
        out, feats = ex(x)

        def run():
            torch.manual_seed(step)
            run.out = reference(x)

        hooked = zc.module_calls(reference, run, set(paths))
        where = f"train step {step}"
        problems += zc.differences(out, run.out, f"{where} output", tol)
        problems += zc.module_differences(feats, ex.names, paths, hooked, f"{where} feature", tol)
        _loss(out).backward()
        _loss(run.out).backward()
        for (name, p), q in zip(params.items(), reference.parameters()):
            if (p.grad is None) != (q.grad is None):
                problems.append(f"{where} grad {name}: present {p.grad is not None} vs eager {q.grad is not None}")
            elif p.grad is not None:
                problems += zc.differences(p.grad, q.grad, f"{where} grad {name}", tol)
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
        for (name, b), c in zip(model.named_buffers(), reference.buffers()):
            problems += zc.differences(b, c, f"{where} buffer {name}", tol)
        if problems:
            break
    tracer = ex.tracer
    ex.eval()
    return problems, tracer


def check_timm(model: nn.Module, x: torch.Tensor, name: str) -> zc.Result:
    """The eval, feature_info and train-step checks; never raises (failures are rows).

    Trains ``model`` in place (SGD): build a fresh one for the next check.
    """
    result = zc.Result(name=name, input_shape=tuple(x.shape))
    start = time.perf_counter()
    stage = "plan"
    try:
        with torch.no_grad():
            called = zc.module_calls(model, lambda: model(x))
        paths, result.skipped = _called_features(model, called)
        result.n_modules = len(paths)
        tol = None if _eager_is_deterministic(model, x) else (1e-5, 1e-6)
        result.tolerance = "exact" if tol is None else "allclose (eager model nondeterministic)"
        stage = "eval"
        problems, tracer = check_eval(model, x, paths, tol)
        result.tracer = tracer
        result.seconds_eval = time.perf_counter() - start
        if not problems:
            stage = "train"
            problems, tracer = check_train_steps(model, paths, x.shape[-1], tol)
            result.tracer = f"{result.tracer} / {tracer}"
        zc.settle(result, problems)
    except Exception as err:  # noqa: BLE001 - the report lists every failure
        result.reason = f"{stage}: {zc._first_line(err)}"
        result.problems = [traceback.format_exc(limit=-4)]
    finally:
        model.eval()
    result.seconds = time.perf_counter() - start
    return result


def assert_timm_conforms(name: str) -> None:
    model, x = build_timm(name)
    result = check_timm(model, x, name)
    assert result.status == "pass", "\n".join([result.reason] + result.problems[:8])
    assert result.n_modules > 0, "no feature_info modules were checked"


# -- the sample ----------------------------------------------------------------------------

# Size words in timm names, smallest first (a name without one ranks in the middle).
_RANK = {"atto": 0, "femto": 1, "pico": 2, "nano": 3, "xxs": 4, "xxsmall": 4, "xxtiny": 4,
         "xs": 5, "xsmall": 5, "xtiny": 5, "tiny": 6, "ti": 6, "t": 6, "mini": 7, "lite": 7,
         "small": 8, "s": 8, "medium": 11, "m": 11, "base": 13, "b": 13, "large": 15, "l": 15}  # fmt: skip
_HUGE = re.compile(r"large|huge|giant|enormous|xlarge|_xl|(^|_)\d+b(_|$)|_[1-9]\d\dm(_|$)")
SECOND_FROM = 15  # families with this many models contribute their two smallest


def _size_rank(name: str) -> tuple:
    words = name.split("_")
    rank = min([_RANK[w] for w in words if w in _RANK] + [9])
    depth = [int(d) for d in re.findall(r"\d+", words[0])] or [0]
    return (rank, depth[0], len(name), name)


def sample_names() -> list[str]:
    """One or two of the smallest-named models of every family of ``timm.list_models()``;
    families whose smallest model is huge (over ~100M parameters) are left out."""
    import timm

    groups: dict[str, list[str]] = {}
    for name in timm.list_models():
        groups.setdefault(family(name), []).append(name)
    picked = []
    for fam in sorted(groups):
        ranked = [n for n in sorted(groups[fam], key=_size_rank) if not _HUGE.search(n)]
        picked += ranked[: 2 if len(groups[fam]) >= SECOND_FROM else 1]
    return picked


def _runs_at(model: nn.Module, size: int) -> bool:
    model = copy.deepcopy(model)
    try:
        with torch.no_grad():
            model.eval()(zc.make_input(size))
            model.train()(zc.make_input(size))
        return True
    except Exception:  # noqa: BLE001 - "does not run at this size"
        return False


def smallest_build(name: str) -> tuple[dict[str, Any], int]:
    """Build arguments and input size: 64 px (``img_size=64`` where the model fixes its
    size), else the model's own input size. Raises if timm cannot run it at all."""
    import timm

    if name in _CI_BUILD:
        return _CI_BUILD[name]
    native = timm.get_pretrained_cfg(name).input_size[-1]
    for kwargs, size in (({}, 64), ({"img_size": 64}, 64), ({}, native)):
        try:
            torch.manual_seed(zc.SEED)
            model = timm.create_model(name, pretrained=False, **kwargs)
        except Exception:  # noqa: BLE001 - this model takes no img_size
            continue
        if _runs_at(model, size):
            return kwargs, size
    raise RuntimeError(f"timm cannot run {name} eagerly on CPU at 64 px or {native} px")

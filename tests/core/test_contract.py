"""One observation contract: the same selectors on the same model give the same keys, in
the same order, with the same values, whichever tracer captures them
(``fallback="never"``, ``"auto"``, ``"always"``); the values are the model's own, seen by
forward hooks and by the model's forward written out."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import assert_matches_hooks, assert_same, detached_copy, hooked
from fxcapture import capture
from fxcapture.core.spec import TraceFailure

sys.path.append(str(Path(__file__).parents[1] / "zoo"))


def _zoo_requested(config: pytest.Config) -> bool:
    return os.environ.get("FXCAPTURE_ZOO") == "1" or "zoo" in (config.option.markexpr or "")


def scaled(x):  # a helper: its locals belong to the calling module
    z = x * 2
    return z


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x).relu()
        z = scaled(h)
        return self.b(z) + h


class Toy(nn.Module):
    """A block called twice (``@i``), a helper's local, a tuple output, a root local."""

    def __init__(self):
        super().__init__()
        self.block, self.pair, self.head = Block(), Pair(), nn.Linear(4, 2)

    def forward(self, x):
        y = self.block(self.block(x))
        left, right = self.pair(y)
        s = left * right
        return self.head(s)


class Pair(nn.Module):
    def forward(self, x):
        return x.sigmoid(), x.tanh()


def toy_reference(model, x):
    """The model's values, written out from its forward and seen by hooks."""
    seen = {}

    def keep(path):
        return lambda m, i, o: seen.setdefault(path, []).append(detached_copy(o))

    handles = [model.get_submodule(p).register_forward_hook(keep(p)) for p in ("block", "pair", "head")]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    b = model.block
    h0 = b.a(x).relu()
    y0 = b.b(h0 * 2) + h0
    h1 = b.a(y0).relu()
    left, right = x_pair = (seen["block"][1].sigmoid(), seen["block"][1].tanh())
    return out, {
        "block:h@0": h0, "block:z@0": h0 * 2, "block@0": seen["block"][0],
        "block:h@1": h1, "block:z@1": h1 * 2, "block@1": seen["block"][1],
        "pair": x_pair, ":s": left * right, "head": seen["head"][0],
    }  # fmt: skip


SELECTORS = ["head", "pair", ":s", "block", "h", "z"]  # keys come in execution order anyway


@pytest.mark.parametrize("fallback", ["never", "auto", "always"])
def test_toy_model_same_keys_order_values_under_every_fallback(fallback):
    torch.manual_seed(0)
    model = Toy()
    ex = capture(model, SELECTORS, fallback=fallback)
    for step in range(3):
        x = torch.randn(step + 2, 4)
        out, feats = ex(x)
        ref_out, ref = toy_reference(model, x)
        assert torch.equal(out, ref_out)
        assert list(feats) == list(ref), (fallback, ex.tracer)
        for key, value in ref.items():
            got = feats[key]
            pairs = zip(got, value) if isinstance(value, tuple) else [(got, value)]
            for g, v in pairs:
                torch.testing.assert_close(g, v, rtol=0, atol=1e-6, msg=key)
    assert ex.names == list(ref)


# -- the toy models of the project's tests ----------------------------------------------
FALLBACKS = ("never", "auto", "always")
CALLS = 3
# toy -> why the tracers still disagree (strict: the day it passes, the entry goes)
TOY_GAPS: dict[str, str] = {}


def _toy_params():
    from toy_models import TOYS

    return [pytest.param(name, marks=[pytest.mark.xfail(reason=TOY_GAPS[name], strict=True)] if name in TOY_GAPS else [])
            for name in sorted(TOYS)]  # fmt: skip


def _run_toy(name: str, fallback: str, model: nn.Module) -> tuple[str, list]:
    """Three calls, the same seed per call; ``fallback="never"`` traces symbolically, or by
    running the example inputs where torch.fx cannot follow the model."""
    from toy_models import module_paths, sample

    selectors = module_paths(model, sample(name, 0)) + ["**:*"]  # every module and every local
    try:
        ex = capture(model, selectors, fallback=fallback)
    except TraceFailure:
        ex = capture(model, selectors, fallback=fallback, example_inputs=sample(name, 0))
    runs = []
    for i in range(CALLS):
        torch.manual_seed(100 + i)
        args = sample(name, i)
        torch.manual_seed(100 + i)
        runs.append(ex(*args))
    return ex.tracer, runs


@pytest.mark.parametrize("name", _toy_params())
def test_toy_zoo_same_keys_order_values_under_every_fallback(name):
    """Every module output and every local of each toy (training mode, three calls): the
    same keys in the same order under each fallback, module outputs equal to forward
    hooks on an eager copy, locals equal across tracers."""
    from toy_models import TOYS, module_paths, sample

    torch.manual_seed(0)
    model = TOYS[name][0]().train()
    reference = copy.deepcopy(model)
    paths = module_paths(model, sample(name, 0))
    results = {}
    for fallback in FALLBACKS:
        try:
            results[fallback] = _run_toy(name, fallback, copy.deepcopy(model))
        except TraceFailure:  # data-dependent control flow: no graph can hold it
            assert fallback == "never", fallback
    assert "auto" in results and "always" in results
    for i in range(CALLS):
        torch.manual_seed(100 + i)
        args = sample(name, i)
        torch.manual_seed(100 + i)
        with hooked(reference, paths) as seen:
            ref_out = reference(*args)
        expected = results["always"][1][i][1]
        for fallback, (tracer, runs) in results.items():
            out, feats = runs[i]
            assert_same(out, ref_out, exact=False, path=f"{fallback} output")
            assert list(feats) == list(expected), f"{fallback} ({tracer}) call {i}"
            assert_matches_hooks(feats, {p: calls for p, calls in seen.items() if calls}, exact=False)
            for key in expected:
                assert_same(feats[key], expected[key], exact=False, path=f"{fallback} {key}")


@pytest.mark.parametrize("fallback", FALLBACKS)
def test_container_and_constant_locals_equal_the_model_written_out(fallback):
    """A dataclass, a namedtuple, a dict and a list of constants built in forward: each
    tracer's values equal the model's forward written out, over calls of three sizes,
    the last after the model's linear layer was swapped."""
    from toy_models import ContainersMadeInForward

    torch.manual_seed(0)
    model = ContainersMadeInForward()
    ex = capture(model, ["parts", "triple", "table", "grid", "lin"], fallback=fallback)
    for step in range(3):
        if step == 2:
            model.lin = nn.Linear(4, 4)  # changed after capture: the next call follows it
        x = torch.rand(2 + step, 4)
        out, feats = ex(x)
        with torch.no_grad():
            h = model.lin(x)
            body, tail = h.relu(), h.sigmoid()
            expected = {":parts": (body, tail), ":triple": (h, h * 2, 3), ":table": {"sum": body + tail, "n": 2},
                        ":grid": [torch.arange(4.0), torch.ones(2) * 3], "lin": h}  # fmt: skip
            assert_same(out.detach(), model(x), exact=False)
        assert set(feats) == set(expected), (fallback, list(feats))
        for key, value in expected.items():
            got = feats[key]
            got = (got.body, got.tail) if key == ":parts" else tuple(got) if key == ":triple" else got
            assert_same(got, value, exact=False, path=f"{fallback} {key} call {step}")


# -- the transformers zoo -----------------------------------------------------------------
def _zoo_params():
    from hf_models import CI_HF, CONFIGS

    return [pytest.param(name, marks=[] if name in CI_HF else [pytest.mark.zoo]) for name in CONFIGS]


def _hf_run(model, fallback: str, selectors: list[str], batches: list[dict]) -> tuple[str, list]:
    ex = capture(model, selectors, fallback=fallback, example_inputs=batches[0])
    with torch.no_grad():
        return ex.tracer, [ex(**batch) for batch in batches]


@pytest.mark.parametrize("name", _zoo_params())
def test_transformers_same_keys_order_values_under_every_fallback(name, request):
    """Every child module, a sample of deeper modules and the attention maps (eager) or
    outputs (sdpa): ``"never"`` and ``"auto"`` trace by running the example inputs,
    ``"always"`` captures at run time; keys, order and values agree, module outputs equal
    forward hooks and attention maps the model's own ``output_attentions=True``."""
    pytest.importorskip("transformers")
    if request.node.get_closest_marker("zoo") and not _zoo_requested(request.config):
        pytest.skip("the full transformers zoo: run with -m zoo or FXCAPTURE_ZOO=1")
    from hf_models import _attention_keys, build_hf, module_plan, reference_attentions

    model, inputs = build_hf(name)
    batches = [inputs(2, 7, 0), inputs(1, 5, 1), inputs(3, 9, 2)]
    paths = module_plan(model, batches[0])
    local = "attn_output" if name.endswith(":sdpa") else "attn_weights"
    results = {f: _hf_run(model, f, [local] + paths, batches) for f in FALLBACKS}
    assert results["never"][0] == results["auto"][0] == "running", {f: r[0] for f, r in results.items()}
    assert results["always"][0] == "run time"
    for step, batch in enumerate(batches):
        with torch.no_grad(), hooked(model, paths) as seen:
            ref_out = model(**batch)
        expected = results["never"][1][step][1]
        for fallback, (_, runs) in results.items():
            out, feats = runs[step]
            assert_same(out, ref_out, path=f"{fallback} output")
            assert list(feats) == list(expected), fallback
            assert_matches_hooks(feats, seen, exact=False)
            for key in expected:
                assert_same(feats[key], expected[key], exact=False, path=f"{fallback} {key}")
            if local == "attn_weights":
                keys = _attention_keys(list(feats), local)
                attentions = reference_attentions(model, batch)
                assert len(keys) == len(attentions) and keys, fallback
                for key, ref in zip(keys, attentions):
                    torch.testing.assert_close(feats[key], ref, msg=f"{fallback} {key}")


def _resnet():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=10).eval(), torch.randn(2, 3, 32, 32)


def _toy():
    return Toy(), torch.randn(3, 4)


@pytest.mark.parametrize("build, selectors", [
    (_resnet, ["layer1.*", "identity", "layer2.**:out", "fc", "maxpool"]),
    (_toy, ["block.*", "block:*", "*:s", "pair"]),
])  # fmt: skip
def test_globs_and_bare_names_same_under_every_fallback(build, selectors):
    torch.manual_seed(0)
    model, x = build()
    results = {}
    for fallback in ("never", "auto", "always"):
        ex = capture(model, selectors, fallback=fallback)
        with torch.no_grad():
            results[fallback] = [ex(x), ex(x[:1])]
    modules = dict(model.named_modules())
    for step, batch in enumerate((x, x[:1])):
        seen = {}
        handles = [m.register_forward_hook(lambda m, i, o, p=p: seen.setdefault(p, []).append(detached_copy(o)))
                   for p, m in modules.items() if p]  # fmt: skip
        with torch.no_grad():
            model(batch)
        for h in handles:
            h.remove()
        keys = list(results["never"][step][1])
        for fallback, runs in results.items():
            out, feats = runs[step]
            assert list(feats) == keys, fallback
            for key, value in feats.items():
                torch.testing.assert_close(value, results["never"][step][1][key], rtol=0, atol=0)
                path, _, call = key.partition("@")
                if path in seen:  # a module output: what its hook saw
                    torch.testing.assert_close(value, seen[path][int(call or 0)], rtol=0, atol=0)


class Refine(nn.Module):
    """Calls ``step`` a data-dependent number of times: run-time capture."""

    def __init__(self):
        super().__init__()
        self.step = nn.Linear(4, 4)

    def forward(self, x, times):
        for _ in range(int(times.item())):
            x = self.step(x)
        return x


def test_threads_never_number_each_others_edit_keys():
    import threading

    model = Refine()
    seen = threading.local()

    def edit(value, key):
        seen.keys.append(key)
        return value

    ex = capture(model, ["step"], edit={"step": edit}, fallback="always")
    seen.keys = []
    ex(torch.randn(2, 4), torch.tensor(2))  # the first call: 'step' runs twice
    results, errors = {}, []

    def run(name, times):
        seen.keys = []
        try:
            for _ in range(20):
                seen.keys.clear()
                x = torch.randn(2, 4)
                out, feats = ex(x, torch.tensor(times))
                results.setdefault(name, set()).add(tuple(seen.keys))
                ref = x
                for _ in range(times):
                    ref = model.step(ref)
                assert torch.equal(out, ref) and len(feats) == times
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n, t)) for n, t in (("one", 1), ("three", 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == {"one": {("step@0",)}, "three": {("step@0", "step@1", "step@2")}}

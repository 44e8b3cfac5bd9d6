"""One observation contract: the same selectors on the same model give the same keys, in
the same order, with the same values, whichever tracer captures them
(``fallback="never"``, ``"auto"``, ``"always"``); the values are the model's own, seen by
forward hooks and by the model's forward written out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import detached_copy
from fxcapture import capture

sys.path.append(str(Path(__file__).parents[1] / "zoo"))


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


def _hf_features(name: str, fallback: str, inputs: dict):
    from hf_models import build_hf

    model, _ = build_hf(name)
    ex = capture(model, ["transformer.h.*", "transformer.h.*.attn:attn_weights", "transformer.ln_f"],
                 fallback=fallback, example_inputs=inputs)  # fmt: skip
    runs = []
    with torch.no_grad():
        for batch in (inputs, {"input_ids": inputs["input_ids"][:1, :5]}):
            out, feats = ex(**batch)
            seen = {}  # the reference: forward hooks, and the model's own attention maps
            handles = [model.get_submodule(k).register_forward_hook(
                lambda m, i, o, k=k: seen.setdefault(k, detached_copy(o))) for k in feats if ":" not in k]  # fmt: skip
            ref = model(**batch, output_attentions=True)
            for h in handles:
                h.remove()
            attentions = [v for k, v in feats.items() if ":" in k]
            assert len(attentions) == len(ref.attentions)
            for got, expected in zip(attentions, ref.attentions):
                torch.testing.assert_close(got, expected)
            for key, value in seen.items():
                for g, r in zip(torch.utils._pytree.tree_leaves(feats[key]), torch.utils._pytree.tree_leaves(value)):
                    torch.testing.assert_close(g, r, msg=f"{fallback} {key}")
            runs.append((out, feats))
    return ex.tracer, runs


def test_transformers_same_keys_order_values_under_every_fallback():
    pytest.importorskip("transformers")
    inputs = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
    results = {f: _hf_features("gpt2:eager", f, inputs) for f in ("never", "auto", "always")}
    assert results["never"][0] == results["auto"][0] == "running" and results["always"][0] == "run time"
    (_, reference) = results["auto"]
    for fallback, (_, runs) in results.items():
        for (out, feats), (ref_out, ref_feats) in zip(runs, reference):
            assert torch.equal(out.logits, ref_out.logits)
            assert list(feats) == list(ref_feats), fallback
            for key in ref_feats:
                for g, r in zip(torch.utils._pytree.tree_leaves(feats[key]),
                                torch.utils._pytree.tree_leaves(ref_feats[key])):  # fmt: skip
                    torch.testing.assert_close(g, r, msg=f"{fallback} {key}")


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

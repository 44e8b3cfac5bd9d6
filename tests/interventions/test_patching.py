"""fxcapture.patch against references built from forward hooks and the model's own
modules: clean values recorded by one hook, put into the corrupted run by another, or
the forward written out by hand (attention maps, which no hook sees)."""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from conftest import assert_same, hook_values, module_state, tiny_gpt2
from fxcapture.cli.models import TinyViT
from fxcapture.interventions.patching import ALL, patch


def hook_patched(model: nn.Module, clean, corrupted, paths: list[str], combine=None):
    """The reference: record ``paths`` on the clean run, replace them on the corrupted run."""
    modules = [model.get_submodule(p) for p in paths]
    recorded = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, p=p: recorded.setdefault(p, out))
        for p, m in zip(paths, modules)
    ]
    with torch.no_grad():
        model(clean)
        for h in handles:
            h.remove()
        combine = combine or (lambda c, r: c)
        handles = [
            m.register_forward_hook(lambda mod, a, out, p=p: combine(recorded[p], out))
            for p, m in zip(paths, modules)
        ]
        try:
            return model(corrupted)
        finally:
            for h in handles:
                h.remove()


# -- acceptance: resnet18 layer3 -----------------------------------------------------------------
def test_patching_resnet_layer3_equals_the_tail_of_the_network_on_the_clean_layer3(resnet18):
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    m = resnet18
    _, seen = hook_values(m, ["layer2", "layer3"], a)
    with torch.no_grad():  # the reference: the rest of the network by hand, on clean values
        tail = {"layer3": lambda h: m.fc(torch.flatten(m.avgpool(m.layer4(h)), 1))}
        tail["layer2"] = lambda h: tail["layer3"](m.layer3(h))
        expected = {p: tail[p](seen[p][0]) for p in ("layer2", "layer3")}
        clean, corrupted = m(a), m(b)
    before = module_state(resnet18)

    result = patch(resnet18, ["layer2", "layer3", "fc"], a, b, batched=False)
    stacked = patch(resnet18, ["layer2", "layer3", "fc"], a, b)  # one forward of batch 4 * 2
    assert result.batched is False and stacked.batched is True
    for r in (result, stacked):
        assert list(r.patched) == ["layer2", "layer3", "fc"]
        for key in ("layer2", "layer3"):
            torch.testing.assert_close(r.patched[key], expected[key], rtol=1e-4, atol=1e-5)
        # patching the last module restores all
        torch.testing.assert_close(r.patched["fc"], clean, rtol=1e-4, atol=1e-5)
    assert torch.equal(result.patched["layer3"], expected["layer3"])  # unstacked: same kernels
    assert torch.equal(result.clean, clean) and torch.equal(result.corrupted, corrupted)
    assert not torch.allclose(result.corrupted, clean)
    assert module_state(resnet18) == before


def test_scores_normalise_between_corrupted_and_clean(resnet18):
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    result = patch(resnet18, ["layer1.0.conv1", "fc"], a, b, batched=False)

    def metric(out):
        return out[:, 0].mean()

    raw = result.scores(metric)
    assert raw["fc"] == pytest.approx(float(metric(result.clean)))
    norm = result.scores(metric, normalize=True)
    low, high = float(metric(result.corrupted)), float(metric(result.clean))
    assert norm["fc"] == pytest.approx(1.0)
    assert norm["layer1.0.conv1"] == pytest.approx((raw["layer1.0.conv1"] - low) / (high - low))


# -- locals, stacking, one run for all -------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return TinyViT().eval()


@pytest.fixture
def pair():
    return torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)


def vit_by_hand(vit: TinyViT, images: torch.Tensor, maps: dict | None = None):
    """TinyViT's forward written out, the attention map of block ``i`` replaced by
    ``maps[i]``: ``(logits, [attention map of each block])``."""
    maps = maps or {}
    seen = []
    with torch.no_grad():
        x = vit.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
        for i, block in enumerate(vit.blocks):
            h = block.norm1(x)
            B, N, C = h.shape
            heads, attn_module = block.attn.heads, block.attn
            qkv = attn_module.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = ((q @ k.transpose(-2, -1)) / math.sqrt(C // heads)).softmax(dim=-1)
            seen.append(attn)
            attn = maps.get(i, attn)
            x = x + attn_module.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
            x = x + block.mlp(block.norm2(x))
        return vit.head(vit.norm(x)[:, 0]), seen


def test_patching_every_attention_map_equals_the_forward_by_hand_with_the_clean_map(vit, pair):
    a, b = pair
    clean_out, clean_maps = vit_by_hand(vit, a)
    with torch.no_grad():
        torch.testing.assert_close(clean_out, vit(a))  # the reference is the model
    expected = {f"blocks.{i}.attn:attn": vit_by_hand(vit, b, {i: clean_maps[i]})[0]
                for i in range(4)}  # fmt: skip

    loop = patch(vit, "attn", *pair, batched=False)
    stacked = patch(vit, "attn", *pair)
    chunked = patch(vit, "attn", *pair, chunk=3)
    assert stacked.batched and chunked.batched and not loop.batched
    for result in (loop, stacked, chunked):
        assert list(result.patched) == list(expected)
        for key, out in expected.items():
            torch.testing.assert_close(result.patched[key], out, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(out, result.corrupted)


def test_all_at_once_patches_every_key_in_one_run(vit, pair):
    paths = ["blocks.0.attn", "blocks.2.mlp"]
    result = patch(vit, paths, *pair, one_at_a_time=False)
    assert list(result.patched) == [ALL]
    torch.testing.assert_close(result.patched[ALL], hook_patched(vit, *pair, paths))


def test_combine_patches_one_position_only(vit, pair):
    position = 0  # the class token

    def tensor_combine(clean, run):
        out = run.clone()
        out[:, position] = clean[:, position]
        return out

    expected = hook_patched(vit, *pair, ["blocks.1"], tensor_combine)
    result = patch(vit, ["blocks.1"], *pair, combine=lambda c, r, k: tensor_combine(c, r))
    torch.testing.assert_close(result.patched["blocks.1"], expected)
    whole = patch(vit, ["blocks.1"], *pair).patched["blocks.1"]
    assert not torch.allclose(whole, expected)


# -- when stacking is wrong ------------------------------------------------------------------------
class BatchCentered(nn.Module):
    """Samples interact: each is centred on the batch mean."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0, keepdim=True))


class WithWeightValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        scaled = self.w * 2  # not batch-first: cannot be stacked
        return self.lin(x) @ scaled


def test_a_batch_dependent_model_is_detected_and_run_one_patch_at_a_time():
    model = BatchCentered().eval()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    result = patch(model, ["a", "b"], a, b)
    assert result.batched is False
    torch.testing.assert_close(result.patched["a"], hook_patched(model, a, b, ["a"]))
    # stacking anyway (batched=True) would mix the samples of different patches
    forced = patch(model, ["a", "b"], a, b, batched=True)
    assert not torch.allclose(forced.patched["a"], result.patched["a"])


def test_a_value_without_the_batch_in_dimension_0_falls_back_or_explains():
    model = WithWeightValue().eval()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    result = patch(model, [":scaled", "lin"], a, b)
    assert result.batched is False
    torch.testing.assert_close(result.patched["lin"], hook_patched(model, a, b, ["lin"]))
    with pytest.raises(ValueError, match=r"':scaled' has shape \(4, 4\).*batched=False"):
        patch(model, [":scaled", "lin"], a, b, batched=True)


# -- structured values: namedtuples and dataclasses ----------------------------------------------
Pair = collections.namedtuple("Pair", "a b")


@dataclasses.dataclass
class Fields:
    a: torch.Tensor
    b: torch.Tensor


class Block(nn.Module):
    """Returns ``make(h, 2 * h)``: a namedtuple or a dataclass."""

    def __init__(self, make: type):
        super().__init__()
        self.make = make
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return self.make(h, h * 2)


class Structured(nn.Module):
    """Its block returns a structure; it returns a namedtuple (the logits and a sum)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        o = self.block(x)
        return Pair(self.head(o.a + o.b), o.b.sum(-1))


@pytest.mark.parametrize("make", [Pair, Fields])
def test_a_module_returning_a_namedtuple_or_a_dataclass_is_patched_whole(make):
    model = Structured(Block(make)).eval()
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        clean, corrupted = model(a), model(b)
    expected = hook_patched(model, a, b, ["block"])
    assert_same(expected, clean)  # every path to the output goes through the block
    leaf = [Block]  # the block is one call: its value is the namedtuple / dataclass itself

    loop = patch(model, ["block", "head"], a, b, batched=False, leaf_modules=leaf)
    stacked = patch(model, ["block", "head"], a, b, leaf_modules=leaf)
    assert stacked.batched and not loop.batched
    for result in (loop, stacked):
        assert type(result.patched["block"]) is Pair
        assert_same(result.patched["block"], expected, exact=result is loop)
        assert_same(result.patched["head"], hook_patched(model, a, b, ["head"]), exact=False)
        assert_same(result.corrupted, corrupted)
    assert not torch.allclose(corrupted.a, clean.a)

    def patch_a_only(c, r, key):  # combine sees each tensor of the structure in turn
        return c if torch.equal(r, model.block(b).a) else r

    with torch.no_grad():
        only_a = patch(model, ["block"], a, b, combine=patch_a_only, leaf_modules=leaf)
        by_hand = model.block(b)
        by_hand = type(by_hand)(model.block(a).a, by_hand.b)
        assert_same(only_a.patched["block"], Pair(model.head(by_hand.a + by_hand.b), by_hand.b.sum(-1)))


# -- input forms and errors ------------------------------------------------------------------------
def test_inputs_as_tuples_and_dicts():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x, scale):
            return self.lin(x) * scale

    model = TwoInputs().eval()
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    by_tuple = patch(model, ["lin"], (a, 3.0), (b, 3.0))
    by_dict = patch(model, ["lin"], {"x": a, "scale": 3.0}, {"x": b, "scale": 3.0})
    with torch.no_grad():
        expected = model(a, 3.0)
    assert torch.equal(by_tuple.patched["lin"], expected)
    assert torch.equal(by_dict.patched["lin"], expected)


def test_mistakes_are_explained(vit):
    with pytest.raises(TypeError, match=r"not \{alias: selector\}"):
        patch(vit, {"a": "attn"}, torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"batched must be"):
        patch(vit, "attn", torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), batched="yes")
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match=r"same shape.*pad"):
        patch(conv, ["0"], torch.randn(1, 3, 8, 8), torch.randn(1, 3, 10, 10))


# -- through the run-time fallback -----------------------------------------------------------------
def test_patching_a_gpt2_block_through_the_fallback_equals_hooks():
    model = tiny_gpt2()
    a, b = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    result = patch(model, ["transformer.h.0"], {"input_ids": a, "use_cache": False},
                   {"input_ids": b, "use_cache": False})  # fmt: skip
    expected = hook_patched(
        model, a, b, ["transformer.h.0"],
        lambda c, r: c if isinstance(c, torch.Tensor) else (c[0], *r[1:]),
    )  # fmt: skip
    torch.testing.assert_close(result.patched["transformer.h.0"].logits, expected.logits)
    assert_same(result.corrupted.logits, model(b).logits.detach(), exact=False)


def test_the_example_finds_the_copied_position(capsys, monkeypatch):
    import runpy
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "activation_patching.py"
    monkeypatch.setattr("sys.argv", [str(path)])  # the example parses its command line
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only contend on a busy machine
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "accuracy after training: 1.00" in printed
    assert "position 2: +1.00" in printed and "position 0: +0.00" in printed
    assert "attn:v     +1.00" in printed

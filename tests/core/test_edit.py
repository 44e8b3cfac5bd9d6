"""capture(..., edit=...): interventions inside the graph, checked against forward hooks
that replace module outputs and against manual forwards written from the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxcapture import capture
from fxcapture.cli.models import TinyViT

from conftest import assert_same, module_state, timm_vit_small, tiny_gpt2


def replace_output(module: nn.Module, fn):
    """An independent reference: a forward hook whose return value replaces the output."""
    return module.register_forward_hook(lambda m, args, out: fn(out))


def zero_head(head: int):
    def edit(attn: torch.Tensor, key: str) -> torch.Tensor:
        mask = torch.ones(attn.shape[1], 1, 1, dtype=attn.dtype)
        mask[head] = 0
        return attn * mask

    return edit


# -- acceptance: head ablation on timm ViT against a manual forward ---------------------
def manual_block_with_head_zeroed(block: nn.Module, x: torch.Tensor, head: int) -> torch.Tensor:
    """timm's pre-norm block, its attention written out from the weights, one head zeroed."""
    attn = block.attn
    B, N, C = x.shape
    H = attn.num_heads
    D = C // H
    h = block.norm1(x)
    qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = torch.softmax((q * D**-0.5) @ k.transpose(-2, -1), dim=-1)
    weights[:, head] = 0.0
    mixed = (weights @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(mixed, attn.proj.weight, attn.proj.bias)
    return x + block.mlp(block.norm2(x))


def test_zero_ablating_a_timm_vit_head_equals_a_manual_forward():
    model = timm_vit_small()
    block_index, head = 3, 2
    block = model.blocks[block_index]
    assert isinstance(block.ls1, nn.Identity) and isinstance(block.attn.norm, nn.Identity)
    images = torch.randn(2, 3, 224, 224)

    entering = {}
    handle = block.register_forward_pre_hook(lambda m, args: entering.setdefault("x", args[0]))
    with torch.no_grad():
        original = model(images)
        handle.remove()
        x = manual_block_with_head_zeroed(block, entering["x"], head)
        for later in model.blocks[block_index + 1 :]:
            x = later(x)
        expected = model.forward_head(model.norm(x))

        key = f"blocks.{block_index}.attn:attn"
        ex = capture(model, [key, f"blocks.{block_index - 1}"], edit={key: zero_head(head)})
        out, feats = ex(images)

    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, original, atol=1e-3), "the ablation changed nothing"
    assert torch.equal(feats[key][:, head], torch.zeros_like(feats[key][:, head]))
    assert feats[key][:, head - 1].sum(-1).allclose(torch.ones(2, feats[key].shape[2]))
    with torch.no_grad():
        assert torch.equal(model(images), original)  # the model itself is unchanged


# -- rewiring: module outputs of every shape ---------------------------------------------
class Split(nn.Module):
    def forward(self, x):
        a = x[:, :3]
        return a, x[:, 3:] * a.sum(1, keepdim=True)  # the second part uses the first inside


class Named(nn.Module):
    def forward(self, x):
        return {"left": x[:, :2], "right": x[:, 2:]}


class Structured(nn.Module):
    """Outputs as a traced tuple, a traced dict and a leaf module's (out, (h, c))."""

    def __init__(self):
        super().__init__()
        self.split = Split()
        self.named = Named()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        a, b = self.split(x)
        d = self.named(torch.cat([b, a], 1))
        seq = torch.stack([d["left"], d["right"][:, :2]], 1).repeat(1, 1, 2)
        out, (h, c) = self.lstm(seq)
        return self.head(out[:, -1] + h[0] + c[0])


def _scale_first(value, key=None):
    return (value[0] * 3, value[1])


def _swap_dict(value, key=None):
    return {"left": value["right"][:, :2], "right": torch.cat([value["left"], value["left"]], 1)}


def _shift_lstm(value, key=None):
    out, (h, c) = value
    return out + 1, (h * 0, c)


@pytest.mark.parametrize(
    "path, fn", [("split", _scale_first), ("named", _swap_dict), ("lstm", _shift_lstm)]
)
def test_structured_module_outputs_are_replaced_in_every_consumer(path, fn):
    model = Structured().eval()
    x = torch.randn(3, 6)
    handle = replace_output(model.get_submodule(path), fn)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    seen = []

    def edit(value, key):
        seen.append((key, type(value).__name__))
        return fn(value)

    with torch.no_grad():
        out, feats = capture(model, [path], edit={path: edit})(x)
        original = model(x)
    assert seen == [(path, "dict" if path == "named" else "tuple")]
    assert_same(out, expected)
    assert not torch.equal(out, original)
    with torch.no_grad():
        assert_same(feats[path], fn(capture(model, [path])(x)[1][path]))  # captured = edited


def test_a_value_used_inside_its_module_keeps_the_original_there():
    model = Structured().eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        _, feats = capture(model, ["split"], edit={"split": _scale_first})(x)
    # b was computed from the unedited a inside Split; only consumers after it change
    assert torch.equal(feats["split"][1], x[:, 3:] * x[:, :3].sum(1, keepdim=True))


# -- constants, in-place safety, composition ----------------------------------------------
def test_a_constant_replacement_is_broadcast_and_never_written_into(resnet18):
    image = torch.randn(2, 3, 64, 64)
    key = "layer1.0.bn2"  # BasicBlock then runs `out += identity` on it, in place
    with torch.no_grad():
        mean = capture(resnet18, [key])(image)[1][key].mean(0, keepdim=True)
    before = mean.clone()
    handle = replace_output(resnet18.get_submodule(key), lambda out: mean.expand_as(out).clone())
    try:
        with torch.no_grad():
            expected = resnet18(image)
    finally:
        handle.remove()
    with torch.no_grad():
        out, _ = capture(resnet18, [], edit={key: mean})(image)
    assert torch.equal(out, expected)
    assert torch.equal(mean, before), "the model's in-place add wrote into the edit's tensor"


def test_the_captured_value_is_the_edited_one_and_upstream_values_are_not():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, plain = capture(model, ["blocks.1", "blocks.1.attn:attn", "blocks.0"])(x)
        ex = capture(model, ["blocks.1", "blocks.1.attn:attn", "blocks.0"],
                     edit={"blocks.1.attn:attn": zero_head(0)})  # fmt: skip
        _, edited = ex(x)
    assert torch.equal(edited["blocks.0"], plain["blocks.0"])
    assert torch.equal(edited["blocks.1.attn:attn"], zero_head(0)(plain["blocks.1.attn:attn"], ""))
    assert not torch.allclose(edited["blocks.1"], plain["blocks.1"])


def test_edits_of_one_value_compose_in_dict_order():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 64, 64)
    # blocks.0.attn returns proj's output: two keys, one graph value
    handle = replace_output(model.blocks[0].attn, lambda out: (out + 1) * 2)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    edit = {"blocks.0.attn.proj": lambda v, k: v + 1, "blocks.0.attn": lambda v, k: v * 2}
    with torch.no_grad():
        out, _ = capture(model, [], edit=edit)(x)
    torch.testing.assert_close(out, expected)


def test_a_bare_local_name_edits_it_in_every_module_with_its_key():
    model = TinyViT(depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    keys = []

    def record(attn, key):
        keys.append(key)
        return attn

    with torch.no_grad():
        out, _ = capture(model, [], edit={"attn": record})(x)
        assert torch.equal(out, model(x))
    assert keys == ["blocks.0.attn:attn", "blocks.1.attn:attn"]


# -- the model is never changed --------------------------------------------------------------
def test_the_model_is_unchanged_and_an_extractor_without_edit_gives_the_original():
    model = TinyViT().eval()
    x = torch.randn(2, 3, 64, 64)
    before = module_state(model)
    with torch.no_grad():
        original = model(x)
        edited, _ = capture(model, [], edit={"attn": zero_head(1)})(x)
        plain, _ = capture(model, [])(x)
        after = model(x)
    assert module_state(model) == before
    assert not torch.allclose(edited, original)
    assert torch.equal(plain, original) and torch.equal(after, original)


def test_the_edit_applies_in_train_and_eval_graphs():
    model = TinyViT().eval()  # no dropout: train and eval forwards agree
    x = torch.randn(2, 3, 64, 64)
    handle = replace_output(model.blocks[2], lambda out: out * 0.5)
    try:
        with torch.no_grad():
            expected = model(x)
    finally:
        handle.remove()
    ex = capture(model, [], edit={"blocks.2": lambda v, k: v * 0.5})
    with torch.no_grad():
        torch.testing.assert_close(ex(x)[0], expected)
        torch.testing.assert_close(ex.train()(x)[0], expected)


# -- torch.compile ---------------------------------------------------------------------------------
def test_edited_extractor_compiles_to_one_graph_without_breaks():
    torch._dynamo.reset()
    model = TinyViT().eval()
    x = torch.randn(2, 3, 64, 64)
    steer = torch.randn(96)
    edit = {"blocks.1.attn:attn": zero_head(2), "blocks.2": lambda v, k: v + steer,
            "blocks.0.mlp": torch.zeros(1, 1, 96)}  # fmt: skip
    ex = capture(model, ["blocks.1.attn:attn", "blocks.2"], edit=edit)
    with torch.no_grad():
        eager_out, eager_feats = ex(x)
        explanation = torch._dynamo.explain(ex)(x)
        assert explanation.graph_count == 1
        assert explanation.graph_break_count == 0
        compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")
        out, feats = compiled(x)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(feats, eager_feats)


# -- errors ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return TinyViT(depth=1).eval()


def test_an_unknown_selector_names_the_problem_and_close_matches(tiny):
    with pytest.raises(ValueError, match=r"'atn'.*Did you mean.*'attn'"):
        capture(tiny, [], edit={"atn": zero_head(0)})


def test_an_edit_that_is_not_a_function_or_tensor_is_refused(tiny):
    with pytest.raises(TypeError, match=r"edit for 'attn' must be a function"):
        capture(tiny, [], edit={"attn": 0.0})


def test_an_edit_returning_none_says_to_return_the_value(tiny):
    def in_place(attn, key):
        attn[:, 0] = 0

    ex = capture(tiny, [], edit={"attn": in_place})
    with pytest.raises(ValueError, match=r"edit of 'blocks.0.attn:attn' returned None"):
        ex(torch.randn(1, 3, 64, 64))


def test_structure_and_shape_mistakes_are_explained():
    model = Structured().eval()
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"'split' is a tuple of 2.*must return"):
        capture(model, [], edit={"split": lambda v, k: v[0]})(x)
    with pytest.raises(TypeError, match=r"tensor, which can only replace a tensor"):
        capture(model, [], edit={"split": torch.zeros(3)})(x)
    with pytest.raises(ValueError, match=r"does not broadcast"):
        capture(model, [], edit={"head": torch.zeros(4, 4)})(x)


# -- the run-time fallback (transformers models do not fx-trace) -----------------------------------
def test_steering_gpt2_residual_stream_through_the_fallback_equals_a_hook():
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (2, 8))
    vector = torch.randn(64)

    def add(out):
        return out + vector if isinstance(out, torch.Tensor) else (out[0] + vector, *out[1:])

    block = model.transformer.h[1]
    seen = []
    handles = [replace_output(block, add)]  # registered first: the next hook sees its output
    handles.append(block.register_forward_hook(lambda m, a, o: seen.append(o)))
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        original = model(ids).logits
        ex = capture(model, ["transformer.h.1"], edit={"transformer.h.1": lambda v, k: add(v)},
                     fallback="auto")  # fmt: skip
        out, feats = ex(ids)
        again, _ = ex(ids)  # the second call runs the discovered plan
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(again.logits, expected)
    assert not torch.allclose(expected, original)
    assert_same(feats["transformer.h.1"], seen[0], exact=False)  # captured = edited
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original)

"""attention="weights": probabilities out of fused attention, against unfused references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import module_state
from fxcapture import capture
from fxcapture.core.attention import ExplicitAttentionMode, explicit_sdpa


def _sdpa_nodes(graph) -> list:
    return [n for n in graph.nodes if n.target is F.scaled_dot_product_attention]


# -- timm vit_small_patch16_224, fused attention (the default) --------------------------------


@pytest.fixture(scope="module")
def fused_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    assert all(block.attn.fused_attn for block in model.blocks), "timm default should be fused"
    return model


def _unfused_attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The same weights with fused_attn off; a hook on attn_drop sees the probabilities."""
    reference = copy.deepcopy(model)
    seen = []
    for block in reference.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        reference(x)
    return seen


def test_timm_fused_vit_probabilities_equal_unfused(fused_vit):
    x = torch.randn(2, 3, 224, 224)
    before = module_state(fused_vit)
    ex = capture(fused_vit, ["attn_probs"], attention="weights")
    with torch.no_grad():
        out, feats = ex(x)
        ref_out = fused_vit(x)
    assert module_state(fused_vit) == before
    assert _sdpa_nodes(ex.graph) == []
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    assert list(feats) == [f"blocks.{i}.attn:attn_probs" for i in range(12)]
    expected = _unfused_attention_maps(fused_vit, x)
    assert len(expected) == 12
    for key, ref in zip(feats, expected):
        assert feats[key].shape == (2, 6, 197, 197)
        torch.testing.assert_close(feats[key], ref, atol=1e-6, rtol=1e-5, msg=key)


def test_default_keeps_the_fused_kernel(fused_vit):
    ex = capture(fused_vit, ["blocks.0.attn"])
    assert len(_sdpa_nodes(ex.graph)) == 12
    with pytest.raises(ValueError, match="fused kernel.*capture 'attn_probs'"):
        capture(fused_vit, ["blocks.0.attn:attn"])


@pytest.mark.parametrize("selector", ["attn_probs", "blocks.3.attn:attn_probs", "blocks.*.attn:attn_prob?"])
def test_asking_for_probabilities_needs_no_option(fused_vit, selector):
    x = torch.randn(1, 3, 224, 224)
    ex = capture(fused_vit, selector)
    with torch.no_grad():
        out, feats = ex(x)
        ref_out = fused_vit(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    expected = _unfused_attention_maps(fused_vit, x)
    keys = [f"blocks.{i}.attn:attn_probs" for i in range(12)]
    assert list(feats) == (["blocks.3.attn:attn_probs"] if "3" in selector else keys)
    for key in feats:
        torch.testing.assert_close(feats[key], expected[int(key.split(".")[1])], atol=1e-6, rtol=1e-5)


def test_unknown_mode_is_a_clear_error(fused_vit):
    with pytest.raises(ValueError, match="attention='weights'"):
        capture(fused_vit, ["blocks.0.attn"], attention="probs")


# -- torchvision vit_b_16: nn.MultiheadAttention with need_weights=False ----------------------


@pytest.fixture(scope="module")
def tv_vit():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vit_b_16(weights=None, image_size=64).eval()


def _mha_reference(model: nn.Module, x: torch.Tensor):
    """Per-layer (per-head, averaged) weights: each MHA called again with need_weights=True."""
    inputs = []
    handles = [
        layer.self_attention.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append((m, args)), with_kwargs=True
        )
        for layer in model.encoder.layers
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        per_head = [m(*a, need_weights=True, average_attn_weights=False)[1] for m, a in inputs]
        mean = [m(*a, need_weights=True)[1] for m, a in inputs]
    return out, per_head, mean


def test_torchvision_vit_multihead_attention_weights(tv_vit):
    x = torch.randn(2, 3, 64, 64)
    path = "encoder.layers.encoder_layer_0.self_attention"
    ex = capture(tv_vit, ["attn_probs", "attn_probs_mean", path], attention="weights")
    with torch.no_grad():
        out, feats = ex(x)
    ref_out, per_head, mean = _mha_reference(tv_vit, x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    assert len(per_head) == 12
    for i, (heads_ref, mean_ref) in enumerate(zip(per_head, mean)):
        prefix = f"encoder.layers.encoder_layer_{i}.self_attention"
        assert feats[f"{prefix}:attn_probs"].shape == (2, 12, 17, 17)
        torch.testing.assert_close(feats[f"{prefix}:attn_probs"], heads_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(feats[f"{prefix}:attn_probs_mean"], mean_ref, atol=1e-6, rtol=1e-5)
    # the module's own capture keeps its original return value: (output, None)
    attn_out, weights = feats[path]
    assert weights is None
    with torch.no_grad():
        first_input = _first_mha_input(tv_vit, x)
        module_out = tv_vit.encoder.layers[0].self_attention(*first_input, need_weights=False)[0]
    torch.testing.assert_close(attn_out, module_out, atol=1e-5, rtol=0)


def _first_mha_input(model: nn.Module, x: torch.Tensor) -> tuple:
    seen = []
    h = model.encoder.layers[0].self_attention.register_forward_pre_hook(
        lambda m, args: seen.append(args)
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen[0]


def test_multihead_attention_asked_for_weights_still_gets_them():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            out, weights = self.mha(x, x, x)  # default: averaged weights
            return out, weights

    net = Net().eval()
    x = torch.randn(2, 5, 16)
    ex = capture(net, ["mha:attn_probs"], attention="weights")
    with torch.no_grad():
        (out, weights), feats = ex(x)
        ref_out, ref_weights = net(x)
        ref_heads = net.mha(x, x, x, average_attn_weights=False)[1]
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(feats["mha:attn_probs"], ref_heads, atol=1e-6, rtol=0)


# -- the explicit form: masks, causal, scale, GQA, dropout -------------------------------------


def _manual_attention(q, k, v, bias):
    """Textbook attention with an additive bias: an independent reference."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias
    probs = scores.softmax(-1)
    return probs @ v, probs


class SdpaNet(nn.Module):
    """Calls F.scaled_dot_product_attention with the flags given at construction."""

    def __init__(self, **flags):
        super().__init__()
        self.flags = flags
        self.qkv = nn.Linear(8, 24)

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.flags.get("enable_gqa"):
            k, v = k[:, :1], v[:, :1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.flags)


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa"])
def test_explicit_sdpa_matches_fused_and_textbook(case):
    torch.manual_seed(0)
    flags = {"causal": {"is_causal": True}, "scale": {"scale": 0.3}, "gqa": {"enable_gqa": True}}
    net = SdpaNet(**flags.get(case, {})).eval()
    x = torch.randn(2, 6, 8)
    mask = None
    if case == "bool_mask":
        mask = torch.rand(6, 6) > 0.3
        mask[:, 0] = True  # no fully masked row
    elif case == "float_mask":
        mask = torch.randn(2, 1, 6, 6)
    ex = capture(net, ["attn_probs"], attention="weights")
    with torch.no_grad():
        out, feats = ex(x, mask)
        ref = net(x, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    probs = feats[":attn_probs"]
    assert probs.shape == (2, 2, 6, 6)

    q, k, v = net.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4).unbind(0)
    bias = torch.zeros(6, 6)
    if case == "bool_mask":
        bias = torch.zeros(6, 6).masked_fill(~mask, float("-inf"))
    elif case == "float_mask":
        bias = mask
    elif case == "causal":
        bias = torch.full((6, 6), float("-inf")).triu(1)
    elif case == "scale":
        q = q * 0.3 * math.sqrt(4)  # _manual_attention divides by sqrt(d)
    elif case == "gqa":
        k, v = k[:, :1].expand(-1, 2, -1, -1), v[:, :1].expand(-1, 2, -1, -1)
    with torch.no_grad():
        ref_out, ref_probs = _manual_attention(q, k, v, bias)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)


def test_explicit_sdpa_function_matches_fused_kernel():
    q, k, v = torch.randn(3, 2, 4, 7, 16).unbind(0)
    out, probs = explicit_sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=0)
    assert torch.all(probs.triu(1) == 0)
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        explicit_sdpa(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool), is_causal=True)


def test_training_dropout_keeps_probabilities_before_dropout():
    net = SdpaNet(dropout_p=0.5).train()
    x = torch.randn(2, 6, 8)
    ex = capture(net, ["attn_probs"], attention="weights").train()
    out, feats = ex(x)
    probs = feats[":attn_probs"]
    # pre-dropout probabilities: every row sums to one, no dropped (zero) entries
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 6))
    assert torch.all(probs > 0)
    assert out.shape == (2, 2, 6, 4)


# -- transformers LLaMA with sdpa -----------------------------------------------------------------


def _llama_pair():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    # each model gets its own config: _from_config sets the implementation on the config
    sdpa = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    eager = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    sdpa.eval(), eager.eval()
    assert sdpa.config._attn_implementation == "sdpa"
    return sdpa, eager, torch.randint(0, 100, (2, 9))


def test_llama_sdpa_runtime_mode_equals_eager_attentions():
    sdpa, eager, ids = _llama_pair()
    maps = []
    with torch.no_grad(), ExplicitAttentionMode(lambda probs, function: maps.append(probs)):
        out = sdpa(ids)
    with torch.no_grad():
        ref = eager(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert len(maps) == 2
    for value, expected in zip(maps, ref.attentions):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


def test_llama_sdpa_capture_equals_eager_attentions():
    sdpa, eager, ids = _llama_pair()
    ex = capture(sdpa, ["attn_probs"], attention="weights", fallback="auto")
    with torch.no_grad():
        out, feats = ex(ids)
    assert ex.tracer == "running"  # LLaMA is traced by running it; the probabilities are graph nodes
    with torch.no_grad():
        ref = eager(ids, output_attentions=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    assert len(feats) == 2
    for value, expected in zip(feats.values(), ref.attentions):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


# -- the run-time mode: MultiheadAttention and unfused softmax -> matmul ---------------------


def _encoder_and_reference(x: torch.Tensor):
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2,
                                    enable_nested_tensor=False).eval()  # fmt: skip
    expected, h = [], x
    with torch.no_grad():
        for layer in encoder.layers:
            expected.append(layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)[1])
            h = layer(h)
    return encoder, expected


def test_runtime_mode_gives_multihead_attention_weights():
    x = torch.randn(2, 5, 16)
    encoder, expected = _encoder_and_reference(x)
    maps = []
    with torch.no_grad():
        with ExplicitAttentionMode(lambda probs, function: maps.append(probs)):
            out = encoder(x)
        torch.testing.assert_close(out, encoder(x), atol=1e-5, rtol=1e-4)  # fast path outside the mode
    assert len(maps) == 2
    for value, ref in zip(maps, expected):
        torch.testing.assert_close(value, ref)


def test_fallback_always_captures_probabilities_at_run_time():
    x = torch.randn(2, 5, 16)
    encoder, expected = _encoder_and_reference(x)
    ex = capture(encoder, "attn_probs", fallback="always")
    for _ in range(2):  # the first call discovers the names, the second uses them
        with torch.no_grad():
            out, feats = ex(x)
        assert list(feats) == ["layers.0.self_attn:attn_probs", "layers.1.self_attn:attn_probs"]
        for value, ref in zip(feats.values(), expected):
            torch.testing.assert_close(value, ref)


def test_runtime_mode_reports_unfused_softmax_before_dropout_and_cast():
    def attention(q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1, dtype=torch.float32)
        dropped = F.dropout(probs.to(q.dtype), p=0.0)
        scores_elsewhere = torch.softmax(q.sum(-1), -1)  # a softmax that feeds no matmul
        return dropped @ v, probs, scores_elsewhere

    q, k, v = (torch.randn(2, 3, 4, 8) for _ in range(3))
    maps = []
    with ExplicitAttentionMode(lambda probs, function: maps.append(probs)):
        out, probs, _ = attention(q, k, v)
    assert len(maps) == 1 and torch.equal(maps[0], probs)
    torch.testing.assert_close(out, (q @ k.transpose(-2, -1)).softmax(-1) @ v)


@pytest.mark.parametrize("fallback", ["never", "always"])
def test_multihead_attention_mean_of_heads_under_every_tracer(fallback):
    """``attn_probs_mean`` of an ``nn.MultiheadAttention`` comes from run-time capture too,
    equal to the weights the module itself returns (averaged over heads)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).eval()
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.attn = model, attn

        def forward(self, x):
            h = self.pre(x)
            return self.attn(h, h, h, need_weights=False)[0]

    block = Block().eval()
    ex = capture(block, ["attn:attn_probs", "attn:attn_probs_mean"], fallback=fallback)
    for n in (3, 5):
        x = torch.randn(2, n, 8)
        with torch.no_grad():
            out, feats = ex(x)
            h = model(x)
            expected_out, expected_mean = attn(h, h, h, need_weights=True)
            _, per_head = attn(h, h, h, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(out, expected_out)
        assert list(feats) == ["attn:attn_probs", "attn:attn_probs_mean"]
        torch.testing.assert_close(feats["attn:attn_probs"], per_head)
        torch.testing.assert_close(feats["attn:attn_probs_mean"], expected_mean)

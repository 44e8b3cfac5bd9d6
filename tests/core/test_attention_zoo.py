"""``capture(model, "attn_probs")`` on real architectures, each against its own unfused path.

References are independent of fxcapture: timm with ``fused_attn=False`` (a hook on
``attn_drop`` sees the softmax output), transformers eager ``output_attentions=True``,
``nn.MultiheadAttention(need_weights=True, average_attn_weights=False)`` called on the
inputs its module received, and the eager model's own ``F.softmax`` outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import module_state
from fxcapture import capture


def _close(actual: dict, expected: list, atol: float = 1e-5) -> None:
    assert len(actual) == len(expected), (list(actual), len(expected))
    for (key, value), ref in zip(actual.items(), expected):
        assert value.shape == ref.shape, (key, value.shape, ref.shape)
        torch.testing.assert_close(value, ref, atol=atol, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def _run_twice(ex, model, make_input):
    """Two calls with different inputs: the maps follow the input (no stale values)."""
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        x = make_input()
        with torch.no_grad():
            out, feats = ex(x)
            ref = model(x)
        results.append((x, out, ref, feats))
    return results


# -- timm: fused_attn (default) against fused_attn=False --------------------------------------

TIMM = {
    "vit": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, depth=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=32)),
}


def _timm_unfused_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    reference = copy.deepcopy(model)
    seen: list[torch.Tensor] = []
    for module in reference.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
            module.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        reference(x)
    return seen


@pytest.mark.parametrize("arch", list(TIMM))
def test_timm_fused_attention_probabilities(arch):
    timm = pytest.importorskip("timm")
    name, kwargs = TIMM[arch]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    fused = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert fused, f"{name}: expected timm attention modules"
    for module in fused:  # timm's default, except where timm marks it experimental (Swin)
        module.fused_attn = True
    before = module_state(model)
    ex = capture(model, "attn_probs")
    size = kwargs["img_size"]
    for x, out, ref, feats in _run_twice(ex, model, lambda: torch.randn(2, 3, size, size)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert all(key.endswith(".attn:attn_probs") for key in feats), list(feats)
        _close(feats, _timm_unfused_maps(model, x))
    assert module_state(model) == before
    # the default keeps the fused kernels: no probabilities, the same output
    plain = capture(model, "blocks.0" if arch != "swin" else "layers.0")
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], model(x), atol=0, rtol=0)


def test_timm_unfused_model_names_its_softmax_attn_probs():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    ex = capture(model, "attn_probs")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, feats = ex(x)
        torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    _close(feats, _timm_unfused_maps(model, x), atol=0)


# -- torchvision ------------------------------------------------------------------------------


class SoftmaxRecorder(torch.overrides.TorchFunctionMode):
    """Every F.softmax output of an eager forward (the reference for unfused code)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.softmax:
            self.seen.append(out)
        return out


def test_torchvision_swin_t_window_attention():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=5).eval()
    ex = capture(model, "attn_probs")
    for x, out, ref, feats in _run_twice(ex, model, lambda: torch.randn(1, 3, 64, 64)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        recorder = SoftmaxRecorder()
        with torch.no_grad(), recorder:
            model(x)
        assert list(feats)[0] == "features.1.0.attn:attn_probs"
        _close(feats, recorder.seen)


def test_torchvision_vit_b_16_multihead_attention():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=5).eval()
    inputs = []
    for layer in model.encoder.layers:
        layer.ln_1.register_forward_hook(lambda m, args, out: inputs.append(out))
    ex = capture(model, ["attn_probs", "attn_probs_mean"])
    for x, out, ref, feats in _run_twice(ex, model, lambda: torch.randn(2, 3, 32, 32)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        per_head = {k: v for k, v in feats.items() if k.endswith(":attn_probs")}
        means = {k: v for k, v in feats.items() if k.endswith(":attn_probs_mean")}
        assert list(per_head)[0] == "encoder.layers.encoder_layer_0.self_attention:attn_probs"
        expected = []
        inputs.clear()
        with torch.no_grad():
            model(x)
            for layer, h in zip(model.encoder.layers, inputs):
                expected.append(layer.self_attention(h, h, h, need_weights=True, average_attn_weights=False)[1])
        _close(per_head, expected)
        _close(means, [e.mean(1) for e in expected])


# -- nn.TransformerEncoder (a torch.nn leaf with MultiheadAttention inside) --------------------


class Encoder(nn.Module):
    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x, mask=None):
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask))


def _encoder_reference(model: Encoder, x: torch.Tensor, mask=None) -> list[torch.Tensor]:
    """Each layer's MultiheadAttention asked for its weights on the input it received."""
    h = model.embed(x)
    maps = []
    for layer in model.encoder.layers:
        a = layer.norm1(h) if layer.norm_first else h
        maps.append(layer.self_attn(a, a, a, key_padding_mask=mask, need_weights=True, average_attn_weights=False)[1])
        h = layer(h, src_key_padding_mask=mask)
    return maps


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_probabilities(norm_first):
    torch.manual_seed(0)
    model = Encoder(norm_first).eval()
    ex = capture(model, "attn_probs")
    for x, out, ref, feats in _run_twice(ex, model, lambda: torch.randn(2, 5, 8)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert list(feats) == [f"encoder.layers.{i}.self_attn:attn_probs" for i in range(3)]
        with torch.no_grad():
            _close(feats, _encoder_reference(model, x))
    # an nn.TransformerEncoderLayer alone, through its fast path when not asked
    layer = model.encoder.layers[0]
    with torch.no_grad():
        x = torch.randn(2, 5, 16)
        out, feats = capture(layer, "self_attn:attn_probs")(x)
        torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-4)


# -- transformers in sdpa mode against eager output_attentions --------------------------------


def _hf_pair(kind: str):
    transformers = pytest.importorskip("transformers")
    configs = {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=32)),
        "bert": (transformers.BertModel, transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
        "vit": (transformers.ViTModel, transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)),
    }  # fmt: skip
    cls, config = configs[kind]
    torch.manual_seed(0)
    sdpa = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    eager = cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    return sdpa, eager


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama", "vit"])
def test_transformers_sdpa_probabilities_equal_eager_attentions(kind):
    sdpa, eager = _hf_pair(kind)
    ex = capture(sdpa, "attn_probs")
    for seed in (1, 2):
        torch.manual_seed(seed)
        if kind == "vit":
            kwargs = {"pixel_values": torch.randn(2, 3, 32, 32)}
        else:
            kwargs = {"input_ids": torch.randint(0, 50, (2, 7))}
            if kind == "bert":
                kwargs["attention_mask"] = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
        with torch.no_grad():
            out, feats = ex(**kwargs)
            ref = eager(**kwargs, output_attentions=True)
        first = out.logits if hasattr(out, "logits") else out.last_hidden_state
        expected = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
        torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-4)
        assert all(key.endswith(":attn_probs") for key in feats), list(feats)
        _close(feats, list(ref.attentions))

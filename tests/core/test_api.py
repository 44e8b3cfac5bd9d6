"""capture(): outputs, module captures and locals against forward hooks and manual forwards."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from conftest import (
    assert_matches_hooks,
    assert_same,
    hook_values,
    hooked,
    module_state,
    timm_vit_small,
)
from fxcapture import capture


# -- output identity -----------------------------------------------------------------------


def test_output_is_bit_identical_in_eval(resnet18, image):
    ex = capture(resnet18, ["layer1", "layer4", "fc"])
    out, feats = ex(image)
    with torch.no_grad():
        ref = resnet18(image)
    assert torch.equal(out, ref)
    assert list(feats) == ["layer1", "layer4", "fc"]
    assert torch.equal(feats["fc"], ref)


def test_output_is_bit_identical_in_train_with_dropout():
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4)).train()
    ex = capture(model, ["1", "3"])
    x = torch.randn(5, 8)
    torch.manual_seed(123)
    with hooked(model, ["1"]) as seen:
        ref = model(x)
    torch.manual_seed(123)
    out, feats = ex(x)
    assert torch.equal(out, ref)
    assert torch.equal(feats["1"], seen["1"][0])
    assert torch.equal(feats["3"], ref)
    # dropout really ran (some zeros), so the RNG stream was the same one
    assert (feats["1"] == 0).any()


# -- module captures == forward hooks ------------------------------------------------------


def test_module_captures_equal_forward_hooks(resnet18, image):
    paths = ["conv1", "bn1", "relu", "maxpool", "layer1.0", "layer2.1.bn2", "layer3", "avgpool"]
    ex = capture(resnet18, paths)
    out, feats = ex(image)
    ref, seen = hook_values(resnet18, paths, image)
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)


class TupleDictModel(nn.Module):
    """Submodules returning a tuple, a dict and a namedtuple-free nested structure."""

    class Split(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=-1)
            return a * 2, b + 1

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return {"logits": self.lin(x), "aux": (x.sum(-1), x.mean(-1))}

    def __init__(self):
        super().__init__()
        self.split = self.Split()
        self.heads = self.Heads()

    def forward(self, x):
        a, b = self.split(x)
        h = self.heads(a)
        return h["logits"] + b, h


def test_module_returning_tuple_or_dict_is_captured_whole():
    model = TupleDictModel().eval()
    ex = capture(model, ["split", "heads"])
    x = torch.randn(3, 8)
    out, feats = ex(x)
    ref, seen = hook_values(model, ["split", "heads"], x)
    assert_same(out, ref)
    assert isinstance(feats["split"], tuple) and len(feats["split"]) == 2
    assert set(feats["heads"]) == {"logits", "aux"}
    assert_matches_hooks(feats, seen)


# -- model not modified; weights are shared -------------------------------------------------


def test_model_is_not_modified(resnet18, image):
    before = module_state(resnet18)
    root_attrs = set(vars(resnet18))
    globals_before = (nn.Module.__call__, nn.Module.__getattr__, torch.Tensor.__setitem__)
    helper_code = helper_gate.__code__
    ex = capture(resnet18, ["layer1.0:out", "layer4", "%flatten"])
    ex(image)
    ex.train()
    ex(image)
    ex.eval()
    assert module_state(resnet18) == before
    assert set(vars(resnet18)) == root_attrs
    assert not any(k.startswith("_fxcapture") for k in dir(resnet18))
    assert not resnet18.training
    _, feats = capture(Shared(), ["gate"])(torch.randn(2, 4))  # a helper function's local
    assert helper_gate.__code__ is helper_code
    assert (nn.Module.__call__, nn.Module.__getattr__, torch.Tensor.__setitem__) == globals_before


def test_weight_change_after_capture_shows_in_extractor(image):
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    ex = capture(model, ["layer4", "fc"])
    before, _ = ex(image)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
        model.fc.bias.zero_()
        model.layer4[1].bn2.running_mean.add_(0.5)
    out, feats = ex(image)
    ref, seen = hook_values(model, ["layer4"], image)
    assert not torch.allclose(out, before)
    assert torch.equal(out, ref)
    assert torch.equal(feats["layer4"], seen["layer4"][0])
    # a whole new parameter object assigned to the model shows too (shared submodule)
    model.fc.weight = nn.Parameter(torch.zeros_like(model.fc.weight))
    out, _ = ex(image)
    assert torch.equal(out, torch.zeros_like(out))


# -- inputs and outputs ----------------------------------------------------------------------


class KwargsModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x, y, scale=None, mask=None):
        h = self.a(x) + self.b(y)
        if scale is not None:
            h = h * scale
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        return {"h": h, "pair": (h.sum(-1), y.mean())}


def test_several_inputs_kwargs_and_dict_output():
    model = KwargsModel().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 6)
    scale, mask = torch.randn(2, 4), torch.rand(2, 4) > 0.5
    ex = capture(model, ["a", "b", ":h"])
    out, feats = ex(x, y, scale=scale, mask=mask)
    ref, seen = hook_values(model, ["a", "b"], x, y, scale=scale, mask=mask)
    assert_same(out, ref)
    assert_matches_hooks({k: feats[k] for k in ("a", "b")}, seen)
    assert torch.equal(feats[":h"], ref["h"])
    # the same extractor with the kwargs passed positionally
    out2, _ = ex(x, y, scale, mask)
    assert_same(out2, ref)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)

    def forward(self, x):
        z = self.enc(x)
        stats = (z.mean(0), {"max": z.amax(0), "min": z.amin(0)})
        return z.relu(), stats


def test_non_tensor_local_and_tuple_model_output():
    model = TupleOut().eval()
    x = torch.randn(5, 4)
    ex = capture(model, ["stats", "enc"])
    out, feats = ex(x)
    ref = model(x)
    assert_same(out, ref)
    assert_same(feats[":stats"], ref[1])
    assert isinstance(feats[":stats"], tuple) and isinstance(feats[":stats"][1], dict)


@torch.fx.wrap
def clamp_by_norm(x, limit: float):
    # data-dependent Python control flow: only traceable as a wrapped leaf function
    n = float(x.detach().norm())
    return x if n <= limit else x * (limit / n)


def scaled(x):
    if x.sum() > 0:  # not symbolically traceable
        return x * 2
    return x


class WrappedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        c = clamp_by_norm(self.lin(x), 1.0)
        s = scaled(c)
        return s + 1


def test_fx_wrap_and_autowrap_functions():
    model = WrappedModel().eval()
    ex = capture(model, [":c", ":s"], autowrap_functions=[scaled])
    x = torch.randn(3, 4) * 10
    out, feats = ex(x)
    h = model.lin(x)
    c = clamp_by_norm(h, 1.0)
    assert torch.allclose(c.norm(), torch.tensor(1.0))
    assert torch.equal(out, model(x))
    assert torch.equal(feats[":c"], c)
    assert torch.equal(feats[":s"], scaled(c))
    ops = {n.target for n in ex.graph.nodes if n.op == "call_function"}
    assert clamp_by_norm in ops and scaled in ops


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # untraceable: must stay a leaf
            return self.lin(x)
        return -self.lin(x)


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.inner(x).tanh())


def test_leaf_modules_by_class_and_by_path():
    model = WithLeaf().eval()
    x = torch.randn(3, 4)
    ref, seen = hook_values(model, ["inner", "out"], x)
    for leaf in (Inner, "inner"):
        ex = capture(model, ["inner", "out"], leaf_modules=[leaf])
        out, feats = ex(x)
        assert torch.equal(out, ref)
        assert_matches_hooks(feats, seen)
        assert any(n.op == "call_module" and n.target == "inner" for n in ex.graph.nodes)


# -- several calls, helper locals ---------------------------------------------------------------


def helper_gate(x):
    gate = torch.sigmoid(x)
    return x * gate


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.GELU())

    def forward(self, x):
        h = self.lin(x)
        h = self.lin(h.tanh())
        h = helper_gate(self.block(h))
        return h


def test_module_called_twice_gives_indexed_keys():
    model = Shared().eval()
    x = torch.randn(3, 4)
    ex = capture(model, ["lin"])
    assert ex.names == ["lin@0", "lin@1"]
    out, feats = ex(x)
    ref, seen = hook_values(model, ["lin"], x)
    assert len(seen["lin"]) == 2
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)
    # one call on its own
    _, one = capture(model, "lin@1")(x)
    assert list(one) == ["lin@1"] and torch.equal(one["lin@1"], seen["lin"][1])


def test_helper_local_is_attributed_to_calling_module():
    model = Shared().eval()
    x = torch.randn(3, 4)
    ex = capture(model, ["gate"])
    assert ex.names == [":gate"]  # helper called from the root forward
    _, feats = ex(x)
    _, seen = hook_values(model, ["block"], x)
    assert torch.equal(feats[":gate"], torch.sigmoid(seen["block"][0]))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub = Shared()

        def forward(self, x):
            return self.sub(x) * 3

    outer = Outer().eval()
    ex = capture(outer, ["sub:gate"])
    _, feats = ex(x)
    _, seen = hook_values(outer, ["sub.block"], x)
    assert list(feats) == ["sub:gate"]
    assert torch.equal(feats["sub:gate"], torch.sigmoid(seen["sub.block"][0]))


def test_local_keeps_value_at_function_return():
    class Rebind(nn.Module):
        def forward(self, x):
            y = x + 1
            first = y
            y = y * 10  # the local `y` is this value when forward returns
            return first + y

    x = torch.randn(4)
    _, feats = capture(Rebind(), ["y", "first"])(x)
    assert torch.equal(feats[":y"], (x + 1) * 10)
    assert torch.equal(feats[":first"], x + 1)


def test_torchvision_block_locals_match_manual_forward(resnet18, image):
    block = resnet18.layer2[0]  # BasicBlock with a downsample branch
    ex = capture(resnet18, ["layer2.0:identity", "layer2.0:out"])
    _, feats = ex(image)
    _, seen = hook_values(resnet18, ["layer1", "layer2.0"], image)
    with torch.no_grad():
        identity = block.downsample(seen["layer1"][0])
    assert torch.equal(feats["layer2.0:identity"], identity)
    assert torch.equal(feats["layer2.0:out"], seen["layer2.0"][0])


def test_node_capture_against_manual_forward():
    class M(nn.Module):
        def forward(self, x):
            return (x * 3).sum(-1) - 1

    x = torch.randn(2, 5)
    ex = capture(M(), ["%mul", "%sum_1"])
    _, feats = ex(x)
    assert torch.equal(feats["%mul"], x * 3)
    assert torch.equal(feats["%sum_1"], (x * 3).sum(-1))


# -- model zoo: captures == forward hooks, output bit-identical ---------------------------

ZOO = {
    "resnet50": (64, ["layer1", "layer2.0.bn3", "layer2.0", "layer3.5", "layer4", "fc"]),
    "vgg11": (32, ["features.0", "features.1", "features", "classifier.0", "classifier.1"]),
    "mobilenet_v3_small": (64, ["features.1", "features.2.block", "features.12", "classifier.0"]),
    "efficientnet_b0": (64, ["features.1.0.block", "features.2.1", "features.8", "avgpool"]),
    "convnext_tiny": (32, ["features.0", "features.1.0.block", "features.3", "classifier"]),
    "vit_b_16": (32, [
        "conv_proj", "encoder.layers.encoder_layer_0.self_attention",
        "encoder.layers.encoder_layer_11", "encoder.ln", "heads",
    ]),
    "swin_t": (64, ["features.0", "features.1.0.attn", "features.1.0", "features.5", "norm"]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ZOO))
def test_torchvision_zoo_matches_hooks(name):
    import torchvision

    size, paths = ZOO[name]
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    x = torch.randn(1 if name.startswith("vit") else 2, 3, size, size)
    ex = capture(model, paths)
    with torch.no_grad():  # as the hooks run: nn.MultiheadAttention's fast path needs it
        out, feats = ex(x)
    ref, seen = hook_values(model, paths, x)
    assert torch.equal(out, ref)
    assert list(feats) == ex.names
    assert_matches_hooks(feats, seen)
    if name == "vit_b_16":  # nn.MultiheadAttention returns a tuple: captured whole
        attn = feats["encoder.layers.encoder_layer_0.self_attention"]
        assert isinstance(attn, tuple) and len(attn) == 2


def test_timm_vit_small_attention_maps_equal_attn_drop_hooks():
    model = timm_vit_small()
    x = torch.randn(2, 3, 224, 224)
    ex = capture(model, ["attn"])
    assert ex.names == [f"blocks.{i}.attn:attn" for i in range(12)]
    drops = [f"blocks.{i}.attn.attn_drop" for i in range(12)]
    with hooked(model, drops) as seen, torch.no_grad():
        ref = model(x)
    out, feats = ex(x)
    assert torch.equal(out, ref)
    maps = list(feats.values())
    assert len(maps) == 12
    for i, m in enumerate(maps):
        assert m.shape == (2, 6, 197, 197)
        assert torch.equal(m, seen[drops[i]][0])
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 6, 197))

"""The extractor as an nn.Module: autograd, pruning, copies, dtypes, state_dict, contexts."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_matches_hooks, assert_same, hook_values
from fxcapture import capture
from fxcapture.cli.models import TinyViT


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return TinyViT(image_size=32, patch=8, dim=48, depth=2, heads=3).eval()


@pytest.fixture
def small_image():
    return torch.randn(2, 3, 32, 32)


# -- autograd ----------------------------------------------------------------------------


def hook_grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, cls: int):
    """Grad-CAM the classic way: a forward hook keeps the activation, a tensor hook its grad."""
    store = {}

    def forward_hook(module, args, output):
        store["act"] = output
        output.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(forward_hook)
    try:
        out = model(x)
        out[:, cls].sum().backward()
    finally:
        handle.remove()
    weights = store["grad"].mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * store["act"]).sum(1))
    return store["act"].detach(), store["grad"], cam.detach()


def test_gradients_through_captured_values_equal_hook_grad_cam(resnet18, image):
    cls = 3
    act, grad, cam = hook_grad_cam(resnet18, resnet18.layer4, image, cls)
    resnet18.zero_grad(set_to_none=True)
    ex = capture(resnet18, ["layer4"])
    out, feats = ex(image)
    (g,) = torch.autograd.grad(out[:, cls].sum(), feats["layer4"])
    assert torch.equal(feats["layer4"].detach(), act)
    torch.testing.assert_close(g, grad, rtol=0, atol=0)
    ours = torch.relu((g.mean(dim=(2, 3), keepdim=True) * feats["layer4"]).sum(1))
    torch.testing.assert_close(ours.detach(), cam)


def test_backward_into_parameters_matches_model(vit, small_image):
    ex = capture(vit, ["blocks.0.attn:attn", "blocks.1"])
    out, feats = ex(small_image)
    (out.sum() + feats["blocks.0.attn:attn"].pow(2).sum()).backward()
    ours = {n: p.grad.clone() for n, p in vit.named_parameters()}
    vit.zero_grad(set_to_none=True)
    # reference: the same loss from a manual forward of the model
    ref = vit(small_image)
    a0 = _manual_attn(vit.blocks[0], vit, small_image)
    (ref.sum() + a0.pow(2).sum()).backward()
    for n, p in vit.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=lambda m, n=n: f"{n}: {m}")
    vit.zero_grad(set_to_none=True)


def _manual_attn(block, vit, x):
    h = vit.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([vit.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + vit.pos_embed
    h = block.norm1(h)
    attn = block.attn
    B, N, C = h.shape
    qkv = attn.qkv(h).reshape(B, N, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return ((q @ k.transpose(-2, -1)) * (C // attn.heads) ** -0.5).softmax(-1)


# -- pruning -------------------------------------------------------------------------------


def test_keep_output_false_prunes_after_last_capture(resnet18, image):
    full = capture(resnet18, ["layer2"])
    ex = capture(resnet18, ["layer1", "layer2"], keep_output=False)
    out, feats = ex(image)
    assert out is None
    _, seen = hook_values(resnet18, ["layer1", "layer2"], image)
    assert_matches_hooks(feats, seen)
    targets = {n.target for n in ex.graph.nodes if n.op == "call_module"}
    assert not any(t.startswith(("layer3", "layer4", "fc", "avgpool")) for t in targets)
    assert any(t.startswith("layer2") for t in targets)
    assert len(ex.graph.nodes) < 0.6 * len(full.graph.nodes)  # layer3, layer4, head gone


def test_pruning_keeps_inplace_ops_the_capture_needs():
    class M(nn.Module):
        def forward(self, x):
            a = x * 2
            a.add_(1)  # part of `a`'s value at return
            b = a.exp()  # after the last capture: pruned
            return b.sum()

    x = torch.randn(5)
    ex = capture(M(), [":a"], keep_output=False)
    out, feats = ex(x)
    assert out is None
    assert torch.equal(feats[":a"], x * 2 + 1)
    assert not any(getattr(n.target, "__name__", n.target) == "exp" for n in ex.graph.nodes)


def test_the_whole_model_graph_drops_dead_pure_ops_and_keeps_its_random_draws():
    """With the model's output kept, a running trace loses only the ATen ops nothing uses
    (transformers' masks under tracing): a dead dropout still draws what eager draws."""

    class DeadWork(nn.Module):
        def forward(self, x):
            if x.shape[0] > 0:  # fx cannot branch on a shape: traced by running
                unused = torch.arange(x.shape[1]).unsqueeze(0) * 2  # noqa: F841
                _noise = F.dropout(x, 0.5, training=True)
            return x * 2 + torch.rand(x.shape)

    model, x = DeadWork(), torch.randn(3, 4)
    ex = capture(model, [], example_inputs=(x,))
    assert ex.tracer == "running"
    targets = [str(n.target) for n in ex.graph.nodes if n.op == "call_function"]
    assert not any("arange" in t or "unsqueeze" in t for t in targets), targets
    assert any("dropout" in t for t in targets), targets
    for seed in (0, 1):
        torch.manual_seed(seed)
        out, _ = ex(x)
        torch.manual_seed(seed)
        assert torch.equal(out, model(x))


# -- copies, pickling, dtypes ------------------------------------------------------------------


def _results_equal(ex_a, ex_b, *args):
    with torch.no_grad():
        assert_same(ex_a(*args), ex_b(*args))


def test_deepcopy(vit, small_image):
    ex = capture(vit, ["attn", "blocks.0"])
    dup = copy.deepcopy(ex)
    _results_equal(ex, dup, small_image)
    with torch.no_grad():
        dup.head.weight.zero_()  # the copy owns its parameters
    assert not torch.equal(vit.head.weight, torch.zeros_like(vit.head.weight))
    assert dup.names == ex.names


def test_pickle_and_torch_save(vit, small_image):
    ex = capture(vit, ["attn", "blocks.1.mlp"])
    ex.eval()
    restored = pickle.loads(pickle.dumps(ex))
    _results_equal(ex, restored, small_image)
    buf = io.BytesIO()
    torch.save(ex, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _results_equal(ex, loaded, small_image)
    assert loaded.names == ex.names and not loaded.training


def test_to_dtype_and_half(vit, small_image):
    model64 = copy.deepcopy(vit).to(torch.float64)
    ex = capture(copy.deepcopy(vit), ["attn", "blocks.0.mlp"]).to(torch.float64)
    x = small_image.double()
    out, feats = ex(x)
    ref, seen = hook_values(model64, ["blocks.0.mlp"], x)
    assert out.dtype == torch.float64 and torch.equal(out, ref)
    assert torch.equal(feats["blocks.0.mlp"], seen["blocks.0.mlp"][0])

    model16 = copy.deepcopy(vit).half()
    ex16 = capture(copy.deepcopy(vit), ["blocks.1"]).half()
    x = small_image.half()
    out, feats = ex16(x)
    ref, seen = hook_values(model16, ["blocks.1"], x)
    assert out.dtype == torch.float16 and torch.equal(out, ref)
    assert torch.equal(feats["blocks.1"], seen["blocks.1"][0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda(vit, small_image):
    ex = capture(copy.deepcopy(vit), ["attn"]).to("cuda")
    out, feats = ex(small_image.cuda())
    with torch.no_grad():
        ref = vit(small_image)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert all(v.is_cuda for v in feats.values())


# -- state_dict ----------------------------------------------------------------------------


def test_state_dict_keys_equal_the_models(vit, resnet18):
    for model in (vit, resnet18):  # TinyViT has parameters on the root module
        ex = capture(model, ["%flatten"] if model is resnet18 else ["attn"])
        assert list(ex.state_dict()) == list(model.state_dict())
        for k, v in ex.state_dict().items():
            assert v.data_ptr() == model.state_dict()[k].data_ptr()


def test_loading_a_model_checkpoint_into_the_extractor(vit, small_image):
    torch.manual_seed(1)
    other = TinyViT(image_size=32, patch=8, dim=48, depth=2, heads=3).eval()
    ex = capture(copy.deepcopy(vit), ["blocks.0"])
    result = ex.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    out, feats = ex(small_image)
    ref, seen = hook_values(other, ["blocks.0"], small_image)
    assert torch.equal(out, ref)
    assert torch.equal(feats["blocks.0"], seen["blocks.0"][0])


# -- grad modes and autocast -------------------------------------------------------------------


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_runs_under_no_grad_and_inference_mode(vit, small_image, context):
    ex = capture(vit, ["attn", "blocks.1"])
    with getattr(torch, context)():
        out, feats = ex(small_image)
        ref = vit(small_image)
    assert torch.equal(out, ref)
    assert not out.requires_grad and not any(v.requires_grad for v in feats.values())
    if context == "inference_mode":
        assert out.is_inference()


def test_runs_under_cpu_autocast_bfloat16(vit, small_image):
    ex = capture(vit, ["blocks.0.attn.qkv", "blocks.1"])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out, feats = ex(small_image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, seen = hook_values(vit, ["blocks.0.attn.qkv", "blocks.1"], small_image)
    assert feats["blocks.0.attn.qkv"].dtype == torch.bfloat16
    assert_same(out, ref)
    assert_matches_hooks(feats, seen)


# -- no references to earlier results ------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])
def test_extractor_keeps_no_reference_to_features(resnet18, image, grad):
    ex = capture(resnet18, ["layer3", "layer4", "bn1"])
    with torch.set_grad_enabled(grad):
        out, feats = ex(image)
    refs = [weakref.ref(v) for v in feats.values()] + [weakref.ref(out)]
    del out, feats
    gc.collect()
    assert all(r() is None for r in refs)
    # and nothing grows on the extractor across calls
    size = len(ex.__dict__)
    with torch.no_grad():
        ex(image)
    assert len(ex.__dict__) == size


def test_grad_cam_example(resnet18, image):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "grad_cam.py"
    spec = importlib.util.spec_from_file_location("grad_cam_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cam = example.grad_cam(resnet18, "layer4", image, cls=5)
    _, _, raw = hook_grad_cam(resnet18, resnet18.layer4, image, 5)  # this file's reference
    resnet18.zero_grad(set_to_none=True)
    assert cam.shape == (2, 64, 64)
    expected = torch.nn.functional.interpolate(raw[:, None], size=(64, 64), mode="bilinear")[:, 0]
    expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    torch.testing.assert_close(cam, expected)

"""HookManager: TorchHook's API (its article's usages) and its bugs, fixed.

References are independent of HookManager: plain forward hooks (conftest.hook_values)
and direct module calls.
"""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import assert_same, hook_values

from fxcapture import HookManager
from fxcapture.compat.hook_manager import format_parameter_count


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_article_quick_start(resnet, capsys):
    x = torch.randn(1, 3, 64, 64)
    _, seen = hook_values(resnet, ["conv1", "layer4.1.relu", "fc"], x)
    manager = HookManager(resnet, max_size=1)
    manager.register_forward_hook(layer_name="conv1")
    manager.add(layer_name="layer4.1.relu")
    manager.add(layer_name="fully_connected", layer=resnet.fc)
    with torch.no_grad():
        resnet(x)
    assert_same(manager.get_features("conv1"), seen["conv1"])
    # the block's ReLU runs twice per forward: max_size=1 keeps the last call
    assert_same(manager.get_features("layer4.1.relu"), seen["layer4.1.relu"][-1:])
    assert_same(manager.get_features("fully_connected"), seen["fc"])
    assert list(manager.get_all()) == ["conv1", "layer4.1.relu", "fully_connected"]

    manager.summary()
    text = capsys.readouterr().out
    assert text.startswith("Model: ResNet | Total Parameters: 11.69 M\n")
    assert "Registered Hooks: 3 (max_size=1)" in text
    assert "conv1                         1                   (1, 64, 32, 32)" in text
    assert "fully_connected               1                   (1, 1000)" in text
    assert str(manager) == text.rstrip("\n")

    manager.clear_hooks()
    resnet(x)
    assert all(len(m._forward_hooks) == 0 for m in resnet.modules())
    assert len(manager.get_features("conv1")) == 1  # features stay after clear_hooks


def test_readme_auto_keys_and_unbounded_lists():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    manager = HookManager(model)
    manager.register_forward_hook(layer_name="0")
    manager.register_forward_hook(layer=model[1])
    manager.register_forward_hook("CustomName", layer=model[3])
    manager.register_forward_hook(layer=nn.ReLU())  # not even in the model: still a key
    inputs = [torch.randn(2, 3, 8, 8) for _ in range(5)]
    with torch.no_grad():
        for x in inputs:
            model(x)
    assert manager.get_keys() == ["0", "ReLU_0", "CustomName", "ReLU_1"]
    assert len(manager.get_features("ReLU_0")) == 5
    for x, got in zip(inputs, manager.get_features("CustomName")):
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
    assert manager.get_features("ReLU_1") == []
    assert "ReLU_1                        0                   not triggered yet" in str(manager)
    manager.remove("ReLU_0")
    assert manager.get_keys() == ["0", "CustomName", "ReLU_1"]
    assert len(model[1]._forward_hooks) == 0
    manager.clear_features()
    assert manager.get_all() == {}


def test_max_size_keeps_the_last_outputs():
    model = nn.Linear(3, 2)
    manager = HookManager(model, max_size=2)
    manager.add("out", layer=model)
    inputs = [torch.randn(1, 3) for _ in range(5)]
    with torch.no_grad():
        for x in inputs:
            model(x)
        expected = [model(x) for x in inputs[-2:]]
    assert_same(manager.get_features("out"), expected)


def test_custom_hook_stores_its_result_and_leaves_the_output(resnet):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = resnet(x)
    _, seen = hook_values(resnet, ["layer1.0.conv1"], x)

    def my_custom_hook(module, input, output):
        positive_mean = output[output > 0].mean()
        return torch.tensor([positive_mean])  # TorchHook would replace the conv output

    manager = HookManager(resnet)
    manager.add(layer_name="layer1.0.conv1", custom_hook=my_custom_hook)
    with torch.no_grad():
        out = resnet(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    (stored,) = manager.get_features("layer1.0.conv1")
    conv = seen["layer1.0.conv1"][0]
    torch.testing.assert_close(stored, conv[conv > 0].mean().reshape(1))

    manager.add("skip", layer=resnet.layer1, custom_hook=lambda m, i, o: None)
    with torch.no_grad():
        resnet(x)
    assert manager.get_features("skip") == []  # None: nothing stored


def test_output_transform(resnet):
    x = torch.randn(1, 3, 64, 64)
    manager = HookManager(resnet)
    manager.add(layer_name="fc", output_transform=lambda y: torch.softmax(y, dim=-1).detach().cpu())
    with torch.no_grad():
        logits = resnet(x)
    (probs,) = manager.get_features("fc")
    torch.testing.assert_close(probs, logits.softmax(-1))


def test_tuple_outputs_kept_whole_without_warnings():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    manager = HookManager(attn)
    manager.add("mha", layer=attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            expected = attn(x, x, x)
            manager.clear_features()
            attn(x, x, x)
    (stored,) = manager.get_features("mha")
    assert isinstance(stored, tuple) and len(stored) == 2
    assert_same(stored, tuple(t.detach() for t in expected))
    assert "((2, 5, 8), (2, 5, 5))" in str(manager)


def test_hooks_removed_on_close_context_exit_and_garbage_collection():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    manager = HookManager(model)
    manager.add("0")
    manager.close()
    assert len(model[0]._forward_hooks) == 0

    with HookManager(model) as manager:
        manager.add("1")
        model(torch.randn(1, 2))
        assert len(model[1]._forward_hooks) == 1
    assert len(model[1]._forward_hooks) == 0
    assert len(manager.get_features("1")) == 1

    manager = HookManager(model)
    manager.add("0")
    manager.add("1")
    del manager
    gc.collect()
    assert len(model[0]._forward_hooks) == 0 and len(model[1]._forward_hooks) == 0
    model(torch.randn(1, 2))  # still runs


def test_torch_save_while_attached(resnet):
    manager = HookManager(resnet)
    manager.add("layer1")
    buffer = io.BytesIO()
    torch.save(resnet, buffer)  # TorchHook: "Can't pickle local object"
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), resnet(x), rtol=0, atol=0)
    assert len(manager.get_features("layer1")) == 1  # only the original model's call


def test_deepcopy_does_not_write_into_the_original_manager():
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
    manager = HookManager(model)
    manager.add("0")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone(torch.randn(4, 2))
        assert manager.get_features("0") == []
        x = torch.randn(1, 2)
        model(x)
        torch.testing.assert_close(manager.get_features("0")[0], model[0](x))


def test_clear_errors(resnet):
    with pytest.raises(ValueError, match="no module 'layer4.1.reul'.*Did you mean 'layer4.1.relu'"):
        HookManager(resnet).add("layer4.1.reul")
    model = nn.Sequential(nn.Linear(2, 2))
    manager = HookManager(model)
    with pytest.raises(ValueError, match="no module '1'.*named_modules"):
        manager.add("1")
    manager.add("0")
    with pytest.raises(ValueError, match="already registered"):
        manager.add("0")
    with pytest.raises(ValueError, match="not both"):
        manager.add("x", layer=model[0], custom_hook=print, output_transform=print)
    with pytest.raises(ValueError, match="registered keys: 0"):
        manager.get_features("missing")
    with pytest.raises(TypeError, match="nn.Module"):
        HookManager("model")
    with pytest.raises(ValueError, match="max_size"):
        HookManager(model, max_size=-2)


def test_format_parameter_count():
    assert format_parameter_count(11_689_512) == "11.69 M"
    assert format_parameter_count(144_458) == "144.46 K"
    assert format_parameter_count(12) == "12.00"
    assert format_parameter_count(3_000_000_000) == "3.00 G"

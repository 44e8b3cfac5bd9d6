"""The TorchHook article (seeds/torchhook-article-zh.md), run with one import changed.

The snippets are the article's code with ``from torchhook import HookManager``
replaced by ``from fxcapture import HookManager`` (``models.resnet18()`` has random
weights: nothing is downloaded); "... 执行前向传播 ..." is a forward of the same
input. Stored features are compared with plain forward hooks registered on the same
modules (``conftest.hooked``), and the printed summary with the article's output.
"""

from __future__ import annotations

from conftest import assert_same, hooked

ARTICLE_OUTPUT = """\
Conv1 feature shape: torch.Size([1, 64, 112, 112])
Layer 4.1 ReLU feature shape: torch.Size([1, 512, 7, 7])
Model: ResNet | Total Parameters: 11.69 M
Registered Hooks: 3 (max_size=1)
--------------------------------------------------------------------------------
Captured Features Summary:
Layer Key                     Feature Count       Feature Shape                 
--------------------------------------------------------------------------------
conv1                         1                   (1, 64, 112, 112)             
layer4.1.relu                 1                   (1, 512, 7, 7)                
fully_connected               1                   (1, 1000)                     
--------------------------------------------------------------------------------
"""  # noqa: W291 (the article's lines end in the table's padding)


def test_article(capsys):  # seeded by conftest
    # -- 快速上手, as in the article ----------------------------------------------------------
    import torch
    import torchvision.models as models
    # 导入我们的库 TorchHook
    from fxcapture import HookManager  # was: from torchhook import HookManager

    # 1. 加载你的模型
    model = models.resnet18()
    model.eval() # 设置为评估模式

    # the reference: plain forward hooks, registered before the manager's
    reference = hooked(model, ["conv1", "layer4.1.relu", "fc", "layer1.0.conv1"])
    seen = reference.__enter__()

    # 2. 初始化 HookManager
    # max_size=1 表示每个 hook 只保留最新的特征图
    hook_manager = HookManager(model, max_size=1)

    # 3. 注册你感兴趣的层
    # 通过层名称注册
    # 层的名称可从 dict(model.named_modules()).keys() 中获取
    hook_manager.register_forward_hook(layer_name='conv1')
    # 也可以使用别名 add
    hook_manager.add(layer_name='layer4.1.relu')
    # 或者直接传入层对象
    target_layer = model.fc
    hook_manager.add(layer_name='fully_connected', layer=target_layer) # 建议提供名称

    # 4. 执行模型的前向传播
    dummy_input = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        output = model(dummy_input)

    # 5. 获取特征
    features_conv1 = hook_manager.get_features('conv1') # 获取 'conv1' 的特征列表
    features_relu = hook_manager.get_features('layer4.1.relu') # 获取 'layer4.1.relu' 的特征列表
    all_features = hook_manager.get_all() # 获取包含所有捕获的特征的字典

    print(f"Conv1 feature shape: {features_conv1[0].shape}")
    print(f"Layer 4.1 ReLU feature shape: {features_relu[0].shape}")

    # 6. 查看 Hook 状态总结
    hook_manager.summary()
    # 或者 print(hook_manager)

    # 7. 清理 Hook（重要！）
    hook_manager.clear_hooks()

    # -- checks --------------------------------------------------------------------------
    printed = capsys.readouterr().out
    assert [line.rstrip() for line in printed.splitlines()] == [
        line.rstrip() for line in ARTICLE_OUTPUT.splitlines()
    ]
    assert_same(features_conv1, seen["conv1"])
    # the block's ReLU runs twice per forward; max_size=1 keeps what the hook saw last
    assert len(seen["layer4.1.relu"]) == 2
    assert_same(features_relu, seen["layer4.1.relu"][-1:])
    assert_same(all_features["fully_connected"], seen["fc"])
    assert list(all_features) == ["conv1", "layer4.1.relu", "fully_connected"]
    torch.testing.assert_close(seen["fc"][0], output, rtol=0, atol=0)
    assert all(len(m._forward_hooks) == (1 if m in reference_modules(model) else 0)
               for m in model.modules())  # clear_hooks left only the reference's  # fmt: skip

    # -- 自定义 Hook 逻辑, as in the article ---------------------------------------------------
    def my_custom_hook(module, input, output):
        # 示例：只保存输出张量中正值的平均值
        if isinstance(output, torch.Tensor):
            positive_mean = output[output > 0].mean()
            # 注意：custom_hook 需要返回一个 Tensor 或 None
            # 这里我们返回一个包含单个值的 Tensor
            return torch.tensor([positive_mean])
        return None # 如果不保存，返回 None

    hook_manager.add(layer_name='layer1.0.conv1', custom_hook=my_custom_hook)

    # ... 执行前向传播 ...
    with torch.no_grad():
        second = model(dummy_input)

    custom_features = hook_manager.get_features('layer1.0.conv1')
    if custom_features:
        print(f"Custom feature (positive mean): {custom_features[0].item()}")

    conv = seen["layer1.0.conv1"][-1]
    assert custom_features[0].item() == conv[conv > 0].mean().item()
    assert capsys.readouterr().out == f"Custom feature (positive mean): {conv[conv > 0].mean().item()}\n"
    # TorchHook's custom_hook return value replaced the conv output; here it does not
    torch.testing.assert_close(second, output, rtol=0, atol=0)

    # -- 输出转换, as in the article ------------------------------------------------------------
    def apply_softmax(output_tensor):
        # 假设输出是 logits
        return torch.softmax(output_tensor, dim=-1).detach().cpu()

    # 假设 'fc' 层输出 logits
    hook_manager.add(layer_name='fc', output_transform=apply_softmax)

    # ... 执行前向传播 ...
    with torch.no_grad():
        model(dummy_input)

    softmax_output = hook_manager.get_features('fc')
    if softmax_output:
        print(f"Softmax output shape: {softmax_output[0].shape}")

    assert capsys.readouterr().out == "Softmax output shape: torch.Size([1, 1000])\n"
    torch.testing.assert_close(softmax_output[0], seen["fc"][-1].softmax(-1), rtol=0, atol=0)
    hook_manager.clear_hooks()
    reference.__exit__(None, None, None)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def reference_modules(model):
    modules = dict(model.named_modules())
    return [modules[p] for p in ("conv1", "layer4.1.relu", "fc", "layer1.0.conv1")]

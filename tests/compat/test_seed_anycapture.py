"""The AnyCapture READMEs (seeds/anycapture-readme.md and -zh), run with one import changed.

Each snippet is the README's code with ``from anycapture import get_local`` replaced by
``from fxcapture import get_local``; the README's ``...`` are filled with the smallest
complete code, said in comments. Recorded values are compared with a reference
tracer (``sys.setprofile`` reading the frame's locals at return) on separate calls.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from seed_reference import assert_arrays_equal, fresh_get_local, frame_locals  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_get_local")

# -- 步骤1 / 高级用法: the model file ---------------------------------------------------------
from fxcapture import get_local  # noqa: E402  (was: from anycapture import get_local)

@get_local('attention_map')
def your_attention_function(*args, **kwargs):
    # the README's "...": an attention whose map is ``attention_map``
    q, k, v = args
    attention_map = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attention_map @ v


@get_local('attention_map', 'query', 'key', 'value')
def multi_attention_function(*args, **kwargs):
    # the README names it your_attention_function too; one module cannot hold both
    x, w = args
    query, key, value = (x @ w).chunk(3, dim=-1)
    attention_map = (query @ key.transpose(-2, -1)).softmax(dim=-1)
    return attention_map @ value


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        # the README's "...": a single-head attention
        self.qkv = nn.Linear(8, 24)

    @get_local('attn_map', 'scores')  # 支持同时捕获多个变量
    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / 8 ** 0.5
        attn_map = scores.softmax(dim=-1)
        return attn_map @ v


class Model(nn.Module):  # "from ... import model": three attention layers
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(Attention(), Attention(), Attention())
        self.w = nn.Parameter(torch.randn(8, 24) * 0.3)

    def forward(self, x):
        x = your_attention_function(x, x, x)
        x = self.layers(x)
        return multi_attention_function(x, self.w)


def reference(model, data):
    """Every recorded local of one forward, by the reference tracer (get_local inactive)."""
    was_active = get_local.is_activated()
    get_local.deactivate()
    tracers = {
        "your_attention_function": (your_attention_function, ("attention_map",)),
        "multi_attention_function": (multi_attention_function,
                                     ("attention_map", "query", "key", "value")),
        "Attention.forward": (Attention.forward, ("attn_map", "scores")),
    }
    with torch.no_grad(), frame_locals(your_attention_function, "attention_map") as a, \
            frame_locals(multi_attention_function, *tracers["multi_attention_function"][1]) as b, \
            frame_locals(Attention.forward, "attn_map", "scores") as c:  # fmt: skip
        out = model(data)
    if was_active:
        get_local.activate(get_local.max_size)
    calls = {"your_attention_function": a, "multi_attention_function": b, "Attention.forward": c}
    return out, {f"{fn}.{name}": [call[name] for call in calls[fn]]
                 for fn, (_, names) in tracers.items() for name in names}  # fmt: skip


@pytest.fixture
def model_and_data():
    torch.manual_seed(0)
    return Model().eval(), torch.randn(2, 5, 8)


def test_step2_single_and_multiple_variables_and_class_methods(model_and_data):
    model, data = model_and_data
    # 步骤2: the analysis code, as in the README
    from fxcapture import get_local  # was: from anycapture import get_local

    get_local.activate()  # 激活装饰器
    # from ... import model  -> defined above, before activate(): that order works now

    # 加载模型和数据
    ...
    output = model(data)

    # 获取捕获的变量
    cache = get_local.cache  # 输出格式：{'your_attention_function.attention_map': [attention_map]}

    expected_output, expected = reference(model, data)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    for key, values in expected.items():
        assert_arrays_equal(cache[key], values)
    assert len(cache['Attention.forward.attn_map']) == 3  # one per layer
    assert len(cache['multi_attention_function.query']) == 1


def test_cache_management_and_queue(model_and_data):
    model, data = model_and_data
    get_local.activate()
    with torch.no_grad():
        model(data)
    # 缓存管理, as in the README
    # 查看当前缓存内容
    print(get_local.cache)

    # 清空所有缓存数据
    get_local.clear()

    # 检查缓存状态
    print(len(get_local.cache))  # 输出：0
    # The README says 0, but AnyCapture's own clear() empties each list and keeps the
    # keys (`cls.cache[key] = []`), as fxcapture does: every list is empty.
    assert all(values == [] for values in get_local.cache.values())

    # the zh README: 激活/取消激活, 队列功能
    get_local.activate()  # 激活捕获
    get_local.deactivate()  # 取消激活,提高性能
    with torch.no_grad():
        model(data)
    assert all(values == [] for values in get_local.cache.values())  # nothing while inactive

    get_local.activate(max_size=10)  # 只保留最近10次结果
    inputs = [torch.randn(2, 5, 8) for _ in range(6)]
    with torch.no_grad():
        for x in inputs:
            model(x)
    assert len(get_local.cache['Attention.forward.attn_map']) == 10  # 18 calls, last 10
    get_local.set_size(5)  # 动态调整为5个元素
    expected: dict[str, list] = {}
    for x in inputs:
        for key, values in reference(model, x)[1].items():
            expected.setdefault(key, []).extend(values)
    for key, values in expected.items():
        assert_arrays_equal(get_local.cache[key], values[-5:])
    get_local.deactivate()


def test_notes_final_value(model_and_data):
    # 变量覆盖问题: "get_local捕获的是变量在函数中的最终值"
    @get_local('attention_map')
    def overwritten(x):
        attention_map = x.softmax(-1)
        attention_map = attention_map + 1
        return attention_map.sum()

    get_local.activate()
    x = torch.randn(3, 4)
    overwritten(x)
    get_local.deactivate()
    with frame_locals(overwritten, "attention_map") as calls:
        overwritten(x)
    assert_arrays_equal(get_local.cache[f"{overwritten.__qualname__}.attention_map"],
                        [calls[0]["attention_map"]])  # fmt: skip

"""The Visualizer README (seeds/visualizer-readme.md), run with one import changed.

Each snippet is the README's code with ``from visualizer import get_local`` replaced by
``from fxcapture import get_local``; the README's ``...`` (function bodies, "load
model and data") are filled with the smallest complete code, said in comments. The
recorded values are compared with a reference tracer (``sys.setprofile`` reading the
frame's locals at return), run on separate calls of the same model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from seed_reference import assert_arrays_equal, fresh_get_local, frame_locals  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_get_local")


# -- Usage1: a decorated function, its local ``attention_map`` ------------------------------
# "在模型文件里，我们这么写" -- the model file (decorated at import, before activate()):
from fxcapture import get_local  # was: from visualizer import get_local
@get_local('attention_map')
def your_attention_function(*args, **kwargs):
    # the README's "...": the smallest attention that has an ``attention_map``
    q, k, v = args
    attention_map = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return attention_map @ v


class Model(nn.Module):  # a model calling it, twice per forward
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        for _ in range(2):
            x = your_attention_function(*self.qkv(x).chunk(3, dim=-1))
        return x


def test_usage1_function_local():
    torch.manual_seed(0)
    model = Model()
    data = torch.randn(2, 5, 8)

    # "然后在可视化代码里，我们这么写" -- the visualisation code, as in the README:
    from fxcapture import get_local  # was: from visualizer import get_local
    get_local.activate() # 激活装饰器
    # from ... import model  -> built above (random weights)

    # load model and data
    ...
    out = model(data)

    cache = get_local.cache # ->  {'your_attention_function': [attention_map]}

    get_local.deactivate()
    with frame_locals(your_attention_function, "attention_map") as calls, torch.no_grad():
        expected_out = model(data)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    expected = [c["attention_map"] for c in calls]
    assert len(expected) == 2
    # Visualizer's key (the function's name) and AnyCapture's (function.variable): one list
    assert_arrays_equal(cache['your_attention_function'], expected)
    assert cache['your_attention_function'] is cache['your_attention_function.attention_map']


# -- Usage2: Attention.forward of a ViT: every block's map at once ---------------------------
# (the same ``from fxcapture import get_local`` line as above)


class Attention(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        # the README's "...": a ViT attention
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    @get_local('attn_map')
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_map = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn_map @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, depth=12, dim=32):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.Sequential(*[Block(dim) for i in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def test_usage2_every_attention_map_of_a_12_block_vit():
    torch.manual_seed(0)
    model = VisionTransformer().eval()  # "vit_small": 12 blocks, random weights
    images = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    get_local.activate()
    with torch.no_grad():
        outs = [model(x) for x in images]
    cache = get_local.cache
    get_local.deactivate()
    with frame_locals(Attention.forward, "attn_map") as calls, torch.no_grad():
        expected_outs = [model(x) for x in images]
    for out, expected_out in zip(outs, expected_outs):
        torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    # "我们就可以同时取出vit中12层Transformer的所有Attention Map": 12 per forward
    assert len(cache['Attention.forward']) == 3 * 12
    assert_arrays_equal(cache['Attention.forward'], [c["attn_map"] for c in calls])
    assert cache['Attention.forward'][0].shape == (2, 4, 16, 16)


def test_notes_final_value_and_no_cost_when_inactive():
    # "get_local取的是对应名称变量在函数中的最终值": the value at return
    @get_local('attention_map')
    def overwritten(x):
        attention_map = x.softmax(-1)
        attention_map = attention_map * 2  # a later value under the same name
        return attention_map.sum()

    x = torch.randn(3, 4)
    overwritten(x)  # not activated: nothing recorded, same result
    assert get_local.cache.get('overwritten.attention_map', []) == []
    get_local.activate()
    result = overwritten(x)
    with frame_locals(overwritten, "attention_map") as calls:
        expected = overwritten.__wrapped__(x)
    assert torch.equal(result, expected)
    key = overwritten.__qualname__  # Visualizer's key: the qualified name
    assert_arrays_equal(get_local.cache[key], [calls[0]["attention_map"]])

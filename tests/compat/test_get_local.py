"""get_local: the seed docs' usages (Visualizer / AnyCapture) and their bugs, fixed.

References are independent of get_local: values recomputed by hand, or read with
forward hooks on the real modules.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxcapture import capture, get_local
from fxcapture.compat.get_local import default_collate


@pytest.fixture(autouse=True)
def fresh_get_local():
    """Each test starts inactive with an empty cache, and leaves it that way."""
    get_local.deactivate()
    get_local.cache.clear()
    get_local.set_size(None)
    get_local.set_collate(None)
    yield
    get_local.deactivate()
    get_local.cache.clear()
    get_local.set_size(None)
    get_local.set_collate(None)


# -- the Visualizer README's ViT: Attention.forward decorated, every block's map ------
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    @get_local("attention_map")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention_map = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attention_map @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 4, patch: int = 8) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.blocks(x)[:, 0])


def reference_attention_maps(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """softmax(q k^T * scale) per block, from forward hooks on each ``attn.qkv``."""
    qkvs = []
    handles = [
        block.attn.qkv.register_forward_hook(lambda m, a, out: qkvs.append(out.detach().clone()))
        for block in model.blocks
    ]
    with torch.no_grad():
        model(images)
    for h in handles:
        h.remove()
    maps = []
    for block, qkv in zip(model.blocks, qkvs):
        B, N, C3 = qkv.shape
        heads, C = block.attn.heads, C3 // 3
        q, k, _ = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        maps.append(((q @ k.transpose(-2, -1)) / math.sqrt(C // heads)).softmax(-1))
    return maps


def test_visualizer_vit_example_records_every_block():
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    images = torch.randn(2, 3, 32, 32)
    expected = reference_attention_maps(model, images)
    get_local.activate()  # after the model's module was imported and the model built
    with torch.no_grad():
        model(images)
    maps = get_local.cache["Attention.forward.attention_map"]
    assert len(maps) == len(model.blocks)
    for got, ref in zip(maps, expected):
        assert isinstance(got, np.ndarray) and got.shape == (2, 4, 17, 17)
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_inactive_decorator_records_nothing_and_changes_nothing():
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    assert "Attention.forward.attention_map" not in get_local.cache
    get_local.activate()
    torch.testing.assert_close(model(images), out, rtol=0, atol=0)
    get_local.deactivate()
    model(images)
    assert len(get_local.cache["Attention.forward.attention_map"]) == 3  # kept, not grown


# -- AnyCapture README: single variable, several variables, methods, clear -------------
@get_local("attention_map")
def your_attention_function(q, k):
    scores = q @ k.transpose(-2, -1)
    attention_map = scores.softmax(-1)
    return attention_map @ k


@get_local("attention_map", "query", "key", "value")
def multi_attention_function(x, w):
    query, key, value = x @ w[0], x @ w[1], x @ w[2]
    attention_map = (query @ key.transpose(-2, -1)).softmax(-1)
    return attention_map @ value


def test_single_variable_usage():
    get_local.activate()
    q, k = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    your_attention_function(q, k)
    (value,) = get_local.cache["your_attention_function.attention_map"]
    np.testing.assert_allclose(value, (q @ k.transpose(-2, -1)).softmax(-1).numpy(), rtol=1e-6)


def test_several_variables_one_entry_each_per_call():
    get_local.activate()
    x, w = torch.randn(2, 5, 4), torch.randn(3, 4, 4)
    for _ in range(3):
        multi_attention_function(x, w)
    for name, expected in [("query", x @ w[0]), ("key", x @ w[1]), ("value", x @ w[2])]:
        entries = get_local.cache[f"multi_attention_function.{name}"]
        assert len(entries) == 3
        np.testing.assert_allclose(entries[-1], expected.numpy(), rtol=1e-6)
    assert len(get_local.cache["multi_attention_function.attention_map"]) == 3


class MethodAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)

    @get_local("attn_map", "scores")
    def forward(self, x):
        scores = self.q(x) @ x.transpose(-2, -1)
        attn_map = scores.softmax(-1)
        return attn_map @ x


def test_method_usage_and_clear_keeps_keys():
    module = MethodAttention()
    get_local.activate()
    x = torch.randn(2, 3, 4)
    module(x)
    expected_scores = (module.q(x) @ x.transpose(-2, -1)).detach()
    np.testing.assert_allclose(get_local.cache["MethodAttention.forward.scores"][0],
                               expected_scores.numpy(), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(get_local.cache["MethodAttention.forward.attn_map"][0],
                               expected_scores.softmax(-1).numpy(), rtol=1e-6)  # fmt: skip
    get_local.clear()
    assert get_local.cache["MethodAttention.forward.scores"] == []
    assert get_local.cache["MethodAttention.forward.attn_map"] == []


# -- the seed's bugs ------------------------------------------------------------------
@get_local("y", "z")
def early_return(x, early):
    y = x * 2
    if early:
        return y
    z = y + 1
    return z


def test_every_return_path_is_recorded():
    get_local.activate()
    x = torch.arange(3.0)
    early_return(x, early=True)
    early_return(x, early=False)
    np.testing.assert_array_equal(get_local.cache["early_return.y"][0], [0, 2, 4])
    np.testing.assert_array_equal(get_local.cache["early_return.y"][1], [0, 2, 4])
    assert get_local.cache["early_return.z"][0] is None  # not assigned on that path
    np.testing.assert_array_equal(get_local.cache["early_return.z"][1], [1, 3, 5])


@get_local("n", "result")
def factorial(n):
    if n <= 1:
        result = 1
        return result
    result = n * factorial(n - 1)
    return result


def test_recursion_records_each_frame():
    get_local.activate()
    assert factorial(4) == 24
    # inner calls return first
    assert get_local.cache["factorial.n"] == [1, 2, 3, 4]
    assert get_local.cache["factorial.result"] == [1, 2, 6, 24]


def test_stacked_decorators_and_wraps():
    def plain(x):
        """Doc."""
        a = x + 1
        b = a * 3
        return b

    code = plain.__code__
    inner = torch.no_grad()(plain)  # a foreign decorator that keeps __wrapped__
    decorated = get_local("a")(get_local("b")(inner))
    assert plain.__code__ is code  # never rewritten
    assert decorated.__name__ == "plain" and decorated.__doc__ == "Doc."
    assert inspect.signature(decorated) == inspect.signature(plain)
    assert inspect.unwrap(decorated) is plain
    get_local.activate()
    x = torch.ones(2, requires_grad=True)
    out = decorated(x)
    assert not out.requires_grad  # torch.no_grad still applies
    assert get_local.cache[f"{plain.__qualname__}.a"][0].tolist() == [2.0, 2.0]
    assert get_local.cache[f"{plain.__qualname__}.b"][0].tolist() == [6.0, 6.0]


def test_exception_records_nothing_and_restores_profile():
    @get_local("a")
    def boom(x):
        a = x + 1
        raise RuntimeError(f"boom {a.shape}")

    get_local.activate()
    with pytest.raises(RuntimeError, match="boom"):
        boom(torch.ones(1))
    assert get_local.cache["test_exception_records_nothing_and_restores_profile.<locals>.boom.a"] == []
    assert sys.getprofile() is None


def test_previous_profile_function_is_chained_and_restored():
    events = []

    def profiler(frame, event, arg):
        if frame.f_code is your_attention_function.__wrapped__.__code__:
            events.append(event)

    get_local.activate()
    sys.setprofile(profiler)
    try:
        your_attention_function(torch.randn(1, 2, 2), torch.randn(1, 2, 2))
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert "call" in events and "return" in events
    assert len(get_local.cache["your_attention_function.attention_map"]) == 1


def test_thread_safe_cache():
    @get_local("v")
    def work(i):
        v = torch.full((2,), float(i))
        return v

    get_local.activate()

    def run(base):
        for i in range(200):
            work(base + i)

    threads = [threading.Thread(target=run, args=(1000 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = get_local.cache["test_thread_safe_cache.<locals>.work.v"]
    assert len(values) == 800
    # each entry is the value of its own call, never another thread's
    assert sorted(int(v[0]) for v in values) == sorted(1000 * t + i for t in range(4) for i in range(200))
    assert all(v[0] == v[1] for v in values)


def test_max_size_queue_and_set_size():
    @get_local("v")
    def f(i):
        v = i
        return v

    get_local.activate(max_size=3)
    for i in range(10):
        f(i)
    assert get_local.cache["test_max_size_queue_and_set_size.<locals>.f.v"] == [7, 8, 9]
    assert get_local.set_size(2) == 2
    assert get_local.cache["test_max_size_queue_and_set_size.<locals>.f.v"] == [8, 9]
    assert get_local.set_size(0) is None  # non-positive: unbounded
    for i in range(5):
        f(i)
    assert len(get_local.cache["test_max_size_queue_and_set_size.<locals>.f.v"]) == 7


def test_default_collate_converts_recursively():
    value = {
        "t": torch.ones(2, requires_grad=True) * 2,
        "bf": torch.ones(2, dtype=torch.bfloat16),
        "pair": (torch.zeros(1), [torch.ones(1), 3]),
        "other": "text",
    }
    out = default_collate(value)
    assert isinstance(out["t"], np.ndarray) and out["t"].tolist() == [2.0, 2.0]
    assert out["bf"].dtype == np.float32
    assert isinstance(out["pair"], tuple) and isinstance(out["pair"][1], list)
    assert isinstance(out["pair"][1][0], np.ndarray) and out["pair"][1][1] == 3
    assert out["other"] == "text"


def test_custom_collate_global_and_per_decorator():
    @get_local("v", collate=lambda t: ("mine", t.shape))
    def own(x):
        v = x * 1
        return v

    @get_local("v")
    def shared(x):
        v = x * 1
        return v

    get_local.activate(collate=lambda t: t.clone())  # keep tensors
    x = torch.randn(2, 3)
    own(x)
    shared(x)
    assert get_local.cache["test_custom_collate_global_and_per_decorator.<locals>.own.v"] == [
        ("mine", torch.Size([2, 3]))
    ]
    (kept,) = get_local.cache["test_custom_collate_global_and_per_decorator.<locals>.shared.v"]
    assert isinstance(kept, torch.Tensor) and torch.equal(kept, x)


def test_generators_async_and_missing_names_are_rejected_clearly():
    def gen():
        a = 1
        yield a

    async def coro():
        a = 1
        return a

    with pytest.raises(TypeError, match="generator"):
        get_local("a")(gen)
    with pytest.raises(TypeError, match="coroutine"):
        get_local("a")(coro)
    asyncio.run(coro())  # (silence "never awaited" warnings)

    def f(x):
        y = x
        return y

    with pytest.raises(ValueError, match="no local variable 'attn'.*its locals: x, y"):
        get_local("attn")(f)
    with pytest.raises(TypeError, match="at least one"):
        get_local()


def test_static_and_class_methods():
    class K:
        @get_local("s")
        @staticmethod
        def st(x):
            s = x + 1
            return s

    get_local.activate()
    assert K.st(1) == 2 and K().st(2) == 3
    assert get_local.cache["test_static_and_class_methods.<locals>.K.st.s"] == [2, 3]


# -- with fxcapture: capture(), torch.fx, torch.compile --------------------------------
def test_decorated_locals_stay_capturable_by_capture():
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    images = torch.randn(2, 3, 32, 32)
    expected = reference_attention_maps(model, images)
    get_local.activate()
    extractor = capture(model, ["attention_map"])
    assert extractor.names == [f"blocks.{i}.attn:attention_map" for i in range(3)]
    out, feats = extractor(images)
    torch.testing.assert_close(out, model(images))
    for key, ref in zip(extractor.names, expected):
        torch.testing.assert_close(feats[key], ref, rtol=1e-5, atol=1e-6)
    # the extractor runs its own graph: get_local saw only the eager call above
    assert len(get_local.cache["Attention.forward.attention_map"]) == 3


def test_fx_symbolic_trace_and_compile_of_decorated_model():
    torch.manual_seed(0)
    model = VisionTransformer().eval()
    images = torch.randn(2, 3, 32, 32)
    get_local.activate()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(images), model(images))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)

"""Toy models, one per kind of Python a model may run, after the classes of TorchLens'
toy-model suite (written here from scratch): in-place ops, buffers read and assigned,
random ops, branching, loops, nested and shared modules, containers in and out,
dataclasses, functional calls, ``no_grad``/``autocast`` blocks, recurrent layers.

``TOYS[name] = (build, inputs)``: ``build()`` makes the model, ``inputs(i)`` the
positional arguments of call ``i`` (sizes vary between calls where the model allows).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

TOYS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]] = {}


def toy(inputs: Callable[[int], tuple]):
    """Register a model class (or factory) under its name with its inputs per call."""

    def register(build):
        TOYS[build.__name__] = (build, inputs)
        return build

    return register


def batch(*shape: int) -> Callable[[int], tuple]:
    """One positive tensor input whose first dimension grows with the call."""
    return lambda i: (torch.rand(2 + i, *shape) + 0.1,)


def fixed(*shape: int) -> Callable[[int], tuple]:
    """One positive tensor input of a fixed shape."""
    return lambda i: (torch.rand(*shape) + 0.1,)


# -- plain arithmetic, static forwards ------------------------------------------------
@toy(batch(4))
class StaticChain(nn.Module):
    @staticmethod
    def forward(x):
        y = x * 3 - 1
        return torch.exp(-y.abs())


@toy(lambda i: (torch.rand(2 + i, 4), torch.rand(2 + i, 4), torch.rand(2 + i, 4) + 0.5))
class StaticThreeInputs(nn.Module):
    @staticmethod
    def forward(a, b, c):
        return (a + b) ** torch.log(c)


@toy(batch(6))
class SplitAndJoin(nn.Module):
    def forward(self, x):
        left, middle, right = torch.split(x, 2, dim=1)
        return torch.cat([left * middle, right.sin(), x[:, ::2]], dim=1)


@toy(batch(4))
class SameTensorTwice(nn.Module):
    def forward(self, x):
        doubled = x + x
        return torch.mul(doubled, doubled).cos()


# -- in-place ops and item assignment ----------------------------------------------------
@toy(batch(5))
class InplaceModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.fresh = nn.ReLU()

    def forward(self, x):
        shifted = x - 0.5
        kept = self.act(shifted)  # writes `shifted`
        scaled = shifted * 10
        return self.fresh(torch.log(kept + 1)) + scaled


@toy(batch(4, 4))
class ItemWrites(nn.Module):
    def forward(self, x):
        y = torch.log(x)
        y[0, 1] = 5.0
        y[1] = y[0, 2] * 2
        y[:, :, 0] += 1
        return y * 2


@toy(batch(6, 6))
class ViewWrites(nn.Module):
    def forward(self, x):
        y = x.clone()
        window = y[:, 1:3, 2:4]
        window.zero_()
        row = y[0]
        row.mul_(-1)
        return y.sum(dim=1)


@toy(batch(4))
class AugmentedAssignment(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        for _ in range(3):
            h += 1
        h *= 0.5
        return h


# -- tensors made inside forward, constants ----------------------------------------------
@toy(batch(3))
class MadeInside(nn.Module):
    def forward(self, x):
        ones = torch.ones(x.shape)
        grid = torch.arange(x.shape[1], dtype=x.dtype)
        table = torch.from_numpy(np.linspace(0.0, 1.0, 3)).to(x.dtype)
        return x * ones + grid + table.mean()


@toy(batch(3))
class UnusedBranch(nn.Module):
    def forward(self, x):
        orphan = torch.zeros(4, 4) + 1
        _unused = orphan * 3
        return x ** 2


# -- random ops ----------------------------------------------------------------------------
@toy(batch(4))
class RandomNoise(nn.Module):
    def forward(self, x):
        noise = torch.rand(x.shape)
        return torch.log(x) + noise + torch.randn(4)


@toy(batch(8))
class DropoutChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return F.dropout(self.drop(self.lin(x)), p=0.2, training=self.training)


# -- buffers ---------------------------------------------------------------------------------
@toy(batch(4))
class ReadsBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.rand(4))
        self.register_buffer("scale", torch.rand(4) + 1)

    def forward(self, x):
        return (x + self.offset) * self.scale


class RewritesBuffers(nn.Module):
    """Buffers assigned (a new tensor) and written in place on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("memory", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.count += 1
        mixed = x + self.memory
        self.memory = 0.5 * self.memory + 0.5 * mixed.detach().mean(0)
        return mixed * self.count


@toy(batch(4))
class CallsBufferModuleRepeatedly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.state = RewritesBuffers()

    def forward(self, x):
        x = self.state(torch.cos(x))
        x = self.state(x * 2)
        return self.state(x) + 1


@toy(lambda i: (torch.randn(2 + i, 3, 5, 5),))
class BatchNormTrain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


# -- branching and loops ---------------------------------------------------------------------
@toy(batch(4))
class ParallelBranches(nn.Module):
    def forward(self, x):
        a = torch.log(x * 2 + 3)
        b = torch.sin(x ** 2)
        return x + a + b


@toy(lambda i: ((-1) ** i * (torch.rand(2 + i, 5) + 0.1),))
class DataDependentBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(5, 5)
        self.down = nn.Linear(5, 5)

    def forward(self, x):
        if x.mean() > 0:
            return self.up(x).sin()
        return self.down(x).cos() ** 2


@toy(lambda i: (torch.rand(2, 3 + i) + 0.1,))
class ShapeBranch(nn.Module):
    def forward(self, x):
        if x.shape[1] > 3:
            return x[:, :3] * 2
        return x + 1


@toy(batch(5))
class FixedLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        for _ in range(4):
            x = torch.tanh(self.fc(x))
        return x


@toy(batch(4))
class LoopOverModuleList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        outs = []
        for layer in self.layers:
            x = F.gelu(layer(x))
            outs.append(x)
        return torch.stack(outs).sum(0)


# -- nested and shared modules -----------------------------------------------------------------
class Leaf(nn.Module):
    def forward(self, x):
        return torch.sin(torch.tan(x))


class Middle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.leaf = Leaf()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.leaf(self.lin(x) + 1)


@toy(batch(4))
class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = Middle()
        self.second = Middle()

    def forward(self, x):
        a = self.first(x)
        b = self.first(x) * self.second(a)  # `first` called twice: first@0, first@1
        return self.second.leaf(a + b)


@toy(batch(4))
class SharedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.encoder = nn.Sequential(shared, nn.ReLU())
        self.decoder = nn.Sequential(nn.ReLU(), shared)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@toy(batch(4))
class IdentityInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.keep = nn.Identity()

    def forward(self, x):
        return self.keep(x * 2) * 2


# -- containers in and out ------------------------------------------------------------------
@toy(lambda i: ([torch.rand(2 + i, 3), torch.rand(2 + i, 3)], {"scale": torch.rand(3)}))
class ContainerInputs(nn.Module):
    def forward(self, pair, extras):
        a, b = pair
        return a * extras["scale"] + b


Triple = collections.namedtuple("Triple", "low mid high")


@dataclasses.dataclass
class Parts:
    body: torch.Tensor
    tail: torch.Tensor


class ReturnsEverything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return {"list": [h, h * 2], "triple": Triple(h.sin(), h.cos(), h.tanh()), "parts": Parts(h + 1, h - 1)}


@toy(batch(4))
class ContainerOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = ReturnsEverything()

    def forward(self, x):
        out = self.inner(x)
        return out["list"][1] + out["triple"].mid + out["parts"].tail, out["triple"]


class DataclassBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return Parts(body=h.relu(), tail=h.sigmoid())


@toy(batch(4))
class DataclassBetweenModules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DataclassBlock()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        parts = self.block(x)
        return self.head(parts.body * parts.tail)


@toy(batch(4))
class ContainersMadeInForward(nn.Module):
    """Locals that are containers built in forward: a dataclass, a namedtuple, a dict, a
    list of constants (no input reaches them)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        parts = Parts(h.relu(), h.sigmoid())
        triple = Triple(h, h * 2, 3)
        table = {"sum": parts.body + parts.tail, "n": 2}
        grid = [torch.arange(4.0), torch.ones(2) * 3]
        return table["sum"] * triple.mid + grid[0]


# -- functional calls, grad and autocast regions --------------------------------------------------
@toy(lambda i: (torch.randn(2 + i, 3, 8, 8),))
class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.1)

    def forward(self, x):
        h = F.conv2d(x, self.weight, padding=1)
        h = F.max_pool2d(F.relu(h), 2)
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


@toy(batch(4))
class NoGradBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.trained = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            anchor = self.frozen(x).tanh()
        return self.trained(x) + anchor


@toy(batch(4))
class AutocastBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.low(x)
        return h.float() * 2


# -- sequences and attention -------------------------------------------------------------------------
@toy(lambda i: (torch.randint(0, 10, (2 + i, 5)),))
class EmbedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.rnn = nn.GRU(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        out, last = self.rnn(self.embed(ids))
        return self.head(out[:, -1]) + last[0].sum()


@toy(lambda i: (torch.randn(3, 6, 4), torch.tensor([[6, 2, 4], [5, 6, 1], [3, 3, 6]][i % 3])))
class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, (h, c) = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.head(padded), h + c


@toy(lambda i: (torch.randn(2 + i, 5, 8),))
class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        return self.norm(x + h)


@toy(lambda i: (torch.randn(2 + i, 4),))
class KeywordOnlyDefaults(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, *, mask=None, scale: float = 2.0):
        h = self.lin(x)
        if mask is not None:
            h = h * mask
        return h * scale


def module_paths(model: nn.Module, args: tuple) -> list[str]:
    """Every submodule whose forward runs on ``args`` (the modules whose outputs the
    zoo compares; a ``ModuleList`` or ``MultiheadAttention.out_proj`` never runs)."""
    ran: list[str] = []
    probe = copy.deepcopy(model)
    handles = [m.register_forward_hook(lambda *_, path=path: ran.append(path))
               for path, m in probe.named_modules() if path]  # fmt: skip
    with torch.random.fork_rng():
        probe(*args)
    for handle in handles:
        handle.remove()
    return list(dict.fromkeys(ran))


def sample(name: str, i: int) -> Any:
    """Inputs of call ``i`` of toy ``name``."""
    return TOYS[name][1](i)

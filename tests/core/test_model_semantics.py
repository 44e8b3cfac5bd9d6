"""The extractor is the model (issue 14): on every call, in train and eval, across seeds
and input sizes, it computes and updates exactly what the eager model does.

Every check runs the extractor beside an eager copy of the model (same weights, same
seed per step) for several calls; none compares fxcapture with itself.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import threading
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import hook_values, module_state
from fxcapture import capture


# -- models whose Python does more than build a graph ----------------------------------
class StepCounter(nn.Module):
    """A buffer updated in Python on every call, and one reassigned."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        self.steps += 1
        h = self.lin(x)
        self.ema = 0.9 * self.ema + 0.1 * h.detach().mean(0)  # assigned, not updated in place
        return h * self.steps + self.ema


class Noisy(nn.Module):
    """A random tensor of constant shape and dropout: fresh on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        noise = torch.randn(4)
        return self.drop(self.lin(x)) + noise


class Frozen(nn.Module):
    """A no_grad block (a frozen branch) and an autocast block inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.trained = nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            anchor = self.frozen(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = self.trained(x)
        return low.float() + anchor


class RoundSTE(torch.autograd.Function):
    """Rounding with a straight-through backward (the gradient passes unchanged)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, grad):
        return grad


class Quantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        q = RoundSTE.apply(self.lin(x))
        return q * 2


class BiasCache(nn.Module):
    """timm LeViT-style cache of a derived tensor, keyed by device, kept on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}

    def get_bias(self, device):
        key = str(device)
        if self.training:
            return self.bias * 2
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x):
        return x + self.get_bias(x.device)


Pair = collections.namedtuple("Pair", "low high")


@dataclasses.dataclass
class Split:
    low: torch.Tensor
    high: torch.Tensor


class Splitter(nn.Module):
    def __init__(self, as_dataclass: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.as_dataclass = as_dataclass

    def forward(self, x):
        h = self.lin(x)
        kind = Split if self.as_dataclass else Pair
        return kind(h[:, :4], h[:, 4:])


class UsesSplit(nn.Module):
    def __init__(self, as_dataclass: bool) -> None:
        super().__init__()
        self.split = Splitter(as_dataclass)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        parts = self.split(x)
        return self.out(parts.low * parts.high)


def train_side_by_side(model: nn.Module, names, steps: int = 5, sizes=(3, 2, 5, 1, 4), seed=0):
    """Train the extractor's model and an eager copy with the same data and seeds;
    assert outputs, gradients, parameters and buffers equal at every step."""
    reference = copy.deepcopy(model)
    ex = capture(model, names)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(sizes[step % len(sizes)], 4)
        torch.manual_seed(seed + step)
        out, feats = ex(x)
        torch.manual_seed(seed + step)
        ref = reference(x)
        assert out.dtype == ref.dtype and torch.equal(out, ref), f"step {step}: outputs differ"
        out.float().square().mean().backward()
        ref.float().square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None), f"step {step}: {name} grad presence"
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), f"step {step}: {name} grad differs"
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
        for (name, b), c in zip(model.named_buffers(), reference.buffers()):
            assert torch.equal(b, c), f"step {step}: buffer {name} differs"
    return ex


@pytest.mark.parametrize("cls", [StepCounter, Noisy, Frozen, Quantized])
def test_train_steps_equal_eager(cls):
    model = cls().train()
    train_side_by_side(model, ["lin" if hasattr(model, "lin") else "trained"])


def test_python_side_effects_are_not_traced_symbolically():
    for cls in (StepCounter, Noisy, Frozen):
        ex = capture(cls().train(), [], example_inputs=torch.randn(2, 4))
        assert ex.tracer == "running", (cls.__name__, ex.explain())
    # a custom autograd.Function called by the root forward: only the eager model keeps
    # its backward, so the model runs eagerly
    ex = capture(Quantized().train(), [], example_inputs=torch.randn(2, 4))
    assert ex.tracer == "run time" and "RoundSTE" in ex.explain()


def test_frozen_branch_gets_no_gradient():
    model = Frozen().train()
    ex = capture(model, ["frozen"])
    out, feats = ex(torch.randn(3, 4))
    out.sum().backward()
    assert model.frozen.weight.grad is None and model.trained.weight.grad is not None
    assert not feats["frozen"].requires_grad  # made under no_grad, as the model made it


def test_random_tensor_is_fresh_each_call_and_matches_eager_under_a_seed():
    model = Noisy().eval()
    ex = capture(model, ["lin"])
    x = torch.randn(2, 4)
    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out, _ = ex(x)
        torch.manual_seed(seed)
        assert torch.equal(out, model(x))
        outs.append(out)
    assert not torch.equal(outs[0], outs[1])


def test_hooks_on_the_model_and_its_modules_run_on_every_call():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = {"root_pre": 0, "root": 0, "inner": 0}

    def root_pre(module, args):
        calls["root_pre"] += 1
        return (args[0] * 2,)

    def root_post(module, args, out):
        calls["root"] += 1
        return out + 1

    def inner(module, args, out):
        calls["inner"] += 1
        return out * 3

    handles = [model.register_forward_pre_hook(root_pre), model.register_forward_hook(root_post),
               model[0].register_forward_hook(inner)]  # fmt: skip
    try:
        ex = capture(model, ["0", "2"])
        x = torch.randn(3, 4)
        for _ in range(3):
            out, feats = ex(x)
            ref, seen = hook_values(model, ["0", "2"], x)
            assert torch.equal(out, ref)
            assert torch.equal(feats["0"], seen["0"][0]) and torch.equal(feats["2"], seen["2"][0])
        assert calls == {"root_pre": 6, "root": 6, "inner": 6}  # 3 extractor + 3 eager calls
    finally:
        for h in handles:
            h.remove()


def test_cache_and_assignment_leave_the_model_untouched():
    model = BiasCache().eval()
    reference = copy.deepcopy(model)
    before = module_state(model)
    ex = capture(model, [], example_inputs=torch.randn(2, 4))
    for batch in (3, 2):
        x = torch.randn(batch, 4)
        assert torch.equal(ex(x)[0], reference(x))
    assert module_state(model) == before
    # the cache moves as the eager model's does (the module runs as it is), and holds
    # real tensors, no Proxy or fake tensor
    assert model.cache.keys() == reference.cache.keys() == {"cpu"}
    assert type(model.cache["cpu"]) is torch.Tensor and torch.equal(model.cache["cpu"], reference.cache["cpu"])
    # a second capture works on the model (a deep copy fails, as the eager one's does:
    # the cached tensor is not a graph leaf)
    assert torch.equal(capture(model, [])(x)[0], reference(x))


@pytest.mark.parametrize("as_dataclass", [False, True], ids=["namedtuple", "dataclass"])
def test_submodule_returning_a_structure(as_dataclass):
    model = UsesSplit(as_dataclass).eval()
    ex = capture(model, ["split"])
    for batch in (3, 2):
        x = torch.randn(batch, 4)
        out, feats = ex(x)
        ref, seen = hook_values(model, ["split"], x)
        assert torch.equal(out, ref)
        value = feats["split"]
        assert type(value) is type(seen["split"][0])
        assert torch.equal(value.low, seen["split"][0].low) and torch.equal(value.high, seen["split"][0].high)


# -- modes ---------------------------------------------------------------------------------
class ModeDependent(nn.Module):
    """Returns a loss in training mode and predictions in eval, like detection models."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 1e9:  # data-dependent: no tracer follows it, the model runs eagerly
            y = y * 0
        return {"loss": y.square().mean()} if self.training else {"pred": y.argmax(-1)}


def test_train_and_eval_switch_the_model_too():
    model = ModeDependent().train()
    ex = capture(model, ["lin"])
    x = torch.randn(3, 4)
    assert set(ex(x)[0]) == {"loss"}
    ex.eval()
    assert not model.training and not model.lin.training
    assert set(ex(x)[0]) == {"pred"} and set(model(x)) == {"pred"}
    ex.train()
    assert model.training and set(ex(x)[0]) == {"loss"}


def test_a_refused_mode_switch_leaves_everything_as_it_was():
    class TrainOnlyBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.extra = nn.Linear(4, 4)

        def forward(self, x):
            h = self.lin(x)
            return self.extra(h) if self.training else h

    model = TrainOnlyBranch().train()
    ex = capture(model, ["extra"])
    with pytest.raises(ValueError, match="'extra'.*did not run"):
        ex.eval()  # 'extra' does not run in eval mode: the switch is refused
    assert ex.training and model.training and model.lin.training
    x = torch.randn(2, 4)
    assert torch.equal(ex(x)[0], model(x))


# -- run-time capture: plans per call ----------------------------------------------------------
class Refine(nn.Module):
    """A module called a data-dependent number of times; a helper and the forward hold
    a local of the same name."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4)

    def update(self, h):
        delta = self.step(h)
        return delta

    def forward(self, x, rounds: torch.Tensor):
        h = x
        for _ in range(int(rounds)):
            delta = self.update(h)
            h = h + delta.tanh()
        if int(rounds) > 2:
            h = self.extra(h)
        delta = h * 2  # the forward's own `delta`
        return delta


def test_run_time_keys_follow_each_call():
    model = Refine().eval()
    ex = capture(model, ["step", "extra", "delta"])
    x = torch.randn(2, 4)
    for rounds in (2, 3, 1, 3):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, feats = ex(x, torch.tensor(rounds))
        if rounds == 2:  # the first call: 'extra' exists but did not run, and says so
            assert any("'extra'" in str(w.message) for w in caught)
        ref, seen = hook_values(model, ["step", "extra"], x, torch.tensor(rounds))
        assert torch.equal(out, ref)
        steps = [k for k in feats if k.startswith("step")]
        assert len(steps) == rounds, (rounds, sorted(feats))
        for i, value in enumerate(seen["step"]):
            assert torch.equal(feats["step" if rounds == 1 else f"step@{i}"], value)
        assert ("extra" in feats) == (rounds > 2)
        deltas = [k for k in feats if k.startswith(":delta")]
        assert len(deltas) == rounds + 1  # every helper's `delta`, then the forward's
        assert torch.equal(feats[deltas[-1]], ref)


def test_threads_sharing_one_extractor_get_their_own_values():
    model = Refine().eval()
    ex = capture(model, ["step", "delta"])
    ex(torch.randn(2, 4), torch.tensor(2))  # discovery
    errors = []

    def work(seed: int) -> None:
        try:
            g = torch.Generator().manual_seed(seed)
            reference = copy.deepcopy(model)  # hooks on the shared model would see both threads
            for _ in range(20):
                x = torch.randn(2, 4, generator=g)
                out, feats = ex(x, torch.tensor(2))
                ref, seen = hook_values(reference, ["step"], x, torch.tensor(2))
                assert torch.equal(out, ref)
                assert sorted(k for k in feats if k.startswith("step")) == ["step@0", "step@1"]
                assert torch.equal(feats["step@0"], seen["step"][0])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

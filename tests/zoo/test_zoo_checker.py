"""The checker's references are what the zoo tests stand on: check that they see
what they claim to, and that a model that does not conform is caught."""

from __future__ import annotations

import torch
import torch.nn as nn

import zoo_checker as zc


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.lin(x)
        y = h * 2
        y.add_(1)  # the local `y` holds the updated value when forward returns
        return self.act(y)


class Noisy(nn.Module):
    """Not deterministic in eval mode: an extractor cannot reproduce its output."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x) + torch.rand_like(x)


def test_differences_reports_values_shapes_and_structure():
    a = torch.ones(2, 3)
    assert zc.differences((a, {"k": a}), (a.clone(), {"k": a.clone()})) == []
    assert zc.differences(a + 1, a, "x") == ["x: values differ (max abs diff 1)"]
    assert "!=" in zc.differences(a[:1], a, "x")[0]
    assert zc.differences({"j": a}, {"k": a}, "d")
    assert zc.differences((a,), (a, a), "t")


def test_hooks_keep_the_value_before_a_later_inplace_op():
    block = Block()
    x = torch.randn(2, 4)
    calls = zc.module_calls(block, lambda: block(x), {"lin"})
    with torch.no_grad():
        expected = block.lin(x)
    assert torch.equal(calls["lin"][0], expected)
    assert len(calls["lin"]) == 1


def test_frame_locals_are_the_values_at_return():
    block = Block()
    x = torch.randn(2, 4)
    found = zc.frame_locals(block, "", lambda: block(x))
    with torch.no_grad():
        h = block.lin(x)
    assert torch.equal(found[("Block.forward", "h")][0], h)
    assert torch.equal(found[("Block.forward", "y")][0], torch.relu(h * 2 + 1))  # relu_ ran in place


class PlainBlock(Block):
    def forward(self, x):
        h = self.lin(x)
        y = h * 2 + 1
        return self.act(y)


def test_a_conforming_model_passes_and_a_nonconforming_one_fails():
    torch.manual_seed(0)
    good = nn.Sequential(PlainBlock(), nn.Linear(4, 2))
    result = zc.check_model(good, torch.randn(2, 4), name="good")
    assert result.status == "pass", result.problems
    assert result.n_modules == 2 + 2  # children 0, 1 and the deeper 0.lin, 0.act

    result = zc.check_model(Noisy(), torch.randn(2, 4), name="noisy")
    assert result.status == "fail"
    assert "output" in result.reason


def test_local_written_in_place_before_return_has_its_value_at_return():
    """`y.add_(1)` then `nn.ReLU(inplace=True)` on `y` run before the return: both count
    (regnet's `x` in ResBottleneckBlock.forward, `return self.activation(x)`)."""
    torch.manual_seed(0)
    result = zc.check_model(nn.Sequential(Block(), nn.Linear(4, 2)), torch.randn(2, 4))
    assert result.status == "pass", result.problems

"""In-place safety: a captured value keeps its value at capture time; no needless copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import assert_matches_hooks, clone_nodes, hook_values
from fxcapture import capture


def test_batchnorm_then_inplace_relu_keeps_bn_output(resnet18, image):
    paths = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.relu"]
    ex = capture(resnet18, paths)
    out, feats = ex(image)
    ref, seen = hook_values(resnet18, paths, image)  # hooks copy at call time
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)
    assert (feats["bn1"] < 0).any(), "bn1 must not be the ReLU output"
    # bn1 / layer1.0.bn1 are overwritten by ReLU(inplace), layer1.0.bn2 by `out += identity`
    assert len(clone_nodes(ex.graph)) == 3


class InplaceOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x, y):
        a = self.lin(x)
        b = a * 2
        first = b  # alias: the same tensor as `b` at this point
        b += y
        c = b - 1
        c.relu_()
        d = c * 3
        view = d[:, :3]
        d[0] = 7.0
        view.mul_(-1)  # writes into d through a view
        return d + first


def _manual(model, x, y):
    with torch.no_grad():
        a = model.lin(x)
        b0 = (a * 2).clone()
        b = a * 2 + y
        c = (b - 1).relu()
        c_pre = b - 1
        d0 = c * 3
        d = d0.clone()
        d[0] = 7.0
        d[:, :3] *= -1
        return {"a": a, "b0": b0, "b": b, "c_pre": c_pre, "c": c, "d0": d0, "d": d, "out": d + b}


def test_iadd_relu_setitem_and_view_writes():
    model = InplaceOps().eval()
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    ref = _manual(model, x, y)
    with torch.no_grad():
        expected_out = model(x, y)
    assert torch.allclose(expected_out, ref["out"])

    # node names of the values before each in-place op
    ex = capture(model, {"b0": "%mul", "c_pre": "%sub", "d0": "%mul_1", "lin": "lin"})
    out, feats = ex(x, y)
    assert torch.equal(out, expected_out)
    assert torch.equal(feats["lin"], ref["a"])  # never written in place: no clone
    for key in ("b0", "c_pre", "d0"):
        assert torch.equal(feats[key], ref[key]), key
    cloned = {n.args[0].name for n in clone_nodes(ex.graph)}
    assert cloned == {"mul", "sub", "mul_1"}


def test_local_rebound_after_inplace_gives_value_at_return():
    model = InplaceOps().eval()
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    ref = _manual(model, x, y)
    _, feats = capture(model, ["first", "c", "d", "view"])(x, y)
    # `first` aliases `b`, and `b += y` ran before return: the local's value at return
    # is the updated tensor (as a real frame inspection at return would see it)
    assert torch.equal(feats[":first"], ref["b"])
    assert torch.equal(feats[":c"], ref["c"])
    assert torch.equal(feats[":view"], ref["d"][:, :3])


def test_local_written_through_setitem_and_view_has_value_at_return():
    model = InplaceOps().eval()
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    ref = _manual(model, x, y)
    _, feats = capture(model, ["d"])(x, y)
    assert torch.equal(feats[":d"], ref["d"])


def test_view_of_captured_value_written_in_place():
    class M(nn.Module):
        def forward(self, x):
            h = x * 2
            flat = h.view(-1)
            flat[0] = 100.0
            t = h.transpose(0, 1)
            t.add_(1)
            return h

    x = torch.randn(3, 4)
    ex = capture(M(), {"h0": "%mul"})
    out, feats = ex(x)
    expected_out = x * 2
    expected_out.view(-1)[0] = 100.0
    expected_out += 1
    assert torch.equal(out, expected_out)
    assert torch.equal(feats["h0"], x * 2)
    assert len(clone_nodes(ex.graph)) == 1


def test_functional_inplace_flag():
    class M(nn.Module):
        def forward(self, x):
            h = x - 0.5
            y = torch.nn.functional.relu(h, inplace=True)
            return y * 2

    x = torch.randn(10)
    _, feats = capture(M(), {"h": "%sub"})(x)
    assert torch.equal(feats["h"], x - 0.5)
    assert (feats["h"] < 0).any()


def test_no_clone_without_later_inplace_op(resnet18, image):
    # layer outputs, conv outputs and the final ReLUs are never written in place later
    paths = ["conv1", "layer1", "layer2.0.conv1", "layer3", "layer4", "avgpool", "fc"]
    ex = capture(resnet18, paths)
    assert clone_nodes(ex.graph) == []
    out, feats = ex(image)
    ref, seen = hook_values(resnet18, paths, image)
    assert_matches_hooks(feats, seen)


def test_no_clone_in_model_without_inplace_ops():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ex = capture(model, ["0", "1", "2"])
    assert clone_nodes(ex.graph) == []
    x = torch.randn(3, 4)
    out, feats = ex(x)
    # returned without a copy: the captured output of "2" is the very output tensor
    assert feats["2"].data_ptr() == out.data_ptr()


def test_captured_value_later_written_only_through_unrelated_tensor_is_not_cloned():
    class M(nn.Module):
        def forward(self, x):
            a = x * 2
            b = x + 1
            b.relu_()  # writes b, not a
            return a + b

    ex = capture(M(), {"a": "%mul", "b": "%add"})
    cloned = {n.args[0].name for n in clone_nodes(ex.graph)}
    assert cloned == {"add"}
    x = torch.randn(8)
    _, feats = ex(x)
    assert torch.equal(feats["a"], x * 2)
    assert torch.equal(feats["b"], x + 1)


def _fill_first_row(h):
    h[0] = 5.0  # a write that returns no node for `h`
    return h


class HelperThenLaterWrite(nn.Module):
    def forward(self, x):
        g = _fill_first_row(x * 2)  # the helper's local `h` at return: row 0 filled
        g.mul_(10)  # a write after the helper returned: not part of `h`
        return g + 1


def test_helper_local_after_setitem_is_copied_at_return_not_after_later_writes():
    x = torch.randn(3, 4)
    at_return = x * 2
    at_return[0] = 5.0
    _, feats = capture(HelperThenLaterWrite(), [":h"])(x)
    assert torch.equal(feats[":h"], at_return)
    torch.manual_seed(0)
    out, _ = torch.compile(capture(HelperThenLaterWrite(), [":h"]), fullgraph=True, backend="eager")(x)
    assert torch.equal(out, at_return * 10 + 1)


def test_editing_a_local_after_inplace_writes_reaches_the_code_after_it():
    class M(nn.Module):
        def forward(self, x):
            c = x - 1
            c.relu_()  # the Python name `c` still holds the node before relu_
            d = c * 3
            return d

    x = torch.randn(3, 4)
    out, feats = capture(M(), [":c"], edit={":c": lambda v, key: v + 100})(x)
    expected_c = (x - 1).relu() + 100  # manual forward with the edit
    assert torch.equal(feats[":c"], expected_c)
    assert torch.equal(out, expected_c * 3)

    model = InplaceOps().eval()  # `d` written through d[0] = 7 and a view before return
    x, y = torch.randn(4, 6), torch.randn(4, 6)
    ref = _manual(model, x, y)
    out, feats = capture(model, [":d"], edit={":d": lambda v, key: v * 0.5})(x, y)
    assert torch.equal(feats[":d"], ref["d"] * 0.5)
    assert torch.allclose(out, ref["d"] * 0.5 + ref["b"])


class ReturnsItsInput(nn.Module):  # a leaf: fx does not see that it returns its input
    def forward(self, x):
        return x


class ResidualThroughOpaqueCalls(nn.Module):
    """torchvision's MBConv tail: ``stochastic_depth`` (``torch.fx.wrap``-ed) returns its
    input in eval mode, and ``result += input`` then writes into the block's output."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.block = nn.Linear(4, 4)
        self.depth = StochasticDepth(0.1, "row")
        self.proj = nn.Linear(4, 4)
        self.leaf = ReturnsItsInput()

    def forward(self, x):
        result = self.depth(self.block(x))
        result += x
        h = self.leaf(self.proj(result))
        h.mul_(2)
        return h


def test_inplace_write_through_an_opaque_function_or_leaf_keeps_the_captured_value():
    model = ResidualThroughOpaqueCalls().eval()
    x = torch.randn(3, 4)
    paths = ["block", "proj"]
    out, feats = capture(model, paths, leaf_modules=[ReturnsItsInput])(x)
    ref, seen = hook_values(model, paths, x)  # hooks copy at call time
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)

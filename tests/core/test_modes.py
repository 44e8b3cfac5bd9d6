"""train()/eval(): one graph per mode, each equal to the model in that mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import assert_matches_hooks, assert_same, clone_nodes, hook_values
from fxcapture import capture


class Branchy(nn.Module):
    """A forward that branches on self.training (like torchvision's aux heads)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.aux = nn.Linear(4, 2)
        self.head = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.drop(self.body(x))
        if self.training:
            extra = self.aux(h)
            return self.head(h), extra
        return self.head(h)


PATHS = ["body", "drop", "head"]


def assert_equals_the_model(ex, model, x, seed):
    """``ex(x)`` against ``model(x)`` with forward hooks, in the mode both are in."""
    torch.manual_seed(seed)
    ref, seen = hook_values(model, PATHS, x)
    torch.manual_seed(seed)
    out, feats = ex(x)
    assert_same(out, ref)
    assert list(feats) == PATHS
    assert_matches_hooks(feats, seen)
    return out, feats


def test_graph_follows_training_flag():
    model = Branchy().train()
    ex = capture(model, PATHS)
    x = torch.randn(6, 4)

    out, feats = assert_equals_the_model(ex, model, x, seed=7)
    assert isinstance(out, tuple) and len(out) == 2
    assert not torch.equal(feats["drop"], feats["body"])  # dropout dropped something
    assert any(n.op == "call_module" and n.target == "aux" for n in ex.graph.nodes)

    ex.eval()
    model.eval()
    for seed in (1, 2):  # eval: no randomness, same values on every call
        out, feats = assert_equals_the_model(ex, model, x, seed)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(feats["drop"], feats["body"])  # dropout is the identity in eval
    assert not any(n.op == "call_module" and n.target == "aux" for n in ex.graph.nodes)

    ex.train()
    model.train()
    assert ex.training and all(m.training for m in ex.modules())
    assert_equals_the_model(ex, model, x, seed=8)
    assert any(n.op == "call_module" and n.target == "aux" for n in ex.graph.nodes)


def test_the_aux_local_exists_in_the_train_graph_only():
    model = Branchy().train()
    x = torch.randn(2, 4)
    ex = capture(model, ["extra"])
    assert ex.names == [":extra"]
    torch.manual_seed(3)
    ref, seen = hook_values(model, ["aux"], x)
    torch.manual_seed(3)
    out, feats = ex(x)
    assert_same(out, ref)
    assert torch.equal(feats[":extra"], seen["aux"][0])  # extra = self.aux(h)
    # in eval mode `extra` is never assigned: asking for it is an error naming it
    with pytest.raises(ValueError, match="'extra' is not a capturable name"):
        ex.eval()
    with pytest.raises(ValueError, match="'extra' is not a capturable name"):
        capture(Branchy().eval(), ["extra"])


def test_train_eval_switch_toggles_model_modules_not_model_root(resnet18, image):
    model = copy.deepcopy(resnet18).eval()
    ex = capture(model, ["layer1", "fc"])
    ex.train()
    # submodules are shared, so their mode follows (BatchNorm uses batch statistics)
    assert model.layer1[0].bn1.training
    out, feats = ex(image)
    ref, seen = hook_values(model.train(), ["layer1", "fc"], image)  # the root flag is its own
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)
    ex.eval()
    model.eval()
    assert not model.layer1[0].bn1.training
    out, feats = ex(image)
    ref, seen = hook_values(model, ["layer1", "fc"], image)  # running statistics now
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)
    assert not torch.allclose(feats["layer1"], hook_values(model.train(), ["layer1"], image)[1]["layer1"][0])


def test_dropout_in_train_mode_matches_same_seed_and_no_clone():
    model = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Dropout(0.3)
    ).train()
    ex = capture(model, ["1", "2", "4"])
    assert clone_nodes(ex.graph) == []
    x = torch.randn(4, 8)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        ref, seen = hook_values(model, ["1", "2", "4"], x)
        torch.manual_seed(seed)
        out, feats = ex(x)
        assert torch.equal(out, ref)
        for k in ("1", "2", "4"):
            assert torch.equal(feats[k], seen[k][0])

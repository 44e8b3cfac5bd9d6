"""train()/eval(): one graph per mode, each equal to the model in that mode."""

from __future__ import annotations

import torch
import torch.nn as nn

from conftest import clone_nodes, hook_values
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


def test_graph_follows_training_flag():
    model = Branchy().train()
    ex = capture(model, ["body", "drop", "head"])
    x = torch.randn(6, 4)

    torch.manual_seed(7)
    ref_train, seen = hook_values(model, ["drop"], x)
    torch.manual_seed(7)
    out, feats = ex(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert torch.equal(out[0], ref_train[0]) and torch.equal(out[1], ref_train[1])
    assert torch.equal(feats["drop"], seen["drop"][0])
    assert any(n.op == "call_module" and n.target == "aux" for n in ex.graph.nodes)

    ex.eval()
    model.eval()
    out, feats = ex(x)
    with torch.no_grad():
        ref_eval = model(x)
    assert isinstance(out, torch.Tensor) and torch.equal(out, ref_eval)
    assert torch.equal(feats["drop"], model.body(x))  # dropout is the identity in eval
    assert not any(n.op == "call_module" and n.target == "aux" for n in ex.graph.nodes)

    ex.train()
    assert ex.training and all(m.training for m in ex.modules())
    assert any(n.op == "call_module" and n.target == "aux" for n in ex.graph.nodes)


def test_only_the_train_graph_has_the_aux_local():
    model = Branchy().train()
    ex = capture(model, ["body"])
    _, feats = ex(torch.randn(2, 4))
    assert list(feats) == ["body"]
    # the local `extra` only exists in training mode
    ex = capture(model, ["extra"])
    assert ex.names == [":extra"]


def test_train_eval_switch_toggles_model_modules_not_model_root(resnet18, image):
    import copy

    model = copy.deepcopy(resnet18).eval()
    ex = capture(model, ["layer1", "fc"])
    ex.train()
    # submodules are shared, so their mode follows (BatchNorm uses batch statistics)
    assert model.layer1[0].bn1.training
    torch.manual_seed(0)
    out, feats = ex(image)
    with torch.no_grad():
        ref = model.train()(image)  # mode on the model too (its root flag is its own)
    assert torch.equal(out, ref)
    ex.eval()
    model.eval()
    out, _ = ex(image)
    with torch.no_grad():
        assert torch.equal(out, model(image))


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

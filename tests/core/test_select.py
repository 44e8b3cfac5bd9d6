"""Selectors: errors, globs, namespaces, aliases, predicates and list_names()."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import assert_matches_hooks, hook_values
from fxcapture import capture, list_names


def test_unknown_name_suggests_close_matches(resnet18):
    with pytest.raises(ValueError) as err:
        capture(resnet18, ["layer4", "layr4"])
    msg = str(err.value)
    assert "'layr4'" in msg
    assert "Did you mean" in msg and "'layer4'" in msg
    assert "list_names" in msg


def test_unknown_local_name_is_an_error(resnet18):
    with pytest.raises(ValueError, match=r"'layer1\.0:outt'.*Did you mean"):
        capture(resnet18, "layer1.0:outt")


def test_glob_matching_nothing_is_an_error(resnet18):
    with pytest.raises(ValueError, match=r"'layer9\.\*'.*matches nothing"):
        capture(resnet18, ["layer1", "layer9.*"])


def test_predicate_selecting_nothing_is_an_error(resnet18):
    with pytest.raises(ValueError, match="selected no value"):
        capture(resnet18, lambda info: info.op == "NoSuchLayer")


def test_glob_patterns(resnet18, image):
    ex = capture(resnet18, "layer?.0")
    assert ex.names == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    ex = capture(resnet18, "layer*.*:identity")
    assert ex.names == [f"layer{i}.{j}:identity" for i in range(1, 5) for j in range(2)]
    _, feats = ex(image)
    # identity of a block without downsample is its input: the previous block's output
    _, seen = hook_values(resnet18, ["layer1.0"], image)
    assert torch.equal(feats["layer1.1:identity"], seen["layer1.0"][0])


class Collide(nn.Module):
    """Submodules named like fx ops and like a local."""

    def __init__(self):
        super().__init__()
        self.add = nn.Linear(4, 4)
        self.sub = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        add = self.add(x) + x  # a local `add`, and an fx node `add`
        sub = self.sub(add) - 1
        return self.relu(sub)


def test_module_local_and_node_namespaces_never_collide():
    model = Collide().eval()
    x = torch.randn(3, 4)
    # fx names the call of module `add` "add" and the `+` after it "add_1"
    ex = capture(model, ["add", "sub", ":add", ":sub", "%add", "%add_1", "relu"])
    out, feats = ex(x)
    assert len(ex.names) == len(set(ex.names)) == 7
    with torch.no_grad():
        a = model.add(x)
        add = a + x
        sub = model.sub(add) - 1
    assert torch.equal(out, model(x))
    assert torch.equal(feats["add"], a)  # the module
    assert torch.equal(feats[":add"], add)  # the local
    assert torch.equal(feats["%add"], a)  # the fx node calling module `add`
    assert torch.equal(feats["%add_1"], add)  # the fx node of `+`
    assert torch.equal(feats["sub"], model.sub(add))
    assert torch.equal(feats[":sub"], sub)
    kinds = {r.key: (r.kind, r.op) for r in list_names(model)}
    assert kinds["add"] == ("module", "Linear")
    assert kinds[":add"][0] == "local"
    assert kinds["%add"] == ("node", "call_module add")
    assert kinds["%add_1"][0] == "node" and "add" in kinds["%add_1"][1]


def test_list_names_kinds_owner_and_op(resnet18):
    table = list_names(resnet18)
    by_key = {r.key: r for r in table}
    assert by_key["layer1.0.bn1"].kind == "module"
    assert by_key["layer1.0.bn1"].op == "BatchNorm2d"
    assert by_key["layer1.0.bn1"].module == "layer1.0.bn1"
    assert by_key["layer2.0:identity"].kind == "local"
    assert by_key["layer2.0:identity"].module == "layer2.0"
    assert "BasicBlock.forward" in by_key["layer2.0:identity"].op
    assert by_key["%flatten"].kind == "node"
    assert {r.kind for r in table} == {"module", "local", "node"}
    # every module that runs is listed, each call once (relu runs twice in a block)
    assert "layer1.0.relu@0" in by_key and "layer1.0.relu@1" in by_key
    modules_run = {p for p, _ in resnet18.named_modules() if p}
    assert {r.base for r in table if r.kind == "module"} == modules_run
    # filtering, and the printed table
    only = list_names(resnet18, "layer4.1**", kinds=["module"])
    assert only.keys() and all(k.startswith("layer4.1") for k in only.keys())
    assert all(r.kind == "module" for r in only)
    text = str(only)
    assert text.splitlines()[0].split() == ["key", "kind", "module", "op"]
    assert "layer4.1.conv2" in text and "Conv2d" in text
    # every listed key can be captured
    ex = capture(resnet18, only.keys())
    assert ex.names == only.keys()


def test_execution_order_of_names(resnet18):
    ex = capture(resnet18, ["layer4", "conv1", "layer2", "layer1.0.relu"])
    assert ex.names == ["conv1", "layer1.0.relu@0", "layer1.0.relu@1", "layer2", "layer4"]
    ex = capture(resnet18, {"z": "fc", "a": "bn1"})
    assert ex.names == ["a", "z"]


def test_dict_aliases(resnet18, image):
    ex = capture(resnet18, {"stem": "bn1", "relus": "layer1.0.relu", "last": "layer4"})
    assert ex.names == ["stem", "relus@0", "relus@1", "last"]
    _, feats = ex(image)
    _, seen = hook_values(resnet18, ["bn1", "layer1.0.relu", "layer4"], image)
    assert torch.equal(feats["stem"], seen["bn1"][0])
    assert torch.equal(feats["relus@0"], seen["layer1.0.relu"][0])
    assert torch.equal(feats["relus@1"], seen["layer1.0.relu"][1])
    assert torch.equal(feats["last"], seen["layer4"][0])


def test_predicate_selects_by_kind_and_op(resnet18, image):
    ex = capture(resnet18, lambda info: info.kind == "module" and info.op == "Conv2d")
    convs = [p for p, m in resnet18.named_modules() if isinstance(m, nn.Conv2d)]
    assert ex.names == convs
    out, feats = ex(image)
    ref, seen = hook_values(resnet18, convs, image)
    assert torch.equal(out, ref)
    assert_matches_hooks(feats, seen)


def test_bad_names_type():
    with pytest.raises(TypeError, match="names must be"):
        capture(nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match="selector must be"):
        capture(nn.Linear(2, 2), [3])


@pytest.mark.parametrize("selectors, kept, dropped", [
    (["layer4", "blocks.0.attn", "%add_3"], [], ["attn", "x", "layer4x"]),
    (["attn"], ["attn"], ["attn_probs", "x"]),
    (["blocks.3.attn:attn@1"], ["attn"], ["q"]),
    (["blocks.*:q*", "layer?"], ["q", "qkv", "layer1"], ["k", "layer12"]),
    ([":x"], ["x"], ["y"]),
])  # fmt: skip
def test_wanted_locals_is_what_a_selector_can_select(selectors, kept, dropped):
    from fxcapture.core.select import wanted_locals

    wanted = wanted_locals(selectors)
    assert [n for n in kept if wanted(n)] == kept
    assert [n for n in dropped if wanted(n)] == []


@pytest.mark.parametrize("selectors", [["blocks.**"], [lambda info: True], ["x", "**:attn"]])
def test_selectors_that_may_select_any_local_keep_them_all(selectors):
    from fxcapture.core.select import wanted_locals

    assert wanted_locals(selectors) is None

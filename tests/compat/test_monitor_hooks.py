"""Monitor, used as the seed doc uses it: the training loop calls the model itself.

References: plain forward hooks on the same modules (``conftest.hooked``), run in the
same forwards; ``monitor.model`` for the structure of values selected several times.
"""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn as nn
from conftest import assert_same, hooked, module_state

from fxcapture import Monitor


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)  # writes into lin's output after the hook
        self.shared = nn.Linear(4, 4)  # called twice per forward
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)  # a tuple
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = self.act(self.lin(x))
        h = self.shared(self.shared(h))
        scale = h.sigmoid()  # a local: hooks cannot see it
        a, _ = self.attn(h[:, None], h[:, None], h[:, None])
        return self.drop(a[:, 0] * scale)


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_the_issue_snippet_records_what_a_hook_sees():
    model = net()
    mon = Monitor(model, ["lin"], epochs_to_record=[0], batch_indices=[0])
    mon.set_epoch(0); mon.set_batch_idx(0)  # noqa: E702
    x = torch.randn(3, 4)
    with hooked(model, ["lin"]) as seen:
        model(x)  # as in the seed doc
    data = mon.get_single_data()
    assert list(data) == ["lin"] and data["lin"]["output_shape"] == [3, 4]
    assert_same(data["lin"]["data"], {(0, 0): seen["lin"][0]})
    assert (seen["lin"][0] < 0).any()  # the value before ReLU(inplace=True)
    assert not data["lin"]["data"][(0, 0)].requires_grad


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_chosen_epochs_and_batches_tuples_and_repeated_modules(mode):
    model = net().train(mode == "train")
    layers = {"attn": {"alias": "attention"},
              "shared": {"alias": "twice", "record_type": "epoch_full"}}  # fmt: skip
    monitor = Monitor(model, layers, epochs_to_record=[1, 2], batch_indices=[0, 2])
    inputs = [torch.randn(3, 4) for _ in range(3)]
    got, expected = {}, {}
    with hooked(model, ["attn", "shared"]) as seen:
        for epoch in range(3):
            monitor.set_epoch(epoch)
            for i, x in enumerate(inputs):
                monitor.set_batch_idx(i)
                model(x).sum().backward() if mode == "train" else model(x)
                expected[(epoch, i)] = (seen["attn"][-1], seen["shared"][-2:])
            got[epoch] = (monitor.get_single_data(), monitor.get_epoch_data())
    assert got[0] == ({}, {})
    for epoch in (1, 2):
        single, full = got[epoch]
        attention = single["attention"]
        assert_same(attention["data"], {(epoch, i): expected[(epoch, i)][0] for i in (0, 2)})
        assert all(isinstance(v, tuple) for v in attention["data"].values())  # whole
        assert attention["output_shape"] == [[3, 1, 4], [3, 1, 1]]
        # a module called twice: {"shared@0": first call, "shared@1": second}, every batch
        assert_same(full["twice"]["data"], {
            (epoch, i): dict(zip(["shared@0", "shared@1"], expected[(epoch, i)][1]))
            for i in range(3)
        })  # fmt: skip
    # the same structure as monitor.model gives
    monitor.set_batch_idx(1)
    with torch.no_grad():
        monitor.model.eval()(inputs[1])
    assert list(monitor.get_epoch_data()["twice"]["data"][(2, 1)]) == ["shared@0", "shared@1"]


def test_a_local_is_said_naming_monitor_model():
    model = net().eval()
    monitor = Monitor(model, ["lin", ":scale"], epochs_to_record=[1], batch_indices=[0])
    x = torch.randn(3, 4)
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # not a recorded epoch: nothing to say
    monitor.set_epoch(1)
    monitor.set_batch_idx(0)
    with pytest.warns(UserWarning, match=r"':scale'.*not a module output.*monitor\.model"):
        model(x)
    assert list(monitor.get_single_data()) == ["lin"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = monitor.model(x)  # records both, no warning
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    scale = monitor.get_single_data()[":scale"]["data"][(1, 0)]
    h = model.shared(model.shared(model.lin(x).relu()))
    torch.testing.assert_close(scale, h.sigmoid().detach())


def test_a_compiled_model_is_said_naming_monitor_model():
    torch._dynamo.reset()
    model = net().eval()
    with pytest.warns(UserWarning, match=r"compiled.*torch\.compile\(monitor\.model\)"):
        Monitor(torch.compile(model, backend="aot_eager"), ["lin"], [0], batch_indices=[0])

    monitor = Monitor(model, ["lin"], [0], batch_indices=[0])
    compiled = torch.compile(model, backend="aot_eager")
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    with torch.no_grad():
        compiled(torch.randn(3, 4))
    with pytest.warns(UserWarning, match=r"ran compiled.*epoch 0, batch 0.*monitor\.model"):
        assert monitor.get_single_data() == {}
    monitor.remove_hooks()


def test_remove_hooks_garbage_collection_save_and_deepcopy():
    model = net()
    before = module_state(model)
    monitor = Monitor(model, ["lin", "attn"], [0], batch_indices=[0])
    assert module_state(model) != before  # the hooks the seed doc describes
    buffer = io.BytesIO()
    torch.save(model, buffer)  # hooks pickle as inert placeholders
    clone = copy.deepcopy(model)
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    with torch.no_grad():
        clone(torch.randn(3, 4))
        buffer.seek(0)
        torch.load(buffer, weights_only=False)(torch.randn(3, 4))
    assert monitor.get_single_data() == {}  # copies never record into the monitor
    monitor.remove_hooks()
    assert module_state(model) == before
    model(torch.randn(3, 4))
    assert monitor.get_single_data() == {}

    monitor = Monitor(model, ["lin"], [0], batch_indices=[0])
    del monitor
    gc.collect()
    assert module_state(model) == before

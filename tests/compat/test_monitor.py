"""Monitor: the training monitor doc's usages, on capture() (locals too, torch.compile).

References are independent of the Monitor: forward hooks on the real modules (what
the seed Monitor itself used) and attention maps recomputed from the qkv projection.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_same, detached_copy, module_state

from fxcapture import Monitor
from fxcapture.compat.monitor import MonitoredTrainer
from fxcapture.cli.models import TinyViT


def tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(image_size=16, patch=8, dim=16, depth=2, heads=2, num_classes=3)


class Recorder:
    """Forward hooks that copy every output of some modules: the reference."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        modules = dict(model.named_modules())
        self.calls: dict[str, list] = {p: [] for p in paths}
        self.handles = [
            modules[p].register_forward_hook(
                lambda m, a, out, p=p: self.calls[p].append(detached_copy(out))
            )
            for p in paths
        ]

    def last(self, path: str):
        return self.calls[path][-1]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attention_from_qkv(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, _ = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(C // heads)).softmax(-1)


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 3, (2,), generator=g))
            for _ in range(n)]  # fmt: skip


def test_list_layers_single_records_chosen_epochs_and_batches(tmp_path):
    model = tiny_vit()
    before = module_state(model)
    monitor = Monitor(model, ["blocks.0.mlp", "attn"], epochs_to_record=[0, 2],
                      output_dir=tmp_path, batch_indices=[1])  # fmt: skip
    net = monitor.model
    assert list(net.state_dict()) == list(model.state_dict())
    ref = Recorder(model, ["blocks.0.mlp", "blocks.0.attn.qkv", "blocks.1.attn.qkv"])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    expected = {}
    for epoch in range(3):
        monitor.set_epoch(epoch)
        for batch_idx, (x, y) in enumerate(batches(3, seed=epoch)):
            monitor.set_batch_idx(batch_idx)
            out = net(x)
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # model output unchanged
            if batch_idx == 1:
                expected[epoch] = {
                    "mlp": ref.last("blocks.0.mlp"),  # from model(x), just above
                    "attn": [attention_from_qkv(ref.last(f"blocks.{i}.attn.qkv"), 2)
                             for i in range(2)],  # fmt: skip
                }
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        data = monitor.get_single_data()
        if epoch == 1:
            assert data == {}
            continue
        assert list(data) == ["blocks.0.mlp", "attn"]
        mlp = data["blocks.0.mlp"]
        assert mlp["layer"] == "blocks.0.mlp" and mlp["output_shape"] == [2, 5, 16]
        assert list(mlp["data"]) == [(epoch, 1)]
        assert_same(mlp["data"][(epoch, 1)], expected[epoch]["mlp"])
        attn = data["attn"]["data"][(epoch, 1)]  # "attn" is a local of every block
        assert list(attn) == ["blocks.0.attn:attn", "blocks.1.attn:attn"]
        for got, want in zip(attn.values(), expected[epoch]["attn"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert not got.requires_grad and got.device.type == "cpu"
        assert data["attn"]["output_shape"] == {k: [2, 2, 5, 5] for k in attn}
        monitor.save_single_outputs()
        monitor.clear_current_epoch_data()
        assert monitor.get_single_data() == {}
    ref.remove()
    monitor.remove_hooks()
    assert module_state(model) == before  # capture() never touches the model

    loaded = Monitor.load(tmp_path)
    assert list(loaded["attn"]["data"]) == [(0, 1), (2, 1)]
    for epoch in (0, 2):
        assert_same(loaded["blocks.0.mlp"]["data"][(epoch, 1)], expected[epoch]["mlp"])
        for got, want in zip(loaded["attn"]["data"][(epoch, 1)].values(), expected[epoch]["attn"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    item = torch.load(tmp_path / "attn" / "single_epoch2_batch1.pt", weights_only=True)
    assert set(item) == {"epoch", "batch_idx", "layer", "alias", "output_shape", "output"}
    assert (item["epoch"], item["batch_idx"], item["layer"]) == (2, 1, "attn")


def test_dict_layers_aliases_and_epoch_full(tmp_path):
    model = tiny_vit().eval()
    layers = {
        "blocks.1.attn:attn": {"alias": "attention_weights", "record_type": "single"},
        "blocks.0.mlp": {"alias": "ffn_epoch_stats", "record_type": "epoch_full"},
    }
    monitor = Monitor(model, layers, epochs_to_record=[1], output_dir=tmp_path, batch_indices=[0])
    ref = Recorder(model, ["blocks.0.mlp", "blocks.1.attn.qkv"])
    data = batches(3)
    expected = []
    for epoch in range(2):
        monitor.set_epoch(epoch)
        for i, (x, _) in enumerate(data):
            monitor.set_batch_idx(i)
            with torch.no_grad():
                monitor(x)
                model(x)  # the reference
            expected.append((ref.last("blocks.0.mlp"), ref.last("blocks.1.attn.qkv")))
    epoch_data = monitor.get_epoch_data()
    assert list(epoch_data) == ["ffn_epoch_stats"]
    ffn = epoch_data["ffn_epoch_stats"]
    assert ffn["layer"] == "blocks.0.mlp" and ffn["alias"] == "ffn_epoch_stats"
    assert list(ffn["data"]) == [(1, 0), (1, 1), (1, 2)]  # every batch of the epoch
    for i, value in enumerate(ffn["data"].values()):
        assert_same(value, expected[3 + i][0])
    all_outputs = torch.cat(list(ffn["data"].values()), dim=0)  # the doc's statistics
    assert all_outputs.shape == (6, 5, 16)
    single = monitor.get_single_data(["attention_weights"])
    assert list(single["attention_weights"]["data"]) == [(1, 0)]
    torch.testing.assert_close(single["attention_weights"]["data"][(1, 0)],
                               attention_from_qkv(expected[3][1], 2))  # fmt: skip
    assert monitor.get_epoch_data(["blocks.0.mlp"]).keys() == {"ffn_epoch_stats"}  # by layer name
    paths = monitor.save_epoch_outputs()
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "ffn_epoch_stats/epoch_full_epoch1.pt"
    ]
    loaded = Monitor.load(tmp_path, "epoch_full")["ffn_epoch_stats"]["data"]
    assert_same(list(loaded.values()), list(ffn["data"].values()))
    ref.remove()


def test_single_without_batch_indices_keeps_the_last_batch():
    model = tiny_vit().eval()
    monitor = Monitor(model, ["head"], epochs_to_record=[0])
    data = batches(3)
    monitor.set_epoch(0)
    with torch.no_grad():
        for i, (x, _) in enumerate(data):
            monitor.set_batch_idx(i)
            monitor(x)
        expected = model(data[-1][0])
    (key,) = monitor.get_single_data()["head"]["data"]
    assert key == (0, 2)
    assert_same(monitor.get_single_data()["head"]["data"][key], expected)


class MHANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.embed(x)
        out, _ = self.self_attn(h, h, h)
        return out.mean(1)


def test_tuple_outputs_are_kept_whole():
    torch.manual_seed(0)
    model = MHANet().eval()
    monitor = Monitor(model, {"self_attn": {"alias": "attention"}}, [0], batch_indices=[0])
    ref = Recorder(model, ["self_attn"])
    x = torch.randn(2, 5, 4)
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    with torch.no_grad():
        monitor(x)
    entry = monitor.get_single_data()["attention"]
    attn_output, attn_weights = entry["data"][(0, 0)]
    assert_same((attn_output, attn_weights), ref.last("self_attn"))
    assert entry["output_shape"] == [[2, 5, 8], [2, 5, 5]]
    ref.remove()


def test_configuration_errors(tmp_path):
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"do not exist in the model: \['blocks.0.atn', 'nope'\].*"
                                         r"Did you mean 'blocks.0.attn'"):  # fmt: skip
        Monitor(model, ["blocks.0.atn", "attn", "nope"], [0])
    with pytest.raises(ValueError, match="Duplicate alias 'a' in layers_to_monitor"):
        Monitor(model, {"head": {"alias": "a"}, "norm": {"alias": "a"}}, [0])
    with pytest.raises(ValueError, match="Duplicate alias 'head'"):
        Monitor(model, {"head": {}, "norm": {"alias": "head"}}, [0])
    with pytest.raises(ValueError, match="epochs_to_record is empty"):
        Monitor(model, ["head"], [])
    with pytest.raises(ValueError, match="'single' or 'epoch_full'"):
        Monitor(model, {"head": {"record_type": "full"}}, [0])
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(FileExistsError, match=f"^output_dir='{tmp_path}/a-file' is a file, not a folder"):
        Monitor(model, ["head"], [0], output_dir=tmp_path / "a-file")
    with pytest.raises(OSError, match=f"^cannot create output_dir='{tmp_path}/a-file/runs': {tmp_path}/a-file is a"):
        Monitor(model, ["head"], [0], output_dir=tmp_path / "a-file" / "runs")
    with pytest.raises(ValueError, match="no output_dir"):
        monitor = Monitor(model, ["head"], [0])
        monitor.set_epoch(0)
        monitor.set_batch_idx(0)
        monitor(torch.randn(1, 3, 16, 16))
        monitor.save_single_outputs()


def test_missing_epoch_or_batch_index_is_reported():
    model = tiny_vit()
    monitor = Monitor(model, ["head"], [0])
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning, match="before monitor.set_epoch"):
        monitor(x)
    monitor.set_epoch(0)
    with pytest.raises(RuntimeError, match="set_batch_idx"):
        monitor(x)
    monitor.set_epoch(1)  # not recorded: no index needed
    monitor(x)


def encapsulated_train(model, data, num_epochs, **kwargs):
    """The doc's training function that only knows about callbacks."""
    epoch_callback = kwargs.get("epoch_callback")
    batch_callback = kwargs.get("batch_callback")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(1, num_epochs + 1):
        if epoch_callback:
            epoch_callback(epoch)
        for batch_idx, (x, y) in enumerate(data):
            if batch_callback:
                batch_callback(batch_idx)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def test_callbacks_and_trainer_wrapper(tmp_path):
    model = tiny_vit()
    monitor = Monitor(model, {"blocks.1.attn:attn": {"alias": "attn"}}, [1, 3],
                      output_dir=tmp_path / "wrapped", batch_indices=[0])  # fmt: skip
    trainer = MonitoredTrainer(monitor)
    monitored_train = trainer.wrap_training_function(encapsulated_train)
    assert monitored_train.__name__ == "encapsulated_train"
    monitored_train(monitor.model, batches(2), 3)
    saved = Monitor.load(tmp_path / "wrapped")
    assert list(saved["attn"]["data"]) == [(1, 0), (3, 0)]

    model = tiny_vit()
    monitor = Monitor(model, ["head"], [2], batch_indices=[1])
    encapsulated_train(monitor.model, batches(2), 2, epoch_callback=monitor.create_epoch_callback(),
                       batch_callback=monitor.create_batch_callback())  # fmt: skip
    assert list(monitor.get_single_data()["head"]["data"]) == [(2, 1)]


def test_remove_hooks_stops_recording_and_keeps_the_model_working():
    model = tiny_vit().eval()
    monitor = Monitor(model, ["head"], [0], batch_indices=[0])
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    monitor.remove_hooks()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(monitor.model(x), model(x), rtol=0, atol=0)
    assert monitor.get_single_data() == {}


def test_train_eval_modes_follow_the_monitored_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    monitor = Monitor(model, ["1"], [0], batch_indices=[0])
    x = torch.randn(3, 4)
    monitor.model.eval()
    assert not model[1].training
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    with torch.no_grad():
        torch.testing.assert_close(monitor(x), model.eval()(x), rtol=0, atol=0)
    assert_same(monitor.get_single_data()["1"]["data"][(0, 0)], model[0](x).detach())
    monitor.model.train()
    assert model[1].training
    out = monitor(x)
    assert (out != model.eval()(x)).any()  # dropout is active in the training graph


def test_torch_compile_fullgraph_one_graph_and_same_records():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_vit().eval()
    monitor = Monitor(model, ["attn", "blocks.0.mlp"], epochs_to_record=[0, 1], batch_indices=[0, 2])
    compiled = torch.compile(monitor.model, backend="aot_eager", fullgraph=True)
    # hooks on the compiled modules would make dynamo recompile: hook a copy instead
    reference = copy.deepcopy(model)
    ref = Recorder(reference, ["blocks.0.mlp", "blocks.0.attn.qkv", "blocks.1.attn.qkv"])
    data, expected = batches(3), {}
    for epoch in range(2):
        monitor.set_epoch(epoch)
        for i, (x, _) in enumerate(data):
            monitor.set_batch_idx(i)
            with torch.no_grad():
                out = compiled(x)
                torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
            expected[i] = {path: ref.last(path) for path in ref.calls}
        records = monitor.get_single_data()
        assert list(records["blocks.0.mlp"]["data"]) == [(epoch, 0), (epoch, 2)]
        for i in (0, 2):
            torch.testing.assert_close(records["blocks.0.mlp"]["data"][(epoch, i)],
                                       expected[i]["blocks.0.mlp"],
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
            attn = records["attn"]["data"][(epoch, i)]
            for b in range(2):
                qkv = expected[i][f"blocks.{b}.attn.qkv"]
                torch.testing.assert_close(attn[f"blocks.{b}.attn:attn"],
                                           attention_from_qkv(qkv, 2), rtol=1e-5, atol=1e-5)  # fmt: skip
    ref.remove()
    # epochs and batch indices changed 6 times: no recompilation
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_torch_compile_training_step_matches_plain_training():
    torch._dynamo.reset()
    data = batches(2)

    def train(net, model, on_batch=lambda i: None):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for i, (x, y) in enumerate(data):
            on_batch(i)
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    plain = tiny_vit()  # the reference: the model itself, a hook on blocks.0.attn.qkv
    ref = Recorder(plain, ["blocks.0.attn.qkv"])
    train(plain, plain)
    expected_attn = attention_from_qkv(ref.calls["blocks.0.attn.qkv"][1], 2)

    model = tiny_vit()
    monitor = Monitor(model, {"blocks.0.attn:attn": {"alias": "a"}}, [0], batch_indices=[1])
    compiled = torch.compile(monitor.model, backend="aot_eager", fullgraph=True)
    monitor.set_epoch(0)
    train(compiled, model, monitor.set_batch_idx)
    torch.testing.assert_close(monitor.get_single_data()["a"]["data"][(0, 1)], expected_attn,
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    torch.testing.assert_close(model.head.weight, plain.head.weight, rtol=1e-4, atol=1e-5)
    assert not torch.equal(plain.head.weight, tiny_vit().head.weight)  # it trained

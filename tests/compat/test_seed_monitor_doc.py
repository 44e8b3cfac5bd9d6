"""The training-monitor doc (seeds/training-monitor-doc-zh.md), run with one import changed.

The doc's snippets call the model itself (``outputs = model(batch)``); with
``from fxcapture import Monitor`` (was ``from agent.scripts.monitor import Monitor``)
they run unchanged. What the doc leaves undefined (``Monitor(...)``'s arguments,
``dataloader``, ``targets``, ``compute_statistics``, the "训练逻辑..." of the
encapsulated function, ``plot_attention_patterns``) is filled with the smallest
complete code, said in comments. The reference is plain forward hooks registered on
the same modules (``conftest.hooked``): what a hook sees at each forward.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from conftest import assert_same, hooked, module_state

from fxcapture import Monitor  # was: from agent.scripts.monitor import Monitor
# was: from agent.scripts.training_wrapper import MonitoredTrainer
from fxcapture.compat import MonitoredTrainer

DIM, HEADS, TOKENS, BATCH = 16, 2, 6, 4


class SelfAttention(nn.Module):
    """Returns the attention weights (B, heads, N, N): the doc's 'attention_weights'."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(DIM, 2 * DIM)

    def forward(self, x):
        B, N, C = x.shape
        q, k = self.qk(x).reshape(B, N, 2, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
        return (q @ k.transpose(-2, -1) * (C // HEADS) ** -0.5).softmax(-1)


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = SelfAttention()
        self.v = nn.Linear(DIM, DIM)
        self.cross_attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)  # tuple output
        self.ffn = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.ReLU(), nn.Linear(2 * DIM, DIM))

    def forward(self, x, memory):
        B, N, C = x.shape
        v = self.v(x).reshape(B, N, HEADS, C // HEADS).transpose(1, 2)
        x = x + (self.self_attn(x) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + self.cross_attn(x, memory, memory)[0]
        return x + self.ffn(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Linear(DIM, DIM)
        # ReLU(inplace=True) writes into the output of `attention`
        self.ffn = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(DIM, DIM))

    def forward(self, x):
        return x + self.ffn(self.attention(x))


class DocModel(nn.Module):
    """Module paths of the doc: transformer.encoder.layers.0.{self_attn, cross_attn, ffn},
    transformer.layers.{0.attention, 1.ffn}."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.memory = nn.Parameter(torch.randn(1, 3, DIM))
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList([EncoderLayer(), EncoderLayer()])
        self.transformer.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, 3)

    def forward(self, batch):
        x = self.embed(batch)
        memory = self.memory.expand(x.shape[0], -1, -1)
        for layer in self.transformer.encoder.layers:
            x = layer(x, memory)
        for block in self.transformer.layers:
            x = block(x)
        return self.head(x.mean(1))


MIXED = {  # the doc's "混合记录类型"
    'transformer.encoder.layers.0.self_attn': {
        'alias': 'attention_weights',
        'record_type': 'single'  # 记录特定batch
    },
    'transformer.encoder.layers.0.ffn': {
        'alias': 'ffn_epoch_stats',
        'record_type': 'epoch_full'  # 记录整个epoch
    }
}
SELF_ATTN, FFN = "transformer.encoder.layers.0.self_attn", "transformer.encoder.layers.0.ffn"


def setup(num_batches: int = 4):
    torch.manual_seed(0)
    model = DocModel()
    g = torch.Generator().manual_seed(1)
    dataloader = [torch.randn(BATCH, TOKENS, 8, generator=g) for _ in range(num_batches)]
    targets = torch.randint(0, 3, (BATCH,), generator=g)  # the doc's loop uses `targets`
    return model, dataloader, targets


def compute_statistics(all_outputs):  # undefined in the doc: its Example 2's statistics
    return {'mean': torch.mean(all_outputs, dim=0), 'std': torch.std(all_outputs, dim=0)}


def by_forward(seen: dict[str, list], num_epochs: int, num_batches: int) -> dict:
    """``{path: {(epoch, batch_idx): output}}`` from hooks called once per forward."""
    positions = [(e, b) for e in range(1, num_epochs + 1) for b in range(num_batches)]
    return {path: dict(zip(positions, calls, strict=True)) for path, calls in seen.items()}


def test_unencapsulated_training_loop(tmp_path, monkeypatch):
    model, dataloader, targets = setup()
    monkeypatch.chdir(tmp_path)  # the loop saves custom files into the working directory
    num_epochs = 3
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with hooked(model, [SELF_ATTN, FFN]) as seen:
        before = module_state(model)
        # Monitor(...): the doc leaves the arguments out; its mixed configuration
        monitor = Monitor(model, MIXED, epochs_to_record=[1, 3], output_dir="monitor_out",
                          batch_indices=[0, 2])  # fmt: skip

        # -- "未封装训练过程的处理", as in the doc ------------------------------------------
        try:
            for epoch in range(1, num_epochs + 1):
                monitor.set_epoch(epoch)

                for batch_idx, batch in enumerate(dataloader):
                    monitor.set_batch_idx(batch_idx)

                    # 正常的训练代码
                    outputs = model(batch)
                    loss = criterion(outputs, targets)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()

                # epoch结束：处理Monitor数据
                single_data = monitor.get_single_data()
                epoch_data = monitor.get_epoch_data()

                # 自定义处理逻辑
                for alias, layer_info in single_data.items():
                    outputs = list(layer_info['data'].values())
                    # 计算平均值或其他统计
                    avg_output = torch.mean(torch.stack(outputs), dim=0)
                    torch.save(avg_output, f'custom_avg_{alias}_epoch_{epoch}.pt')

                for alias, layer_info in epoch_data.items():
                    outputs = list(layer_info['data'].values())
                    # 对整个epoch的数据进行处理
                    all_outputs = torch.cat(outputs, dim=0)
                    epoch_stats = compute_statistics(all_outputs)
                    torch.save(epoch_stats, f'epoch_stats_{alias}_epoch_{epoch}.pt')

                # 保存原始数据
                monitor.save_single_outputs()
                monitor.save_epoch_outputs()

                # 清理内存
                monitor.clear_current_epoch_data()

        finally:
            # 确保清理hooks
            monitor.remove_hooks()

        assert module_state(model) == before  # remove_hooks removed every hook it added
    ref = by_forward(seen, num_epochs, len(dataloader))
    for epoch in (1, 3):
        avg = torch.load(f"custom_avg_attention_weights_epoch_{epoch}.pt")
        expected = [ref[SELF_ATTN][(epoch, b)] for b in (0, 2)]
        torch.testing.assert_close(avg, torch.stack(expected).mean(0), rtol=0, atol=0)
        stats = torch.load(f"epoch_stats_ffn_epoch_stats_epoch_{epoch}.pt")
        whole = torch.cat([ref[FFN][(epoch, b)] for b in range(4)])
        assert_same(stats, compute_statistics(whole))
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(
        [f"custom_avg_attention_weights_epoch_{e}.pt" for e in (1, 3)]
        + [f"epoch_stats_ffn_epoch_stats_epoch_{e}.pt" for e in (1, 3)]
    )  # epoch 2 is not recorded
    single = Monitor.load("monitor_out")["attention_weights"]
    assert single["layer"] == SELF_ATTN and single["output_shape"] == [BATCH, HEADS, TOKENS, TOKENS]
    assert_same(single["data"], {p: ref[SELF_ATTN][p] for p in [(1, 0), (1, 2), (3, 0), (3, 2)]})
    full = Monitor.load("monitor_out", "epoch_full")["ffn_epoch_stats"]["data"]
    assert_same(full, {(e, b): ref[FFN][(e, b)] for e in (1, 3) for b in range(4)})
    # 保存到磁盘时，每个输出项包含: epoch, batch_idx, layer, alias, output_shape, output
    item = torch.load("monitor_out/attention_weights/single_epoch3_batch2.pt")
    assert list(item) == ["epoch", "batch_idx", "layer", "alias", "output_shape", "output"]
    assert (item["epoch"], item["batch_idx"], item["layer"], item["alias"]) == (
        3, 2, SELF_ATTN, "attention_weights")
    assert_same(item["output"], ref[SELF_ATTN][(3, 2)])


def encapsulated_train(config, device, **kwargs):
    # -- "方法1：回调函数", as in the doc -------------------------------------------------------
    # 获取回调函数
    epoch_callback = kwargs.get('epoch_callback')
    batch_callback = kwargs.get('batch_callback')

    for epoch in range(1, config.train.num_epochs + 1):
        if epoch_callback:
            epoch_callback(epoch)  # 设置当前epoch

        for batch_idx, batch in enumerate(dataloader):
            if batch_callback:
                batch_callback(batch_idx)  # 设置当前batch

            # 训练逻辑... (the doc's placeholder: one step)
            loss = config.criterion(config.model(batch.to(device)), config.targets)
            config.optimizer.zero_grad()
            loss.backward()
            config.optimizer.step()

        # epoch结束处理
        if hasattr(config, 'monitor') and config.monitor:
            single_data = config.monitor.get_single_data()
            epoch_data = config.monitor.get_epoch_data()
            config.seen.append((single_data, epoch_data))  # 自定义处理...
            config.monitor.save_single_outputs()
            config.monitor.save_epoch_outputs()
            config.monitor.clear_current_epoch_data()

    # 训练结束
    if hasattr(config, 'monitor') and config.monitor:
        config.monitor.remove_hooks()


dataloader: list = []  # the global the doc's encapsulated_train reads


@pytest.mark.parametrize("method", ["callbacks", "wrapper", "call_site"])
def test_encapsulated_training(method, tmp_path, monkeypatch):
    model, data, targets = setup(num_batches=3)
    monkeypatch.setitem(globals(), "dataloader", data)
    config = SimpleNamespace(train=SimpleNamespace(num_epochs=3), model=model, targets=targets,
                             criterion=nn.CrossEntropyLoss(), seen=[],
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1))  # fmt: skip
    device = "cpu"
    with hooked(model, [SELF_ATTN, FFN]) as seen:
        before = module_state(model)
        monitor = Monitor(model, MIXED, [2, 3], str(tmp_path), batch_indices=[1])
        if method == "call_site":
            config.monitor = None
            # -- "方法3：直接在调用点控制", as in the doc -------------------------------------
            num_epochs, num_batches = 3, len(data)

            def encapsulated_train_one_batch(batch_idx):  # the doc's single-batch function
                loss = config.criterion(model(data[batch_idx]), targets)
                config.optimizer.zero_grad()
                loss.backward()
                config.optimizer.step()

            for epoch in range(1, num_epochs + 1):
                monitor.set_epoch(epoch)

                for batch_idx in range(num_batches):
                    monitor.set_batch_idx(batch_idx)
                    # 调用封装的单batch训练函数
                    encapsulated_train_one_batch(batch_idx)

                # epoch结束处理
                single_data = monitor.get_single_data()
                epoch_data = monitor.get_epoch_data()
                config.seen.append((single_data, epoch_data))  # 自定义处理...
                monitor.save_single_outputs()
                monitor.save_epoch_outputs()
                monitor.clear_current_epoch_data()

            monitor.remove_hooks()  # 训练结束清理
        else:
            config.monitor = monitor
        if method == "callbacks":
            # 在训练脚本中使用, as in the doc
            epoch_callback = monitor.create_epoch_callback()
            batch_callback = monitor.create_batch_callback()

            # 调用封装的训练函数
            encapsulated_train(config, device,
                              epoch_callback=epoch_callback,
                              batch_callback=batch_callback)
        if method == "wrapper":
            # -- "方法2：包装器模式", as in the doc ------------------------------------------
            trainer = MonitoredTrainer(monitor)
            monitored_train = trainer.wrap_training_function(encapsulated_train)
            monitored_train(config, device)
        assert module_state(model) == before
    ref = by_forward(seen, 3, 3)
    singles = [s for s, _ in config.seen]
    assert [list(s) for s in singles] == [[], ["attention_weights"], ["attention_weights"]]
    for epoch, (single_data, epoch_data) in zip((2, 3), config.seen[1:]):
        assert_same(single_data["attention_weights"]["data"], {(epoch, 1): ref[SELF_ATTN][(epoch, 1)]})
        assert_same(epoch_data["ffn_epoch_stats"]["data"],
                    {(epoch, b): ref[FFN][(epoch, b)] for b in range(3)})  # fmt: skip
    loaded = Monitor.load(tmp_path)["attention_weights"]["data"]
    assert_same(loaded, {(e, 1): ref[SELF_ATTN][(e, 1)] for e in (2, 3)})


def test_tuple_outputs_and_eval_mode():
    model, dataloader, _ = setup(num_batches=2)
    model.eval()
    # the doc's config.json "monitor_layers" (cross_attn is a MultiheadAttention: a tuple)
    monitor_layers = {
        "transformer.encoder.layers.0.self_attn": {"alias": "attention_weights",
                                                   "record_type": "single"},
        "transformer.encoder.layers.0.cross_attn": {"alias": "cross_attention",
                                                    "record_type": "epoch_full"},
        # and the hard-coded ones ("或直接在代码中硬编码")
        'transformer.layers.0.attention': {'alias': 'attn_out', 'record_type': 'single'},
        'transformer.layers.1.ffn': {'alias': 'ffn_stats', 'record_type': 'epoch_full'},
    }  # fmt: skip
    paths = list(monitor_layers)
    with hooked(model, paths) as seen:
        monitor = Monitor(model, monitor_layers, [0], batch_indices=[1])
        monitor.set_epoch(0)
        with torch.no_grad():
            for batch_idx, batch in enumerate(dataloader):
                monitor.set_batch_idx(batch_idx)
                model(batch)
        monitor.remove_hooks()

    # -- "Tuple输出处理", as in the doc ---------------------------------------------------------
    # 对于tuple输出，output_shape为列表，output为tuple
    single_data = monitor.get_single_data()
    for alias, layer_info in single_data.items():
        outputs = list(layer_info['data'].values())
        for output in outputs:
            if isinstance(output, tuple):
                attn_output, attn_weights = output
                # 处理注意力输出和权重
                print(f"Attention output shape: {attn_output.shape}")
                print(f"Attention weights shape: {attn_weights.shape}")

    epoch_data = monitor.get_epoch_data()
    cross = epoch_data["cross_attention"]
    assert cross["output_shape"] == [[BATCH, TOKENS, DIM], [BATCH, TOKENS, 3]]
    assert_same(cross["data"], {(0, b): seen[paths[1]][b] for b in range(2)})
    assert all(isinstance(v, tuple) for v in cross["data"].values())  # whole, not [0]
    assert_same(single_data["attention_weights"]["data"], {(0, 1): seen[paths[0]][1]})
    # attention's output is overwritten later by ReLU(inplace=True): the value the hook saw
    assert (seen[paths[2]][1] < 0).any()
    assert_same(single_data["attn_out"]["data"], {(0, 1): seen[paths[2]][1]})
    assert_same(epoch_data["ffn_stats"]["data"], {(0, b): seen[paths[3]][b] for b in range(2)})


def test_data_processing_examples(tmp_path, monkeypatch):
    model, dataloader, _ = setup(num_batches=3)
    monkeypatch.chdir(tmp_path)
    layers = {SELF_ATTN: {"alias": "attention_weights", "record_type": "single"},
              FFN: {"alias": "ffn_epoch_stats", "record_type": "epoch_full"}}  # fmt: skip
    with hooked(model, [SELF_ATTN, FFN]) as seen:
        monitor = Monitor(model, layers, [5], "out", batch_indices=[0, 1])
        epoch = 5
        monitor.set_epoch(epoch)
        for batch_idx, batch in enumerate(dataloader):
            monitor.set_batch_idx(batch_idx)
            model(batch)
    plotted = []
    plot_attention_patterns = plotted.append  # undefined in the doc: keep what it is given

    # -- 示例1：注意力权重分析 ------------------------------------------------------------------
    # 获取single数据
    single_data = monitor.get_single_data()
    for alias, layer_info in single_data.items():
        if 'attention' in alias:
            # 获取所有输出
            outputs = list(layer_info['data'].values())  # list of outputs
            # 计算注意力权重的平均值
            attention_weights = outputs  # 已经是list
            avg_attention = torch.mean(torch.stack(attention_weights), dim=0)

            # 可视化注意力模式
            plot_attention_patterns(avg_attention)
            torch.save(avg_attention, f'attention_analysis_epoch_{epoch}.pt')

    # -- 示例2：FFN输出统计 ---------------------------------------------------------------------
    # 获取epoch数据
    epoch_data = monitor.get_epoch_data()
    for alias, layer_info in epoch_data.items():
        if 'ffn' in alias:
            # 获取所有输出
            outputs = list(layer_info['data'].values())
            # 拼接所有batch的输出
            all_outputs = torch.cat(outputs, dim=0)

            # 计算统计信息
            stats = {
                'mean': torch.mean(all_outputs, dim=0),
                'std': torch.std(all_outputs, dim=0),
                'min': torch.min(all_outputs, dim=0)[0],
                'max': torch.max(all_outputs, dim=0)[0]
            }

            torch.save(stats, f'ffn_stats_epoch_{epoch}.pt')

    # -- 示例3：自定义处理函数 ------------------------------------------------------------------
    def process_attention_outputs(outputs):
        """自定义注意力输出处理"""
        weights = torch.stack(outputs)

        # 计算头部重要性
        head_importance = torch.mean(weights, dim=[0, 2])  # [num_heads]

        # 计算层间注意力模式
        layer_patterns = torch.mean(weights, dim=1)  # [batch_size, seq_len, seq_len]

        return {
            'head_importance': head_importance,
            'layer_patterns': layer_patterns
        }

    # 在训练循环中使用
    single_data = monitor.get_single_data()
    for alias, layer_info in single_data.items():
        if 'attention' in alias:
            outputs = list(layer_info['data'].values())
            analysis = process_attention_outputs(outputs)
            torch.save(analysis, f'attention_analysis_{alias}_epoch_{epoch}.pt')

    # -- 自定义数据处理 (扩展功能) -------------------------------------------------------------
    def my_custom_function(outputs):  # undefined in the doc: a concatenation
        return torch.cat(outputs)

    buffers = monitor.get_epoch_buffers()
    for layer, outputs in buffers.items():
        # 自定义拼接、统计、可视化等
        processed = my_custom_function(outputs)
        monitor.save_custom_output(processed, f'custom_{layer}.pt')
    monitor.clear_epoch_data()

    # -- checks against the hooks ---------------------------------------------------------
    attn = [seen[SELF_ATTN][b] for b in (0, 1)]
    ffn = torch.cat(seen[FFN])
    torch.testing.assert_close(plotted[0], torch.stack(attn).mean(0), rtol=0, atol=0)
    assert_same(torch.load(f"attention_analysis_epoch_{epoch}.pt"), torch.stack(attn).mean(0))
    assert_same(torch.load(f"ffn_stats_epoch_{epoch}.pt"),
                {"mean": ffn.mean(0), "std": ffn.std(0), "min": ffn.min(0)[0], "max": ffn.max(0)[0]})
    weights = torch.stack(attn)
    assert_same(torch.load(f"attention_analysis_attention_weights_epoch_{epoch}.pt"),
                {"head_importance": weights.mean([0, 2]), "layer_patterns": weights.mean(1)})
    assert_same(torch.load(tmp_path / "out" / "custom_ffn_epoch_stats.pt"), ffn)
    assert monitor.get_epoch_data() == {} and monitor.get_single_data() == {}


def test_common_problems(tmp_path):
    model, dataloader, _ = setup(num_batches=1)
    # 1. 层名不正确
    with pytest.raises(ValueError, match=r"The following layers specified in 'layers_to_monitor' "
                                         r"do not exist in the model: \['transformer.layers.0.atention'\]"):  # fmt: skip
        Monitor(model, ['transformer.layers.0.atention'], [1], str(tmp_path))
    # 2. 别名重复
    with pytest.raises(ValueError, match=r"Duplicate alias 'xxx' in layers_to_monitor\."):
        Monitor(model, {SELF_ATTN: {'alias': 'xxx'}, FFN: {'alias': 'xxx'}}, [1], str(tmp_path))
    # 3. 输出目录不存在: Monitor会自动创建目录
    out = tmp_path / "not" / "yet"
    monitor = Monitor(model, [FFN], [1], str(out), batch_indices=[0])
    monitor.set_epoch(1)
    monitor.set_batch_idx(0)
    model(dataloader[0])
    assert [p.relative_to(out).as_posix() for p in monitor.save_single_outputs()] == [
        f"{FFN}/single_epoch1_batch0.pt"
    ]
    monitor.remove_hooks()

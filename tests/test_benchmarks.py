"""Smoke tests of the benchmark scripts: each ``main`` runs at tiny sizes and its tables
have the expected rows and columns, and every method returned the same values.
Timings themselves are never asserted (they are what the scripts report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common, compiled, extract, generate, overhead, peers

QUICK = ["--quick", "--rounds", "1", "--iters", "1", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def rows_of(table: common.Table, model_prefix: str) -> list[list[str]]:
    return [row for row in table.rows if row[0].startswith(model_prefix)]


def column(table: common.Table, rows: list[list[str]], header: str) -> list[str]:
    i = table.headers.index(header)
    return [row[i] for row in rows]


# -- common helpers -------------------------------------------------------------------------
def test_interleaved_timing_rotates_the_order_and_times_every_round():
    calls: list[str] = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = common.time_interleaved(contenders, rounds=3, warmup=1, iters=2)
    # warm-up once each, then two calls each per round, each round starting one later
    assert calls == list("abc" + "aabbcc" + "bbccaa" + "ccaabb")
    for name in "abc":
        assert len(timings[name].times) == 3
        assert timings[name].best == min(timings[name].times)


def test_ratio_is_the_median_of_per_round_ratios():
    timings = {"a": common.Timing("a", [2.0, 4.0, 9.0]), "b": common.Timing("b", [1.0, 2.0, 3.0])}
    assert common.ratio(timings, "a", "b") == 2.0  # median of 2, 2, 3
    assert common.ratio(timings, "b", "b") == 1.0


def test_peak_memory_counts_a_known_allocation():
    nbytes = 8 * 2**20
    peak = common.peak_memory(lambda: torch.empty(nbytes, dtype=torch.uint8))
    assert nbytes <= peak < nbytes + 2**20


def test_markdown_table_and_row_width_check():
    table = common.Table("t", ["a", "bb"])
    table.add("x", 1.5)
    lines = common.markdown_table(table.headers, table.rows).splitlines()
    assert lines[0] == "| a | bb  |" and lines[2] == "| x | 1.5 |"
    with pytest.raises(ValueError, match="2 columns"):
        table.add("only one")


def test_hook_capture_leaves_the_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    hooks = common.HookCapture(model, ["0"])
    x = torch.randn(2, 3)
    out, feats = hooks(x)
    assert not model[0]._forward_hooks  # the hooks sit on a copy
    assert torch.equal(feats["0"], model[0](x)) and torch.equal(out, model(x))


# -- the scripts ------------------------------------------------------------------------------
def test_overhead_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    tables = overhead.main(QUICK + ["--save"])
    table = tables[0]
    assert table.headers == overhead.HEADERS
    for prefix in ("resnet50", "vit_small"):
        rows = rows_of(table, prefix)
        assert column(table, rows, "method") == overhead.METHODS
        assert column(table, rows, "same values") == ["yes"] * 4
        assert column(table, rows, "x plain")[0] == "1.000"
        float(column(table, rows, "build s")[1])  # fxcapture's build was timed: a number
    gpt2, gpt2_compiled = tables[1], tables[2]
    assert column(gpt2, gpt2.rows, "same values") == ["yes"] * 12  # 2 cases x 6 methods
    assert column(gpt2_compiled, gpt2_compiled.rows, "graphs") == ["1", "1"]  # fullgraph, no break
    assert column(gpt2_compiled, gpt2_compiled.rows, "close to eager") == ["yes", "yes"]
    printed = capsys.readouterr().out
    assert "| model" in printed and "threads 1, batch 2" in printed
    assert "resnet50" in (tmp_path / "overhead.md").read_text()


def test_extract_quick_text_tables():
    throughput, memory = extract.main(QUICK + ["--text-only"])
    rows = {row[0]: row for row in throughput.rows}
    assert set(rows) >= {"bare forward", "extract (tokens, bfloat16)"}
    assert column(throughput, throughput.rows, "same values")[:2] == ["yes", "yes"]  # store = hooks at real tokens
    assert float(column(throughput, [rows["extract (tokens, bfloat16)"]], "x bare after batch 1")[0]) > 0
    assert any(row[0].startswith("read back, shuffled") for row in throughput.rows)
    assert column(memory, memory.rows, "method") == ["hooks", "extract"]
    small, large = (int(v.replace(",", "")) for v in memory.rows[0][4].split(" / "))
    assert large > 5 * small > 0  # the two sizes differ by about 10x in real tokens


def test_compiled_quick():
    tables = compiled.main(QUICK + ["--backend", "eager"])
    table, pruned = tables
    assert table.headers == compiled.COMPILED_HEADERS
    assert column(table, table.rows, "method") == [
        "eager model", "compiled model", "compiled fxcapture", "compiled torchvision", "compiled hooks"
    ]
    assert column(table, table.rows, "close to eager") == ["yes"] * 5
    fx = table.rows[2]
    assert fx[table.headers.index("graphs")] == "1"  # no graph break
    hooks = table.rows[4][table.headers.index("hooks fired")]
    assert hooks.startswith("5/5")
    assert "hook fired" in " ".join(table.notes)
    assert pruned.headers == compiled.PRUNED_HEADERS
    assert column(pruned, pruned.rows, "same values") == ["yes"] * 4


def test_generate_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    table = generate.main(QUICK + ["--save"])[0]
    assert table.headers == generate.HEADERS
    methods = column(table, table.rows, "method")
    assert methods[:3] == generate.EAGER
    assert methods[3:] in ([], generate.COMPILED)  # compiled generation, or a note saying why not
    assert len(methods) == 5 or "compiled generation skipped" in " ".join(table.notes)
    assert column(table, table.rows, "same values") == ["yes"] * len(methods)  # fxcapture = hooks, every step
    assert all(float(v) > 0 for v in column(table, table.rows, "tokens/s"))
    assert "gpt2 tiny" in (tmp_path / "generate.md").read_text()


def test_peers_quick_without_torchlens():
    table = peers.main(QUICK + ["--no-torchlens"])[0]
    assert table.headers == peers.HEADERS
    for prefix in ("resnet50", "vit_small"):
        rows = rows_of(table, prefix)
        assert column(table, rows, "method") == peers.METHODS[:-1]
        values = dict(zip(column(table, rows, "method"), column(table, rows, "same values")))
        assert all(values[m] == "yes" for m in ("plain", "fxcapture", "torchvision", "hooks"))
        assert all(float(p) > 0 for p in column(table, rows, "peak MiB")[:4])  # memory, not time
    vit_get_local = rows_of(table, "vit_small")[4]
    assert vit_get_local[-1] == "yes"  # the attention maps, as locals
    resnet_get_local = rows_of(table, "resnet50")[4]
    assert resnet_get_local[-1].startswith("n/a")  # locals only: resnet50 captures module outputs


@pytest.mark.slow
def test_peers_torchlens_worker_in_its_own_process():
    # importing torchlens wraps torch functions for the whole process: never here
    if not peers.torchlens_installed():
        pytest.skip("torchlens is not installed (optional extra `bench`)")
    spec = {"workload": "vit", "batch_size": 1, "quick": True, "device": "cpu", "rounds": 1, "threads": 1}
    root = Path(peers.__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--torchlens-worker", json.dumps(spec)],
        capture_output=True, text=True, cwd=root, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_values"] == "yes"
    float(result["ratio"])  # reported, never asserted

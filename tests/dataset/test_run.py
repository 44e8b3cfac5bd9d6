"""``fxcapture.extract`` over datasets, checked against plain loops (forward hooks and
a manual forward, numpy), a killed and resumed subprocess, memory of a 10x larger run,
and the ``fxcapture extract`` command line."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxcapture
from conftest import SUBPROCESS_ENV, hook_values, kill_after_chunks
from fxcapture import cli
from fxcapture.dataset.reduce import resolve_reducers
from fxcapture.dataset.sources import SyntheticImages
from fxcapture.cli.models import TinyViT, build_model
from fxcapture.dataset.storage import Column, TokenColumn, UnfinishedOutputError, complete_chunks

ROOT = Path(__file__).resolve().parents[2]


def tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(image_size=32).eval()


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


# -- an independent reference: hooks, a manual attention map, numpy ---------------------
def vit_reference(model: TinyViT, x: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Per batch: block 1's output (hook) mean over tokens, every attention map computed by
    hand from the attention module's input, the model output."""
    rows: dict[str, list] = {"output": [], "blocks.1": []}
    rows.update({f"blocks.{i}.attn:attn": [] for i in range(len(model.blocks))})
    seen: dict = {}
    handles = [model.blocks[1].register_forward_hook(lambda m, a, out: seen.__setitem__("b1", out))]
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])))
    try:
        with torch.no_grad():
            for b in x.split(batch_size):
                rows["output"].append(model(b).numpy())
                rows["blocks.1"].append(seen["b1"].mean(1).numpy())
                for i, block in enumerate(model.blocks):
                    a, h = seen[i], block.attn.heads
                    B, N, C = a.shape
                    q, k, _ = block.attn.qkv(a).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
                    attn = (q @ k.transpose(-2, -1) / math.sqrt(C // h)).softmax(-1)
                    rows[f"blocks.{i}.attn:attn"].append(attn.flatten(1).numpy())
    finally:
        for handle in handles:
            handle.remove()
    return {k: np.concatenate(v) for k, v in rows.items()}


def test_values_equal_a_plain_loop(tmp_path):
    model, x = tiny_vit(), images(23)
    feats = fxcapture.extract(
        model, ["blocks.1", "attn"], x, out=tmp_path / "o", reduce={"blocks.1": "mean", "attn": "flatten"},
        output=True, batch_size=5, chunk_size=7,
    )  # fmt: skip
    expected = vit_reference(model, x, batch_size=5)
    attn = [f"blocks.{i}.attn:attn" for i in range(4)]
    assert list(feats) == ["output", *attn[:2], "blocks.1", *attn[2:]]  # execution order
    for key, value in expected.items():
        assert isinstance(feats[key], Column) and isinstance(feats[key][:7], np.memmap)  # one chunk: a map
        np.testing.assert_allclose(feats[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["rows"] == 23 and manifest["names"] == list(feats)
    assert manifest["arrays"]["blocks.1"]["shape"] == [23, 96]
    assert manifest["arrays"]["blocks.0.attn:attn"]["dtype"] == "<f4"
    assert [c["rows"] for c in manifest["chunks"]] == [[0, 7], [7, 14], [14, 21], [21, 23]]
    assert not (tmp_path / "o" / "run.json").exists()


def test_resnet_dataloader_of_image_label_pairs_equals_hooks(resnet18, tmp_path):
    x, y = images(10, 64), torch.arange(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    feats = fxcapture.extract(resnet18, ["layer4", "layer2"], loader, out=tmp_path / "o",
                              reduce={"layer4": "mean", "layer2": "max"}, dtype="float16")  # fmt: skip
    expected: dict = {"layer4": [], "layer2": []}
    handles = [resnet18.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: expected[p].append(o))
               for p in expected]  # fmt: skip
    with torch.no_grad():
        for b, _ in loader:
            resnet18(b)
    for h in handles:
        h.remove()
    mean = torch.cat(expected["layer4"]).mean((2, 3)).half().numpy()
    amax = torch.cat(expected["layer2"]).amax((2, 3)).half().numpy()
    assert feats["layer4"].dtype == np.float16 and feats["layer4"].shape == (10, 512)
    np.testing.assert_array_equal(feats["layer4"], mean)
    np.testing.assert_array_equal(feats["layer2"], amax)
    assert resnet18.training is False


def test_cls_callable_and_dict_batches_with_inputs(tmp_path):
    model, x = tiny_vit(), images(9)
    batches = [{"pixels": b, "label": torch.zeros(len(b))} for b in x.split(4)]  # an iterable of dicts
    feats = fxcapture.extract(
        model, {"last": "blocks.3", "tokens": "blocks.0"}, batches, out=tmp_path / "o",
        reduce={"last": "cls", "tok*": lambda v: v[:, 1:3].sum(1)}, inputs=lambda b: (b["pixels"],),
    )  # fmt: skip
    seen: dict = {"blocks.3": [], "blocks.0": []}
    handles = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen[p].append(o)) for p in seen]
    with torch.no_grad():
        for b in x.split(4):
            model(b)
    for h in handles:
        h.remove()
    np.testing.assert_array_equal(feats["last"], torch.cat(seen["blocks.3"])[:, 0].numpy())
    np.testing.assert_array_equal(feats["tokens"], torch.cat(seen["blocks.0"])[:, 1:3].sum(1).numpy())


def test_untraceable_model_through_the_fallback_equals_output_attentions(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 100, (6, 8), generator=torch.Generator().manual_seed(0))
    feats = fxcapture.extract(model, ["attn_weights", "transformer.h.1"], [{"input_ids": b} for b in ids.split(4)],
                              out=tmp_path / "o", reduce={"attn_weights": "flatten", "transformer.**": "mean"})  # fmt: skip
    block = []
    model.transformer.h[1].register_forward_hook(lambda m, a, o: block.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        ref = model(ids, output_attentions=True)
    np.testing.assert_allclose(feats["transformer.h.1"], block[0].mean(1).numpy(), rtol=1e-6, atol=1e-6)
    for i in range(2):
        np.testing.assert_allclose(feats[f"transformer.h.{i}.attn:attn_weights"], ref.attentions[i].flatten(1).numpy(),
                                   rtol=1e-6, atol=1e-7)  # fmt: skip


def test_training_flags_are_restored_and_the_model_is_not_rewired(tmp_path):
    model = tiny_vit().train()
    forward = type(model).forward
    fxcapture.extract(model, "blocks.0", images(4), out=tmp_path / "o", reduce="mean", batch_size=2)
    assert all(m.training for m in model.modules())
    assert type(model).forward is forward and not model._forward_hooks


# -- Ctrl-C, resume, kill ---------------------------------------------------------------
class interrupted(list):
    """The batches of ``x`` (a list: it can be read again), whose first reading raises
    KeyboardInterrupt once ``after`` batches went out."""

    def __init__(self, x: torch.Tensor, after: int):
        super().__init__(x.split(2))
        self.after = after

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if i == self.after:
                raise KeyboardInterrupt
            yield b


def test_ctrl_c_leaves_complete_chunks_and_resume_fills_the_rest(tmp_path):
    model, x = tiny_vit(), images(14)
    kw = dict(out=tmp_path / "o", reduce="mean", chunk_size=4, data_name="x")
    with pytest.raises(KeyboardInterrupt):
        fxcapture.extract(model, "blocks.1", interrupted(x, after=5), **kw)  # 10 rows were computed
    # the 10 rows computed before Ctrl-C are written whole: full chunks and the partial one
    assert [(c.start, c.stop) for c in complete_chunks(tmp_path / "o")] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(UnfinishedOutputError, match="10 rows in complete chunks"):
        fxcapture.load(tmp_path / "o")
    ran = []
    count = lambda m, a: ran.append(a[0].shape[0]) if isinstance(a[0], torch.Tensor) else None  # noqa: E731
    model.patch_embed.register_forward_pre_hook(count)  # a leaf: the extractor calls it
    feats = fxcapture.extract(model, "blocks.1", list(x.split(2)), **kw)
    assert sum(ran) == 4, "rows 0-9 are stored: only the 4 rows after them run again"
    reference = fxcapture.extract(model, "blocks.1", x, out=tmp_path / "ref", reduce="mean", batch_size=2)
    np.testing.assert_array_equal(feats["blocks.1"], reference["blocks.1"])


def test_a_finished_output_is_returned_without_running(tmp_path):
    model, x = tiny_vit(), images(6)
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean")
    stamp = (tmp_path / "o" / "manifest.json").stat().st_mtime_ns
    ran = []
    model.patch_embed.register_forward_pre_hook(lambda m, a: ran.append(1) if isinstance(a[0], torch.Tensor) else None)
    feats = fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean")
    assert not ran and feats["blocks.1"].shape == (6, 96)
    assert (tmp_path / "o" / "manifest.json").stat().st_mtime_ns == stamp


SCRIPT = '''
import sys, time
import torch
from torch.utils.data import Dataset
import fxcapture
from fxcapture.cli.models import TinyViT

N = 64


class SlowImages(Dataset):
    fetched = 0

    def __init__(self, delay=0.0):
        self.delay = delay

    def __len__(self):
        return N

    def __getitem__(self, i):
        time.sleep(self.delay)
        SlowImages.fetched += 1
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))


def run(out, delay=0.0):
    torch.manual_seed(0)
    model = TinyViT(image_size=32).eval()
    return fxcapture.extract(model, ["blocks.1", "blocks.2"], SlowImages(delay), out=out, reduce="mean",
                             batch_size=4, chunk_size=8, data_name="slow images")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], float(sys.argv[2]))
'''


def test_kill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = tmp_path / "o"
    kill_after_chunks([sys.executable, str(script), str(out), "0.03"], out, 3, SUBPROCESS_ENV)
    chunks = complete_chunks(out)
    stored = sum(c.stop - c.start for c in chunks)
    assert 24 <= stored < 64 and not (out / "manifest.json").exists()
    with pytest.raises(UnfinishedOutputError, match=f"{stored} of 64 rows"):
        fxcapture.load(out)

    job = runpy.run_path(str(script))
    resumed = job["run"](out)
    fingerprint = 9  # the identity hashes 8 items of the dataset, one of them read twice
    assert job["SlowImages"].fetched == 64 - stored + fingerprint, "only rows without a complete chunk are loaded again"
    reference = job["run"](tmp_path / "ref")
    for key in ("blocks.1", "blocks.2"):
        assert resumed[key].shape == (64, 96)
        np.testing.assert_array_equal(resumed[key], reference[key])
    assert len(np.unique(resumed["blocks.1"], axis=0)) == 64  # no duplicated rows


MEMORY = '''
import sys
import tempfile

import torch
import fxcapture
from fxcapture.dataset.sources import SyntheticImages
from benchmarks.extract import peak_above_start  # RSS sampled every millisecond

torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
kept = []


def keep_all(n):  # the control: the usual loop, every row kept in memory
    loader = torch.utils.data.DataLoader(SyntheticImages(n, (3, 32, 32)), batch_size=50)
    with torch.no_grad():
        for x, _ in loader:
            kept.append(model[0](x).flatten(1).numpy())


def stream(n):
    fxcapture.extract(model, ["0"], SyntheticImages(n, (3, 32, 32)), out=tempfile.mkdtemp(),
                      reduce="flatten", batch_size=50, chunk_size=100, progress=False)


run = {"extract": stream, "keep": keep_all}[sys.argv[1]]
print(*[peak_above_start(lambda: run(n)) for n in (300, 3000)])
'''


def test_peak_memory_does_not_grow_with_the_number_of_samples(tmp_path):
    """Peak RSS during a run of 300 and of 3000 samples (24 MiB more features if kept).
    The control, a loop keeping every row, shows that the measurement sees such growth."""
    script = tmp_path / "mem.py"
    script.write_text(MEMORY)
    extra = 2700 * 8 * 32 * 32 * 4  # bytes of the 2700 extra rows
    peaks = {}
    for mode in ("extract", "keep"):
        done = subprocess.run([sys.executable, str(script), mode], env=SUBPROCESS_ENV, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        peaks[mode] = tuple(map(int, done.stdout.split()[-2:]))
    mib = {k: [f"{v / 2**20:.1f} MiB" for v in p] for k, p in peaks.items()}
    assert peaks["keep"][1] - peaks["keep"][0] > 0.5 * extra, f"the control should grow with the rows it keeps: {mib}"
    assert peaks["extract"][1] - peaks["extract"][0] < 0.15 * extra, f"extract's peak grows with the samples: {mib}"
    # one-time costs (tracing, the writer thread, the loader) weigh the same in both loops
    assert peaks["extract"][1] < peaks["keep"][0] + 0.15 * extra, f"extract holds a large part of the rows: {mib}"


# -- errors and options -------------------------------------------------------------------
def test_existing_output_of_another_configuration(tmp_path):
    model, x = tiny_vit(), images(4)
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean")
    with pytest.raises(FileExistsError, match=r"another configuration \(reduce: 'mean' there, 'cls' now\)"):
        fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="cls")
    torch.nn.init.zeros_(model.head.weight)
    with pytest.raises(FileExistsError, match="model_fingerprint"):
        fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean")
    feats = fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="cls", overwrite=True)
    assert feats["blocks.1"].shape == (4, 96)


def test_unknown_name_and_bad_reducers_fail_before_writing(tmp_path):
    model, x = tiny_vit(), images(4)
    with pytest.raises(ValueError, match="'block.1' is not a module of TinyViT. Did you mean 'blocks.1'"):
        fxcapture.extract(model, "block.1", x, out=tmp_path / "a")
    with pytest.raises(ValueError, match="reduce has 'layer4', which selects none"):
        fxcapture.extract(model, "blocks.1", x, out=tmp_path / "b", reduce={"layer4": "mean"})
    with pytest.raises(ValueError, match="unknown reducer 'avg'"):
        fxcapture.extract(model, "blocks.1", x, out=tmp_path / "c", reduce="avg")
    assert not any((tmp_path / d).exists() for d in "abc")
    with pytest.raises(ValueError, match=r"first dimension is not the batch"):
        fxcapture.extract(model, "blocks.1", x, out=tmp_path / "d", reduce=lambda v: v.sum())
    # a run that failed before its first chunk is simply started again
    feats = fxcapture.extract(model, "blocks.1", x, out=tmp_path / "d", reduce="mean")
    assert feats["blocks.1"].shape == (4, 96)


def test_reducers_by_capture_selector():
    keys = ["blocks.0.attn:attn", "blocks.1.attn:attn", "blocks.1", "output"]
    catalogue = fxcapture.capture(tiny_vit(), "attn").catalogue
    table = resolve_reducers({"attn": "flatten", "blocks.?": "mean"}, keys, catalogue)
    assert table["blocks.0.attn:attn"].__name__ == "reduce_flatten"
    assert table["blocks.1"].__name__ == "reduce_mean" and table["output"] is None


def test_progress_bar_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    model, x = tiny_vit(), images(6)
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "a", reduce="mean", batch_size=2)
    assert capsys.readouterr().err == ""  # not a terminal: a log line every 30 s, none in a short run
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "b", reduce="mean", batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "6/6" in err and "samples/s" in err


# -- one row per token ------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    """Embedding and two tanh layers over ``input_ids`` (the mask is for the reducers)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(2)])

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h


def text_batches(n_batches, side, seed=0):
    """Dict batches of 3 sequences of 1-7 real tokens, padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        lengths = torch.randint(1, 8, (3,), generator=g)
        ids, mask = torch.zeros(3, 7, dtype=torch.long), torch.zeros(3, 7, dtype=torch.long)
        for i, n in enumerate(lengths.tolist()):
            cols = slice(0, n) if side == "right" else slice(7 - n, 7)
            ids[i, cols] = torch.randint(1, 50, (n,), generator=g)
            mask[i, cols] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokens_are_the_models_hidden_states_at_exactly_the_real_tokens(tmp_path, side):
    model, batches = TinyLM().eval(), text_batches(5, side)
    feats = fxcapture.extract(model, ["layers.0", "layers.1"], batches, out=tmp_path / "o", reduce="tokens",
                              chunk_size=4, dtype="bfloat16")  # fmt: skip
    expected, ids, positions = {0: [], 1: []}, [], []
    with torch.no_grad():  # the reference: forward hooks, then the mask picks the real tokens
        for b in batches:
            _, seen = hook_values(model, ["layers.0", "layers.1"], **b)
            real = b["attention_mask"].bool()
            for i in (0, 1):
                for row in range(3):
                    expected[i].append(seen[f"layers.{i}"][0][row][real[row]].bfloat16().float().numpy())
            for row in range(3):
                ids.append(b["input_ids"][row][real[row]].numpy())
                positions.append(np.arange(int(real[row].sum())))
    col = feats["layers.1"]
    assert isinstance(col, TokenColumn) and col.samples == 15 and col.shape == (sum(map(len, ids)), 16)
    for i in (0, 1):
        np.testing.assert_array_equal(feats[f"layers.{i}"][:], np.concatenate(expected[i]))
        for row in range(15):
            np.testing.assert_array_equal(feats[f"layers.{i}"].sample(row), expected[i][row])
    for row in range(15):
        np.testing.assert_array_equal(feats["input_ids"].sample(row), ids[row])
        np.testing.assert_array_equal(feats["positions"].sample(row), positions[row])
    batch = next(iter(feats.loader("layers.1", batch_size=8, seed=0)))
    assert batch.dtype == torch.bfloat16 and batch.shape == (8, 16)


class CountedTexts(torch.utils.data.Dataset):
    """30 sequences of 1-7 tokens; ``interrupt_at``: the item fetch that raises KeyboardInterrupt."""

    def __init__(self, interrupt_at=None):
        self.items = [(b["input_ids"][r], b["attention_mask"][r]) for b in text_batches(10, "right", seed=3)
                      for r in range(3)]  # fmt: skip
        self.calls, self.interrupt_at = 0, interrupt_at

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.items[i]


def collate(items):
    return {"input_ids": torch.stack([i for i, _ in items]), "attention_mask": torch.stack([m for _, m in items])}


def test_a_token_budget_stops_at_its_size_and_resume_continues_it(tmp_path):
    model, budget = TinyLM().eval(), 40
    run = lambda data, out: fxcapture.extract(  # noqa: E731
        model, ["layers.1"], DataLoader(data, batch_size=3, collate_fn=collate), out=out, reduce="tokens",
        chunk_size=3, max_tokens=budget, data_name="texts")  # fmt: skip
    reference = run(CountedTexts(), tmp_path / "ref")["layers.1"]
    lengths = torch.stack([m for _, m in CountedTexts().items]).sum(1)
    per_batch = lengths.view(-1, 3).sum(1).cumsum(0)
    batches = int((per_batch < budget).sum()) + 1  # the batch that reaches the budget is the last
    assert reference.samples == 3 * batches and len(reference) == int(per_batch[batches - 1]) >= budget
    with pytest.raises(KeyboardInterrupt):  # 9 fetches for the identity, then the 3rd batch
        run(CountedTexts(interrupt_at=9 + 2 * 3 + 2), tmp_path / "o")
    assert 0 < sum(c.stop - c.start for c in complete_chunks(tmp_path / "o")) < reference.samples
    resumed = run(CountedTexts(), tmp_path / "o")["layers.1"]
    np.testing.assert_array_equal(resumed[:], reference[:])
    np.testing.assert_array_equal(resumed.offsets, reference.offsets)
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["tokens"] == len(reference)


# -- command line -----------------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    return cli.main(["extract", *argv, "--no-progress"])


def test_cli_synthetic_data(tmp_path, capsys):
    rc = run_cli("--model", "demo:vit", "--names", "blocks.3", "--reduce", "cls", "--data", "synthetic:6",
                 "--out", str(tmp_path / "o"), "--batch-size", "4", "--output")
    assert rc == 0
    assert "wrote 6 rows" in capsys.readouterr().out
    torch.manual_seed(0)  # the command line's random weights come from --seed 0
    model = build_model("demo:vit")
    data = SyntheticImages(6, (3, 64, 64))
    x = torch.stack([data[i][0] for i in range(6)])
    assert torch.equal(x[3], torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3)))
    seen = []
    model.blocks[3].register_forward_hook(lambda m, a, o: seen.append(o[:, 0]))
    with torch.no_grad():
        out = torch.cat([model(b) for b in x.split(4)])
    feats = fxcapture.load(tmp_path / "o")
    np.testing.assert_allclose(feats["output"], out.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["blocks.3"], torch.cat(seen).numpy(), rtol=1e-5, atol=1e-6)


def test_cli_image_folder(tmp_path):
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    paths = []
    for cls, sizes in (("cat", [(40, 50), (48, 48)]), ("dog", [(60, 36), (33, 45), (50, 41)])):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            paths.append(tmp_path / "imgs" / cls / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    rc = run_cli("--model", "torchvision:resnet18", "--names", "layer4", "layer3", "--reduce", "layer3=max",
                 "--reduce", "mean", "--data", str(tmp_path / "imgs"), "--image-size", "32",
                 "--num-workers", "0", "--out", str(tmp_path / "o"))  # fmt: skip
    assert rc == 0
    feats = fxcapture.load(tmp_path / "o")
    # reference: the same preprocessing written out, the model's own forward with hooks
    prep = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])  # fmt: skip
    x = torch.stack([prep(Image.open(p).convert("RGB")) for p in paths])  # classes, then files, sorted
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18")
    seen = {}
    model.layer3.register_forward_hook(lambda m, a, o: seen.__setitem__("layer3", o))
    model.layer4.register_forward_hook(lambda m, a, o: seen.__setitem__("layer4", o))
    with torch.no_grad():
        model(x)
    assert list(feats) == ["layer3", "layer4"] and feats["layer4"].shape == (5, 512)  # execution order
    np.testing.assert_allclose(feats["layer4"], seen["layer4"].mean((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["layer3"], seen["layer3"].amax((2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["model"] == "torchvision:resnet18" and manifest["config"]["data_fingerprint"]["files"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet50"], "bad model spec 'resnet50'"),
        (["--model", "torchvision:resnet5"], "unknown torchvision model 'resnet5'"),
        (["--names", "layer5"], "'layer5' is not a capturable name"),
        (["--data", "nowhere/"], "no such folder"),
        (["--data", "synthetic:x"], "synthetic:N"),
        (["--reduce", "avg"], "unknown reducer 'avg'"),
    ],
)
def test_cli_errors(tmp_path, capsys, argv, message):
    args = {"--model": "torchvision:resnet18", "--names": "layer4", "--data": "synthetic:2",
            "--out": str(tmp_path / "o"), "--image-size": "32"}  # fmt: skip
    args.update(dict(zip(argv[::2], argv[1::2])))
    assert run_cli(*[x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxcapture extract: error:") and message in err


def test_cli_existing_output_of_another_configuration(tmp_path, capsys):
    base = ["--model", "demo:vit", "--data", "synthetic:2", "--out", str(tmp_path / "o")]
    assert run_cli(*base, "--names", "blocks.0", "--reduce", "mean") == 0
    assert run_cli(*base, "--names", "blocks.1", "--reduce", "mean") == 2
    err = capsys.readouterr().err
    assert "another configuration (names: ['blocks.0'] there, ['blocks.1'] now)" in err and "--overwrite" in err
    assert run_cli(*base, "--names", "blocks.1", "--reduce", "mean", "--overwrite") == 0
    assert list(fxcapture.load(tmp_path / "o")) == ["blocks.1"]


# -- the benchmark script ---------------------------------------------------------------------
def test_benchmark_script_runs_at_tiny_sizes(capsys):
    from benchmarks import extract as bench

    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--arch", "resnet18", "--samples", "4", "--rounds", "1", "--device", "cpu",
                    "--threads", "1", "--no-memory"])  # fmt: skip
        bench.main(["--rss-child", "extract", "4", "--arch", "resnet18", "--rss-image-size", "32"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert rows[:3] == ["bare", "hooks", "extract"]
    assert "| yes " in out and "| NO " not in out and "extract x bare" in out
    assert int(out.split()[-1]) >= 0  # the child's peak resident bytes during its loop


def test_image_search_example_stores_hook_values_and_reuses_a_finished_output(tmp_path):
    import importlib.util

    import torchvision

    spec = importlib.util.spec_from_file_location("image_search", ROOT / "examples" / "image_search.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder = example.synthetic_folder(tmp_path / "images", per_class=4)
    result = example.main([str(folder), "--out", str(tmp_path / "feats")])
    assert result["agreement"] > 0.5  # colour classes are apart even with random weights
    # reference: the same images through the plain model with a hook
    dataset = result["dataset"]
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    seen = []
    model.layer4.register_forward_hook(lambda m, a, o: seen.append(o.mean((2, 3))))
    with torch.no_grad():
        model(x)
    np.testing.assert_allclose(result["features"]["layer4"], seen[0].numpy(), rtol=1e-4, atol=1e-5)
    manifest = tmp_path / "feats" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    example.main([str(folder), "--out", str(tmp_path / "feats")])  # finished: not run again
    assert manifest.stat().st_mtime_ns == before

"""The text examples at tiny sizes, against the eager model (no fxcapture in the reference)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fxcapture.dataset.text import synthetic_texts

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_ids(text: str) -> torch.Tensor:
    return torch.tensor([[b + 1 for b in text.encode("utf-8")]])  # 257 ids, 0 pads


def test_help_answers_without_running(capsys):
    for name in ("sentence_embeddings", "token_probe"):
        with pytest.raises(SystemExit) as exit_:
            example(name).main(["--help"])
        assert exit_.value.code == 0 and "--out" in capsys.readouterr().out


def test_sentence_embeddings_are_masked_means_and_a_rerun_reuses_the_output(tmp_path, capsys):
    module = example("sentence_embeddings")
    argv = ["--out", str(tmp_path / "e"), "--layers", "1", "--width", "32", "--query", "the moon", "--k", "2"]
    result = module.main(argv)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=1,
                                     intermediate_size=128, vocab_size=257)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # each sentence alone: no padding at all
        alone = [model(byte_ids(t), output_hidden_states=True).hidden_states[1][0].mean(0) for t in result["texts"]]
        query = model(byte_ids("the moon"), output_hidden_states=True).hidden_states[1][0].mean(0)
    np.testing.assert_allclose(result["embeddings"], torch.stack(alone).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result["query"], query.numpy(), rtol=1e-4, atol=1e-5)
    x = np.stack([a.numpy() for a in alone])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    for i, row in enumerate(result["neighbours"]):  # the nearest, by cosine (ties aside)
        np.testing.assert_allclose(similarity[i, row], np.sort(similarity[i])[::-1][:2], rtol=1e-4)
    manifest = tmp_path / "e" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = module.main(argv)
    assert again["state"] == "finished" and manifest.stat().st_mtime_ns == before
    np.testing.assert_array_equal(again["embeddings"], result["embeddings"])


def test_sentence_embeddings_without_out_leave_no_temporary_files(tmp_path, monkeypatch):
    # a temporary folder of this test's own: a suite running beside this one (CI runs two
    # Pythons side by side) makes and removes its own in the shared one meanwhile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = example("sentence_embeddings")
    made = []
    real = tempfile.TemporaryDirectory

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "TemporaryDirectory", recording)
    result = module.main(["--layers", "1", "--width", "32"])
    assert result["embeddings"].shape == (18, 32)
    assert [Path(d.name).parent for d in made] == [tmp_path]  # the example used one, here
    assert list(tmp_path.glob("fxcapture-sentences-*")) == []


def test_token_probe_trains_on_the_stored_tokens(tmp_path):
    module = example("token_probe")
    result = module.main(["--out", str(tmp_path / "t"), "--documents", "6", "--layers", "2", "--layer", "0",
                          "--width", "32", "--steps", "30", "--batch-size", "64", "--features", "32"])  # fmt: skip
    feats, data = result["feats"], result["data"]
    column = feats["h.0"]
    texts = synthetic_texts(6)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=1, vocab_size=257, n_positions=256,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    for i in range(column.samples):  # right padding: each window as if alone; stored in bfloat16
        d, s, n = data.documents[i], data.starts[i], data.lengths[i]
        ids = byte_ids(texts[d])[:, s : s + n]
        with torch.no_grad():
            expected = model(ids, output_hidden_states=True).hidden_states[1][0]
        np.testing.assert_allclose(column.sample(i), expected.bfloat16().float().numpy(), rtol=2e-2, atol=2e-2)
        assert feats["input_ids"].sample(i).tolist() == ids[0].tolist()
    losses = result["sae"]["losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])  # it learns
    assert 0 <= result["probe"]["accuracy"] <= 1

"""``fxcapture extract`` over text and its errors.

References: the model built again with transformers directly (same seed), documents
tokenized by hand (bytes written out) or by the saved tokenizer itself, batches padded
in the test, hidden states from ``output_hidden_states=True`` masked by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fxcapture
from fxcapture import cli
from fxcapture.dataset.text import synthetic_texts

transformers = pytest.importorskip("transformers")

GPT2 = "n_layer=2,n_embd=64,n_head=2,vocab_size=100,n_positions=64,bos_token_id=1,eos_token_id=2"


def run_cli(*argv: str) -> int:
    return cli.main(["extract", *argv, "--no-progress"])


def byte_ids(text: str, vocab: int = 100) -> list[int]:
    """The byte tokenizer written out: id 0 pads, byte b is 1 + b % (vocab - 1)."""
    return [1 + b % (vocab - 1) for b in text.encode("utf-8")]


def hidden(model, rows: list[list[int]], side: str, layer: int) -> list[torch.Tensor]:
    """Layer ``layer``'s output at the real tokens of ``rows`` padded (with 0) on ``side``."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols], mask[i, cols] = torch.tensor(r), 1
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer + 1]
    return [states[i][mask[i].bool()] for i in range(len(rows))]


@pytest.mark.parametrize("side", ["right", "left"])
def test_hf_config_text_windows_sorted_equal_the_model_on_the_same_batches(tmp_path, capsys, side):
    docs = synthetic_texts(9, seed=1, max_words=12)
    (tmp_path / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    rc = run_cli("--model", "hf-config:gpt2", "--config-overrides", GPT2, "--names", "h.0", "h.1",
                 "--reduce", "h.0=mean", "--reduce", "last", "--data", str(tmp_path / "corpus.txt"),
                 "--max-length", "24", "--stride", "16", "--sort-batches", "2", "--batch-size", "3",
                 "--padding-side", side, "--out", str(out))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    feats = fxcapture.load(out)
    samples = np.load(out / "text_samples.npy")  # per row: document, first token, length
    encoded = [byte_ids(d) for d in docs]
    rows = [encoded[d][s : s + n] for d, s, n in samples]
    assert sorted((d, s) for d, s, _ in samples) == sorted(  # every window of every document, once
        (d, s) for d, ids in enumerate(encoded) for s in range(0, max(len(ids) - 8, 1), 16)
    )
    for lo in range(0, len(rows), 6):  # sorted by length within windows of 2 batches
        assert list(samples[lo : lo + 6, 2]) == sorted(samples[lo : lo + 6, 2], reverse=True)
    torch.manual_seed(0)  # the command line's weights: --seed 0
    config = transformers.AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                               n_positions=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = transformers.AutoModel.from_config(config).eval()
    for lo in range(0, len(rows), 3):  # the batches, padded here
        batch = rows[lo : lo + 3]
        first = hidden(model, batch, side, 0)
        for i, tokens in enumerate(first):
            np.testing.assert_allclose(feats["h.0"][lo + i], tokens.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    # h.1 is the last layer: hidden_states[2] has ln_f on top, so compare with hooks instead
    seen = []
    model.h[1].register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
    for lo in range(0, len(rows), 3):
        hidden(model, rows[lo : lo + 3], side, 0)
    last = []
    for lo, value in zip(range(0, len(rows), 3), seen):
        for i, r in enumerate(rows[lo : lo + 3]):
            last.append(value[i, len(r) - 1] if side == "right" else value[i, -1])
    np.testing.assert_allclose(feats["h.1"], torch.stack(last).numpy(), rtol=1e-4, atol=1e-5)


def test_token_store_in_bfloat16_with_a_token_budget(tmp_path, capsys):
    docs = synthetic_texts(8, seed=5, max_words=8)
    (tmp_path / "c.txt").write_text("\n".join(docs), encoding="utf-8")
    argv = ["--model", "hf-config:gpt2", "--config-overrides", GPT2, "--names", "h.0", "--reduce", "tokens",
            "--dtype", "bfloat16", "--data", str(tmp_path / "c.txt"), "--batch-size", "2", "--out", str(tmp_path / "o")]
    assert run_cli(*argv, "--max-tokens", "60") == 0, capsys.readouterr().err
    feats = fxcapture.load(tmp_path / "o")
    samples = np.load(tmp_path / "o" / "text_samples.npy")
    column = feats["h.0"]
    assert len(samples) == column.samples < len(docs) and 60 <= len(column)  # stopped after the batch reaching 60
    assert column.lengths.tolist() == samples[:, 2].tolist() == [len(byte_ids(docs[d])) for d in samples[:, 0]]
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                               n_positions=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = transformers.AutoModel.from_config(config).eval()
    rows = [byte_ids(docs[d]) for d in samples[:, 0]]
    expected = torch.cat([t for lo in range(0, len(rows), 2) for t in hidden(model, rows[lo : lo + 2], "right", 0)])
    assert column.raw[:].dtype == np.uint16  # bfloat16 bits
    np.testing.assert_array_equal(column[:], expected.bfloat16().float().numpy())
    assert feats["input_ids"][:].tolist() == [t for r in rows for t in r]


def save_bert_with_tokenizer(folder):
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted({w for d in synthetic_texts(30) for w in d.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                                     vocab_size=len(vocab), max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(1)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_hf_folder_with_its_tokenizer_and_a_jsonl_text_field(tmp_path, capsys):
    model, tokenizer = save_bert_with_tokenizer(tmp_path / "bert")
    docs = synthetic_texts(7, seed=2, max_words=30)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    rc = run_cli("--model", f"hf:{tmp_path / 'bert'}", "--names", "encoder.layer.0", "--reduce", "mean",
                 "--data", str(tmp_path / "d.jsonl"), "--text-field", "body", "--max-length", "20",
                 "--batch-size", "4", "--out", str(tmp_path / "o"))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    feats = fxcapture.load(tmp_path / "o")
    assert feats["encoder.layer.0"].shape == (7, 64)
    for i, doc in enumerate(docs):  # right padding: each document as if alone, truncated to 20
        ids = torch.tensor([tokenizer(doc)["input_ids"][:20]])
        with torch.no_grad():
            alone = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        np.testing.assert_allclose(feats["encoder.layer.0"][i], alone.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_parquet_text(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = ["a short one", "", "something longer than the first"]
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    rc = run_cli("--model", "hf-config:gpt2", "--config-overrides", GPT2, "--names", "h.0", "--reduce", "first",
                 "--data", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    feats = fxcapture.load(tmp_path / "o")
    assert np.load(tmp_path / "o" / "text_samples.npy")[:, 0].tolist() == [0, 2]  # the empty document: no row
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                               n_positions=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = transformers.AutoModel.from_config(config).eval()
    first = [rows[0] for rows in hidden(model, [byte_ids(docs[0]), byte_ids(docs[2])], "right", 0)]
    np.testing.assert_allclose(feats["h.0"], torch.stack(first).numpy(), rtol=1e-4, atol=1e-5)


# -- errors: exit 2, one line, no traceback ----------------------------------------------------
def errors_of(capsys, *argv: str) -> str:
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err  # transformers may draw a "Loading weights" bar before
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("fxcapture extract: error:") and "Traceback" not in err, err
    return last


IMAGES = ["--model", "demo:vit", "--names", "blocks.0", "--data", "synthetic:2"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "tpu"], "--device 'tpu' is not a device: use cpu, cuda"),
        (["--device", "xla"], "no xla device is available here"),
        (["--model", "hf-config:gtp2"], "unknown hf-config model 'gtp2'. Did you mean hf-config:gpt2"),
        (["--model", "hf-config:gpt2", "--config-overrides", "n_layr=2"], "no 'n_layr' (did you mean n_layer?)"),
        (["--model", "hf-config:gpt2", "--config-overrides", "n_layer"], "'n_layer' is not KEY=VALUE"),
        (["--config-overrides", "depth=2"], "--config-overrides applies to hf-config: models"),
        (["--model", "hf:nowhere"], "no config.json in nowhere"),
        (["--model", "hf:"], "bad model spec 'hf:'"),
        (["--model", "gpt2"], "bad model spec 'gpt2'"),
        (["--data", "synthetic-text:3"], "TinyViT is not a transformers language model"),
        (["--data", "corpus.csv"], "no such folder"),
        (["--model", "hf-config:gpt2", "--config-overrides", GPT2, "--data", "missing.txt"],
         "'missing.txt': no such file"),
    ],
)
def test_errors(tmp_path, capsys, argv, message):
    args = dict(zip(IMAGES[::2], IMAGES[1::2]), **{"--out": str(tmp_path / "o")})
    args.update(dict(zip(argv[::2], argv[1::2])))
    assert message in errors_of(capsys, *[x for kv in args.items() for x in kv])


def test_text_window_errors(tmp_path, capsys):
    base = ["--model", "hf-config:gpt2", "--config-overrides", GPT2, "--names", "h.0", "--out", str(tmp_path / "o")]
    assert "stride must be between 1 and max_length (8)" in errors_of(
        capsys, *base, "--data", "synthetic-text:3", "--max-length", "8", "--stride", "9"
    )
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    assert "d.jsonl:2 has no field 'text' (it has ['body']): pass --text-field" in errors_of(
        capsys, *base, "--data", str(tmp_path / "d.jsonl")
    )
    model, _ = save_bert_with_tokenizer(tmp_path / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "bert" / name).unlink(missing_ok=True)
    err = errors_of(capsys, "--model", f"hf:{tmp_path / 'bert'}", "--names", "encoder.layer.0", "--data",
                    "synthetic-text:2", "--out", str(tmp_path / "o2"))  # fmt: skip
    assert "holds no tokenizer" in err and "tokenizer.save_pretrained(PATH)" in err


@pytest.mark.parametrize("size", ["0", "-5"])
def test_image_size_must_be_positive(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_:
        run_cli(*IMAGES, "--image-size", size, "--out", str(tmp_path / "o"))
    assert exit_.value.code == 2
    assert f"argument --image-size: must be a positive number, got {size}" in capsys.readouterr().err


def test_weights_of_another_model_name_the_keys(tmp_path, capsys):
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    err = errors_of(capsys, *IMAGES, "--weights", str(tmp_path / "linear.pt"), "--out", str(tmp_path / "o"))
    assert "does not fit this model" in err and "missing keys (cls_token, pos_embed, patch_embed.weight, ...)" in err
    assert "2 unexpected keys (weight, bias)" in err
    from fxcapture.cli.models import TinyViT

    state = TinyViT(image_size=32).state_dict()  # same keys, another shape
    torch.save(state, tmp_path / "small.pt")
    err = errors_of(capsys, *IMAGES, "--weights", str(tmp_path / "small.pt"), "--out", str(tmp_path / "o"))
    assert "size mismatch for pos_embed" in err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    err = errors_of(capsys, *IMAGES, "--weights", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o"))
    assert "not a torch state_dict file" in err
    torch.save(TinyViT().state_dict(), tmp_path / "good.pt")  # the right model loads
    assert run_cli(*IMAGES, "--weights", str(tmp_path / "good.pt"), "--out", str(tmp_path / "o")) == 0


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_image_is_named_in_one_line(tmp_path, capsys, workers):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "imgs" / "a" / "good.png")
    (tmp_path / "imgs" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    err = errors_of(capsys, "--model", "demo:vit", "--names", "blocks.0", "--data", str(tmp_path / "imgs"),
                    "--num-workers", workers, "--out", str(tmp_path / "o"))  # fmt: skip
    assert f"cannot read image {tmp_path / 'imgs' / 'a' / 'bad.png'}" in err and "remove or replace the file" in err


def test_generate_max_new_tokens_stores_prompt_and_greedy_completion(tmp_path, capsys):
    docs = ["one prompt", "two", "three words here"]
    (tmp_path / "p.txt").write_text("\n".join(docs), encoding="utf-8")
    overrides = GPT2.replace("eos_token_id=2", "eos_token_id=99")  # no early end: every completion has 3 tokens
    argv = ["--model", "hf-config:gpt2", "--config-overrides", overrides, "--names", "transformer.h.0",
            "--reduce", "tokens", "--data", str(tmp_path / "p.txt"), "--batch-size", "2",
            "--generate-max-new-tokens", "3", "--out", str(tmp_path / "o")]  # fmt: skip
    assert run_cli(*argv) == 0, capsys.readouterr().err
    feats = fxcapture.load(tmp_path / "o")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                               n_positions=64, bos_token_id=1, eos_token_id=99)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    offsets = feats["generated"].offsets
    for i, doc in enumerate(docs):
        prompt = torch.tensor([byte_ids(doc)])
        with torch.no_grad():
            seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
            states = model(seq, output_hidden_states=True).hidden_states[1][0]
        rows = slice(offsets[i], offsets[i + 1])
        assert feats["input_ids"][rows].ravel().tolist() == seq[0].tolist()
        assert feats["generated"][rows].ravel().tolist() == [False] * prompt.shape[1] + [True] * 3
        np.testing.assert_allclose(feats["transformer.h.0"][rows], states.numpy(), rtol=1e-4, atol=1e-5)

"""Text sources: tokenizer, windows, length sorting, readers, and extract over text.

References: the tokenizer applied to each document by hand (``tokenizer.encode`` /
the transformers tokenizer's own call), slices written out, and the eager model run on
each sample alone (right padding must not change a real token's hidden state).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fxcapture
from fxcapture.dataset.sources import is_map_style, make_source
from fxcapture.dataset.text import ByteTokenizer, TextDataset, read_texts, synthetic_texts

transformers = pytest.importorskip("transformers")

DOCS = ["the cat sat on the mat", "", "a", "hello world, a longer document than the others by far"]


def word_tokenizer():
    """A real transformers tokenizer, built offline from a word vocabulary."""
    import tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = sorted({w for doc in DOCS + synthetic_texts(50) for w in doc.replace(",", " ").split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def test_byte_tokenizer_ids_padding_and_truncation():
    tok = ByteTokenizer(vocab_size=100, pad_token_id=0)
    text = "héllo wörld ~\x00\xff"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and all(1 <= i < 100 for i in ids)
    big = ByteTokenizer(vocab_size=300)  # every byte its own id
    assert big.encode("AB") == [ord("A") + 1, ord("B") + 1]
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(["abc", "a", "abcdefgh"], padding=True, truncation=True, max_length=5, return_tensors="pt")
        assert batch["input_ids"].shape == (3, 5)
        assert batch["attention_mask"].sum(1).tolist() == [3, 1, 5]
        real = batch["input_ids"][batch["attention_mask"].bool()].tolist()
        assert real == tok.encode("abc") + tok.encode("a") + tok.encode("abcde")
        assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
        first_column = batch["attention_mask"][:, 0].tolist()
        assert first_column == ([1, 1, 1] if side == "right" else [0, 0, 1])
    assert tok("ab")["input_ids"] == tok.encode("ab")
    with pytest.raises(ValueError, match="pad_token_id 7 is not below vocab_size 5"):
        ByteTokenizer(5, pad_token_id=7)


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(100), word_tokenizer()], ids=["bytes", "transformers"])
def test_windows_cover_each_document_in_order(tokenizer):
    encoded = [tokenizer(doc)["input_ids"] for doc in DOCS]  # reference: one call per document
    for max_length, stride in [(4, 4), (4, 2), (4, None), (None, None), (1, 1)]:
        data = TextDataset(DOCS, tokenizer, max_length=max_length, stride=stride)
        expected = []
        for d, ids in enumerate(encoded):
            if not ids:
                continue  # an empty document gives no sample
            if max_length is None:
                expected.append((d, 0, ids))
            elif stride is None:
                expected.append((d, 0, ids[:max_length]))
            else:
                start = 0
                while True:
                    expected.append((d, start, ids[start : start + max_length]))
                    if start + max_length >= len(ids):
                        break
                    start += stride
        got = [(int(data.documents[i]), int(data.starts[i]), data[i]["input_ids"].tolist()) for i in range(len(data))]
        assert got == expected, (max_length, stride)
        assert data.lengths.tolist() == [len(ids) for _, _, ids in expected]


def test_sorting_by_length_within_a_window_keeps_every_sample_and_maps_back():
    tok = ByteTokenizer(100)
    texts = synthetic_texts(37, seed=3)
    plain = TextDataset(texts, tok, max_length=40, stride=30)
    data = TextDataset(texts, tok, max_length=40, stride=30, sort_window=8)
    assert len(data) == len(plain)
    for lo in range(0, len(data), 8):
        block = data.lengths[lo : lo + 8]
        assert list(block) == sorted(block, reverse=True)
        assert sorted(zip(data.documents[lo : lo + 8], data.starts[lo : lo + 8])) == sorted(
            zip(plain.documents[lo : lo + 8], plain.starts[lo : lo + 8])
        )  # samples move inside their window only
    for i in range(len(data)):  # each row maps back to its document's tokens
        ids = tok.encode(texts[data.documents[i]])
        assert data[i]["input_ids"].tolist() == ids[data.starts[i] : data.starts[i] + data.lengths[i]]
    assert TextDataset(texts, tok, max_length=40, stride=30, sort_window=8).data_name() == data.data_name()
    assert data.data_name() != plain.data_name()


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_on_the_tokenizer_side(side):
    tok = word_tokenizer()
    tok.padding_side = side
    data = TextDataset(DOCS, tok)
    batch = data.collate_fn([data[i] for i in range(len(data))])
    expected = tok([d for d in DOCS if d], padding=True, return_tensors="pt")  # the tokenizer's own padding
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])


def test_readers(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nsecond doc\n\nfourth\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["first doc", "second doc", "", "fourth"]
    rows = [{"text": "x y", "id": 1}, {"text": "z", "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_texts(tmp_path / "a.jsonl") == ["x y", "z"]
    with pytest.raises(ValueError, match=r"a.jsonl:1 has no field 'body' \(it has \['id', 'text'\]\)"):
        read_texts(tmp_path / "a.jsonl", "body")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p q", "r"], "n": [1, 2]}), tmp_path / "a.parquet")
    assert read_texts(tmp_path / "a.parquet", "body") == ["p q", "r"]
    with pytest.raises(ValueError, match="no column 'text'"):
        read_texts(tmp_path / "a.parquet")
    assert read_texts("synthetic-text:5") == read_texts("synthetic-text:5") == synthetic_texts(5)
    assert read_texts("synthetic-text:5")[:2] == read_texts("synthetic-text:2")  # seeded per document
    with pytest.raises(ValueError, match="synthetic-text:N"):
        read_texts("synthetic-text:0")
    with pytest.raises(ValueError, match=r"\.txt, \.jsonl, \.parquet"):
        read_texts(tmp_path / "a.csv")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_texts(tmp_path / "b.txt")


def test_bad_window_settings():
    tok = ByteTokenizer(100)
    with pytest.raises(ValueError, match="stride must be between 1 and max_length"):
        TextDataset(DOCS, tok, max_length=4, stride=5)
    with pytest.raises(ValueError, match="give max_length too"):
        TextDataset(DOCS, tok, stride=5)
    with pytest.raises(ValueError, match="padding side must be 'left' or 'right'"):
        TextDataset(DOCS, tok, padding_side="middle")


class Squares:
    """Map-style without being a torch Dataset: ``__len__`` and ``__getitem__`` only."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < 10:
            raise IndexError(i)
        return torch.full((4,), float(i * i))


def test_any_object_with_len_and_getitem_is_a_map_style_dataset(tmp_path):
    assert is_map_style(Squares()) and is_map_style(np.zeros((3, 2))) and is_map_style(torch.zeros(3))
    assert not is_map_style([torch.zeros(2, 4)]) and not is_map_style({"a": 1}) and not is_map_style("abc")
    source = make_source(Squares(), batch_size=4, num_workers=0, pin_memory=False)
    assert source.total == 10 and [b.start for b in source.batches([(0, 10)], None, {})] == [0, 4, 8]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    feats = fxcapture.extract(model, ["0"], Squares(), out=tmp_path / "o", batch_size=4, progress=False)
    x = torch.stack([Squares()[i] for i in range(10)])
    with torch.no_grad():
        np.testing.assert_allclose(feats["0"], model(x).numpy(), rtol=1e-6)


def gpt2_small():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=64, vocab_size=100,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2Model(config).eval()


def test_extract_over_a_text_dataset_equals_each_sample_alone(tmp_path):
    """Sorted, windowed, right-padded batches: each row is its window's mean and last
    hidden state, as the model gives for that window alone."""
    tok, texts = ByteTokenizer(100), synthetic_texts(12, max_words=20)
    data = TextDataset(texts, tok, max_length=48, stride=40, sort_window=8, padding_side="right")
    model = gpt2_small()
    feats = fxcapture.extract(model, {"mean": "h.0", "last": "h.0"}, data, out=tmp_path / "o", batch_size=4,
                              reduce={"mean": "mean", "last": "last"}, progress=False)  # fmt: skip
    assert feats["mean"].shape == (len(data), 64)
    for i in range(len(data)):
        ids = tok.encode(texts[data.documents[i]])[data.starts[i] : data.starts[i] + data.lengths[i]]
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]  # h.0's output
        np.testing.assert_allclose(feats["mean"][i], hidden.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats["last"][i], hidden[-1].numpy(), rtol=1e-4, atol=1e-5)
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["data"] == data.data_name()


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_store_rows_are_the_hidden_states_at_exactly_the_real_tokens(tmp_path, side):
    """``reduce="tokens"`` through ``extract`` and ``load``: per sample, its real tokens in
    order; the token ids beside them. Reference: the eager model on the same padded batches."""
    tok, texts = ByteTokenizer(100), synthetic_texts(10, seed=4, max_words=10)
    data = TextDataset(texts, tok, max_length=30, stride=20, sort_window=6, padding_side=side)
    model = gpt2_small()
    feats = fxcapture.extract(model, ["h.0"], data, out=tmp_path / "o", batch_size=3, reduce="tokens", progress=False)
    column = feats["h.0"]
    assert column.samples == len(data) and column.shape == (int(data.lengths.sum()), 64)
    rows = [tok.encode(texts[d])[s : s + n] for d, s, n in zip(data.documents, data.starts, data.lengths)]
    expected = []
    for lo in range(0, len(rows), 3):  # the batches, padded here
        batch = rows[lo : lo + 3]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            ids[i, cols], mask[i, cols] = torch.tensor(r), 1
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        expected += [hidden[i][mask[i].bool()] for i in range(len(batch))]
    np.testing.assert_allclose(column[:], torch.cat(expected).numpy(), rtol=1e-4, atol=1e-5)
    for i in (0, len(rows) // 2, len(rows) - 1):
        np.testing.assert_allclose(column.sample(i), expected[i].numpy(), rtol=1e-4, atol=1e-5)
    assert feats["input_ids"][:].tolist() == [t for r in rows for t in r]

"""Reducers that see the attention mask, against the eager model masked by hand.

Reference: ``model(..., output_hidden_states=True)`` (no fxcapture involved), with the
real tokens of every sample picked out by ``hidden[i][mask[i]]``, on left- and
right-padded batches of GPT-2, BERT and LLaMA built from small configs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxcapture
from fxcapture.dataset.ragged import Ragged
from fxcapture.dataset.reduce import REDUCERS, apply_reducer, check_reducer, takes_mask

transformers = pytest.importorskip("transformers")

VOCAB = 100
CONFIGS = {
    "gpt2": ("h.0", dict(n_layer=2, n_embd=64, n_head=2, n_positions=64)),
    "bert": ("encoder.layer.0", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)),
    "llama": ("layers.0", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=128, max_position_embeddings=64)),
}  # fmt: skip
LENGTHS = [7, 3, 5, 1]


def small_model(model_type: str) -> nn.Module:
    """A random-weight transformers base model: 2 layers, 64 wide, vocabulary of 100."""
    kwargs = dict(CONFIGS[model_type][1], vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {t: small_model(t) for t in CONFIGS}


def padded_batch(lengths: list[int], side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` (pad id 0) and ``attention_mask`` of random sequences of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


def real_tokens(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The eager model's first-layer hidden states at the real tokens of every sample."""
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    return [hidden[i][mask[i].bool()] for i in range(len(ids))]


MANUAL = {
    "mean": lambda rows: rows.mean(0),
    "max": lambda rows: rows.amax(0),
    "first": lambda rows: rows[0],
    "cls": lambda rows: rows[0],
    "last": lambda rows: rows[-1],
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_masked_reducers_equal_a_manual_computation(models, model_type, side):
    model, key = models[model_type], CONFIGS[model_type][0]
    extractor = fxcapture.capture(model, [key])
    for seed in range(2):  # several calls: run-time capture is re-armed every time
        ids, mask = padded_batch(LENGTHS, side, seed)
        expected = real_tokens(model, ids, mask)
        _, feats = extractor(input_ids=ids, attention_mask=mask)
        for how, manual in MANUAL.items():
            got = apply_reducer(key, check_reducer(how), feats[key], len(ids), None, mask=mask)
            torch.testing.assert_close(got, torch.stack([manual(rows) for rows in expected]), msg=how)
        tokens = apply_reducer(key, check_reducer("tokens"), feats[key], len(ids), None, mask=mask)
        assert isinstance(tokens, Ragged) and tokens.lengths.tolist() == LENGTHS
        torch.testing.assert_close(tokens.values, torch.cat(expected))
        for part, rows in zip(tokens.split(), expected):
            torch.testing.assert_close(part, rows)


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_right_padding_changes_nothing_for_masked_mean_and_last(models, model_type):
    """A right-padded sample reduces to what the sample alone gives (padding is invisible)."""
    model, key = models[model_type], CONFIGS[model_type][0]
    ids, mask = padded_batch(LENGTHS, "right")
    _, feats = fxcapture.capture(model, [key])(input_ids=ids, attention_mask=mask)
    for how in ("mean", "last", "tokens"):
        batch = apply_reducer(key, check_reducer(how), feats[key], len(ids), None, mask=mask)
        for i, n in enumerate(LENGTHS):
            with torch.no_grad():
                alone = model(input_ids=ids[i : i + 1, :n], output_hidden_states=True).hidden_states[1][0]
            expected = {"mean": alone.mean(0), "last": alone[-1], "tokens": alone}[how]
            got = batch.split()[i] if how == "tokens" else batch[i]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_without_a_mask_reducers_use_every_position():
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(apply_reducer("k", REDUCERS["mean"], x, 3, None), x.mean(1))
    torch.testing.assert_close(apply_reducer("k", REDUCERS["last"], x, 3, None), x[:, -1])
    torch.testing.assert_close(apply_reducer("k", REDUCERS["cls"], x, 3, None), x[:, 0])
    tokens = apply_reducer("k", REDUCERS["tokens"], x, 3, None)
    assert tokens.lengths.tolist() == [5, 5, 5] and torch.equal(tokens.values, x.reshape(15, 8))


def test_values_the_mask_does_not_describe_are_reduced_over_every_position():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    image = torch.randn(2, 6, 4, 4)  # (B, C, H, W): the mask is about tokens, not pixels
    torch.testing.assert_close(apply_reducer("k", REDUCERS["mean"], image, 2, None, mask=mask), image.mean((2, 3)))
    attn = torch.randn(2, 3, 4, 4)  # (B, heads, N, N)
    torch.testing.assert_close(apply_reducer("k", REDUCERS["max"], attn, 2, None, mask=mask), attn.amax((2, 3)))
    other = torch.randn(2, 5, 8)  # 5 tokens for a mask of 4 (a model that adds a token)
    torch.testing.assert_close(apply_reducer("k", REDUCERS["mean"], other, 2, None, mask=mask), other.mean(1))


def test_tuple_and_dict_outputs_are_reduced_through_their_first_tensor():
    hidden, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    for value in [(hidden, torch.zeros(1)), [hidden], {"last_hidden_state": hidden, "x": torch.ones(2)}]:
        torch.testing.assert_close(apply_reducer("k", REDUCERS["mean"], value, 2, None, mask=mask), expected)


def test_a_callable_gets_the_mask_when_it_takes_two_arguments():
    x, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    seen = []

    def with_mask(value, m):
        seen.append(m)
        return value.sum(1)

    assert torch.equal(apply_reducer("k", with_mask, x, 2, None, mask=mask), x.sum(1)) and seen[0] is mask
    assert torch.equal(apply_reducer("k", lambda v: v[:, 0], x, 2, None, mask=mask), x[:, 0])
    assert takes_mask(lambda v, m: v) and not takes_mask(lambda v: v) and takes_mask(lambda *a: a[0])


def test_sample_without_real_tokens_and_errors():
    x, mask = torch.randn(2, 3, 4), torch.tensor([[0, 0, 0], [1, 1, 1]])
    mean = apply_reducer("k", REDUCERS["mean"], x, 2, None, mask=mask)
    assert torch.equal(mean[0], torch.zeros(4)) and torch.allclose(mean[1], x[1].mean(0))
    assert apply_reducer("k", REDUCERS["tokens"], x, 2, None, mask=mask).lengths.tolist() == [0, 3]
    with pytest.raises(ValueError, match=r"reducing 'k' .* 'tokens' picks tokens of a \(batch, tokens, dim\)"):
        apply_reducer("k", REDUCERS["tokens"], torch.randn(2, 3, 4, 4), 2, None)
    with pytest.raises(ValueError, match="unknown reducer 'avg'.*tokens"):
        check_reducer("avg")


def test_storage_dtype_of_reduced_values():
    x = torch.randn(2, 3, 4)
    assert apply_reducer("k", REDUCERS["mean"], x, 2, torch.float16).dtype == torch.float16
    assert apply_reducer("k", REDUCERS["mean"], x.bfloat16(), 2, None).dtype == torch.float32
    tokens = apply_reducer("k", REDUCERS["tokens"], x, 2, torch.bfloat16)
    assert tokens.values.dtype == torch.bfloat16 and torch.equal(tokens.values, x.reshape(6, 4).bfloat16())
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    bf = torch.randn(2, 3, 4).bfloat16()  # the masked mean of bfloat16 accumulates in float32
    expected = torch.stack([bf[0].float().mean(0), bf[1, 0].float()]).bfloat16()
    assert torch.equal(apply_reducer("k", REDUCERS["mean"], bf, 2, torch.bfloat16, mask=mask), expected)


@pytest.mark.parametrize("how", ["mean", "last"])
def test_extract_passes_each_batch_mask_to_the_reducers(models, tmp_path, how):
    model = models["gpt2"]
    batches = [dict(zip(("input_ids", "attention_mask"), padded_batch(LENGTHS, "left", seed))) for seed in range(3)]
    feats = fxcapture.extract(model, ["h.0"], batches, out=tmp_path / how, reduce=how, progress=False)
    expected = [MANUAL[how](rows) for b in batches for rows in real_tokens(model, b["input_ids"], b["attention_mask"])]
    np.testing.assert_allclose(feats["h.0"], torch.stack(expected).numpy(), rtol=1e-5, atol=1e-5)

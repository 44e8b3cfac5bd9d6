"""``extract(..., generate=...)`` (issue 26): per-token rows of prompt and completion.

References: ``model.generate`` run on each prompt alone (no padding) for the token ids,
and ``output_hidden_states=True`` of a forward of the model over those sequences for the
rows; every prompt is completed independently of fxcapture.
"""

from __future__ import annotations

import copy
import runpy
import sys
import warnings

import numpy as np
import pytest
import torch

import fxcapture.dataset.run as run
from conftest import SUBPROCESS_ENV, kill_after_chunks
from fxcapture import extract
from fxcapture.dataset.storage import complete_chunks
from fxcapture.dataset.text import ByteTokenizer, TextDataset

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

CONFIG = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                 bos_token_id=0, eos_token_id=99, pad_token_id=0)  # fmt: skip
PROMPTS = ["hello", "a longer prompt", "xy", "some words here", "z"]
NEW = 4


def gpt2(attn: str = "eager") -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel._from_config(copy.deepcopy(CONFIG), attn_implementation=attn).eval()


def completed(model, prompt: list[int], **options) -> tuple[list[int], int, torch.Tensor]:
    """``(ids, prompt length, layer-0 rows)`` of one prompt alone: ``model.generate``'s
    sequence cut before its first end-of-sequence token, and the hidden states of a
    forward over it."""
    eos = options.pop("eos_token_id", CONFIG.eos_token_id)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        seq = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **options)[0].tolist()
        new = seq[len(prompt):]
        ids = prompt + new[: new.index(eos) if eos in new else len(new)]
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
    return ids, len(prompt), states


def check_rows(feats, model, data, **options) -> None:
    column = feats["transformer.h.0"]
    assert column.samples == len(data)
    for i in range(len(data)):
        ids, prompt, states = completed(model, data[i]["input_ids"].tolist(), **options)
        a, b = column.offsets[i], column.offsets[i + 1]
        assert feats["input_ids"][a:b].ravel().tolist() == ids
        assert feats["positions"][a:b].ravel().tolist() == list(range(len(ids)))
        assert feats["generated"][a:b].ravel().tolist() == [False] * prompt + [True] * (len(ids) - prompt)
        np.testing.assert_allclose(column[a:b], states.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn, side", [("eager", "right"), ("sdpa", "left")])  # each traces GPT-2 once
def test_rows_equal_hidden_states_of_model_generate(tmp_path, side, attn):
    model = gpt2(attn)
    data = TextDataset(PROMPTS, ByteTokenizer(100), padding_side=side)
    feats = extract(model, ["transformer.h.0"], data, out=tmp_path / "o", reduce="tokens", batch_size=2,
                    progress=False, generate={"max_new_tokens": NEW, "do_sample": False})  # fmt: skip
    check_rows(feats, model, data)
    assert int(feats["generated"][:].sum()) == NEW * len(data)  # no end-of-sequence token here


def test_a_completion_stops_before_its_end_of_sequence_token(tmp_path):
    model, data = gpt2(), TextDataset(PROMPTS[:3], ByteTokenizer(100))
    eos = completed(model, data[1]["input_ids"].tolist())[0][len(data[1]["input_ids"]) + 1]  # its 2nd new token
    feats = extract(model, ["transformer.h.0"], data, out=tmp_path / "o", reduce="tokens", batch_size=3,
                    progress=False, generate={"max_new_tokens": NEW, "eos_token_id": eos})  # fmt: skip
    check_rows(feats, model, data, eos_token_id=eos)
    assert eos not in feats["input_ids"][:].ravel()[feats["generated"][:].ravel()]


JOB = '''
import sys, time, warnings
import torch, transformers
from fxcapture import extract
from fxcapture.dataset.text import ByteTokenizer, TextDataset

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()


class Slow(TextDataset):
    delay = 0.0

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


def run(out, delay=0.0):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=99, pad_token_id=0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    data = Slow(["prompt %d %s" % (i, "x" * (i % 5)) for i in range(12)], ByteTokenizer(100))
    data.delay = delay
    return extract(model, ["transformer.h.0"], data, out=out, reduce="tokens", batch_size=2, chunk_size=2,
                   progress=False, generate={"max_new_tokens": NEW})


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], float(sys.argv[2]))
'''


def test_sigkill_then_resume_stores_every_row_once(tmp_path):
    """The killed job's chunks and the resumed run's together: every prompt's rows once,
    equal to ``model.generate`` and its hidden states (the reference of the other tests)."""
    script = tmp_path / "job.py"
    script.write_text(JOB.replace("NEW", str(NEW)))
    out = tmp_path / "o"
    kill_after_chunks([sys.executable, str(script), str(out), "0.1"], out, 2, SUBPROCESS_ENV, seconds=400)
    assert 4 <= sum(c.stop - c.start for c in complete_chunks(out)) < 12 and not (out / "manifest.json").exists()
    job = runpy.run_path(str(script))
    resumed = job["run"](out)
    data = job["Slow"](["prompt %d %s" % (i, "x" * (i % 5)) for i in range(12)], ByteTokenizer(100))
    check_rows(resumed, gpt2(), data)


@pytest.mark.parametrize("generate, output, error", [
    ({"do_sample": False}, False, "needs max_new_tokens"),
    ({"max_new_tokens": 0}, False, "needs max_new_tokens"),
    ({"max_new_tokens": 2, "num_beams": 3}, False, "several completions per prompt"),
    ({"max_new_tokens": 2, "num_return_sequences": 2}, False, "several completions per prompt"),
    ({"max_new_tokens": 2, "max_length": 9}, False, "not max_length"),
    ({"max_new_tokens": 2}, True, "leave output out"),
])  # fmt: skip
def test_bad_generate_options_are_refused_before_any_trace(tmp_path, monkeypatch, generate, output, error):
    monkeypatch.setattr(run, "capture", lambda *a, **k: pytest.fail("the model was traced"))
    data = TextDataset(PROMPTS, ByteTokenizer(100))
    with pytest.raises(ValueError, match=error):
        extract(gpt2(), ["transformer.h.0"], data, out=tmp_path / "o", reduce="tokens", output=output,
                generate=generate)  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_generate_on_a_model_without_generate_is_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(100, 8))
    with pytest.raises(TypeError, match="needs a model with a generate method"):
        extract(model, ["0"], TextDataset(PROMPTS, ByteTokenizer(100)), out=tmp_path / "o",
                generate={"max_new_tokens": 2})  # fmt: skip

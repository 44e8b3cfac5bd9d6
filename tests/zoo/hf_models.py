"""transformers models from small configs (2 layers, hidden 32), eager and sdpa, and
their check against the eager model (issue 14).

Per model (``"gpt2:eager"``, ``"gpt2:sdpa"``, ...), over ten calls with varying batch
and sequence lengths:

* the output equals ``model(**inputs)`` (``torch.equal``);
* every selected key is present, the sampled modules equal forward hooks;
* eager attention: every ``attn_weights`` equals the model's own
  ``output_attentions=True``; sdpa: the fused kernel is kept (no map exists), every
  attention module's ``attn_output`` local is captured on every call;
* ``ex.tracer == "running"``: captured in a graph, not at run time.

Example::

    >>> check_hf("gpt2:eager").status
    'pass'
"""

from __future__ import annotations

import random
import time
import traceback
from typing import Any, Callable

import torch

import fxcapture
import zoo_checker as zc

VOCAB = 64
# (batch, sequence) of the ten calls: sizes up and down, batch 1 included
SHAPES = [(2, 8), (3, 5), (1, 12), (2, 16), (4, 3), (1, 1), (3, 9), (2, 8), (1, 6), (4, 14)]
IMPLS = ("eager", "sdpa")


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _text(batch, seq, seed):
    return {"input_ids": _ids(batch, seq, seed)}


def _seq2seq(batch, seq, seed):
    return {"input_ids": _ids(batch, seq, seed), "decoder_input_ids": _ids(batch, max(seq - 1, 1), seed + 1)}


def _image(batch, seq, seed):
    return {"pixel_values": zc.make_input(32, seed)[:1].expand(batch, -1, -1, -1).contiguous()}


_DECODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False)  # fmt: skip
_ENCODER = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                vocab_size=VOCAB, max_position_embeddings=64)  # fmt: skip
_BART = dict(encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
             max_position_embeddings=64, use_cache=False)  # fmt: skip

# family -> (config class, model class, config kwargs, inputs(batch, seq, seed))
FAMILIES: dict[str, tuple[str, str, dict[str, Any], Callable]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False), _text),
    "bert": ("BertConfig", "BertModel", _ENCODER, _text),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, _text),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER, _text),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER, _text),
    "t5": ("T5Config", "T5Model", dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64,
                                       num_heads=4, vocab_size=VOCAB, use_cache=False), _seq2seq),
    "vit": ("ViTConfig", "ViTModel", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, image_size=32, patch_size=8), _image),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                ffn_dim=64, word_embed_proj_dim=32, vocab_size=VOCAB,
                                                max_position_embeddings=64, use_cache=False), _text),
    "roberta": ("RobertaConfig", "RobertaModel", dict(_ENCODER, pad_token_id=1), _text),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=8), _text),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, pad_token_id=0), _text),
    "bart": ("BartConfig", "BartModel", _BART, _seq2seq),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(_ENCODER, rotary_pct=0.25, use_cache=False), _text),
}  # fmt: skip

CONFIGS = [f"{family}:{impl}" for family in FAMILIES for impl in IMPLS]
CI_HF = ["gpt2:eager"]


def build_hf(name: str) -> tuple[torch.nn.Module, Callable]:
    """The model (random weights, eval) and ``inputs(batch, seq, seed)``."""
    import transformers

    transformers.logging.set_verbosity_error()
    family, _, impl = name.partition(":")
    config_cls, model_cls, kwargs, inputs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(zc.SEED)
    model = getattr(transformers, model_cls)._from_config(config, attn_implementation=impl)
    return model.eval(), inputs


def reference_attentions(model, inputs) -> list[torch.Tensor]:
    """The model's own attention probabilities, in execution order."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if "encoder_attentions" in out:  # encoder-decoder: encoder, then self/cross per layer
        decoder = [a for pair in zip(out.decoder_attentions, out.cross_attentions) for a in pair]
        return list(out.encoder_attentions) + decoder
    return list(out.attentions)


def module_plan(model, inputs) -> list[str]:
    """Direct children that run, and a seeded sample of deeper modules that run."""
    with torch.no_grad():
        called = zc.module_calls(model, lambda: model(**inputs))
    children = [n for n, _ in model.named_children() if n in called]
    deeper = [p for p in called if "." in p]
    rng = random.Random(zc.SEED)
    return children + sorted(rng.sample(deeper, min(zc.SAMPLE_DEEP, len(deeper))), key=list(called).index)


def _attention_keys(names: list[str], local: str) -> list[str]:
    return [k for k in names if k.endswith(f":{local}") or f":{local}@" in k]


def check_call(model, ex, inputs, paths, local, where) -> list[str]:
    """One call: output, keys present, modules vs hooks, attention maps vs the model's."""
    with torch.no_grad():
        out, feats = ex(**inputs)

        def run():
            run.out = model(**inputs)

        hooked = zc.module_calls(model, run, set(paths))
    problems = zc.differences(out, run.out, f"{where} output")
    missing = [k for k in ex.names if feats.get(k) is None]
    if missing:
        problems.append(f"{where}: selected keys missing: {missing[:4]}")
    problems += zc.module_differences(feats, ex.names, paths, hooked, f"{where} module")
    if local != "attn_weights":
        return problems
    keys = _attention_keys(ex.names, local)
    reference = reference_attentions(model, inputs)
    if len(keys) != len(reference):
        return problems + [f"{where}: {len(keys)} {local} captured, the model returned {len(reference)}"]
    for key, ref in zip(keys, reference):
        problems += zc.differences(feats.get(key), ref, f"{where} {key}")
    return problems


def check_hf(name: str) -> zc.Result:
    """Ten calls at varying batch and sequence length (see the module docstring)."""
    model, inputs = build_hf(name)
    first = inputs(*SHAPES[0], 0)
    result = zc.Result(name=name, input_shape=tuple(next(iter(first.values())).shape))
    start = time.perf_counter()
    stage = "plan"
    try:
        paths = module_plan(model, first)
        local = "attn_output" if name.endswith(":sdpa") else "attn_weights"
        result.n_modules = len(paths)
        stage = "capture"
        ex = fxcapture.capture(model, [local] + paths, example_inputs=first)
        result.tracer = ex.tracer
        problems = [] if ex.tracer == "running" else [f"tracer {ex.tracer!r}, not 'running': {ex.explain()[:200]}"]
        result.n_locals = len(_attention_keys(ex.names, local))
        result.locals_module = f"`{local}` of every attention layer"
        for call, (batch, seq) in enumerate(SHAPES):
            stage = f"call {call} ({batch}x{seq})"
            problems += check_call(model, ex, inputs(batch, seq, call), paths, local, f"call {call}")
            if call == 0:
                result.seconds_eval = time.perf_counter() - start
            if ex.tracer != "running":
                problems.append(f"call {call}: tracer became {ex.tracer!r}")
        result.problems = problems
        if problems:
            result.reason = f"{len(problems)} mismatches, first: {problems[0]}"
        else:
            result.status = "pass"
    except Exception as err:  # noqa: BLE001 - reported, never skipped
        result.reason = f"{stage}: {zc._first_line(err)}"
        result.problems = [traceback.format_exc(limit=-4)]
    result.seconds = time.perf_counter() - start
    return result


def assert_hf_conforms(name: str) -> None:
    result = check_hf(name)
    assert result.status == "pass", "\n".join([result.reason] + result.problems[:8])
    assert result.n_locals >= 2  # one attention map per layer (2 layers; T5, BART: 6)
    assert result.n_modules > 0


"""transformers models from tiny configs (2 layers, hidden 32, eager attention) and
their conformance check against ``output_attentions=True`` and forward hooks.

transformers models do not fx-trace (their decorated ``forward`` methods take
``*args, **kwargs``): ``capture(..., fallback="auto")`` runs what fx cannot trace
eagerly and captures it at run time. The check is the same either way.

Example::

    >>> result = check_hf("gpt2")
    >>> result.status
    'partly traced'
"""

from __future__ import annotations

import copy
import random
import time
import traceback
from typing import Any, Callable

import torch

import fxcapture
import zoo_checker as zc

VOCAB, SEQ = 64, 10


def _tiny(config_cls, **kwargs):
    import transformers

    transformers.logging.set_verbosity_error()
    return getattr(transformers, config_cls)(attn_implementation="eager", **kwargs)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (zc.BATCH, SEQ), generator=torch.Generator().manual_seed(zc.SEED))


def _decoder(config_cls: str, model_cls: str) -> Callable[[], tuple[Any, dict]]:
    def build():
        import transformers

        cfg = _tiny(config_cls, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                    use_cache=False)  # fmt: skip
        return getattr(transformers, model_cls)(cfg), {"input_ids": _ids()}

    return build


def gpt2():
    import transformers

    cfg = _tiny("GPT2Config", n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                use_cache=False)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": _ids()}


def bert():
    import transformers

    cfg = _tiny("BertConfig", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                intermediate_size=64, vocab_size=VOCAB)  # fmt: skip
    return transformers.BertModel(cfg), {"input_ids": _ids()}


def t5():
    import transformers

    cfg = _tiny("T5Config", num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, d_ff=64,
                num_heads=4, vocab_size=VOCAB, use_cache=False)  # fmt: skip
    ids = _ids()
    return transformers.T5Model(cfg), {"input_ids": ids, "decoder_input_ids": ids}


def vit():
    import transformers

    cfg = _tiny("ViTConfig", num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
    return transformers.ViTModel(cfg), {"pixel_values": zc.make_input(32)}


CONFIGS: dict[str, Callable[[], tuple[Any, dict]]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "t5": t5,
    "vit": vit,
}


def build_hf(name: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(zc.SEED)
    model, inputs = CONFIGS[name]()
    return model.eval(), inputs


def reference_attentions(model, inputs) -> list[torch.Tensor]:
    """The model's own attention probabilities, in execution order."""
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    if "encoder_attentions" in out:  # encoder-decoder: encoder, then self/cross per layer
        decoder = [a for pair in zip(out.decoder_attentions, out.cross_attentions) for a in pair]
        return list(out.encoder_attentions) + decoder
    return list(out.attentions)


def module_plan(model, inputs) -> tuple[list[str], list[str]]:
    """Direct children that run, and a seeded sample of deeper modules that run."""
    with torch.no_grad():
        called = zc.module_calls(model, lambda: model(**inputs))
    children = [n for n, _ in model.named_children() if n in called]
    deeper = [p for p in called if "." in p]
    rng = random.Random(zc.SEED)
    deep = sorted(rng.sample(deeper, min(zc.SAMPLE_DEEP, len(deeper))), key=list(called).index)
    return children, deep


def check_hf(name: str) -> zc.Result:
    """Output, attention weights, module captures and train mode of one tiny model."""
    model, inputs = build_hf(name)
    x = next(iter(inputs.values()))
    result = zc.Result(name=name, input_shape=tuple(x.shape))
    start = time.perf_counter()
    stage = "plan"
    try:
        children, deep = module_plan(model, inputs)
        paths = children + deep
        result.n_modules = len(paths)
        stage = "capture"
        extractor = fxcapture.capture(model, ["attn_weights"] + paths)
        problems = []
        for call in range(2):  # the first call discovers run-time names, the second uses them
            stage = f"eval forward {call}"
            with torch.no_grad():
                out, feats = extractor(**inputs)
                expected = model(**inputs)
            hooked = zc.module_calls(model, lambda: model(**inputs), set(paths))
            problems += zc.differences(out, expected, f"output (call {call})")
            attn_keys = [k for k in extractor.names if k.endswith(":attn_weights") or ":attn_weights@" in k]
            reference = reference_attentions(model, inputs)
            result.n_locals = len(attn_keys)
            result.locals_module = "every attention module" if attn_keys else None
            if len(attn_keys) != len(reference):
                problems.append(f"{len(attn_keys)} attn_weights captured, {len(reference)} attentions returned")
            for key, ref in zip(attn_keys, reference):
                problems += zc.differences(feats.get(key), ref, f"local {key} (call {call})")
            for path in paths:
                keys = zc._module_keys(extractor.names, path)
                if len(keys) != len(hooked.get(path, [])):
                    problems.append(f"module {path}: {len(keys)} captured calls, hooks saw {len(hooked.get(path, []))}")
                    continue
                for key, value in zip(keys, hooked[path]):
                    problems += zc.differences(feats[key], value, f"module {key} (call {call})")
        result.fallback = zc.fallback_modules(extractor)
        stage = "train mode"
        problems += _check_train(model, inputs, children)
        result.problems = problems
        if problems:
            result.reason = f"{len(problems)} mismatches, first: {problems[0]}"
        else:
            result.status = "partly traced" if result.fallback else "traced"
    except Exception as err:  # noqa: BLE001 - reported, never skipped
        result.reason = f"{stage}: {zc._first_line(err)}"
        result.problems = [traceback.format_exc(limit=-3)]
    result.seconds = time.perf_counter() - start
    return result


def _check_train(model, inputs, children) -> list[str]:
    """Train mode (dropout on): same seed -> same output and children as a deep copy."""
    reference = copy.deepcopy(model).train()
    extractor = fxcapture.capture(model, children).train()

    def run_reference():
        torch.manual_seed(zc.SEED + 1)
        run_reference.out = reference(**inputs)

    with torch.no_grad():
        hooked = zc.module_calls(reference, run_reference, set(children))
        torch.manual_seed(zc.SEED + 1)
        out, feats = extractor(**inputs)
    model.eval()
    problems = zc.differences(out, run_reference.out, "train output")
    for path in children:
        for key, value in zip(zc._module_keys(extractor.names, path), hooked.get(path, [])):
            problems += zc.differences(feats[key], value, f"train module {key}")
    return problems

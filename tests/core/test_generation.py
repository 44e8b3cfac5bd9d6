"""Generation (issue 26): ``Extractor.generate`` runs the model's own ``generate`` with the
extractor as the forward of every step, checked against ``model.generate`` with forward
hooks; decoding steps with a cache are traced by running, once for every step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

import fxcapture.core.extractor as extractor_module
from conftest import assert_same, hooked
from fxcapture import capture
from fxcapture.core.select import UnknownSelectorError

transformers.logging.set_verbosity_error()

MODELS = {
    "gpt2": (transformers.GPT2LMHeadModel,
             transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     bos_token_id=0, eos_token_id=1, pad_token_id=1),
             "transformer.h.0", "transformer.h.1.mlp"),
    "llama": (transformers.LlamaForCausalLM,
              transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1),
              "model.layers.0", "model.layers.1.mlp"),
    "qwen2": (transformers.Qwen2ForCausalLM,
              transformers.Qwen2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1),
              "model.layers.0", "model.layers.1.mlp"),
    # a sliding window shorter than prompt + completion: its layers drop old tokens
    "mistral": (transformers.MistralForCausalLM,
                transformers.MistralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                           sliding_window=8, bos_token_id=0, eos_token_id=1, pad_token_id=1),
                "model.layers.0", "model.layers.1.mlp"),
    "t5": (transformers.T5ForConditionalGeneration,
           transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           "decoder.block.0", "decoder.block.1.layer.2"),
}  # fmt: skip
DECODER_ONLY = ("gpt2", "llama")  # the whole decoding matrix
# the other families: each attention and decoding once (a T5 step traces for seconds)
MORE_CASES = [("qwen2", "sdpa", "greedy"), ("qwen2", "eager", "beams"), ("t5", "eager", "greedy"), ("t5", "sdpa", "beams"),
              ("mistral", "sdpa", "sampling"), ("mistral", "eager", "beams")]  # fmt: skip
DECODINGS = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.7),
    "beams": dict(do_sample=False, num_beams=3),
}


def build(family: str, attn: str) -> torch.nn.Module:
    cls, config, *_ = MODELS[family]
    torch.manual_seed(0)
    return cls._from_config(copy.deepcopy(config), attn_implementation=attn).eval()


def prompt(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(2, 100, (batch, length), generator=torch.Generator().manual_seed(length))


def run(fn, *args, seed: int = 0, **kwargs):
    torch.manual_seed(seed)  # the same random numbers for sampling, in both runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def first(value):
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize(("family", "attn", "decoding"), [
    (family, attn, decoding) for family in DECODER_ONLY for attn in ("eager", "sdpa") for decoding in sorted(DECODINGS)
] + MORE_CASES)  # fmt: skip
def test_generate_equals_model_generate_with_hooks(family, attn, decoding):
    model = build(family, attn)
    paths = list(MODELS[family][2:])
    ex = capture(model, paths)
    ids = prompt()
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, **DECODINGS[decoding])
    for seed in (0, 1):  # twice: the second generate reuses the graphs
        sequences, feats = run(ex.generate, ids, seed=seed, **kwargs)
        with hooked(model, paths) as seen:
            expected = run(model.generate, ids, seed=seed, **kwargs)
        assert torch.equal(sequences, expected), (family, attn, decoding)
        for path in paths:
            assert len(feats[path]) == len(seen[path]) == 8  # the prompt step and 7 decoding steps
            for step, (got, want) in enumerate(zip(feats[path], seen[path])):
                assert_same(got, want, path=f"{path} step {step}")
        if family == "mistral":  # its sliding-window steps run eagerly, and explain() says why
            assert ex.tracer == "run time" and "cumulative_length" in ex.explain(), ex.explain()
        else:
            assert ex.tracer == "running" and ex.explain().startswith("tracer: running"), ex.explain()
    if decoding != "beams":  # rows are sequences: one (batch, prompt + new - 1, hidden) tensor
        aligned = feats.aligned(paths[-1])  # an MLP's output: a tensor with a sequence dimension
        prompt_length = 1 if model.config.is_encoder_decoder else ids.shape[1]  # the decoder's start token
        assert aligned.shape[:2] == (2, prompt_length + 8 - 1)
        assert torch.equal(aligned, torch.cat(seen[paths[-1]], dim=1))
    else:
        with pytest.raises(ValueError, match="beam"):
            feats.aligned(paths[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_twenty_decoding_steps_trace_once(family, monkeypatch):
    builds = []
    build_program = extractor_module.build_program

    def counting(*args, **kwargs):
        builds.append(args[2] is not None)  # traced on an example: a running trace
        return build_program(*args, **kwargs)

    monkeypatch.setattr(extractor_module, "build_program", counting)
    model = build(family, "sdpa")
    ex = capture(model, [MODELS[family][2]])
    ids = prompt(3, 5)
    sequences, feats = run(ex.generate, ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(sequences, run(model.generate, ids, max_new_tokens=20, min_new_tokens=20, do_sample=False))
    assert len(feats[MODELS[family][2]]) == 20
    # the prompt step and one decoding step, not one per step; an encoder-decoder's decoder
    # starts from one token, and export holds a cache of length 1 static: its second step too
    traces = 3 if model.config.is_encoder_decoder else 2
    assert builds.count(True) == traces, builds
    sequences, _ = run(ex.generate, prompt(2, 9), max_new_tokens=20, do_sample=False)  # other sizes too
    assert builds.count(True) == traces, builds


def test_decoding_step_by_hand_updates_the_callers_cache():
    """``ex(next_id, cache=cache)`` outside generate: the graph's new cache is written into
    the caller's object, as the model updates the cache it is given."""
    model = build("gpt2", "sdpa")
    ex = capture(model, ["transformer.h.1"])
    ids = prompt()
    with torch.no_grad():
        out, _ = ex(input_ids=ids, use_cache=True)
        ref = model(input_ids=ids, use_cache=True)
        cache, ref_cache = out.cache, ref.cache
        for _ in range(4):
            next_id = ref.logits[:, -1:].argmax(-1)
            out, feats = ex(input_ids=next_id, cache=cache, use_cache=True)
            with hooked(model, ["transformer.h.1"]) as seen:
                ref = model(input_ids=next_id, cache=ref_cache, use_cache=True)
            assert out.cache is cache and cache.get_seq_length() == ref_cache.get_seq_length()
            assert torch.equal(out.logits, ref.logits)
            assert_same(feats["transformer.h.1"], seen["transformer.h.1"][0])
            for mine, theirs in zip(cache.layers, ref_cache.layers):
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert ex.tracer == "running"


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_steering_at_every_step_equals_a_hook(family):
    model = build(family, "sdpa")
    path = MODELS[family][2]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 4

    def add(value, key):
        return (value[0] + vector,) + tuple(value[1:]) if isinstance(value, tuple) else value + vector

    ex = capture(model, [], edit={path: add})
    ids = prompt()
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    steered, feats = run(ex.generate, ids, **kwargs)
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: add(out, path))
    try:
        expected = run(model.generate, ids, **kwargs)
    finally:
        handle.remove()
    assert torch.equal(steered, expected)
    assert not torch.equal(steered, run(model.generate, ids, **kwargs))  # the edit changed the tokens
    assert feats == {}


def test_num_return_sequences_rows_are_sequences():
    model = build("gpt2", "sdpa")
    path = MODELS["gpt2"][2]
    ex = capture(model, [path])
    ids = prompt()
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=True, num_return_sequences=3)
    sequences, feats = run(ex.generate, ids, **kwargs)
    with hooked(model, [path]) as seen:
        expected = run(model.generate, ids, **kwargs)
    assert torch.equal(sequences, expected) and sequences.shape[0] == 6
    assert torch.equal(feats.aligned(path), torch.cat([first(v) for v in seen[path]], dim=1))


def test_generate_leaves_the_model_as_it_was():
    model = build("gpt2", "sdpa")
    before = dict(model.__dict__)
    run(capture(model, ["transformer.h.0"]).generate, prompt(), max_new_tokens=3)
    assert model.__dict__ == before and "forward" not in model.__dict__


def test_generate_on_a_model_without_generate_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="needs a model with a generate method"):
        capture(model, ["0"]).generate(torch.randn(2, 4))


def test_an_encoder_selector_names_get_encoder_and_its_advice_works():
    """T5's encoder runs once, through get_encoder(), not through a step's forward: the error
    says so, and the capture it advises gives what a hook sees during model.generate."""
    model, ids = build("t5", "sdpa"), prompt()
    with pytest.raises(UnknownSelectorError, match=r"get_encoder\(\).*capture\(model.get_encoder\(\), \['block.0'\]\)"):
        run(capture(model, ["encoder.block.0", "decoder.block.0"]).generate, ids, max_new_tokens=2)
    with hooked(model, ["encoder.block.0"]) as seen:
        run(model.generate, ids, max_new_tokens=2)
    with torch.no_grad():  # generate's own encoder call: ids and the mask it makes of them
        _, feats = capture(model.get_encoder(), ["block.0"])(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert len(seen["encoder.block.0"]) == 1
    assert_same(feats["block.0"], seen["encoder.block.0"][0])


def test_static_cache_is_updated_in_place_and_traced_once(monkeypatch):
    """A ``StaticCache`` (written in place by the model, at fixed addresses): one decoding
    graph for every step, the caller's tensors updated in place, values as the model's
    (to rounding: the graph's attention over the whole static length adds in another order)."""
    builds = []
    build_program = extractor_module.build_program
    monkeypatch.setattr(extractor_module, "build_program",
                        lambda *a, **k: builds.append(a[2] is not None) or build_program(*a, **k))  # fmt: skip
    model = build("llama", "sdpa")
    path = MODELS["llama"][2]
    ex = capture(model, [path])
    ids = prompt()
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, cache_implementation="static")
    sequences, feats = run(ex.generate, ids, **kwargs)
    with hooked(model, [path]) as seen:
        expected = run(model.generate, ids, **kwargs)
    assert torch.equal(sequences, expected)
    for got, want in zip(feats[path], seen[path], strict=True):
        assert_same(got, want, exact=False)
    assert builds.count(True) == 2, builds  # the prompt step and one decoding step
    mine, theirs = (transformers.StaticCache(config=model.config, max_cache_len=24) for _ in range(2))
    with torch.no_grad():
        out, _ = ex(input_ids=ids, cache=mine, use_cache=True)
        model(input_ids=ids, cache=theirs, use_cache=True)
        keys = [layer.keys for layer in mine.layers]
        out, _ = ex(input_ids=ids[:, :1], cache=mine, use_cache=True)
        model(input_ids=ids[:, :1], cache=theirs, use_cache=True)
    assert out.cache is mine and all(k is layer.keys for k, layer in zip(keys, mine.layers))  # same addresses
    for a, b in zip(mine.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys)
        assert int(a.cumulative_length) == int(b.cumulative_length) == ids.shape[1] + 1


def test_sliding_window_cache_is_captured_without_a_trace_per_step(monkeypatch):
    """Mistral's sliding-window layers count tokens in a Python int, which a graph would
    hold constant: such steps are captured at run time, not traced again at every step."""
    builds = []
    build_program = extractor_module.build_program
    monkeypatch.setattr(extractor_module, "build_program",
                        lambda *a, **k: builds.append(a[2] is not None) or build_program(*a, **k))  # fmt: skip
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                        sliding_window=8, pad_token_id=1, eos_token_id=1)  # fmt: skip
    model = transformers.MistralForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    path = "model.layers.0"
    ex = capture(model, [path])
    ids = prompt()
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    sequences, feats = run(ex.generate, ids, **kwargs)
    with hooked(model, [path]) as seen:
        expected = run(model.generate, ids, **kwargs)
    assert torch.equal(sequences, expected)
    for got, want in zip(feats[path], seen[path], strict=True):
        assert_same(got, want)
    assert builds.count(True) <= 2, builds


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_attention_probabilities_of_every_step_equal_output_attentions(family):
    """``attn_probs`` of an sdpa model (a fused kernel) at step ``t`` hold ``prompt + t`` keys
    and equal ``output_attentions=True`` of its eager twin (same weights) in the same generate."""
    model, twin = build(family, "sdpa"), build(family, "eager")
    ids = prompt()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    sequences, feats = run(capture(model, ["attn_probs"]).generate, ids, **kwargs)
    expected = run(twin.generate, ids, output_attentions=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(sequences, expected.sequences)
    keys = [k for k in feats if k.endswith(":attn_probs")]
    assert len(keys) == model.config.num_hidden_layers, list(feats)
    for layer, key in enumerate(keys):
        assert len(feats[key]) == len(expected.attentions) == 6
        for step, (got, want) in enumerate(zip(feats[key], expected.attentions)):
            assert got.shape == want[layer].shape == (2, 4, ids.shape[1] if step == 0 else 1, ids.shape[1] + step)
            torch.testing.assert_close(got, want[layer], msg=lambda m: f"{key} step {step}: {m}")


def test_compiled_generation_with_a_static_cache_is_one_graph_for_every_decoding_step():
    """transformers' compiled generation (``compile_config``, static cache) over the
    extractor: the decoding steps share one compiled graph, as they do for the model itself;
    another prompt of the same size compiles nothing new, a longer cache no more than the
    model compiles for it; tokens and values as the eager model's."""
    graphs = {"model": [], "extractor": []}

    def compile_config(name):
        def backend(gm, example_inputs):
            graphs[name].append(gm)
            return gm.forward

        config = transformers.CompileConfig(backend=backend, fullgraph=False, mode=None)
        config._compile_all_devices = True  # transformers compiles only on accelerators otherwise
        return config

    model = build("llama", "sdpa")
    path = MODELS["llama"][2]
    ids, other = prompt(), torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(9))
    static = dict(do_sample=False, cache_implementation="static")
    torch._dynamo.reset()
    try:
        config = compile_config("model")
        expected = run(model.generate, ids, max_new_tokens=8, min_new_tokens=8, compile_config=config, **static)
        run(model.generate, ids, max_new_tokens=16, min_new_tokens=16, compile_config=config, **static)
        with hooked(model, [path]) as seen:
            eager = run(model.generate, ids, max_new_tokens=8, min_new_tokens=8, **static)
        ex = capture(model, [path])
        config = compile_config("extractor")
        sequences, feats = run(ex.generate, ids, max_new_tokens=8, min_new_tokens=8, compile_config=config, **static)
        first = len(graphs["extractor"])
        again, _ = run(ex.generate, other, max_new_tokens=8, min_new_tokens=8, compile_config=config, **static)
        assert len(graphs["extractor"]) == first, "another prompt of the same size compiled again"
        longer, _ = run(ex.generate, ids, max_new_tokens=16, min_new_tokens=16, compile_config=config, **static)
    finally:
        torch._dynamo.reset()
    assert first == 1, graphs
    assert len(graphs["extractor"]) <= len(graphs["model"]), graphs
    assert torch.equal(sequences, expected) and torch.equal(sequences, eager)
    assert torch.equal(again, run(model.generate, other, max_new_tokens=8, min_new_tokens=8, **static))
    assert torch.equal(longer[:, : sequences.shape[1]], sequences)
    for got, want in zip(feats[path], seen[path], strict=True):
        assert_same(got, want, exact=False)


def test_generate_follows_a_model_changed_after_capture():
    """A block's MLP swapped and a config flag flipped between two ``generate`` calls: the
    second follows the model as it is then (tokens and values equal ``model.generate``)."""
    model = build("gpt2", "sdpa")
    path = "transformer.h.1"
    ex = capture(model, [path])
    ids = prompt()
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for change in (None, "swap", "flag"):
        if change == "swap":
            torch.manual_seed(5)
            model.transformer.h[1].mlp = type(model.transformer.h[1].mlp)(256, model.config).eval()
        elif change == "flag":
            model.config.output_hidden_states = True
        sequences, feats = run(ex.generate, ids, return_dict_in_generate=True, **kwargs)
        with hooked(model, [path]) as seen:
            expected = run(model.generate, ids, return_dict_in_generate=True, **kwargs)
        assert torch.equal(sequences.sequences, expected.sequences), change
        assert (sequences.get("hidden_states") is None) == (expected.get("hidden_states") is None), change
        for got, want in zip(feats[path], seen[path], strict=True):
            assert_same(got, want, path=f"{path} after {change}")

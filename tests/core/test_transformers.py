"""transformers models are first class (issue 14): captured in a graph traced by running
the model, equal to the model's own ``output_attentions`` and forward hooks, on every
call whatever the batch size and sequence length, compiled to one graph."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

from conftest import hook_values
from fxcapture import capture, list_names

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)  # fmt: skip

# family -> (model class, config, the module whose output is checked against hooks)
FAMILIES = {
    "gpt2": (transformers.GPT2LMHeadModel,
             transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64),
             "transformer.h.1"),
    "bert": (transformers.BertModel, transformers.BertConfig(**SMALL), "encoder.layer.1"),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL, num_key_value_heads=2),
              "model.layers.1.mlp"),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**SMALL, num_key_value_heads=2),
                "model.layers.1"),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
              "model.layers.0.self_attn"),
    "t5": (transformers.T5Model,
           transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
           "encoder.block.1"),
    "gpt_neox": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(**SMALL), "gpt_neox.layers.1"),
    "opt": (transformers.OPTForCausalLM,
            transformers.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
            "model.decoder.layers.1"),
    "phi3": (transformers.Phi3ForCausalLM, transformers.Phi3Config(**SMALL, pad_token_id=0), "model.layers.1"),
    "gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig(**SMALL, head_dim=8, num_key_value_heads=2),
              "model.layers.1"),
    "roberta": (transformers.RobertaModel, transformers.RobertaConfig(**SMALL, pad_token_id=1), "encoder.layer.1"),
    "distilbert": (transformers.DistilBertModel,
                   transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                 max_position_embeddings=64),
                   "transformer.layer.1"),
    "vit": (transformers.ViTModel,
            transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, image_size=32, patch_size=8),
            "layers.1"),
}  # fmt: skip
ENCODER_DECODER = {"t5"}


def build(family: str, attn: str) -> torch.nn.Module:
    cls, config, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(config), attn_implementation=attn)
    return model.eval()


def inputs(family: str, batch: int, length: int) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + length)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(2, 96, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # a padded sample
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if family in ENCODER_DECODER:
        kwargs["decoder_input_ids"] = ids[:, : max(1, length // 2)]
    return kwargs


def first_tensor(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


SIZES = [(2, 8), (3, 11), (1, 5), (4, 6), (2, 13), (1, 9), (3, 4), (2, 8), (5, 7), (2, 16)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_graph_capture_equals_the_model_over_sizes(family, attn):
    model = build(family, attn)
    path = FAMILIES[family][2]
    names = [path] + (["attn_weights"] if attn == "eager" else [])
    ex = capture(model, names)
    expected_keys = None
    for batch, length in SIZES:
        kwargs = inputs(family, batch, length)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, feats = ex(**kwargs)
            ref, seen = hook_values(model, [path], **kwargs, output_attentions=(attn == "eager"))
        assert ex.tracer == "running", ex.explain()
        assert torch.equal(first_tensor(out), first_tensor(ref)), (family, batch, length)
        hooked = seen[path][0]
        value = feats[path]
        assert torch.equal(value[0] if isinstance(value, tuple) else value,
                           hooked[0] if isinstance(hooked, tuple) else hooked)  # fmt: skip
        if attn == "eager":
            maps = [feats[k] for k in ex.names if k.endswith(":attn_weights")]
            own = ref.encoder_attentions if family in ENCODER_DECODER else ref.attentions
            if family in ENCODER_DECODER:  # encoder self-attention comes first
                maps = maps[: len(own)]
            assert len(maps) == len(own), (family, ex.names)
            for got, want in zip(maps, own):
                assert torch.equal(got, want)
        keys = sorted(feats)
        expected_keys = expected_keys or keys
        assert keys == expected_keys  # every selected key, on every call
    assert len(ex._running[False]) <= 3  # dynamic batch and length: few traces, not one per size


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_compiled_extractor_is_one_graph_without_recompiles(family):
    """Called as users do (the cache on): the returned ``DynamicCache`` is rebuilt inside the graph."""
    torch._dynamo.reset()
    model = build(family, "sdpa")
    path = FAMILIES[family][2]
    ex = capture(model, [path], example_inputs=inputs(family, 2, 8))
    compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    warmed = None
    for step, (batch, length) in enumerate([(2, 8), (3, 8), (2, 12), (4, 6), (3, 10), (5, 9), (2, 7)]):
        if step == 3:  # static, then batch and length made dynamic: no recompile after
            warmed = counters["stats"]["unique_graphs"]
        kwargs = inputs(family, batch, length)
        with torch.no_grad():
            out, feats = compiled(**kwargs)
            ref, seen = hook_values(model, [path], **kwargs)
        torch.testing.assert_close(first_tensor(out), first_tensor(ref), atol=1e-5, rtol=1e-5)
        value, hooked = feats[path], seen[path][0]
        torch.testing.assert_close(value[0] if isinstance(value, tuple) else value,
                                   hooked[0] if isinstance(hooked, tuple) else hooked, atol=1e-5, rtol=1e-5)  # fmt: skip
        cache = getattr(ref, "past_key_values", None)
        if cache is not None:  # the model's own cache object, with the same contents
            got = out.past_key_values
            assert type(got) is type(cache) and got.get_seq_length() == cache.get_seq_length() == length
            for mine, theirs in zip(got.layers, cache.layers):
                torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)
    assert warmed <= 3 and counters["stats"]["unique_graphs"] == warmed, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_inputs_made_under_inference_mode_are_traced_in_a_graph(family):
    """A loader's batches moved to the device inside ``torch.inference_mode`` (what
    ``extract`` does) are inference tensors: the running tracer still traces them."""
    model = build(family, "sdpa")
    path = FAMILIES[family][2]
    ex = capture(model, [path])
    with torch.inference_mode():
        for batch, length in [(2, 8), (3, 5)]:
            kwargs = {k: v.clone() for k, v in inputs(family, batch, length).items()}  # inference tensors
            out, feats = ex(**kwargs)
            ref, seen = hook_values(model, [path], **kwargs)
            assert torch.equal(first_tensor(out), first_tensor(ref))
            value, hooked = feats[path], seen[path][0]
            assert torch.equal(value[0] if isinstance(value, tuple) else value,
                               hooked[0] if isinstance(hooked, tuple) else hooked)  # fmt: skip
    assert ex.tracer == "running", ex.explain()


def test_list_names_given_example_inputs():
    model = build("gpt2", "eager")
    with pytest.raises(ValueError, match="example_inputs"):
        list_names(model)
    table = list_names(model, "transformer.h.*", kinds=["module"], example_inputs=inputs("gpt2", 2, 8))
    assert table.keys() == ["transformer.h.0", "transformer.h.1"]
    locals_ = list_names(model, "attn_weights", example_inputs=inputs("gpt2", 2, 8))
    assert [r.key for r in locals_] == ["transformer.h.0.attn:attn_weights", "transformer.h.1.attn:attn_weights"]


def test_train_mode_dropout_and_gradients_equal_eager():
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).train()
    reference = copy.deepcopy(model)
    ex = capture(model, ["transformer.h.0"])
    for step, (batch, length) in enumerate([(2, 8), (3, 6), (2, 8)]):
        kwargs = inputs("gpt2", batch, length)
        torch.manual_seed(step)
        out, _ = ex(**kwargs, use_cache=False)
        torch.manual_seed(step)
        ref = reference(**kwargs, use_cache=False)
        assert torch.equal(out.logits, ref.logits)
        out.logits.sum().backward()
        ref.logits.sum().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.equal(p.grad, q.grad)
            p.grad = q.grad = None


def test_running_trace_keeps_only_the_locals_a_selector_can_select():
    """Each value the running tracer keeps costs the export an op: locals no selector
    names stay out of the graph, yet are listed and suggested by name."""
    model = build("gpt2", "eager")
    x = inputs("gpt2", 2, 8)
    with torch.no_grad():
        expected = model(**x, output_attentions=True).attentions
        hooked = hook_values(model, ["transformer.h.1"], **x)[1]["transformer.h.1"][0]
    blocks = capture(model, ["transformer.h.1"], example_inputs=x)
    weights = capture(model, ["attn_w*"], example_inputs=x)
    assert not any(r.kind == "local" for r in blocks.catalogue)
    assert {r.variable for r in weights.catalogue if r.kind == "local"} == {"attn_weights"}
    assert "transformer.h.0.attn:attn_output" in blocks.catalogue.unselected
    for _ in range(2):
        with torch.no_grad():
            (_, got), (_, attn) = blocks(**x), weights(**x)
        torch.testing.assert_close(got["transformer.h.1"], hooked[0] if isinstance(hooked, tuple) else hooked,
                                   rtol=0, atol=0)  # fmt: skip
        assert [k for k in attn] == ["transformer.h.0.attn:attn_weights", "transformer.h.1.attn:attn_weights"]
        for a, b in zip(attn.values(), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Did you mean .*'attn_output'"):
        capture(model, ["attn_outptu"], example_inputs=x)
    everything = list_names(model, example_inputs=x)
    assert "transformer.h.0.attn:attn_output@1" in everything.keys()

"""Output specs a compiled graph can rebuild: the same objects as the original spec gives."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from fxcapture.core.pytrees import Rebuilt, compilable_spec

transformers = pytest.importorskip("transformers")
from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model  # noqa: E402


def gpt2_output():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    register_cache_pytrees_for_model(model)  # what the running tracer does before exporting
    with torch.no_grad():
        return model(torch.randint(0, 64, (2, 5)))


def test_a_cache_node_is_rebuilt_into_the_same_object_without_importing():
    out = gpt2_output()
    leaves, spec = pytree.tree_flatten(out)
    rebuilt_spec = compilable_spec(spec)
    assert [c.type for c in rebuilt_spec.children()][1] is Rebuilt  # the DynamicCache node
    mine, theirs = pytree.tree_unflatten(leaves, rebuilt_spec), pytree.tree_unflatten(leaves, spec)
    assert type(mine) is type(theirs) and type(mine.past_key_values) is type(out.past_key_values)
    for a, b in zip(mine.past_key_values.layers, out.past_key_values.layers):
        assert type(a) is type(b) and a.keys is b.keys and a.values is b.values
    assert mine.past_key_values.get_seq_length() == 5
    assert torch.equal(mine.logits, out.logits)


def test_rebuilding_compiles_to_one_graph():
    out = gpt2_output()
    leaves, spec = pytree.tree_flatten(out)
    rebuilt_spec = compilable_spec(spec)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fn = torch.compile(lambda *values: pytree.tree_unflatten(list(values), rebuilt_spec), fullgraph=True,
                       backend="eager")  # fmt: skip
    got = fn(*leaves)
    assert got.past_key_values.get_seq_length() == 5 and torch.equal(got.logits, out.logits)
    with pytest.raises(Exception, match="import_module|skipped"):  # the original spec: refused
        torch.compile(lambda *values: pytree.tree_unflatten(list(values), spec), fullgraph=True, backend="eager")(*leaves)


def test_other_specs_are_left_as_they_are():
    spec = pytree.tree_structure(({"a": torch.zeros(1)}, [torch.zeros(1), 3]))
    assert compilable_spec(spec) == spec

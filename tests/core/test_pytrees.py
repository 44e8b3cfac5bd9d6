"""Output specs a compiled graph can rebuild: the same objects as the original spec gives."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from fxcapture.core.pytrees import Rebuilt, compilable_spec, spec_walker

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


def _walked(walk, value):
    leaves = []
    return leaves if walk(value, leaves) else None


def test_the_spec_walker_flattens_what_tree_flatten_flattens_and_refuses_every_other_structure():
    """The input guard's fast flatten: on inputs shaped as the example it gives tree_flatten's
    leaves (the same objects, in order); on any input whose spec differs it says so."""
    import collections
    import copy

    out = gpt2_output()
    Pair = collections.namedtuple("Pair", "a b")
    example = ((torch.zeros(2),), {"ids": torch.ones(2, 1), "cache": out.past_key_values, "flag": True,
                                   "pair": Pair(torch.zeros(1), 3), "out": out, "none": None})  # fmt: skip
    leaves, spec = pytree.tree_flatten(example)
    walk = spec_walker(spec)
    assert all(map(lambda a, b: a is b, _walked(walk, example), leaves))  # noqa: C417

    def variant(change):
        value = copy.deepcopy(example)
        change(value[1])
        return value

    variants = [
        variant(lambda kw: kw.update(pair=(torch.zeros(1), 3))),  # a tuple where a namedtuple was
        variant(lambda kw: kw["cache"].layers.pop()),
        variant(lambda kw: setattr(kw["cache"].layers[0], "is_initialized", False)),
        variant(lambda kw: setattr(kw["cache"].layers[1], "device", torch.device("meta"))),
        variant(lambda kw: setattr(kw["cache"].layers[1], "extra", 1)),
        variant(lambda kw: setattr(kw["cache"], "offloading", True)),
        variant(lambda kw: kw["cache"].layers.append(kw["cache"].layers[0])),
        variant(lambda kw: kw.update(cache=transformers.StaticCache(config=transformers.GPT2Config(n_layer=2),
                                                                    max_cache_len=4))),  # fmt: skip
        variant(lambda kw: kw.pop("none")),
        variant(lambda kw: kw.update(ids=[torch.ones(2, 1)])),
    ]
    for value in variants:  # (values of leaves, such as flag=1, are the guard's leaf checks)
        assert pytree.tree_structure(value) != spec  # each really changes the structure
        assert _walked(walk, value) is None, value
    same = variant(lambda kw: kw["cache"].layers[0].__dict__.update(keys=torch.zeros(3)))  # new tensors only
    assert all(map(lambda a, b: a is b, _walked(walk, same), pytree.tree_leaves(same)))  # noqa: C417


def test_state_output_writes_the_graph_state_into_the_callers_cache_as_write_back_does():
    import copy

    from fxcapture.core.pytrees import StateOutput, write_back

    out = gpt2_output()
    leaves, spec = pytree.tree_flatten((out, {"h": torch.ones(1)}))  # a graph's (output, feats)
    spec = compilable_spec(spec)
    state = StateOutput.of(spec)
    assert state is not None and state.outer.num_leaves == 3  # logits, the cache as one leaf, h
    callers = copy.deepcopy(out.past_key_values)  # the cache as the caller holds it: other tensors
    layers = list(callers.layers)
    got, feats = state(list(leaves), [callers])
    want, _ = pytree.tree_unflatten(list(leaves), spec)
    want = write_back([copy.deepcopy(out.past_key_values)], want)
    assert got.past_key_values is callers and all(map(lambda a, b: a is b, callers.layers, layers))  # noqa: C417
    for a, b, c in zip(callers.layers, out.past_key_values.layers, want.past_key_values.layers):
        assert a.keys is b.keys is c.keys and a.values is b.values is c.values
        assert vars(a).keys() == vars(c).keys()
    assert torch.equal(got.logits, want.logits) and list(feats) == ["h"]
    fresh, _ = state(list(leaves), [])  # no cache given: a new one, as the model makes
    assert type(fresh.past_key_values) is type(callers) and fresh.past_key_values is not callers
    assert fresh.past_key_values.get_seq_length() == 5

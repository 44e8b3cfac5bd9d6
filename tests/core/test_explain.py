"""explain() says which tracer runs and why, in words a user can act on: "fx cannot trace
this model: <what in its forward stops fx> (<fx's own error>)"; values stay the model's."""

from __future__ import annotations

import torch
import torch.nn as nn
import transformers

from conftest import assert_matches_hooks, hook_values
from fxcapture import capture
from fxcapture.core.extractor import FX_FAILURES, plain_reason, tracer_line


class Branchy(nn.Module):
    """An ``if`` on a tensor's values: neither fx nor torch.export follows it, so the
    model runs as it is and values are captured while it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return h if h.sum() > 0 else -h


def test_a_decorated_forward_says_fx_cannot_trace_it_and_why():
    """transformers' Llama wraps its forward in a decorator taking *args/**kwargs (fx
    fails with "co_varnames is too small", which alone tells a user nothing): a
    transformers model is traced by running at once, and explain() says why."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64)  # fmt: skip
    model = transformers.LlamaModel(config).eval()
    ex = capture(model, ["layers.0.mlp"])
    for batch in (2, 3):
        ids = torch.randint(0, 96, (batch, 6))
        with torch.no_grad():
            out, feats = ex(ids)
        ref, seen = hook_values(model, ["layers.0.mlp"], ids)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
        assert_matches_hooks(feats, seen)
    first = ex.explain().splitlines()[0]
    assert first.startswith("tracer: running (fx cannot trace this model: LlamaModel is a transformers model")
    assert "torch.export traced it by running it" in first


def test_a_branch_on_a_tensor_says_fx_cannot_trace_it_and_what_runs_instead():
    model = Branchy()
    ex = capture(model, ["lin"])
    assert ex.explain().startswith("tracer: running, on the first call (fx cannot trace this model exactly")
    for sign in (1.0, -1.0):
        x = torch.full((2, 4), sign)
        out, feats = ex(x)
        ref, seen = hook_values(model, ["lin"], x)
        assert torch.equal(out, ref)
        assert_matches_hooks(feats, seen)
    first = ex.explain().splitlines()[0]
    assert first.startswith("tracer: run time (fx cannot trace this model: its forward branches")
    assert "values are captured while it runs" in first


def test_reasons_table():
    for error, meaning in FX_FAILURES.items():
        assert plain_reason(f"SomeError: {error}") == f"{meaning} (SomeError: {error})"
    assert plain_reason("an error fx has no words for") == "an error fx has no words for"
    assert tracer_line("symbolic", []) == "tracer: symbolic"
    line = tracer_line("symbolic", ["blocks.0: TraceError: boom", "torch.no_grad()"])
    assert line == ("tracer: symbolic (fx cannot trace 'blocks.0': TraceError: boom; "
                    "a graph from fx would differ from the model (torch.no_grad()); torch.fx traced the rest)")

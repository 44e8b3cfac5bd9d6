"""The tracer policy: a table of what a symbolic attempt saw -> tracer and reason, and
the same table over toy models (their values checked against the eager model and its
own hooks)."""

import pytest
import torch
import torch.nn as nn

from conftest import detached_copy
from fxcapture import capture
from fxcapture.core.policy import LATER, RAISE, RUN_TIME, RUNNING, SYMBOLIC, Attempt, decide
from fxcapture.core.spec import TraceFailure

HOOK = {"a": "forward hook log"}
CASES = [  # (what fx saw, tracer, words of the reason, eager leaves)
    (Attempt(traced=True), SYMBOLIC, "traces it exactly", set()),
    (Attempt(traced=True, hooks=HOOK), SYMBOLIC, "'a' (forward hook log)", {"a"}),
    (Attempt(traced=True, eager_calls={"a": "calls autograd.Function F.apply"}), SYMBOLIC, "'a' (calls", {"a"}),
    (Attempt(fallback="always", traced=True), RUN_TIME, "fallback='always'", {""}),
    (Attempt(traced=True, global_hooks=True), RUN_TIME, "global module hooks", {""}),
    (Attempt(traced=True, hazards=("torch.no_grad()",)), LATER, "torch.no_grad()", set()),
    (Attempt(traced=True, hazards=("torch.no_grad()",), has_example=True), RUNNING, "torch.no_grad()", set()),
    (Attempt(failure="TraceError: x", has_example=True), RUNNING, "the model: TraceError", set()),
    (Attempt(traced=True, failed={"b": "TraceError: y"}, has_example=True), RUNNING, "b: TraceError", set()),
    (Attempt(failure="E: x", has_example=True, running_failure="E: z"), RUN_TIME, "torch.export: E: z", {""}),
    (Attempt(traced=True, failed={"b": "E: y"}, has_example=True, running_failure="E: z"), SYMBOLIC,
     "eager leaves: 'b'", {"b"}),
    (Attempt(traced=True, failed={"b": "E: y"}, hooks=HOOK), SYMBOLIC, "'a' (forward hook log)", {"a", "b"}),
    (Attempt(traced=True, hazards=("torch.no_grad()",), hooks=HOOK, has_example=True), RUN_TIME,
     "'a' (forward hook log) must run as the model runs it", {""}),
    (Attempt(traced=True, hazards=("torch.no_grad()",), root_hooks=True, has_example=True), RUN_TIME,
     "the model itself", {""}),
    (Attempt(fallback="never", failure="E: x", has_example=True, running_failure="E: z"), RAISE, "E: z", set()),
    (Attempt(fallback="never", failure="E: x", hooks=HOOK), RAISE, "E: x", set()),
    (Attempt(fallback="never", failure="E: x", has_example=True), RUNNING, "E: x", set()),
]


@pytest.mark.parametrize("attempt, tracer, words, leaves", CASES)
def test_decide_table(attempt, tracer, words, leaves):
    decision = decide(attempt)
    assert decision.tracer == tracer
    assert words in decision.reason
    assert set(decision.eager_leaves) == leaves


# -- the same rules on toy models --------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x).relu()
        return self.b(h)


class NoGrad(Mlp):
    def forward(self, x):
        with torch.no_grad():
            y = self.a(x)
        return self.b(y)


class Branchy(nn.Module):
    """Data-dependent control flow in a submodule: fx fails there, export too."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), Gate()

    def forward(self, x):
        return self.b(self.a(x))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x - 1


class DataDependent(Mlp):
    def forward(self, x):
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else h


class Round(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


class Quant(nn.Module):
    def forward(self, x):
        return Round.apply(x)


class QuantMlp(Mlp):
    def __init__(self):
        super().__init__()
        self.q = Quant()

    def forward(self, x):
        return self.b(self.q(self.a(x)))


def log(module, args, output):  # the user's hook: appends what it sees
    module.seen.append(detached_copy(output))


MODELS = [  # (model, hooked module, capture kwargs, tracer, words of explain())
    (Mlp, None, {}, SYMBOLIC, "torch.fx traces it exactly"),
    (Mlp, "a", {}, SYMBOLIC, "'a' (forward hook log)"),
    (NoGrad, None, {"example_inputs": torch.randn(2, 4)}, RUNNING, "torch.no_grad()"),
    (NoGrad, "a", {"example_inputs": torch.randn(2, 4)}, RUN_TIME, "'a' (forward hook log) must run"),
    (Branchy, None, {}, SYMBOLIC, "eager leaves: 'b'"),
    (DataDependent, None, {"example_inputs": torch.randn(2, 4)}, RUN_TIME, "torch.export"),
    (QuantMlp, None, {}, SYMBOLIC, "'q' (calls autograd.Function"),
    (Mlp, None, {"fallback": "always"}, RUN_TIME, "fallback='always'"),
]


@pytest.mark.parametrize("cls, hooked, kwargs, tracer, words", MODELS)
def test_toy_models_tracer_reason_and_values(cls, hooked, kwargs, tracer, words):
    torch.manual_seed(0)
    model, reference = cls(), cls()
    reference.load_state_dict(model.state_dict())
    for m in (model, reference):
        if hooked:
            module = m.get_submodule(hooked)
            module.seen = []
            module.register_forward_hook(log)
    ex = capture(model, ["a", "b"], **kwargs)
    for step in range(3):
        x = torch.randn(3, 4) * (1 if step % 2 else -1)
        out, feats = ex(x)
        assert ex.tracer == tracer and words in ex.explain(), ex.explain()
        seen = {}
        for path in ("a", "b"):
            reference.get_submodule(path).register_forward_hook(
                lambda m, i, o, path=path: seen.setdefault(path, detached_copy(o))
            )
        ref = reference(x)
        for path in ("a", "b"):
            reference.get_submodule(path)._forward_hooks.popitem()
        assert torch.equal(out, ref)
        assert list(feats) == list(seen)  # a module that did not run on this call is missing
        for path in seen:
            assert torch.equal(feats[path], seen[path]), path
    if hooked:  # the user's hook ran once per call, on the values the model makes
        ran, expected = model.get_submodule(hooked).seen, reference.get_submodule(hooked).seen
        assert len(ran) == len(expected) == 3
        assert all(torch.equal(r, e) for r, e in zip(ran, expected))


def test_never_raises_the_trace_error():
    with pytest.raises(TraceFailure, match="the model's own forward"):
        capture(DataDependent(), ["a"], fallback="never", example_inputs=torch.randn(2, 4))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = Mlp(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_unknown_name_refused_at_build_whatever_hooks():
    model = Nested()
    model.block.register_forward_hook(lambda m, args, out: None)
    with pytest.raises(ValueError, match="'nope' is not a capturable name"):
        capture(model, ["nope"])
    with pytest.raises(ValueError, match="'block.nope:h'"):
        capture(model, ["block.nope:h"])
    ex = capture(model, ["block:h", "head"])  # a local inside the hooked module: known
    x = torch.randn(2, 4)
    out, feats = ex(x)
    assert torch.equal(feats["block:h"], model.block.a(x).relu())
    assert torch.equal(out, model(x)) and torch.equal(feats["head"], out)


def test_second_monitor_refuses_an_unknown_layer():
    from fxcapture import Monitor

    model = Nested()
    first = Monitor(model, ["block"], epochs_to_record=[0])
    with pytest.raises(ValueError, match="nope"):
        Monitor(model, ["nope"], epochs_to_record=[0])
    first.remove_hooks()


def test_to_networkx_of_an_extractor_traced_by_running_on_its_first_call():
    from fxcapture.inspect.graph import to_networkx

    model = NoGrad()
    ex = capture(model, ["a", "b"])
    with pytest.raises(ValueError, match="call it once"):
        to_networkx(ex)
    x = torch.randn(2, 4)
    out, feats = ex(x)
    assert ex.tracer == RUNNING
    g = to_networkx(ex, x)
    captured = {d["captured_as"] for _, d in g.nodes(data=True) if d["captured"]}
    assert captured == {"a", "b"}
    # the shapes come from running the graph: those of the model's own values
    assert {d["shape"] for _, d in g.nodes(data=True) if d["captured"]} == {str(tuple(out.shape))}

"""Every tracer computes what the eager model computes (issue 24, points 3-5): locals
written in place, buffers assigned in submodules, dataclass outputs, keyword-only and
static ``forward`` signatures, packed sequences, and tracing while other threads run.

Each check runs under the symbolic tracer, the running tracer and run-time capture,
beside an eager copy of the model (forward hooks, or the value computed by hand) over
several calls.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
import torch.nn as nn

from conftest import TRACERS, assert_matches_hooks, assert_same, capture_under, hook_values, under
from fxcapture import capture, list_names
from zoo.toy_models import KeywordOnlyDefaults, PackedLSTM


# -- locals written in place ----------------------------------------------------------
class WritesLocals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        y[0, 1] = 5  # item assignment through a view
        z = self.lin(x * 2)
        z[:, 2:].zero_()  # an in-place op on a slice
        return y + z


@pytest.mark.parametrize("tracer", TRACERS)
def test_locals_are_read_when_their_function_returns(tracer):
    model = WritesLocals()
    root, key = under(tracer, model)
    ex = capture_under(tracer, root, [":y", ":z"], torch.randn(3, 4), key)
    for batch in (3, 5, 2):
        x = torch.randn(batch, 4)
        out, feats = ex(x)
        with torch.no_grad():
            y, z = model.lin(x), model.lin(x * 2)
            y[0, 1] = 5
            z[:, 2:] = 0
            assert torch.equal(out, y + z) and torch.equal(out, model(x))
        assert torch.equal(feats[key(":y")], y) and torch.equal(feats[key(":z")], z), ex.tracer


# -- buffers assigned in submodules ----------------------------------------------------
class Ema(nn.Module):
    """A running mean assigned (not written in place) in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("running", torch.zeros(4))

    def forward(self, x):
        h = self.lin(x)
        self.running = 0.9 * self.running + 0.1 * h.detach().mean(0)
        return h + self.running


class NestedEma(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = Ema()
        self.deep = nn.Sequential(nn.ReLU(), Ema())

    def forward(self, x):
        return self.deep(self.first(x))


@pytest.mark.parametrize("tracer", TRACERS)
def test_buffers_assigned_in_submodules_move_as_in_eager(tracer):
    root, key = under(tracer, NestedEma())
    reference = copy.deepcopy(root)
    ex = capture_under(tracer, root, ["first", "deep.1"], torch.randn(2, 4), key)
    for batch in (2, 3, 4):
        x = torch.randn(batch, 4)
        out, feats = ex(x)
        ref, seen = hook_values(reference, [key("first"), key("deep.1")], x)
        assert_same(out, ref)
        assert_matches_hooks(feats, seen)
    for (name, b), c in zip(root.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), f"{ex.tracer}: buffer {name} differs after 3 calls"


# -- dataclass and ModelOutput module outputs, captured and edited ------------------------
@dataclasses.dataclass
class Pair:
    a: torch.Tensor
    b: torch.Tensor


class Halves(nn.Module):
    def __init__(self, output_type: type = Pair) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.output_type = output_type

    def forward(self, x):
        h = self.lin(x)
        return self.output_type(a=h, b=h * 2)


class UsesHalves(nn.Module):
    def __init__(self, output_type: type) -> None:
        super().__init__()
        self.halves = Halves(output_type)

    def forward(self, x):
        pair = self.halves(x)
        return pair.a - pair.b.relu()


def _output_type(kind: str) -> type:
    if kind == "dataclass":
        return Pair
    transformers = pytest.importorskip("transformers")

    @dataclasses.dataclass
    class HalvesOutput(transformers.utils.ModelOutput):
        a: torch.Tensor = None
        b: torch.Tensor = None

    return HalvesOutput


def _swap_b(value, key):
    return dataclasses.replace(value, b=-value.b)


@pytest.mark.parametrize("kind", ["dataclass", "ModelOutput"])
@pytest.mark.parametrize("tracer", TRACERS)
def test_dataclass_outputs_are_captured_and_edited(tracer, kind):
    model = UsesHalves(_output_type(kind))
    root, key = under(tracer, model)
    reference = copy.deepcopy(root)
    plain = capture_under(tracer, copy.deepcopy(root), ["halves"], torch.randn(2, 4), key)
    edited = capture_under(tracer, root, ["halves"], torch.randn(2, 4), key, edit={"halves": _swap_b})
    for batch in (2, 3, 4):
        x = torch.randn(batch, 4)
        out, feats = plain(x)
        ref, seen = hook_values(reference, [key("halves")], x)
        assert_same(out, ref)
        assert_matches_hooks(feats, seen)
        # the edit, done by a forward hook returning the replacement on the eager copy
        handle = reference.get_submodule(key("halves")).register_forward_hook(lambda m, a, o: _swap_b(o, ""))
        ref, seen = hook_values(reference, [key("halves")], x)
        handle.remove()
        out, feats = edited(x)
        assert_same(out, ref)
        assert_matches_hooks(feats, seen)


# -- locals of torch's own frames ------------------------------------------------------------
class ItemAssignment(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        y[0] = 5
        y[:, 1] = x[:, 0]
        return y


@pytest.mark.parametrize("tracer", ["symbolic", "running"])
def test_only_the_models_own_frames_have_locals(tracer):
    root, key = under(tracer, ItemAssignment())
    example = torch.randn(3, 4) if tracer == "running" else None
    found = {r.key for r in list_names(root, kinds=["local"], example_inputs=example)}
    wrapper = {":args"} if tracer == "running" else set()  # ForceRunning.forward(*args)
    assert found == {key(":x"), key(":y")} | wrapper


# -- signatures and types ----------------------------------------------------------------------
@pytest.mark.parametrize("tracer", TRACERS)
def test_keyword_only_arguments_may_be_omitted_or_given(tracer):
    root, key = under(tracer, KeywordOnlyDefaults())
    reference = copy.deepcopy(root)
    ex = capture_under(tracer, root, ["lin"], torch.randn(2, 4), key)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    for kwargs in ({}, {"mask": mask}, {"scale": 3.0}, {}, {"mask": mask, "scale": 0.5}):
        x = torch.randn(3, 4)
        out, feats = ex(x, **kwargs)
        ref, seen = hook_values(reference, [key("lin")], x, **kwargs)
        assert_same(out, ref)
        assert_matches_hooks(feats, seen)


class StaticForward(nn.Module):
    @staticmethod
    def forward(a, b):
        c = torch.relu(a) + b * 2
        return c - 1


class CallsStatic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.static = StaticForward()

    def forward(self, x):
        return self.static(self.lin(x), x)


@pytest.mark.parametrize("fallback", ["never", "auto", "always"])
def test_a_static_forward_with_several_inputs(fallback):
    ex = capture(StaticForward(), [":c"], fallback=fallback)
    model = CallsStatic()
    nested = capture(model, ["static", "static:c"], fallback=fallback)
    for batch in (2, 3, 1):
        a, b = torch.randn(batch, 4), torch.randn(batch, 4)
        out, feats = ex(a, b)
        assert torch.equal(out, StaticForward.forward(a, b))
        assert torch.equal(feats[":c"], torch.relu(a) + b * 2)
        out, feats = nested(a)
        ref, seen = hook_values(model, ["static"], a)
        assert_same(out, ref)
        assert_matches_hooks(feats, seen)
        torch.testing.assert_close(feats["static:c"], ref + 1)


@pytest.mark.parametrize("tracer", TRACERS)
def test_packed_sequences_flow_through_an_lstm(tracer):
    model = PackedLSTM()
    reference = copy.deepcopy(model)
    lengths = torch.tensor([5, 2, 3])
    fallback = {"symbolic": "never", "running": "auto", "run time": "always"}[tracer]
    example = (torch.randn(3, 5, 4), lengths) if tracer == "running" else None
    ex = capture(model, ["rnn", "head"], fallback=fallback, example_inputs=example)
    for batch_lengths in ([5, 2, 3], [4, 4, 1, 2], [3, 5, 2]):
        lengths = torch.tensor(batch_lengths)
        x = torch.randn(len(batch_lengths), int(lengths.max()), 4)
        out, feats = ex(x, lengths)
        ref, seen = hook_values(reference, ["rnn", "head"], x, lengths)
        assert_same(out, ref)
        assert_matches_hooks(feats, seen)


# -- threads ---------------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Sequential(nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.b(self.a(x))


def test_tracing_is_invisible_to_other_threads():
    """torch.fx patches nn.Module for every thread while it traces."""
    plain, stop, failures, calls = Plain(), threading.Event(), [], [0]

    def loop():
        x = torch.randn(2, 4)
        while not stop.is_set():
            try:
                plain(x)
                calls[0] += 1
            except Exception as err:  # noqa: BLE001 (counted, the assertion below names it)
                failures.append(repr(err))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        for _ in range(20):
            model = Plain()
            out, feats = capture(model, ["a", "b.0"])(torch.randn(3, 4))
    finally:
        stop.set()
        thread.join()
    assert calls[0] > 0 and not failures, failures[:3]


@pytest.mark.parametrize("tracer", TRACERS)
def test_first_calls_from_eight_threads_at_once(tracer):
    root, key = under(tracer, Plain())
    reference = copy.deepcopy(root)
    paths = [key("a"), key("b.0"), key("b")]
    ex = capture_under(tracer, root, ["a", "b.0", "b"], None, key)  # traced on the first call
    inputs = [torch.randn(i + 1, 4) for i in range(8)]
    expected = [hook_values(reference, paths, x) for x in inputs]
    barrier, errors, results = threading.Barrier(8), [], {}

    def work(i):
        try:
            barrier.wait()
            with torch.no_grad():
                results[i] = [ex(inputs[i]) for _ in range(3)]
        except Exception as err:  # noqa: BLE001
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    for i, (ref, seen) in enumerate(expected):
        for out, feats in results[i]:
            assert_same(out, ref, exact=False)
            assert_matches_hooks(feats, seen, exact=False)

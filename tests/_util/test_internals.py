"""Canaries: each assumption fxcapture makes about private torch / CPython machinery
(``fxcapture._util.internals``), pinned so that a torch that moves fails here, loudly.

Checked on torch 2.14.1. A failure here means: read the torch change, update
``_util/internals.py`` (and the version it names), not the test.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import tokenize
import types
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from fxcapture._util import internals
from fxcapture.core.extractor import run_hooks, run_pre_hooks
from fxcapture._util.internals import InternalsChanged, pytree
from fxcapture.core.quiet import hold_output

PACKAGE = Path(__file__).resolve().parents[2] / "fxcapture"


class Regions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            frozen = self.lin(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = self.lin(x)
        return frozen + low.float() + self.lin(x)


def test_exporting_no_grad_and_autocast_blocks_yields_the_region_ops():
    graph = torch.export.export(Regions(), (torch.randn(2, 4),), strict=False).module().graph
    targets = {n.target for n in graph.nodes if n.op == "call_function"}
    grad_op, autocast_op = internals.region_ops()
    assert grad_op in targets  # values made under no_grad live in its subgraph
    assert autocast_op in targets


def test_missing_region_ops_raise_instead_of_losing_values(monkeypatch):
    monkeypatch.setattr(torch.ops, "higher_order", types.SimpleNamespace())
    with pytest.raises(InternalsChanged, match="wrap_with_set_grad_enabled"):
        internals.region_ops()


class Structured(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple:
        return x + 1, {"double": x * 2}


def test_an_unlifted_graph_has_the_output_spec_it_rewrites():
    model, x = Structured(), torch.randn(3)
    unlifted = torch.export.export(model, (x,), strict=False).module()
    graph = unlifted.graph
    assert internals.output_spec(graph) == pytree.tree_structure(model(x))
    # rewritten as fxcapture's passes do: (original output, {key: value}) from one flat list
    output = graph.output_node()
    flat = list(output.args[0])
    features, feature_spec = pytree.tree_flatten({"f": flat[0]}, is_leaf=lambda v: isinstance(v, fx.Node))
    internals.set_output_spec(graph, internals.tree_spec(tuple, None, [internals.output_spec(graph), feature_spec]))
    output.args = (tuple(flat + features),)
    unlifted.recompile()
    out, feats = unlifted(x)
    expected = model(x)
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1]["double"], expected[1]["double"])
    assert torch.equal(feats["f"], expected[0])


def test_a_plain_fx_graph_has_no_output_spec_and_an_unknown_code_generator_raises():
    assert internals.output_spec(fx.symbolic_trace(Structured()).graph) is None
    graph = fx.symbolic_trace(Structured()).graph
    graph.set_codegen(type("OtherCodeGen", (fx.graph.CodeGen,), {})())
    with pytest.raises(InternalsChanged, match="pytree_info"):
        internals.output_spec(graph)


def test_the_hook_dicts_are_what_the_replay_covers():
    module_dicts = {k for k in vars(nn.Linear(1, 1)) if re.match(r"_(forward|backward)\w*hook", k)}
    assert module_dicts == set(internals.MODULE_HOOK_DICTS) | set(internals.FORWARD_HOOK_FLAGS)
    global_dicts = {k for k in vars(torch.nn.modules.module) if re.match(r"_global_(forward|backward)\w*hook", k)}
    flags = {"_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called"}
    assert global_dicts == set(internals.GLOBAL_HOOK_DICTS) | flags  # flags only mark hooks of these


def test_replayed_hooks_give_what_nn_module_call_gives():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    model.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model.register_forward_pre_hook(lambda m, args, kwargs: ((args[0] + 1,), kwargs), with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: out - 3)
    model.register_forward_hook(lambda m, args, kwargs, out: out * 5, with_kwargs=True, always_call=True)
    assert [flags for _, *flags in internals.forward_hooks(model)] == [[False, False], [True, True]]
    for _ in range(3):
        x = torch.randn(2, 4)
        args, kwargs = run_pre_hooks(model, (x,), {})
        assert torch.equal(run_hooks(model, args, kwargs, model.forward(*args, **kwargs)), model(x))


@pytest.mark.parametrize("register", [
    torch.nn.modules.module.register_module_forward_hook,
    torch.nn.modules.module.register_module_forward_pre_hook,
    torch.nn.modules.module.register_module_full_backward_hook,
    torch.nn.modules.module.register_module_full_backward_pre_hook,
])  # fmt: skip
def test_global_hooks_are_seen(register):
    assert not internals.global_hooks()
    handle = register(lambda *args: None)
    try:
        assert internals.global_hooks()
    finally:
        handle.remove()
    assert not internals.global_hooks()


def test_grad_mode_context_managers_enter_through_the_codes_fxcapture_watches():
    codes = internals.grad_mode_codes()
    seen: set[str] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            seen.add(codes[frame.f_code])

    sys.setprofile(profile)
    try:
        with torch.no_grad(), torch.enable_grad(), torch.set_grad_enabled(False), torch.inference_mode():
            pass
        with torch.autocast("cpu"):
            pass
    finally:
        sys.setprofile(None)
    assert seen == set(codes.values())


def test_a_grad_mode_manager_in_c_raises_instead_of_going_unseen(monkeypatch):
    monkeypatch.setattr(torch.no_grad, "__enter__", torch._C._set_grad_enabled)
    with pytest.raises(InternalsChanged, match=r"torch.no_grad\(\)"):
        internals.grad_mode_codes()


def test_tensor_version_counts_in_place_writes():
    t = torch.zeros(2)
    before = internals.tensor_version(t)
    t.add_(1)
    assert internals.tensor_version(t) == before + 1
    assert internals.tensor_version(t + 1) == 0


def test_is_fx_tracing_inside_a_symbolic_trace_only():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(internals.is_fx_tracing())
            return x

    fx.symbolic_trace(Probe())
    Probe()(torch.zeros(1))
    assert seen == [True, False]


def test_pytree_nodes_unflatten_with_their_registered_function():
    value = {"a": (torch.zeros(1), [torch.ones(1)])}
    leaves, spec = pytree.tree_flatten(value)
    rebuilt = internals.tree_spec(spec.type, spec.context, spec.children())
    assert pytree.tree_unflatten(leaves, rebuilt)["a"][1][0] is leaves[1]
    assert internals.unflatten_fn(tuple)([1, 2], None) == (1, 2)
    assert internals.flatten_fn(dict)({"a": 1, "b": 2}) == ([1, 2], ["a", "b"])


def test_sdpa_functions_are_the_ones_models_call():
    import torch.nn.functional as F

    assert F.scaled_dot_product_attention in internals.SDPA_FUNCTIONS
    assert all(f.__module__ in internals.TORCH_FUNCTION_MODULES for f in (torch.add, F.relu, torch.matmul))


# -- frame watching ---------------------------------------------------------------------------
def _work(x):
    doubled = x * 2
    return doubled + 1


def _tools_in_use() -> list:
    monitoring = getattr(sys, "monitoring", None)
    return [] if monitoring is None else [t for t in range(6) if monitoring.get_tool(t) == "fxcapture"]


def test_watch_returns_sees_the_watched_code_of_this_thread_only():
    seen = []
    go, done = threading.Event(), threading.Event()

    def other():
        go.wait()
        _work(100)
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with internals.watch_returns(lambda code: code is _work.__code__, lambda f: seen.append(dict(f.f_locals))):
        _work(1)
        go.set()
        done.wait()
        _work(2)
    thread.join()
    _work(3)  # after the block: not watched
    assert seen == [{"x": 1, "doubled": 2}, {"x": 2, "doubled": 4}]
    assert _tools_in_use() == [] and sys.gettrace() is None and sys.getprofile() is None


def test_watch_returns_nests_and_keeps_a_debuggers_trace_function():
    outer, inner, traced = [], [], []

    def tracer(frame, event, arg):
        if frame.f_code is _work.__code__:
            traced.append(event)
        return None

    sys.settrace(tracer)
    try:
        with internals.watch_returns(lambda c: c is _work.__code__, lambda f: outer.append(f.f_locals["x"])):
            with internals.watch_returns(lambda c: c is _work.__code__, lambda f: inner.append(f.f_locals["x"])):
                _work(1)
            _work(2)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
    assert outer == [1, 2] and inner == [1] and traced.count("call") == 2
    assert _tools_in_use() == [] and sys.getprofile() is None


# -- nothing outside the internals module uses private machinery -------------------------------
PRIVATE = re.compile(
    r"\btorch(\.\w+)*\._(?!_)\w+"  # torch._ops, torch.utils._pytree, torch._C ... (not __file__)
    r"|\._(forward|backward|global)\w*hooks\w*"  # nn.Module's hook dicts
    r"|\b_symbolic_trace\b|\._codegen\b|\bpytree_info\b|\w\._version\b|\._non_persistent\w*"
    r"|\bsys\._getframe\b|\bhigher_order\b"
)


def _code_without_comments_and_strings(path: Path) -> list[tuple[int, str]]:
    """The lines of ``path`` with comments and string literals (docstrings) blanked out."""
    lines = path.read_text().splitlines()
    for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if t.type in (tokenize.COMMENT, tokenize.STRING):
            (row, col), (end_row, end_col) = t.start, t.end
            for r in range(row, end_row + 1):
                text = lines[r - 1]
                start, stop = (col if r == row else 0), (end_col if r == end_row else len(text))
                lines[r - 1] = text[:start] + " " * (stop - start) + text[stop:]
    return [(i, text) for i, text in enumerate(lines, 1) if text.strip()]


def test_no_module_outside_internals_uses_a_private_torch_name():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {text}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "internals.py"
        for line, text in _code_without_comments_and_strings(path)
        if PRIVATE.search(text)
    ]
    assert not found, "private torch machinery outside fxcapture/_util/internals.py:\n" + "\n".join(found)


def test_the_scan_would_see_a_private_name():
    assert PRIVATE.search("import torch.utils._pytree as pytree")
    assert PRIVATE.search("for h in model._forward_hooks.values():")
    assert PRIVATE.search("frame = sys._getframe(1)")
    assert PRIVATE.search("ident = (id(v), v._version)")
    assert not PRIVATE.search("self._seen.clear()")
    assert not PRIVATE.search("from ._version import __version__; torch.__version__")


def test_export_quietly_exports_as_export_does_and_prints_no_partial_graph(capfd):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    x = torch.randn(2, 3)
    ours = internals.export_quietly(Structured(), (x,), {}, None)
    theirs = torch.export.export(Structured(), (x,), strict=False)
    assert ours.graph_module.code == theirs.graph_module.code
    with pytest.raises(RuntimeError, match="data-dependent"), hold_output():  # its log records: held
        internals.export_quietly(DataDependent(), (x,), {}, None)
    quiet = capfd.readouterr()
    with pytest.raises(RuntimeError, match="data-dependent"):
        torch.export.export(DataDependent(), (x,), strict=False)
    loud = capfd.readouterr()
    assert "def forward" in loud.err  # what export's wrapper prints, and export_quietly does not
    assert "def forward" not in quiet.err + quiet.out


def test_torch_export_exports_through_the_function_export_quietly_calls(monkeypatch):
    from torch.export import _trace

    calls = []
    real = _trace._export_for_training
    monkeypatch.setattr(_trace, "_export_for_training", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.export.export(Structured(), (torch.randn(3),), strict=False)
    assert len(calls) == 1 and calls[0]["strict"] is False

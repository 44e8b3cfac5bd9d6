"""The extractor follows the model after ``capture`` (issue 24, points 1 and 2).

Each test changes a model after capture (mode, frozen weights, dtype, a replaced layer,
LoRA adapters, a config flag) or uses a model that keeps Python state in ``forward``
(a counter, an EMA in a plain attribute, a list it appends to), and compares, over 3
calls, the extractor with an eager copy given the same changes: outputs, captured
values (forward hooks on the copy), parameters, buffers and Python attributes. Every
case runs under each tracer: symbolic fx, by running (``torch.export``) and run time.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from conftest import assert_same, hooked, tiny_gpt2

from fxcapture import capture, list_names

TRACERS = ["symbolic", "running", "run time"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.3)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.drop(self.fc1(x))))


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.shape[0] > 0:
            return self.inner(x)
        return x


class Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


class EMA(nn.Module):
    """An exponential moving average kept in a plain attribute (not a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = None

    def forward(self, x):
        now = x.mean(0).detach()
        self.mean = now if self.mean is None else 0.9 * self.mean + 0.1 * now
        return x - self.mean


class Logger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log: list = []
        self.stats: dict = {"seen": []}
        self.warm = False

    def forward(self, x):
        self.log.append(x.shape[0])
        self.stats["seen"].append(x.detach().sum())
        out = x * 2 if self.warm else x
        self.warm = True
        return out


class Stateful(nn.Module):
    """Traceable layers around modules that keep Python state."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.counter = Counter()
        self.block = nn.Sequential(nn.Linear(8, 8), EMA())
        self.logger = Logger()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.logger(self.block(self.counter(self.fc(x)))))


def build(model: nn.Module, names: list[str], tracer: str, example: Any) -> tuple[nn.Module, Any, str]:
    """(the model as captured, the extractor, the prefix of the names' paths)."""
    if tracer == "running":
        model = ShapeBranch(model)
        prefix = "inner."
    else:
        prefix = ""
    ex = capture(model, [prefix + n for n in names], fallback="always" if tracer == "run time" else "auto",
                 example_inputs=example if tracer == "running" else None)  # fmt: skip
    return model, ex, prefix


def python_state(model: nn.Module) -> dict[str, Any]:
    """The attributes of every module that are not nn.Module's own bookkeeping."""
    own = set(nn.Module().__dict__)
    return {f"{p}.{k}": v for p, m in model.named_modules() for k, v in vars(m).items() if k not in own}


def follow(model: nn.Module, names: list[str], tracer: str, change: Callable[[nn.Module, nn.Module], None],
           make_input: Callable[[nn.Module], torch.Tensor], exact: bool = True) -> Any:  # fmt: skip
    """Capture ``model``, call it 3 times (``change`` applied to it and to an eager copy
    before the second call) and compare everything with the eager copy."""
    reference = copy.deepcopy(model)
    model, ex, prefix = build(model, names, tracer, make_input(model))
    if tracer == "running":
        reference = ShapeBranch(reference)
    for step in range(3):
        if step == 1:
            change(model, reference)
        x = make_input(model)
        torch.manual_seed(step)
        out, feats = ex(x)
        torch.manual_seed(step)
        with hooked(reference, [prefix + n for n in names]) as seen:
            expected = reference(x)
        assert_same(out, expected, exact=exact, path=f"step {step}: output")
        for name in names:
            assert_same(feats[prefix + name], seen[prefix + name][0], exact=exact, path=f"step {step}: {name}")
    assert_same(dict(model.named_parameters()), dict(reference.named_parameters()), exact=exact)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert_same(dict(model.named_buffers()), dict(reference.named_buffers()), exact=exact)
    assert_same(python_state(model), python_state(reference), exact=exact)
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    return ex


def float_input(model: nn.Module) -> torch.Tensor:
    return torch.randn(3, 8, dtype=next(model.parameters()).dtype)


def both(fn: Callable[[nn.Module], Any]) -> Callable[[nn.Module, nn.Module], None]:
    return lambda model, reference: (fn(model), fn(reference))


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize(
    "change",
    [
        both(lambda m: m.eval()),
        both(lambda m: m.eval().train()),
        both(lambda m: m.requires_grad_(False)),
        both(lambda m: m.half()),
        both(lambda m: m.get_submodule("inner.drop" if hasattr(m, "inner") else "drop").eval()),
    ],
    ids=["eval", "train", "requires_grad_", "half", "one-module-eval"],
)
def test_mode_grad_and_dtype_changes(tracer, change):
    model = MLP().train()  # dropout on: a trace in train mode draws random numbers
    follow(model, ["fc1", "drop", "fc2"], tracer, change, float_input)


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_replaced_head(tracer):
    def replace(model, reference):
        head = nn.Linear(16, 6)
        for m, layer in ((model, head), (reference, copy.deepcopy(head))):
            (m.inner if hasattr(m, "inner") else m).fc2 = layer

    ex = follow(MLP().eval(), ["act", "fc2"], tracer, replace, float_input)
    if tracer != "run time":
        assert "traced again: the model changed (" in ex.explain() and "fc2: replaced" in ex.explain()


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(x))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_hook_registered_after_capture(tracer):
    def double(module, args, out):
        return out * 2

    def hook(model, reference):
        for m in (model, reference):
            m.get_submodule("inner.block" if hasattr(m, "inner") else "block").register_forward_hook(double)

    ex = follow(Nested().eval(), ["block", "head"], tracer, hook, float_input)
    if tracer != "run time":
        assert "block: forward hook added" in ex.explain()


@pytest.mark.parametrize("tracer", TRACERS)
def test_lora_adapters_injected_after_capture(tracer):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)

    def inject(model, reference):
        for m in (model, reference):
            torch.manual_seed(1)  # the same adapter weights in both
            peft.inject_adapter_in_model(config, m)

    follow(MLP().eval(), ["fc1", "fc2"], tracer, inject, float_input)


@pytest.mark.parametrize("tracer", TRACERS)
def test_python_state_in_forward(tracer):
    names = ["fc", "counter", "counter.lin", "block", "logger", "out"]
    ex = follow(Stateful().eval(), names, tracer, lambda m, r: None, float_input)
    state = python_state(ex._model)
    prefix = "inner." if tracer == "running" else ""
    assert state[f"{prefix}counter.calls"] == 3 and state[f"{prefix}logger.log"] == [3, 3, 3]
    if tracer == "symbolic":  # the stateful modules run eagerly inside the graph
        assert {"counter", "block.1", "logger"} <= set(ex.untraced)


@pytest.mark.parametrize("tracer", ["running", "run time"])
@pytest.mark.parametrize(
    "change",
    [
        both(lambda m: setattr(m.config, "output_hidden_states", True)),
        both(lambda m: m.set_attn_implementation("sdpa")),
        both(lambda m: m.train()),
    ],
    ids=["output_hidden_states", "attn_implementation", "train"],
)
def test_transformers_config_changes(tracer, change):
    model = tiny_gpt2()  # eager attention
    reference = copy.deepcopy(model)
    ex = capture(model, ["transformer.h.1"], fallback="always" if tracer == "run time" else "auto")
    for step in range(3):
        if step == 1:
            change(model, reference)
        ids = torch.randint(0, 100, (2, 6 + step))
        torch.manual_seed(step)
        out, feats = ex(input_ids=ids)
        torch.manual_seed(step)
        with hooked(reference, ["transformer.h.1"]) as seen:
            expected = reference(input_ids=ids)
        assert ex.tracer == tracer
        assert_same(out.logits, expected.logits, exact=False, path=f"step {step}")
        assert (out.hidden_states is None) == (expected.hidden_states is None)
        if expected.hidden_states is not None:
            assert_same(out.hidden_states, expected.hidden_states, exact=False)
        assert_same(feats["transformer.h.1"], seen["transformer.h.1"][0], exact=False)


# -- nothing from a trace is left in the model ---------------------------------------
_TRACE_TYPES = (fx.Proxy, fx.Node, torch.SymInt, torch.SymFloat, torch.SymBool)


def leftovers(model: nn.Module) -> list[str]:
    """Paths of trace objects (Proxy, SymInt, FakeTensor) or fxcapture objects anywhere
    in the modules' ``__dict__``s, lists, tuples, sets and dicts included."""
    from torch._subclasses.fake_tensor import FakeTensor

    found = []

    def walk(value: Any, where: str, depth: int) -> None:
        if isinstance(value, _TRACE_TYPES + (FakeTensor,)) or type(value).__module__.startswith("fxcapture"):
            found.append(f"{where}: {type(value).__name__}")
        elif depth and isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]", depth - 1)
        elif depth and isinstance(value, (list, tuple, set)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", depth - 1)

    for path, module in model.named_modules():
        for key, value in vars(module).items():
            if key != "_modules":
                walk(value, f"{path}.{key}", 4)
    return found


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("which", ["stateful", "gpt2"])
def test_no_extractor_leaves_anything_in_the_model(tracer, which):
    if which == "gpt2":
        model, x = tiny_gpt2(), torch.randint(0, 100, (2, 5))
        names = ["transformer.h.0", "transformer.h.1"]
        if tracer == "symbolic":
            pytest.skip("torch.fx cannot trace GPT-2")
    else:
        model, x = Stateful().eval(), torch.randn(3, 8)
        names = ["counter", "logger", "out"]
        if tracer == "running":
            model = ShapeBranch(model)
            names = ["inner." + n for n in names]
    example = x if tracer == "running" else None
    # Python state where the model is traced by running: everything runs at run time
    expected = "run time" if (which, tracer) == ("stateful", "running") else tracer
    if expected == "run time" and tracer == "running":
        with pytest.raises(ValueError, match="Python state"):
            list_names(model, example_inputs=example)
    else:  # GPT-2's names come from running it
        list_names(model, example_inputs=x if which == "gpt2" else example)
    assert leftovers(model) == []
    ex = capture(model, names, fallback="always" if tracer == "run time" else "auto", example_inputs=example)
    assert leftovers(model) == []
    for _ in range(3):
        ex(x)
        assert leftovers(model) == []
    assert ex.tracer == expected

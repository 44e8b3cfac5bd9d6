"""Bad arguments to ``capture`` and ``list_names``: refused by name, before any trace (the
trace is replaced by a failure to show it never ran), with the fix in the message."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from fxcapture import capture, list_names
from fxcapture.core.select import UnknownSelectorError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class Base(nn.Module):
    """Like a transformers base model: blocks at ``h.<i>``."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return x


class WithHead(nn.Module):
    """Like a model with a task head: the base at ``transformer``."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = Base()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(x))


@pytest.mark.parametrize("model, message", [
    (Base, "capture() got the class Base, not a model: build one first, e.g. capture(Base(...), ...)"),
    ("resnet18", "capture() got the str 'resnet18', not a model: build the model in Python first"),
    (42, "capture() needs an nn.Module or a function, got int"),
])  # fmt: skip
def test_a_model_that_is_not_one_is_named(no_trace, model, message):
    with pytest.raises(TypeError) as err:
        capture(model, "h.0")
    assert str(err.value).startswith(message)


def test_list_names_names_itself(no_trace):
    with pytest.raises(TypeError, match=r"^list_names\(\) needs an nn.Module or a function, got int"):
        list_names(42)
    with pytest.raises(TypeError, match=r"^list_names\(\) got the class Base"):
        list_names(Base)


@pytest.mark.parametrize("example, what", [
    ("x", "(got str)"),
    (3, "(got int)"),
    (np.zeros((2, 4), np.float32), "(got ndarray, convert it with torch.from_numpy)"),
    ((1, 2), "(got tuple)"),
])  # fmt: skip
def test_example_inputs_without_a_tensor_are_refused(no_trace, example, what):
    for fn in (capture, list_names):
        args = (Base(), "h.0") if fn is capture else (Base(),)
        with pytest.raises(ValueError, match="^" + re.escape(f"example_inputs holds no tensor {what}")) as err:
            fn(*args, example_inputs=example)
        assert "give one tensor, a tuple of positional arguments (x,) or a dict" in str(err.value)


@pytest.mark.parametrize("model, selector, meant", [
    (Base(), "transformer.h.1", "'h.1'"),  # a prefix the model lacks
    (WithHead(), "h.1.fc", "'transformer.h.1.fc'"),  # a prefix the model has
    (Base(), "h.1.fcc", "'h.1.fc'"),  # a misspelling
])  # fmt: skip
def test_a_wrong_module_path_is_refused_before_the_trace_with_the_meant_one(no_trace, model, selector, meant):
    assert meant.strip("'") in dict(model.named_modules())
    for call in (lambda: capture(model, ["head" if isinstance(model, WithHead) else "h.0", selector]),
                 lambda: list_names(model, selector)):  # fmt: skip
        with pytest.raises(UnknownSelectorError) as err:
            call()
        assert err.value.selector == selector
        assert str(err.value).startswith(f"{selector!r} is not a module of {type(model).__name__}. Did you mean {meant}")


def test_the_prefix_hint_also_after_a_trace():
    """A path under a glob-free selector of a local is checked against the trace: same hint."""
    model = Base()
    with pytest.raises(UnknownSelectorError, match=r"Did you mean 'h.0'\? \(the same module under another prefix\)"):
        capture(model, "transformer.h.0:x")(torch.randn(2, 4))


def test_an_edit_that_changes_a_shape_names_the_key_and_both_shapes():
    model = Base()
    extractor = capture(model, "h.1", edit={"h.0": lambda value, key: value[:, :2]})
    with pytest.raises(ValueError) as err:
        extractor(torch.randn(3, 4))
    assert str(err.value).startswith("the edit of 'h.0' changed its shape from (3, 4) to (3, 2)")
    same = capture(model, "h.1", edit={"h.0": lambda value, key: value * 0})  # a shape-keeping edit runs
    x = torch.randn(3, 4)
    _, feats = same(x)
    torch.testing.assert_close(feats["h.1"], model.h[1](torch.zeros(3, 4)))

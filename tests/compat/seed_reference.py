"""References for the seed-document tests, independent of fxcapture.

* :func:`frame_locals`: the seed tools' own mechanism for locals, done plainly: a
  profile function (``sys.setprofile``) that reads ``frame.f_locals`` at the
  ``return`` event of the target function's frames.
* :func:`fresh_get_local`: the fixture every ``get_local`` test uses (the decorator's
  state is global): inactive, empty cache, default size and conversion.

Module outputs are compared with plain forward hooks (``conftest.hooked``).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
from conftest import detached_copy

from fxcapture import get_local


@contextlib.contextmanager
def frame_locals(function: Callable, *names: str) -> Iterator[list[dict[str, Any]]]:
    """Record ``{name: value}`` (tensors copied) each time ``function`` returns.

    Example::

        >>> with frame_locals(Attention.forward, "attn") as calls:
        ...     model(x)
        >>> calls[0]["attn"].shape
    """
    code = inspect.unwrap(function).__code__
    calls: list[dict[str, Any]] = []
    previous = sys.getprofile()

    def profile(frame, event: str, arg: Any) -> None:
        if previous is not None:  # nested tracers all see every event
            previous(frame, event, arg)
        if event == "return" and frame.f_code is code:
            f_locals = frame.f_locals
            calls.append({name: detached_copy(f_locals.get(name)) for name in names})

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


def assert_arrays_equal(got: list, expected: list[torch.Tensor]) -> None:
    """``get_local``'s numpy arrays equal the reference tensors, call by call."""
    assert len(got) == len(expected), f"{len(got)} calls recorded, {len(expected)} expected"
    for i, (array, tensor) in enumerate(zip(got, expected)):
        assert isinstance(array, np.ndarray), f"call {i}: {type(array)}"
        np.testing.assert_array_equal(array, tensor.numpy(), err_msg=f"call {i}")


@pytest.fixture
def fresh_get_local():
    """Start inactive with an empty cache, and leave it that way."""

    def reset() -> None:
        get_local.deactivate()
        get_local.cache.clear()
        get_local.set_size(None)
        get_local.set_collate(None)

    reset()
    yield get_local
    reset()

"""``monitor.model``: the model's forward, rebuilt by :func:`fxcapture.capture`, that
also hands the monitored values to its :class:`~fxcapture.compat.monitor.Monitor`.

Example::

    >>> net = monitor.model          # MonitoredModel: same parameters, same output
    >>> out = net(x)                 # the monitor records on the side
    >>> net = torch.compile(monitor.model, fullgraph=True)   # records in compiled code too
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from .._util.tree import tree_map
from ..core.extractor import share_state


def _detach(value: Any) -> Any:
    return tree_map(torch.Tensor.detach, value)


def to_cpu(value: Any) -> Any:
    return tree_map(lambda t: t.detach().cpu(), value)


def snapshot(value: Any) -> Any:
    """A detached CPU copy taken now: later in-place ops (``ReLU(inplace=True)``) miss it."""
    return tree_map(lambda t: t.detach().to("cpu", copy=True), value)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile(model)``, with a warning saying what to do."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        warnings.warn(
            "Monitor: the model is compiled (torch.compile); forward hooks do not run in "
            "compiled code, so calling it records nothing. Compile monitor.model instead "
            "(net = torch.compile(monitor.model)), which records in compiled code.",
            stacklevel=3,
        )  # fmt: skip
        return inner
    return model


class _Pending:
    """The last forward's features, left by compiled code for the monitor to pick up."""

    __slots__ = ("features",)

    def __init__(self) -> None:
        self.features: dict[str, Any] | None = None


class MonitoredModel(nn.Module):
    """The model's forward that also hands chosen intermediates to ``monitor`` (a
    :class:`~fxcapture.compat.monitor.Monitor`).

    It shares the model's submodules, parameters and buffers (``state_dict()`` keys
    are the model's) and returns exactly what the model returns.
    """

    def __init__(self, model: nn.Module, extractor: nn.Module, monitor: Any) -> None:
        super().__init__()
        # the extractor and the monitor stay out of the module tree: their children are ours
        object.__setattr__(self, "_extractor", extractor)
        object.__setattr__(self, "_monitor", monitor)
        self._pending = _Pending()
        share_state(model, self)
        self.training = extractor.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # No Python control flow on the monitor's state in compiled code (it would
            # recompile at every batch): leave the features, the monitor files them
            # at its next set_batch_idx / set_epoch / get / save call.
            out, feats = self._extractor(*args, **kwargs)
            self._pending.features = _detach(feats)
            return out
        monitor = self._monitor
        monitor._inside_model += 1  # the model's own hooks stay quiet meanwhile
        try:
            out, feats = self._extractor(*args, **kwargs)
        finally:
            monitor._inside_model -= 1
        monitor._record(_detach(feats))
        return out

    def train(self, mode: bool = True) -> "MonitoredModel":
        super().train(mode)
        self._extractor.train(mode)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> "MonitoredModel":
        super()._apply(fn, recurse)
        self._extractor._apply(fn, recurse)  # tensors only the extractor holds (constants)
        return self

    def extra_repr(self) -> str:
        return f"monitoring={[s.alias for s in self._monitor.layers]}"

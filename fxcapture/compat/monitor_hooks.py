"""The hooks a :class:`~fxcapture.compat.monitor.Monitor` puts on the model itself.

The seed monitor's way: when the training loop calls the model (``model(batch)``),
forward hooks on the monitored modules hand their outputs to the monitor. Besides
one hook per monitored module path there is a forward pre-hook on the model, which
numbers the calls of each module within one forward and lets the monitor say what
hooks cannot record (locals, graph nodes, compiled code).

The hooks reach the monitor through a weak reference, do nothing inside
``torch.compile`` (where they only raise a flag the monitor reads afterwards), and
pickle or deep-copy as inert placeholders, so ``torch.save(model)`` and
``copy.deepcopy(model)`` keep working while they are attached.

Example::

    >>> hooks = ModelHooks(monitor, model, ["blocks.0.mlp"])
    >>> model(x)              # monitor._hook_output("blocks.0.mlp", output)
    >>> hooks.remove()
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

class _Inert:
    """What a copied or unpickled hook becomes: it does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class CompiledFlag:
    """Set by the hooks when they run inside compiled code (a plain attribute store,
    which ``torch.compile`` replays after each call without a guard or a break)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False


class _Hook:
    __slots__ = ("monitor_ref", "path", "flag")

    def __init__(self, monitor: Any, path: str, flag: CompiledFlag) -> None:
        self.monitor_ref = weakref.ref(monitor)
        self.path = path
        self.flag = flag

    def __reduce__(self):  # a saved or copied model carries no monitor
        return (_Inert, ())

    def __deepcopy__(self, memo: dict) -> _Inert:
        return _Inert()


class _OutputHook(_Hook):
    """Forward hook of one monitored module path."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return None
        monitor = self.monitor_ref()
        if monitor is not None:
            monitor._hook_output(self.path, output)
        return None  # never replace the module's output


class _ForwardStart(_Hook):
    """Forward pre-hook of the model: one call of ``model(...)`` begins."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            self.flag.seen = True
            return None
        monitor = self.monitor_ref()
        if monitor is not None:
            monitor._model_forward_started()
        return None


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class ModelHooks:
    """Hooks on ``model`` for the module ``paths`` (and the model's pre-hook).

    They are removed by :meth:`remove` or when the monitor is garbage collected.
    """

    def __init__(self, monitor: Any, model: nn.Module, paths: Iterable[str]) -> None:
        self.flag = CompiledFlag()
        modules = dict(model.named_modules())
        self.handles = [model.register_forward_pre_hook(_ForwardStart(monitor, "", self.flag))]
        for path in dict.fromkeys(paths):
            hook = _OutputHook(monitor, path, self.flag)
            self.handles.append(modules[path].register_forward_hook(hook))
        self._finalizer = weakref.finalize(monitor, _remove_all, self.handles)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        _remove_all(self.handles)

    def ran_compiled(self) -> bool:
        """Whether the model ran inside compiled code since the last call."""
        seen, self.flag.seen = self.flag.seen, False
        return seen

"""``HookManager``: forward hooks that store module outputs, TorchHook's API.

A drop-in replacement for ``torchhook.HookManager`` with its bugs fixed: tuple and
dict outputs are stored whole; the hooks go away on :meth:`HookManager.close`, on
leaving a ``with`` block or when the manager is garbage collected; the hooks hold
the manager only weakly and pickle/deep-copy as inert placeholders, so
``torch.save(model)`` works while hooks are attached and ``copy.deepcopy(model)``
never writes into the original manager.

For locals (``attn``) or values that are not module outputs, or under
``torch.compile``, use :func:`fxcapture.capture` instead.

Example::

    >>> manager = HookManager(model, max_size=1)
    >>> manager.add("conv1")
    >>> manager.add(layer=model.fc)           # key "Linear_0"
    >>> model(images)
    >>> manager.get_features("conv1")[0].shape
    torch.Size([1, 64, 112, 112])
    >>> manager.close()
"""

from __future__ import annotations

import difflib
import threading
import weakref
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

Hook = Callable[[nn.Module, Any, Any], Any]


def detach_cpu(value: Any) -> Any:
    """``detach().cpu()`` every tensor in ``value``, keeping tuples, lists and dicts whole."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(detach_cpu(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(detach_cpu(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, detach_cpu(v)) for k, v in value.items())
    return value


def format_parameter_count(count: int, precision: int = 2) -> str:
    """``11689512`` -> ``"11.69 M"`` (units K, M, G, T of 1000)."""
    value = float(count)
    for unit in ("", "K", "M", "G"):
        if value < 1000:
            return f"{value:.{precision}f} {unit}".rstrip()
        value /= 1000
    return f"{value:.{precision}f} T"


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor) or hasattr(value, "shape"):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape(v) for v in value)
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


class _InertHook:
    """What a copied or unpickled hook becomes: it does nothing."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        return None


class _RecordingHook:
    """The forward hook of one key; it reaches the manager through a weak reference."""

    def __init__(self, manager: "HookManager", key: str, custom_hook: Hook | None,
                 output_transform: Callable[[Any], Any] | None) -> None:  # fmt: skip
        self.manager_ref = weakref.ref(manager)
        self.key = key
        self.custom_hook = custom_hook
        self.output_transform = output_transform

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        manager = self.manager_ref()
        if manager is None:
            return None
        if self.custom_hook is not None:
            value = self.custom_hook(module, args, output)
            if value is None:
                return None
        else:
            value = (self.output_transform or detach_cpu)(output)
        manager._store(self.key, value)
        return None  # never replace the module's output

    # A saved or copied model must not carry the manager along (nor write into it).
    def __reduce__(self):
        return (_InertHook, ())

    def __deepcopy__(self, memo: dict) -> _InertHook:
        return _InertHook()


def _remove_all(handles: dict[str, RemovableHandle]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


class HookManager:
    """Register forward hooks by module name or object and keep what they see.

    Args:
        model: the model whose modules are hooked (it is not modified otherwise).
        max_size: keep only the last ``max_size`` outputs per key (None, or TorchHook's
            ``-1`` / ``0``: all).

    Every key holds a list (oldest first); :meth:`get_features` returns it.
    Use it as a context manager to remove the hooks on exit.
    """

    def __init__(self, model: nn.Module, max_size: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"HookManager needs an nn.Module, got {type(model).__name__}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < -1):
            raise ValueError(
                f"max_size must be a positive int, or None / -1 / 0 for all, got {max_size!r}"
            )
        self.model = model
        self.max_size = max_size if max_size is None or max_size > 0 else None
        self.hooks: dict[str, RemovableHandle] = {}
        self.features: dict[str, list] = {}
        self._lock = threading.Lock()
        self._class_counts: dict[str, int] = {}
        self._finalizer = weakref.finalize(self, _remove_all, self.hooks)

    # -- registration ------------------------------------------------------------
    def register_forward_hook(
        self,
        layer_name: str | None = None,
        layer: nn.Module | None = None,
        custom_hook: Hook | None = None,
        output_transform: Callable[[Any], Any] | None = None,
    ) -> RemovableHandle:
        """Hook ``layer`` (or the module at path ``layer_name``) and store its outputs.

        The key is ``layer_name``, or ``ClassName_n`` when only ``layer`` is given.
        ``output_transform(output)`` replaces the default ``detach().cpu()``;
        ``custom_hook(module, args, output)`` replaces both and its return value is
        stored unless it is None. The module's output is never changed.

        Example::

            >>> manager.add("fc", output_transform=lambda y: y.softmax(-1).detach())
        """
        if layer_name is not None and not isinstance(layer_name, str):
            raise TypeError(f"layer_name must be a string, got {layer_name!r}")
        if layer is not None and not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
        for name, fn in (("custom_hook", custom_hook), ("output_transform", output_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        if custom_hook is not None and output_transform is not None:
            raise ValueError(
                "give custom_hook or output_transform, not both "
                "(apply the transform inside custom_hook)"
            )
        if layer is None:
            if layer_name is None:
                raise ValueError("give layer_name='path.in.model' or layer=module")
            layer = self._find(layer_name)
        key = layer_name if layer_name is not None else self._auto_key(layer)
        if key in self.hooks:
            raise ValueError(f"a hook with key {key!r} is already registered; pick another name")
        hook = _RecordingHook(self, key, custom_hook, output_transform)
        handle = layer.register_forward_hook(hook)
        self.hooks[key] = handle
        return handle

    add = register_forward_hook

    def _find(self, layer_name: str) -> nn.Module:
        modules = dict(self.model.named_modules())
        module = modules.get(layer_name)
        if module is None:
            close = difflib.get_close_matches(layer_name, [p for p in modules if p], n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"no module {layer_name!r} in {type(self.model).__name__}.{hint} "
                "The paths are the keys of dict(model.named_modules())."
            )
        return module

    def _auto_key(self, layer: nn.Module) -> str:
        name = type(layer).__name__
        index = self._class_counts.get(name, 0)
        while f"{name}_{index}" in self.hooks:
            index += 1
        self._class_counts[name] = index + 1
        return f"{name}_{index}"

    def _store(self, key: str, value: Any) -> None:
        with self._lock:
            values = self.features.setdefault(key, [])
            values.append(value)
            if self.max_size is not None and len(values) > self.max_size:
                del values[0]

    # -- access ------------------------------------------------------------------
    def get_features(self, key: str) -> list:
        """The stored outputs of ``key``, oldest first."""
        if not isinstance(key, str):
            raise TypeError(f"key must be a string, got {key!r}")
        if key not in self.features:
            if key in self.hooks:
                return []
            known = list(self.hooks) or ["(none registered)"]
            raise ValueError(f"no hook with key {key!r}; registered keys: {', '.join(known)}")
        return self.features[key]

    get = get_features

    def get_all(self) -> dict[str, list]:
        """``{key: [outputs]}`` for every key that has seen a forward."""
        return dict(self.features)

    def get_keys(self) -> list[str]:
        return list(self.hooks)

    # -- removal -----------------------------------------------------------------
    def remove(self, key: str) -> None:
        """Remove the hook of ``key`` and its stored outputs."""
        if key not in self.hooks and key not in self.features:
            raise ValueError(f"no hook with key {key!r}; registered keys: {list(self.hooks)}")
        handle = self.hooks.pop(key, None)
        if handle is not None:
            handle.remove()
        with self._lock:
            self.features.pop(key, None)

    def clear_hooks(self) -> None:
        """Remove every hook (stored outputs stay)."""
        _remove_all(self.hooks)

    def clear_features(self) -> None:
        with self._lock:
            self.features.clear()

    def close(self) -> None:
        """Remove every hook; the manager can still be read."""
        self.clear_hooks()

    def __enter__(self) -> "HookManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- report ------------------------------------------------------------------
    def summary(self) -> None:
        """Print the model, its parameter count and every key's count and shape."""
        print(self)

    def __str__(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        lines = [f"Model: {type(self.model).__name__} | Total Parameters: "
                 f"{format_parameter_count(total)}"]  # fmt: skip
        if not self.hooks and not self.features:
            return lines[0] + "\nNo hooks have been registered."
        size = self.max_size or "unlimited"
        lines.append(f"Registered Hooks: {len(self.hooks)} (max_size={size})")
        rule = "-" * 80
        lines += [rule, "Captured Features Summary:",
                  f"{'Layer Key':<30}{'Feature Count':<20}{'Feature Shape':<30}", rule]  # fmt: skip
        for key in dict.fromkeys([*self.hooks, *self.features]):
            values = self.features.get(key, [])
            shape = str(_shape(values[-1])) if values else "not triggered yet"
            lines.append(f"{key:<30}{len(values):<20}{shape:<30}")
        lines.append(rule)
        return "\n".join(lines)

    __repr__ = __str__

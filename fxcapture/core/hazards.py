"""What a symbolic trace cannot reproduce, and keeping the model as it was.

``torch.fx`` runs the model's Python once, on proxies. Whatever that Python does
besides building the graph happens once, at trace time, instead of on every call:

* a buffer or attribute assigned in ``forward`` (``self.cache = x``; timm's
  ``attention_bias_cache``): the model would keep an ``fx.Proxy``;
* a random tensor made without a proxy argument (``torch.randn(4)``): frozen;
* ``torch.no_grad()``, ``torch.autocast``, ``autograd.Function.apply``: not graph ops,
  so the graph drops the region or the custom backward;
* hooks on modules the trace goes through (and global module hooks): skipped.

:class:`ModelSnapshot` restores the model after a trace and says what changed; the
tracer reports the calls above; :func:`hooked_modules` lists modules whose hooks must
run. Any of these makes the engine use the running tracer instead (``core.running``).

Example::

    >>> snapshot = ModelSnapshot(model)
    >>> ...  # trace
    >>> snapshot.restore()            # ['blocks.0.attn.attention_bias_cache']
"""

from __future__ import annotations

from typing import Any

import torch

from .frames import is_library_file
from .internals import global_hooks, grad_mode_codes, module_hooks, tensor_version

# code objects whose call during a symbolic trace means the graph would differ
HAZARD_CODES: dict[Any, str] = grad_mode_codes()


def custom_function(c_function: Any) -> str | None:
    """The name of a custom ``autograd.Function`` if a C call is its ``apply``."""
    owner = getattr(c_function, "__self__", None)
    if (
        getattr(c_function, "__name__", "") == "apply"
        and isinstance(owner, type)
        and issubclass(owner, torch.autograd.Function)
    ):
        return f"autograd.Function {owner.__qualname__}.apply (its backward)"
    return None

def _hook_code(hook: Any) -> Any:
    hook = getattr(hook, "func", hook)  # functools.partial
    hook = getattr(hook, "__func__", hook)  # a bound method
    code = getattr(hook, "__code__", None)
    return code if code is not None else getattr(getattr(hook, "__call__", None), "__code__", None)


def is_user_hook(hook: Any) -> bool:
    """A hook written by the user, not one a library installs for itself (transformers
    keeps output-capturing hooks on its modules; they act only when it asks them to)."""
    code = _hook_code(hook)
    return code is None or not is_library_file(code.co_filename)


def has_hooks(module: torch.nn.Module) -> bool:
    """Does the module have forward, pre-forward or backward hooks written by the user?"""
    return any(is_user_hook(hook) for hook in module_hooks(module))


def hooked_modules(model: torch.nn.Module) -> list[str]:
    """Paths of the submodules (not the root) that have user hooks."""
    return [path for path, m in model.named_modules() if path and has_hooks(m)]


class ModelSnapshot:
    """The attributes of every module of a model (shallow), to compare and restore.

    Dict-valued attributes (``_buffers``, ``_parameters``, caches) are copied one level
    deep, so that an entry added by a trace is seen and removed.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.tensors = [(name, t, tensor_version(t)) for name, t in model.state_dict(keep_vars=True).items()]
        self.state = [
            (m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if type(v) is dict})
            for _, m in self.modules
        ]

    def written(self) -> list[str]:
        """Parameters and buffers whose values were written since the snapshot."""
        return [name for name, t, version in self.tensors if tensor_version(t) != version]

    def changes(self) -> list[str]:
        """``path.attribute`` of every attribute that differs from the snapshot."""
        changed = []
        for (path, _), (module, attrs, dicts) in zip(self.modules, self.state):
            now = module.__dict__
            for key in set(now) | set(attrs):
                if now.get(key, _MISSING) is not attrs.get(key, _MISSING):
                    changed.append(f"{path}.{key}".lstrip("."))
                elif key in dicts and _dict_changed(now[key], dicts[key]):
                    entries = set(now[key]) | set(dicts[key])
                    for entry in sorted(e for e in entries if now[key].get(e, _MISSING) is not dicts[key].get(e, _MISSING)):
                        name = entry if key in _STATE_DICTS else f"{key}[{entry!r}]"
                        changed.append(f"{path}.{name}".lstrip("."))
        return changed

    def restore(self) -> list[str]:
        """Put every attribute back; returns what had changed."""
        changed = self.changes()
        if changed:
            for module, attrs, dicts in self.state:
                now = module.__dict__
                for key in [k for k in now if k not in attrs]:
                    del now[key]
                for key, value in attrs.items():
                    now[key] = value
                    if key in dicts and _dict_changed(value, dicts[key]):
                        value.clear()
                        value.update(dicts[key])
        return changed


_MISSING = object()
_STATE_DICTS = ("_parameters", "_buffers", "_modules")


def _dict_changed(now: dict, before: dict) -> bool:
    return now.keys() != before.keys() or any(now[k] is not before[k] for k in now)

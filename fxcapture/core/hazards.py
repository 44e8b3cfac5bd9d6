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

# code objects whose call during a symbolic trace means the graph would differ
HAZARD_CODES: dict[Any, str] = {
    torch.no_grad.__enter__.__code__: "torch.no_grad()",
    torch.enable_grad.__enter__.__code__: "torch.enable_grad()",
    torch.set_grad_enabled.__init__.__code__: "torch.set_grad_enabled()",
    torch.inference_mode.__enter__.__code__: "torch.inference_mode()",
    torch.autocast.__enter__.__code__: "torch.autocast",
}


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

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# torch keeps global module hooks in these private dicts of torch.nn.modules.module
# (checked on torch 2.14); their names are stable since torch 1.13.
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


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


def user_hooks(module: torch.nn.Module) -> list[str]:
    """The module's forward, pre-forward and backward hooks written by the user, named
    as ``explain()`` names them: ``["forward hook log_output", "forward pre hook <lambda>"]``."""
    return [
        f"{name.strip('_').replace('_', ' ')[:-1]} {_hook_name(hook)}"
        for name in _HOOK_DICTS
        for hook in getattr(module, name, {}).values()
        if is_user_hook(hook)
    ]


def _hook_name(hook: Any) -> str:
    hook = getattr(hook, "func", hook)  # functools.partial
    return getattr(hook, "__qualname__", None) or type(hook).__qualname__


def has_hooks(module: torch.nn.Module) -> bool:
    """Does the module have forward, pre-forward or backward hooks written by the user?"""
    return bool(user_hooks(module))


def hooked_modules(model: torch.nn.Module) -> dict[str, str]:
    """``{path: its user hooks}`` for the submodules (not the root) that have some.

    Example::

        >>> hooked_modules(model)
        {'blocks.0': 'forward hook log_output'}
    """
    found = ((path, user_hooks(m)) for path, m in model.named_modules() if path)
    return {path: ", ".join(hooks) for path, hooks in found if hooks}


def global_hooks() -> bool:
    """Are global module hooks registered (``register_module_forward_hook`` & co)?"""
    module = torch.nn.modules.module
    return any(getattr(module, name, None) for name in _GLOBAL_HOOK_DICTS)


class ModelSnapshot:
    """The attributes of every module of a model (shallow), to compare and restore.

    Dict-valued attributes (``_buffers``, ``_parameters``, caches) are copied one level
    deep, so that an entry added by a trace is seen and removed.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.tensors = [(name, t, t._version) for name, t in model.state_dict(keep_vars=True).items()]
        self.state = [
            (m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if type(v) is dict})
            for _, m in self.modules
        ]

    def written(self) -> list[str]:
        """Parameters and buffers whose values were written since the snapshot."""
        return [name for name, t, version in self.tensors if t._version != version]

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

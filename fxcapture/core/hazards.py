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

import collections
import sys
from typing import Any

import torch

from .._util.internals import MODULE_HOOK_DICTS, grad_mode_codes, tensor_version
from .frames import is_library_file, is_user_hook

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

def user_hooks(module: torch.nn.Module) -> list[str]:
    """The module's forward, pre-forward and backward hooks written by the user, named
    as ``explain()`` names them: ``["forward hook log_output", "forward pre hook <lambda>"]``."""
    return [
        f"{name.strip('_').replace('_', ' ')[:-1]} {_hook_name(hook)}"
        for name in MODULE_HOOK_DICTS
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


class PythonState(Exception):
    """A forward changed the Python state of modules (not parameters or buffers)."""

    def __init__(self, state: dict[str, list[str]]) -> None:
        names = ", ".join(f"{path}.{key}".lstrip(".") for path, keys in state.items() for key in keys)
        super().__init__(f"forward keeps Python state ({names}): it runs as the model runs it")
        self.state = state


class ModelSnapshot:
    """The attributes of every module of a model, to compare and restore.

    Lists, dicts and sets held in attributes (``_buffers``, caches, a log list) are
    copied too, down to :data:`DEPTH` levels, so that an entry a trace added, removed
    or replaced is seen and put back in the very container the model holds.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.tensors = [(name, t, tensor_version(t)) for name, t in model.state_dict(keep_vars=True).items()]
        self.state = [(m, dict(m.__dict__), _containers(m.__dict__)) for _, m in self.modules]

    def written(self) -> list[str]:
        """Parameters and buffers whose values were written since the snapshot."""
        return [name for name, t, version in self.tensors if tensor_version(t) != version]

    def _diff(self) -> list[tuple[str, str, str]]:
        """``(module path, attribute, what to call it)`` of everything that changed."""
        changed = []
        for (path, _), (module, attrs, inside) in zip(self.modules, self.state):
            now = module.__dict__
            for key in set(now) | set(attrs):
                if now.get(key, _MISSING) is not attrs.get(key, _MISSING):
                    changed.append((path, key, f"{path}.{key}".lstrip(".")))
                elif key in _STATE_DICTS and _changed(now[key], inside[key][0][1]):
                    before = inside[key][0][1]
                    entries = set(now[key]) | set(before)
                    for entry in sorted(e for e in entries if now[key].get(e, _MISSING) is not before.get(e, _MISSING)):
                        changed.append((path, key, f"{path}.{entry}".lstrip(".")))
                elif any(_changed(c, copy) for c, copy in inside.get(key, ())):
                    changed.append((path, key, f"{path}.{key}".lstrip(".")))
        return changed

    def changes(self) -> list[str]:
        """``path.attribute`` of every attribute that differs from the snapshot."""
        return [name for _, _, name in self._diff()]

    def python_state(self) -> dict[str, list[str]]:
        """``{module path: [attribute, ...]}`` for the Python state that changed: an
        attribute (a counter, a flag, a list appended to, a tensor kept in a plain
        attribute), not a parameter, a buffer or nn.Module's bookkeeping (hooks), nor
        a private attribute of a library's module (transformers installs its output
        hooks on the first call that asks for hidden states: put back, it installs them
        again when run eagerly). A value replaced by an equal one is not a change."""
        state: dict[str, list[str]] = {}
        modules = dict(self.modules)
        for path, key, _ in self._diff():
            if key in _NOT_STATE or key in state.get(path, ()) or _library_private(modules[path], key):
                continue
            attrs, inside = next((a, i) for m, a, i in self.state if m is modules[path])
            before = inside[key][0][1] if key in inside else attrs.get(key, _MISSING)
            if not _equivalent(modules[path].__dict__.get(key, _MISSING), before, DEPTH):
                state.setdefault(path, []).append(key)
        return state

    def restore(self) -> list[str]:
        """Put every attribute back, and the contents of every container; returns what
        had changed."""
        changed = self.changes()
        if changed:
            for module, attrs, inside in self.state:
                now = module.__dict__
                for key in [k for k in now if k not in attrs]:
                    del now[key]
                now.update(attrs)
                for container, copy in (c for found in inside.values() for c in found):
                    if _changed(container, copy):
                        _refill(container, copy)
        return changed


DEPTH = 3  # container levels copied under each attribute (a dict of lists of dicts)
# nn.Module's own bookkeeping (hook dicts, state dict hooks), parameters and buffers
_NOT_STATE = frozenset(torch.nn.Module().__dict__) - {"training", "_modules"}


def _library_private(module: torch.nn.Module, key: str) -> bool:
    source = getattr(sys.modules.get(type(module).__module__), "__file__", None)
    return key.startswith("_") and source is not None and is_library_file(source)
_MISSING = object()
_STATE_DICTS = ("_parameters", "_buffers", "_modules")
_CONTAINERS = (list, dict, set, collections.OrderedDict)


def _containers(attrs: dict) -> dict[str, list[tuple[Any, Any]]]:
    """Per attribute: ``(container, copy of its items)`` for the containers it holds."""
    found: dict[str, list[tuple[Any, Any]]] = {}
    for key, value in attrs.items():
        seen: dict[int, tuple[Any, Any]] = {}
        _collect(value, seen, DEPTH)
        if seen:
            found[key] = list(seen.values())
    return found


def _collect(value: Any, seen: dict[int, tuple[Any, Any]], depth: int) -> None:
    if depth < 0 or id(value) in seen:
        return
    if type(value) in _CONTAINERS:
        items = dict(value) if isinstance(value, dict) else list(value)
        seen[id(value)] = (value, items)
        for item in items.values() if isinstance(items, dict) else items:
            _collect(item, seen, depth - 1)
    elif type(value) is tuple:
        for item in value:
            _collect(item, seen, depth - 1)


def _equivalent(now: Any, before: Any, depth: int) -> bool:
    """Is ``now`` what ``before`` (a container's copied items) was, as a value? torch.export
    replaces plain dicts and tuples of a module by equal copies: not state."""
    if now is before:
        return True
    if isinstance(now, dict) and isinstance(before, dict):
        return depth > 0 and now.keys() == before.keys() and all(_equivalent(now[k], before[k], depth - 1) for k in now)
    if isinstance(now, (list, tuple, set)) and isinstance(before, (list, tuple, set)):
        items = list(now)
        return depth > 0 and len(items) == len(before) and all(
            _equivalent(a, b, depth - 1) for a, b in zip(items, before)
        )
    try:
        return type(now) is type(before) and type(now) in _VALUES and bool(now == before)
    except Exception:
        return False


_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _changed(container: Any, copy: Any) -> bool:
    if isinstance(container, dict):
        return container.keys() != copy.keys() or any(container[k] is not copy[k] for k in container)
    items = list(container)
    return len(items) != len(copy) or any(a is not b for a, b in zip(items, copy))


def _refill(container: Any, copy: Any) -> None:
    container.clear()
    if isinstance(container, list):
        container.extend(copy)
    else:
        container.update(copy)

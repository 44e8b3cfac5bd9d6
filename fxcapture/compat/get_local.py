"""``get_local``: record a function's local variables each time it returns.

A drop-in replacement for the ``get_local`` decorator of Visualizer / AnyCapture
(same names, same cache layout), without their bytecode rewriting: the function's
``__code__`` is never touched. While a decorated function runs and capture is
active, a profile function (``sys.setprofile``, per thread) waits for the
``return`` event of exactly that call's frame and reads ``frame.f_locals``. So
every ``return`` (early ones too), recursion, methods and stacked decorators work,
and activating after the model module was imported works.

Example::

    >>> from fxcapture import get_local
    >>> class Attention(nn.Module):
    ...     @get_local("attn")
    ...     def forward(self, x):
    ...         attn = (x @ x.transpose(-2, -1)).softmax(-1)
    ...         return attn @ x
    >>> get_local.activate()
    >>> model(images)
    >>> get_local.cache["Attention.forward.attn"]  # one numpy array per call
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import warnings
from typing import Any, Callable, TypeVar

import torch

from .._util.internals import is_fx_tracing

F = TypeVar("F", bound=Callable[..., Any])
Collate = Callable[[Any], Any]


def default_collate(value: Any) -> Any:
    """detach -> cpu -> numpy for tensors (bfloat16 as float32), recursively.

    Tuples, lists and dicts keep their type; other values are kept as they are.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        return value.numpy()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(default_collate(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(default_collate(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, default_collate(v)) for k, v in value.items())
    return value


def _tracing_or_compiling() -> bool:
    """True inside ``torch.fx`` symbolic tracing or ``torch.compile``/export tracing."""
    return torch.compiler.is_compiling() or is_fx_tracing()


_UNBOUND = object()


def _qualname(code) -> str:
    return getattr(code, "co_qualname", code.co_name)  # co_qualname: Python >= 3.11


class _FrameWatcher:
    """A profile function that records the locals of one call of ``code`` at its return.

    It remembers the first frame of ``code`` that starts after it was installed (the
    call made by the wrapper), so a recursive call of the same function, which has
    its own frame, is not mistaken for it. Events are passed on to the profile
    function that was installed before (the fx tracer's, a profiler's, an outer
    ``get_local``'s).
    """

    __slots__ = ("code", "names", "previous", "frame", "values")

    def __init__(self, code, names: tuple[str, ...], previous: Any) -> None:
        self.code = code
        self.names = names
        self.previous = previous
        self.frame = None
        self.values: dict[str, Any] | None = None

    def __call__(self, frame, event: str, arg: Any) -> None:
        if self.previous is not None:
            self.previous(frame, event, arg)
        if frame.f_code is not self.code:
            return
        if event == "call" and self.frame is None:
            self.frame = frame
        elif event == "return" and frame is self.frame:
            f_locals = frame.f_locals
            self.values = {name: f_locals.get(name, _UNBOUND) for name in self.names}
            self.frame = None  # drop the frame reference as soon as possible


class _Cache(dict):
    """``{"Qualname.var": [values]}``; Visualizer's key ``"Qualname"`` (its decorator took
    one variable) reads the same list when that function records one variable (if
    several such functions share the qualname, the one that recorded something)."""

    def __missing__(self, key: str) -> list:
        with get_local._lock:
            candidates = [k for k in sorted(get_local._single.get(key, ())) if k in self]
        if len(candidates) > 1:  # several one-variable functions share the qualname
            candidates = [k for k in candidates if self[k]] or candidates
        if len(candidates) == 1:
            return self[candidates[0]]
        if candidates:
            raise KeyError(f"{key!r} is ambiguous: use one of {candidates}")
        raise KeyError(key)


class get_local:  # noqa: N801 - the seed tools' name, kept for drop-in compatibility
    """Decorator recording the named locals of a function each time it returns.

    ``get_local.cache["Qualname.var"]`` (AnyCapture's key; Visualizer's ``"Qualname"``
    reads the same list when the function records one variable) is a list with one
    entry per call, made by ``collate`` (default: :func:`default_collate`, tensors to
    numpy arrays). A
    local not yet assigned at the ``return`` that was taken is recorded as ``None``.
    Nothing is recorded until :meth:`activate` (the decorator costs one function
    call when inactive), nor inside ``torch.fx`` tracing (``fxcapture.capture``
    reads the frame itself, so the locals stay capturable by name) or inside
    ``torch.compile`` (use :func:`fxcapture.capture` there).

    Args:
        *varnames: names of local variables of the decorated function.
        collate: per-decorator conversion, overrides the global one.

    Example::

        >>> @get_local("attn", "x")
        ... def attention(x): ...
        >>> get_local.activate(max_size=8)   # keep the last 8 calls per variable
        >>> attention(torch.randn(2, 4, 4))
        >>> get_local.cache["attention.attn"][-1].shape
        (2, 4, 4)
    """

    cache: dict[str, list] = _Cache()
    is_activate: bool = False
    max_size: int | None = None
    collate: Collate = staticmethod(default_collate)
    _lock = threading.RLock()
    _keys: list[str] = []  # every key of every decorated function, for activate()
    _single: dict[str, set[str]] = {}  # Visualizer key -> keys of one-variable decorators

    def __init__(self, *varnames: str, collate: Collate | None = None) -> None:
        if not varnames:
            raise TypeError('get_local needs at least one variable name: @get_local("attn")')
        for name in varnames:
            if not isinstance(name, str) or not name.isidentifier():
                raise TypeError(f"get_local variable names must be identifiers, got {name!r}")
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be callable, got {collate!r}")
        self.varnames = tuple(dict.fromkeys(varnames))
        self._collate = collate

    # -- decoration ------------------------------------------------------------
    def __call__(self, func: F) -> F:
        if isinstance(func, (staticmethod, classmethod)):
            return type(func)(self(func.__func__))
        if not callable(func):
            raise TypeError(f"get_local decorates functions, got {func!r}")
        target = inspect.unwrap(func)
        code = getattr(target, "__code__", None)
        if code is None:
            raise TypeError(
                f"get_local cannot read the locals of {func!r}: it is not a Python function"
            )
        self._check_function(target, code)
        qualname = getattr(func, "__qualname__", code.co_name)
        keys = {name: f"{qualname}.{name}" for name in self.varnames}
        cls = type(self)
        with cls._lock:
            cls._keys.extend(k for k in keys.values() if k not in cls._keys)
            if len(keys) == 1:
                cls._single.setdefault(qualname, set()).update(keys.values())
            if cls.is_activate:
                for key in keys.values():
                    cls.cache.setdefault(key, [])
        names, collate = self.varnames, self._collate

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not cls.is_activate or _tracing_or_compiling():
                return func(*args, **kwargs)
            watcher = _FrameWatcher(code, names, sys.getprofile())
            sys.setprofile(watcher)
            try:
                result = func(*args, **kwargs)
            finally:
                sys.setprofile(watcher.previous)
            if watcher.values is not None:
                cls._record(keys, watcher.values, collate or cls.collate)
            return result

        return wrapper  # type: ignore[return-value]

    def _check_function(self, target: Callable, code) -> None:
        if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
            raise TypeError(
                f"get_local cannot decorate the generator {_qualname(code)}: it returns "
                "at every yield. Record the values inside a helper function instead."
            )
        if inspect.iscoroutinefunction(target):
            raise TypeError(
                f"get_local cannot decorate the coroutine {_qualname(code)}: it returns "
                "at every await. Record the values inside a synchronous helper instead."
            )
        known = set(code.co_varnames) | set(code.co_cellvars) | set(code.co_freevars)
        missing = [name for name in self.varnames if name not in known]
        if missing:
            locals_ = ", ".join(sorted(n for n in code.co_varnames if n != "self")) or "none"
            raise ValueError(
                f"{_qualname(code)} has no local variable {', '.join(map(repr, missing))} "
                f"(its locals: {locals_}). If another decorator wraps it, give that wrapper "
                "a __wrapped__ attribute (functools.wraps) or put get_local innermost."
            )

    @classmethod
    def _record(cls, keys: dict[str, str], values: dict[str, Any], collate: Collate) -> None:
        converted = {
            keys[name]: None if value is _UNBOUND else collate(value)
            for name, value in values.items()
        }
        with cls._lock:
            for key, value in converted.items():
                entries = cls.cache.setdefault(key, [])
                entries.append(value)
                if cls.max_size is not None and len(entries) > cls.max_size:
                    del entries[: len(entries) - cls.max_size]

    # -- state -------------------------------------------------------------------
    @classmethod
    def activate(cls, max_size: int | None = None, collate: Collate | None = None) -> None:
        """Start recording. ``max_size``: keep only the last ``max_size`` calls per key."""
        with cls._lock:
            cls.set_size(max_size)
            if collate is not None:
                cls.set_collate(collate)
            for key in cls._keys:
                cls.cache.setdefault(key, [])
            cls.is_activate = True

    @classmethod
    def deactivate(cls) -> None:
        """Stop recording; the cache is kept."""
        cls.is_activate = False

    @classmethod
    def is_activated(cls) -> bool:
        return cls.is_activate

    @classmethod
    def clear(cls) -> None:
        """Empty every list of the cache (the keys stay)."""
        with cls._lock:
            for key in cls.cache:
                cls.cache[key] = []

    @classmethod
    def get_cache(cls) -> dict[str, list]:
        return cls.cache

    @classmethod
    def set_size(cls, max_size: int | float | None) -> int | None:
        """Bound every list to the last ``max_size`` entries (None or <= 0: unbounded)."""
        if max_size is None:
            size = None
        elif isinstance(max_size, (int, float)) and not isinstance(max_size, bool):
            size = int(max_size) if int(max_size) > 0 else None
        else:
            warnings.warn(
                f"get_local max_size must be an int or None, got {type(max_size).__name__}; "
                "using None (unbounded)",
                UserWarning,
                stacklevel=2,
            )
            size = None
        with cls._lock:
            cls.max_size = size
            if size is not None:
                for entries in cls.cache.values():
                    del entries[: max(0, len(entries) - size)]
        return size

    @classmethod
    def set_collate(cls, collate: Collate | None) -> None:
        """Set the conversion applied to every recorded value (None: the default)."""
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be callable, got {collate!r}")
        cls.collate = staticmethod(collate or default_collate)

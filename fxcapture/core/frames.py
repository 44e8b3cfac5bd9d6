"""Which Python frames hold the user's values, and watching them without stepping on
a profiler or debugger that is already there.

A frame is watched when its code is the model's: a file outside torch, the standard
library and installed packages; an installed package that defines one of the model's
module classes (transformers, timm); code typed by a user (a notebook cell,
``python -c``, ``exec`` of a string). fxcapture's own library code never is;
comprehensions and lambdas are not either.

Example::

    >>> frames = FrameFilter(model)
    >>> frames.watches(MyAttention.forward.__code__)
    True
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import Any, Callable

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep
# fxcapture's library packages; the command line's built-in models are user code
_LIBRARY_DIRS = tuple(
    os.path.join(_PACKAGE_DIR, name) + os.sep
    for name in ("core", "dataset", "interventions", "inspect", "compat", "_util")
)
_PATHS = sysconfig.get_paths()
_SITE_DIRS = tuple({os.path.abspath(_PATHS[k]) + os.sep for k in ("purelib", "platlib")})
_STDLIB_DIRS = tuple({os.path.abspath(_PATHS[k]) + os.sep for k in ("stdlib", "platstdlib")})
_USER_SOURCES = ("<string>", "<stdin>")
_NEVER_PACKAGES = {"torch", "functorch", "fxcapture"}


def _is_user_source(filename: str) -> bool:
    return filename in _USER_SOURCES or filename.startswith(("<ipython-input-", "<cell"))


class FrameFilter:
    """Decides, per code object, whether its locals are the model's values.

    The cache lives as long as the filter (one trace, one run-time capture).
    """

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        packages = set()
        if model is not None:
            packages = {type(m).__module__.partition(".")[0] for m in model.modules()}
        self.packages = frozenset(packages - _NEVER_PACKAGES)
        self._cache: dict[Any, bool] = {}

    def watches(self, code) -> bool:
        watched = self._cache.get(code)
        if watched is None:
            watched = self._cache[code] = not code.co_name.startswith("<") and self._watches_file(
                code.co_filename
            )
        return watched

    def _watches_file(self, filename: str) -> bool:
        if filename.startswith("<"):
            return _is_user_source(filename)
        path = os.path.abspath(filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_LIBRARY_DIRS):
            return False
        for site in _SITE_DIRS:  # site-packages lies inside the stdlib folder: first
            if path.startswith(site):
                top = path[len(site) :].split(os.sep, 1)[0]
                return top.removesuffix(".py") in self.packages
        return not path.startswith(_STDLIB_DIRS)


def is_library_file(filename: str) -> bool:
    """Is ``filename`` part of torch, the standard library or an installed package?"""
    path = os.path.abspath(filename)
    return path.startswith(_TORCH_DIR) or path.startswith(_SITE_DIRS) or path.startswith(_STDLIB_DIRS)


def _hook_code(hook: Any) -> Any:
    hook = getattr(hook, "func", hook)  # functools.partial
    hook = getattr(hook, "__func__", hook)  # a bound method
    code = getattr(hook, "__code__", None)
    return code if code is not None else getattr(getattr(hook, "__call__", None), "__code__", None)


def is_user_hook(hook: Any) -> bool:
    """A hook written by the user, not one a library installs for itself (transformers
    keeps output-capturing hooks on its modules; they act only when it asks them to;
    fxcapture's own live for one call or one trace)."""
    code = _hook_code(hook)
    if code is None:
        return True
    path = os.path.abspath(code.co_filename)
    return not is_library_file(path) and not path.startswith(_LIBRARY_DIRS)


def chain_profile(handler: Callable, previous: Any) -> Callable:
    """A profile function calling ``handler`` then a Python profile function that was
    active (a C-level profiler such as cProfile cannot be chained on Python 3.11)."""
    if not callable(previous):
        return handler

    def both(frame, event, arg):
        handler(frame, event, arg)
        return previous(frame, event, arg)

    return both


class ProfileScope:
    """Install ``handler`` as the profile function (chained to the previous one) and
    restore the previous one on exit.

    Example::

        >>> with ProfileScope(on_event):
        ...     model(x)
    """

    def __init__(self, handler: Callable) -> None:
        self.handler = handler
        self.previous: Any = None

    def __enter__(self) -> "ProfileScope":
        self.previous = sys.getprofile()
        sys.setprofile(chain_profile(self.handler, self.previous))
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(self.previous)

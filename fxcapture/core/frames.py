"""Which Python frames hold the user's values, and watching them without stepping on
a profiler or debugger that is already there.

A frame is watched when its code is the model's, decided by the model itself, not
by where a file lives: the package that defines one of the model's module classes
(an installed one too: the user's own, transformers, timm, fxcapture's built-in
command-line models); code typed by a user (a notebook cell, ``python -c``,
``exec`` of a string); a file outside the folders of installed packages and the
standard library (the user's scripts). torch and fxcapture's own library code
never are; comprehensions, lambdas and the methods dataclasses generate are not
either.

Example::

    >>> frames = FrameFilter(model)
    >>> frames.watches(MyAttention.forward.__code__)
    True
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from typing import Any, Callable, Iterable

import torch

from .._util.internals import chain_profile

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep
# never the model's code, whichever of its classes a model uses; fxcapture's command
# line (its built-in models) is not in this list
_LIBRARY_DIRS = (_TORCH_DIR,) + tuple(
    os.path.join(_PACKAGE_DIR, name) + os.sep
    for name in ("core", "dataset", "interventions", "inspect", "compat", "_util")
)
_PATHS = sysconfig.get_paths()
_STDLIB_DIRS = tuple({os.path.abspath(_PATHS[k]) + os.sep for k in ("stdlib", "platstdlib")})
_USER_SOURCES = ("<string>", "<stdin>")
# methods that dataclasses generate with exec (a "<string>" file, yet not user code)
_GENERATED = "__create_fn__."


def _is_user_source(filename: str) -> bool:
    return filename in _USER_SOURCES or filename.startswith(("<ipython-input-", "<cell"))


def site_dirs() -> tuple[str, ...]:
    """The folders installed packages live in: this interpreter's, the user's, and
    every ``site-packages`` or ``dist-packages`` folder on ``sys.path`` (a venv's
    base interpreter, a ``--target`` or ``PYTHONPATH`` install)."""
    dirs = [_PATHS["purelib"], _PATHS["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs += [p for p in sys.path if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    return tuple(dict.fromkeys(os.path.abspath(d) + os.sep for d in dirs))


def _package_files(module_name: str) -> list[str]:
    """The folders (or the single file) of the top-level package of a loaded module.

    A module run as ``python -m pkg.main`` is ``__main__``: its spec names ``pkg``."""
    module = sys.modules.get(module_name)
    spec = getattr(module, "__spec__", None)
    top = sys.modules.get((spec.name if spec is not None else module_name).partition(".")[0], module)
    paths = list(getattr(top, "__path__", ()))
    if not paths and getattr(top, "__file__", None):
        return [os.path.abspath(top.__file__)]
    return [os.path.abspath(p) + os.sep for p in paths]


def _model_code(root: Any) -> list[str]:
    """The folders and files of the packages that define ``root``'s module classes
    (or the function ``root``)."""
    if isinstance(root, torch.nn.Module):
        names: Iterable[str] = {type(m).__module__ for m in root.modules()}
    else:
        names = {getattr(root, "__module__", None) or ""}
    return [path for name in names for path in _package_files(name)]


class FrameFilter:
    """Decides, per code object, whether its locals are the model's values.

    The cache lives as long as the filter (one trace, one run-time capture).
    """

    def __init__(self, model: Any = None) -> None:
        code = _model_code(model) if model is not None else []
        self.model_dirs = tuple({p for p in code if p.endswith(os.sep)})
        self.model_files = frozenset(p for p in code if not p.endswith(os.sep))
        self.site_dirs = site_dirs()
        self._cache: dict[Any, bool] = {}

    def watches(self, code) -> bool:
        watched = self._cache.get(code)
        if watched is None:
            watched = self._cache[code] = (
                not code.co_name.startswith("<")
                and not getattr(code, "co_qualname", "").startswith(_GENERATED)
                and self._watches_file(code.co_filename)
            )
        return watched

    def _watches_file(self, filename: str) -> bool:
        if filename.startswith("<"):
            return _is_user_source(filename)
        path = os.path.abspath(filename)
        if path.startswith(_LIBRARY_DIRS):
            return False
        if path in self.model_files or path.startswith(self.model_dirs):
            return True
        # site-packages may lie inside the standard library's folder: both are library
        return not path.startswith(self.site_dirs) and not path.startswith(_STDLIB_DIRS)


def is_library_file(filename: str) -> bool:
    """Is ``filename`` part of torch, the standard library or an installed package?"""
    path = os.path.abspath(filename)
    return path.startswith(_TORCH_DIR) or path.startswith(site_dirs()) or path.startswith(_STDLIB_DIRS)


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

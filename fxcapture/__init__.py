"""fxcapture: get module outputs, local variables and any op out of a PyTorch model.

Example::

    >>> from fxcapture import capture
    >>> extractor = capture(model, ["attn", "layer4"])
    >>> out, feats = extractor(images)

Packages, each importing only the ones before it: ``_util`` (tree walk, atomic
files), ``core`` (tracing, records, selectors, passes, the extractor), ``dataset``
(``extract``/``load``), ``interventions`` (``patch``), ``inspect`` (graphs, pictures),
``compat`` (drop-ins for the seed tools), ``cli`` (the command line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .compat import HookManager, Monitor, get_local
    from .core.api import NameTable, capture, list_names
    from .core.extractor import Extractor
    from .core.records import NameInfo
    from .core.spec import CaptureError, TraceFailure
    from .dataset.run import extract
    from .dataset.storage import UnfinishedOutputError, WriteError, load
    from .interventions.patching import patch

# public name -> the module that defines it; imported on first use (PEP 562), so that
# `fxcapture.cli` starts without torch and `import fxcapture` costs nothing until used
_PUBLIC = {
    "capture": ".core.api",
    "list_names": ".core.api",
    "NameTable": ".core.api",
    "extract": ".dataset.run",
    "load": ".dataset.storage",
    "UnfinishedOutputError": ".dataset.storage",
    "WriteError": ".dataset.storage",
    "patch": ".interventions.patching",
    "Extractor": ".core.extractor",
    "NameInfo": ".core.records",
    "CaptureError": ".core.spec",
    "TraceFailure": ".core.spec",
    "get_local": ".compat",
    "HookManager": ".compat",
    "Monitor": ".compat",
}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fxcapture' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = [
    "capture",
    "list_names",
    "extract",
    "load",
    "patch",
    "Extractor",
    "NameInfo",
    "NameTable",
    "CaptureError",
    "TraceFailure",
    "UnfinishedOutputError",
    "WriteError",
    "get_local",
    "HookManager",
    "Monitor",
    "__version__",
]

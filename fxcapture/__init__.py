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

from ._version import __version__
from .compat import HookManager, Monitor, get_local
from .core.api import NameTable, capture, list_names
from .core.extractor import Extractor
from .core.records import NameInfo
from .core.spec import CaptureError, TraceFailure
from .dataset.run import extract
from .dataset.storage import UnfinishedOutputError, WriteError, load
from .interventions.patching import patch

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

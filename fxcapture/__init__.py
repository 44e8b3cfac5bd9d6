"""fxcapture: get module outputs, local variables and any op out of a PyTorch model.

Example::

    >>> from fxcapture import capture
    >>> extractor = capture(model, ["attn", "layer4"])
    >>> out, feats = extractor(images)
"""

from .api import NameTable, capture, list_names
from .catalogue import NameInfo
from .extractor import Extractor
from .extract import extract
from .storage import load
from .compat import HookManager, Monitor, get_local

__version__ = "0.1.0"

__all__ = ["capture", "list_names", "extract", "load", "Extractor", "NameInfo", "NameTable", "__version__"]
__all__ += ["get_local", "HookManager", "Monitor"]

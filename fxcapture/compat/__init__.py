"""Drop-in replacements for the seed tools, built on fxcapture.

* :class:`get_local` (Visualizer / AnyCapture): record a function's locals.
* :class:`HookManager` (TorchHook): forward hooks that store module outputs.
* :class:`Monitor` (training monitor): record layers at chosen epochs and batches.

Owns only these adapters: each maps an old API onto :func:`fxcapture.capture`. May
import ``_util``, ``core``, ``dataset``, ``interventions`` and ``inspect``; nothing
from ``cli``.
"""

from .get_local import default_collate, get_local
from .hook_manager import HookManager
from .monitor import Monitor, MonitoredModel, MonitoredTrainer

__all__ = ["get_local", "default_collate", "HookManager", "Monitor", "MonitoredModel",
           "MonitoredTrainer"]

"""``Monitor``: record chosen intermediates of a model at chosen epochs and batches.

The training monitor of the seed doc, two ways:

* **the model itself** (the seed's way): module outputs are recorded by forward
  hooks that the monitor puts on the model's modules when it is constructed and
  that :meth:`Monitor.remove_hooks` removes, so ``model(batch)`` in an unchanged
  training loop records exactly what a hook sees;
* **``monitor.model``**: a drop-in module sharing the model's parameters (same
  ``state_dict`` keys), built on :func:`fxcapture.capture`, that returns exactly the
  model's output and also records locals (``attn``), globs and graph nodes, and
  keeps working under ``torch.compile`` (one graph, ``fullgraph=True``).

What the first way cannot record (a local, a graph node, a compiled model) is said
by a warning naming ``monitor.model``, never an empty result.

Example::

    >>> monitor = Monitor(model, {"attn": {"alias": "attention", "record_type": "single"}},
    ...                   epochs_to_record=[0, 2], batch_indices=[0], output_dir="runs/attn")
    >>> net = monitor.model                     # train this one to record locals
    >>> for epoch in range(3):
    ...     monitor.set_epoch(epoch)
    ...     for i, (x, y) in enumerate(loader):
    ...         monitor.set_batch_idx(i)
    ...         loss = F.cross_entropy(net(x), y); ...
    ...     monitor.save_single_outputs()
    >>> Monitor.load("runs/attn")["attention"]["data"][(2, 0)]
    {'blocks.0.attn:attn': tensor(...), 'blocks.1.attn:attn': tensor(...), ...}
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .._util.tree import tree_map
from ..core.api import capture
from ..core.select import match
from ..dataset.files import check_output_folder
from . import monitor_store as store
from .monitor_hooks import ModelHooks
from .monitor_layers import LayerSpec, module_keys, parse_layers, unknown_layers_error
from .monitor_model import MonitoredModel, snapshot, to_cpu, unwrap_compiled
from .monitor_store import output_shape


class Monitor:
    """Record layers of a model at chosen epochs (and batches) during training.

    Args:
        model: the model; it is never modified apart from the forward hooks on the
            monitored modules (removed by :meth:`remove_hooks`).
        layers_to_monitor: a list of layers, or ``{layer: {"alias": str | None,
            "record_type": "single" | "epoch_full"}}``. A layer is anything
            :func:`fxcapture.capture` accepts; one that selects several values
            (``"attn"`` in every block) records ``{key: value}`` in execution order.
        epochs_to_record: epochs (as given to :meth:`set_epoch`) to record; non-empty.
        output_dir: where ``save_*`` write (created when needed; nothing is written
            outside it: aliases and file names that are paths are refused).
        batch_indices: the batches ``"single"`` layers record (None: the last batch
            of the epoch). ``"epoch_full"`` layers record every batch.
        **capture_kwargs: passed to :func:`fxcapture.capture` (``leaf_modules``,
            ``attention="weights"``, ...).

    Call the model as before (module outputs, through hooks), or ``monitor.model``
    (everything, also compiled). Values are stored detached on the CPU as ``{alias:
    {"layer", "alias", "output_shape", "data": {(epoch, batch_idx): value}}}``; the
    last forward of a batch wins.
    """

    def __init__(
        self,
        model: nn.Module,
        layers_to_monitor: Any,
        epochs_to_record: Iterable[int],
        output_dir: str | Path | None = None,
        batch_indices: Iterable[int] | None = None,
        **capture_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor needs an nn.Module, got {type(model).__name__}")
        model = unwrap_compiled(model)
        self.layers = parse_layers(layers_to_monitor)
        store.check_folders([s.alias for s in self.layers])
        self.epochs_to_record = set(epochs_to_record or ())
        if not self.epochs_to_record:
            raise ValueError("epochs_to_record is empty: give the epochs to record, e.g. [0, 5]")
        self.batch_indices = None if batch_indices is None else set(batch_indices)
        if self.batch_indices is not None and not self.batch_indices:
            raise ValueError("batch_indices is empty: give batch indices, or None for all")
        self.output_dir = check_output_folder(output_dir, "output_dir") if output_dir is not None else None
        names = {s.internal: s.layer for s in self.layers}
        try:
            extractor = capture(model, names, **capture_kwargs)
        except ValueError as err:
            raise unknown_layers_error(model, self.layers, capture_kwargs, err) from err
        self._keys = self._group_keys(extractor)
        self.model = MonitoredModel(model, extractor, self)
        self.current_epoch: int | None = None
        self.current_batch_idx: int | None = None
        self.single_data: dict[str, dict] = {}
        self.epoch_data: dict[str, dict] = {}
        self._active = True
        self._warned: set[str] = set()
        self._inside_model = 0
        self._setup_hooks(model)

    def _group_keys(self, extractor: nn.Module) -> dict[str, list[tuple[str, str]]]:
        """``{internal alias: [(extractor key, canonical key)]}`` in execution order."""
        grouped: dict[str, list[tuple[str, str]]] = {}
        for spec in self.layers:
            keys = [k for k in extractor.names if k.partition("@")[0] == spec.internal]
            catalogue = extractor.catalogue  # None: captured at run time, keys known per call
            canonical = [r.key for r in match(catalogue, spec.layer)] if catalogue is not None else keys
            if len(canonical) != len(keys):  # cannot happen unless resolve changes
                canonical = keys
            grouped[spec.internal] = list(zip(keys, canonical))
        return grouped

    def _setup_hooks(self, model: nn.Module) -> None:
        """Hooks on the model's modules for the layers that are module outputs."""
        self._targets: dict[str, list[tuple[LayerSpec, str, int]]] = {}
        self._unhookable: list[LayerSpec] = []
        for spec in self.layers:
            keys = self._keys[spec.internal]
            paths = module_keys(model, keys)
            if paths is None:
                self._unhookable.append(spec)
                continue
            for (path, call), (_, key) in zip(paths, keys):
                self._targets.setdefault(path, []).append((spec, key, call))
        self._calls: dict[str, int] = {}
        self._hooks = ModelHooks(self, model, self._targets)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- position in training ------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Set the current epoch; a new epoch drops the data held for the previous one."""
        self._flush()
        if epoch != self.current_epoch:
            self.clear_current_epoch_data()
        self.current_epoch = epoch
        self.current_batch_idx = None

    def set_batch_idx(self, batch_idx: int) -> None:
        """Set the index of the batch about to run (call it before each forward)."""
        self._flush()
        self.current_batch_idx = batch_idx
        self._calls.clear()

    def create_epoch_callback(self) -> Callable[[int], None]:
        return self.set_epoch

    def create_batch_callback(self) -> Callable[[int], None]:
        return self.set_batch_idx

    def is_recording(self) -> bool:
        """Whether a forward now would record anything."""
        return self._active and self.current_epoch in self.epochs_to_record

    # -- recording -----------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _wants(self, spec: LayerSpec, batch_idx: int | None) -> bool:
        """Whether ``spec`` records the batch ``batch_idx`` of a recorded epoch."""
        if spec.record_type == "epoch_full" or self.batch_indices is None:
            return True  # epoch_full: every batch; single: the last batch (overwritten)
        return batch_idx in self.batch_indices

    def _position(self, spec: LayerSpec) -> tuple[int, int] | None:
        """``(epoch, batch_idx)`` where ``spec`` records now, or None."""
        epoch, batch_idx = self.current_epoch, self.current_batch_idx
        if not self._active:
            return None
        if epoch is None:
            self._warn_once("epoch", "Monitor: the model ran before monitor.set_epoch(epoch); "
                            "nothing is recorded until set_epoch is called")  # fmt: skip
            return None
        if epoch not in self.epochs_to_record or not self._wants(spec, batch_idx):
            return None
        if batch_idx is None:
            raise RuntimeError(
                f"Monitor: epoch {epoch} is recorded but no batch index is set; call "
                "monitor.set_batch_idx(batch_idx) before each forward "
                "(or pass monitor.create_batch_callback() to your training function)"
            )
        return epoch, batch_idx

    def _flush(self) -> None:
        pending = self.model._pending
        if pending.features is not None:
            features, pending.features = pending.features, None
            self._record(features)
        if self._hooks.ran_compiled() and self.is_recording():
            self._warn_once("compiled", (
                f"Monitor: the model ran compiled (torch.compile) at epoch {self.current_epoch}, "
                f"batch {self.current_batch_idx}: forward hooks do not run in compiled code, so "
                "nothing was recorded. Compile monitor.model instead: "
                "net = torch.compile(monitor.model)"))  # fmt: skip

    def _record(self, feats: dict[str, Any]) -> None:
        """File the features ``monitor.model`` returned."""
        for spec in self.layers:
            position = self._position(spec)
            if position is not None:
                self._store(spec, position, self._value(spec, feats))

    def _value(self, spec: LayerSpec, feats: dict[str, Any]) -> Any:
        keys = self._keys[spec.internal]
        if len(keys) == 1:
            return to_cpu(feats[keys[0][0]])
        return {canonical: to_cpu(feats[key]) for key, canonical in keys}

    def _model_forward_started(self) -> None:
        """The model itself is called: number module calls afresh, say what it misses."""
        if self._inside_model:
            return
        self._calls.clear()
        missed = [s for s in self._unhookable if self._quiet_position(s) is not None]
        if missed:
            names = ", ".join(f"{s.alias!r} ({s.layer!r})" for s in missed)
            self._warn_once("locals", (
                f"Monitor: {names} is not a module output (a local variable or a graph node): "
                "forward hooks on the model cannot see it, so calling the model does not record "
                "it. Call monitor.model(x) instead (a drop-in module: the model's parameters, "
                "the model's output), which records every layer."))  # fmt: skip

    def _quiet_position(self, spec: LayerSpec) -> tuple[int, int] | None:
        try:
            return self._position(spec)
        except RuntimeError:
            return None

    def _hook_output(self, path: str, output: Any) -> None:
        """A forward hook on the model saw ``output`` of the module ``path``."""
        if self._inside_model:
            return  # monitor.model runs: it files its own features
        call = self._calls[path] = self._calls.get(path, -1) + 1
        targets = self._targets[path]
        last = max(c for _, _, c in targets)
        value = None
        for spec, key, target_call in targets:
            if target_call != min(call, last):
                continue
            position = self._position(spec)
            if position is None:
                continue
            value = snapshot(output) if value is None else value
            part = key if len(self._keys[spec.internal]) > 1 else None
            self._store(spec, position, value, part)

    def _store(self, spec: LayerSpec, position: tuple[int, int], value: Any,
               part: str | None = None) -> None:  # fmt: skip
        data = self.single_data if spec.record_type == "single" else self.epoch_data
        entry = data.setdefault(
            spec.alias, {"layer": spec.layer, "alias": spec.alias, "output_shape": None, "data": {}}
        )
        if spec.record_type == "single" and self.batch_indices is None:  # keep the last batch
            entry["data"] = {k: v for k, v in entry["data"].items()
                             if k[0] != position[0] or k == position}  # fmt: skip
        if part is not None:  # one of several keys, from a hook: merge in key order
            held = entry["data"].get(position)
            merged = {**(held if isinstance(held, dict) else {}), part: value}
            order = [key for _, key in self._keys[spec.internal]]
            value = {key: merged[key] for key in order if key in merged}
        entry["data"][position] = value
        entry["output_shape"] = output_shape(value)

    # -- access ------------------------------------------------------------------------
    def _select(self, data: dict[str, dict], layers: Iterable[str] | None,
                copy: bool = True) -> dict[str, dict]:  # fmt: skip
        self._flush()
        if layers is None:
            chosen = list(data)
        else:
            layers = [layers] if isinstance(layers, str) else list(layers)
            known = {s.alias: s for s in self.layers}
            by_layer = {s.layer: s.alias for s in self.layers if isinstance(s.layer, str)}
            chosen = []
            for name in layers:
                alias = name if name in known else by_layer.get(name)
                if alias is None:
                    raise ValueError(
                        f"{name!r} is not a monitored layer or alias; monitored: {list(known)}"
                    )
                if alias in data:
                    chosen.append(alias)
        held = {a: {**data[a], "data": dict(data[a]["data"])} for a in chosen}
        return tree_map(torch.Tensor.clone, held) if copy else held

    def get_single_data(self, layers: Iterable[str] | None = None) -> dict[str, dict]:
        """``{alias: {"layer", "alias", "output_shape", "data": {(epoch, batch): value}}}``.

        A deep copy, as the seed doc promises (tensors cloned): changing it in place
        changes nothing the monitor holds or saves.
        """
        return self._select(self.single_data, layers)

    def get_epoch_data(self, layers: Iterable[str] | None = None) -> dict[str, dict]:
        """Like :meth:`get_single_data`, for the ``"epoch_full"`` layers (every batch:
        ``torch.cat(list(entry["data"].values()))`` is the whole epoch)."""
        return self._select(self.epoch_data, layers)

    def get_single_outputs(self) -> dict[str, list]:
        """``{alias: [values in (epoch, batch) order]}`` of the single layers (a copy)."""
        return {a: list(e["data"].values()) for a, e in self.get_single_data().items()}

    def get_epoch_buffers(self) -> dict[str, list]:
        """``{alias: [values in batch order]}`` of the epoch_full layers (a copy)."""
        return {a: list(e["data"].values()) for a, e in self.get_epoch_data().items()}

    # -- saving (monitor_store) ------------------------------------------------------------
    def _output_dir(self) -> Path:
        if self.output_dir is None:
            raise ValueError("this Monitor has no output_dir: pass output_dir=... to save")
        return self.output_dir

    def save_single_outputs(self, layers: Iterable[str] | None = None) -> list[Path]:
        """One file per alias and (epoch, batch):
        ``<output_dir>/<alias>/single_epoch{e}_batch{b}.pt``; returns the paths."""
        return store.save_single(self._output_dir(), self._select(self.single_data, layers, False))

    def save_epoch_outputs(self, layers: Iterable[str] | None = None) -> list[Path]:
        """One file per alias and epoch, a list of items in batch order:
        ``<output_dir>/<alias>/epoch_full_epoch{e}.pt``."""
        return store.save_epoch(self._output_dir(), self._select(self.epoch_data, layers, False))

    def save_custom_output(self, obj: Any, filename: str) -> Path:
        """``torch.save(obj)`` to ``<output_dir>/<filename>`` (a plain file name)."""
        return store.save_custom(self._output_dir(), obj, filename)

    @staticmethod
    def load(output_dir: str | Path, record_type: str = "single") -> dict[str, dict]:
        """Read back what ``save_single_outputs`` (or ``save_epoch_outputs`` with
        ``record_type="epoch_full"``) wrote, in the layout of :meth:`get_single_data`;
        a missing folder raises ``FileNotFoundError``."""
        return store.load(output_dir, record_type)

    # -- cleanup -------------------------------------------------------------------------
    def clear_current_epoch_data(self) -> None:
        """Drop every recorded value held in memory."""
        self._flush()
        self.single_data.clear()
        self.epoch_data.clear()

    clear_epoch_data = clear_current_epoch_data

    def remove_hooks(self) -> None:
        """Remove the hooks from the model and stop recording (``monitor.model`` keeps
        working and returns the model's output)."""
        self._flush()
        self._hooks.remove()
        self._active = False

    close = remove_hooks

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove_hooks()

    def __repr__(self) -> str:
        layers = ", ".join(f"{s.alias}={s.layer!r} ({s.record_type})" for s in self.layers)
        batches = None if self.batch_indices is None else sorted(self.batch_indices)
        return f"Monitor({layers}; epochs={sorted(self.epochs_to_record)}, batches={batches})"


class MonitoredTrainer:
    """Run a training function that accepts ``epoch_callback`` / ``batch_callback``.

    At each new epoch the previous epoch's data is saved (when the monitor has an
    ``output_dir``) before it is dropped; the last epoch is saved when the function
    returns.

    Example::

        >>> trainer = MonitoredTrainer(monitor)
        >>> # train(config, device, epoch_callback=None, batch_callback=None)
        >>> trainer.wrap_training_function(train)(config, device)
    """

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def _epoch_callback(self, epoch: int) -> None:
        self._save()
        self.monitor.set_epoch(epoch)

    def _save(self) -> None:
        if self.monitor.output_dir is not None:
            self.monitor.save_single_outputs()
            self.monitor.save_epoch_outputs()

    def wrap_training_function(self, train_fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(train_fn)
        def monitored(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("epoch_callback", self._epoch_callback)
            kwargs.setdefault("batch_callback", self.monitor.set_batch_idx)
            result = train_fn(*args, **kwargs)
            self._save()
            return result

        return monitored

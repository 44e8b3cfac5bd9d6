"""``Monitor``: record chosen intermediates of a model at chosen epochs and batches.

The training monitor of the seed docs, built on :func:`fxcapture.capture` instead of
forward hooks: a layer is anything ``capture()`` accepts (a module path, a local
such as ``attn``, a glob, a graph node), and the monitored model keeps working
under ``torch.compile`` (one graph, ``fullgraph=True``). The user's model is never
modified: train ``monitor.model``, a drop-in module that shares the model's
parameters (same ``state_dict`` keys), returns exactly the model's output and
records on the side.

Example::

    >>> monitor = Monitor(model, {"attn": {"alias": "attention", "record_type": "single"}},
    ...                   epochs_to_record=[0, 2], batch_indices=[0], output_dir="runs/attn")
    >>> net = monitor.model                     # train this one
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
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .._util.atomic import atomic_file
from ..core.api import capture
from ..core.build import trace_symbolic
from ..core.extractor import share_state
from ..core.select import match
from ..core.spec import CaptureSpec


def _save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file (Ctrl-C, a crash)."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)

RECORD_TYPES = ("single", "epoch_full")


@dataclass(frozen=True)
class LayerSpec:
    """One monitored layer: what to capture, under which alias, how to record it."""

    layer: Any  # a capture() selector
    alias: str
    record_type: str
    internal: str  # the alias given to capture(), free of user characters


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_detach(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to_cpu(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def output_shape(value: Any) -> Any:
    """A tensor's shape as a list; tuples/lists give a list of shapes, dicts a dict."""
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, (tuple, list)):
        return [output_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: output_shape(v) for k, v in value.items()}
    return None


def _parse_layers(layers: Any) -> list[LayerSpec]:
    """``layers_to_monitor`` (list or ``{layer: {alias, record_type}}``) as specs."""
    if isinstance(layers, (str, bytes)) or callable(layers):
        layers = [layers]
    if isinstance(layers, Mapping):
        items = []
        for layer, options in layers.items():
            options = dict(options or {})
            unknown = set(options) - {"alias", "record_type"}
            if unknown:
                raise ValueError(
                    f"layers_to_monitor[{layer!r}] has unknown options {sorted(unknown)}; "
                    "use 'alias' and 'record_type'"
                )
            items.append((layer, options.get("alias"), options.get("record_type", "single")))
    elif isinstance(layers, Sequence):
        items = [(layer, None, "single") for layer in layers]
    else:
        raise TypeError(
            "layers_to_monitor must be a list of layer names or a dict "
            f"{{layer: {{'alias': ..., 'record_type': ...}}}}, got {type(layers).__name__}"
        )
    if not items:
        raise ValueError("layers_to_monitor is empty: name at least one layer")
    specs, seen = [], set()
    for i, (layer, alias, record_type) in enumerate(items):
        if record_type not in RECORD_TYPES:
            raise ValueError(
                f"record_type of {layer!r} is {record_type!r}; use 'single' or 'epoch_full'"
            )
        if alias is None:
            if not isinstance(layer, str):
                raise ValueError(f"give an alias to the predicate layer {layer!r}")
            alias = layer
        if alias in seen:
            raise ValueError(f"Duplicate alias {alias!r} in layers_to_monitor.")
        seen.add(alias)
        specs.append(LayerSpec(layer, str(alias), record_type, f"_m{i}"))
    return specs


def _unknown_layers_error(model: nn.Module, specs: list[LayerSpec], capture_kwargs: dict,
                          cause: ValueError) -> ValueError:  # fmt: skip
    """The seed's error, listing every unknown layer at once, with close matches."""
    try:
        spec = CaptureSpec((), leaf_modules=capture_kwargs.get("leaf_modules", ()),
                           autowrap_functions=capture_kwargs.get("autowrap_functions", ()),
                           concrete_args=capture_kwargs.get("concrete_args"))  # fmt: skip
        _, catalogue = trace_symbolic(model, spec)
        missing = [s.layer for s in specs if not match(catalogue, s.layer)]
    except Exception:  # the model cannot be traced: the original error says why
        return cause
    if not missing:
        return cause
    return ValueError(
        "The following layers specified in 'layers_to_monitor' do not exist in the model: "
        f"{missing}. A layer is a module path, a local ('attn', 'blocks.0.attn:attn'), "
        f"a glob or a '%node' name. {cause}"
    )


class _Pending:
    """The last forward's features, left by compiled code for the monitor to pick up."""

    __slots__ = ("features",)

    def __init__(self) -> None:
        self.features: dict[str, Any] | None = None


class MonitoredModel(nn.Module):
    """The model's forward that also hands chosen intermediates to a :class:`Monitor`.

    It shares the model's submodules, parameters and buffers (``state_dict()`` keys
    are the model's) and returns exactly what the model returns.
    """

    def __init__(self, model: nn.Module, extractor: nn.Module, monitor: "Monitor") -> None:
        super().__init__()
        # the extractor and the monitor stay out of the module tree: their children are ours
        object.__setattr__(self, "_extractor", extractor)
        object.__setattr__(self, "_monitor", monitor)
        self._pending = _Pending()
        share_state(model, self)
        self.training = extractor.training

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out, feats = self._extractor(*args, **kwargs)
        feats = _detach(feats)
        if torch.compiler.is_compiling():
            # No Python control flow on the monitor's state in compiled code (it would
            # recompile at every batch): leave the features, the monitor files them
            # at its next set_batch_idx / set_epoch / get / save call.
            self._pending.features = feats
        else:
            self._monitor._record(feats)
        return out

    def train(self, mode: bool = True) -> "MonitoredModel":
        super().train(mode)
        self._extractor.train(mode)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> "MonitoredModel":
        super()._apply(fn, recurse)
        self._extractor._apply(fn, recurse)  # tensors only the extractor holds (constants)
        return self

    def extra_repr(self) -> str:
        return f"monitoring={[s.alias for s in self._monitor.layers]}"


class Monitor:
    """Record layers of a model at chosen epochs (and batches) during training.

    Args:
        model: the model; it is traced with ``torch.fx`` and never modified.
        layers_to_monitor: a list of layers, or ``{layer: {"alias": str | None,
            "record_type": "single" | "epoch_full"}}``. A layer is anything
            :func:`fxcapture.capture` accepts; one that selects several values
            (``"attn"`` in every block) records ``{key: value}`` in execution order.
        epochs_to_record: epochs (as given to :meth:`set_epoch`) to record; non-empty.
        output_dir: where ``save_*_outputs`` write (created when needed).
        batch_indices: the batches ``"single"`` layers record (None: the last batch
            of the epoch). ``"epoch_full"`` layers record every batch.
        **capture_kwargs: passed to :func:`fxcapture.capture` (``leaf_modules``,
            ``attention="weights"``, ...).

    Train ``monitor.model`` (or call ``monitor(x)``). Values are stored detached on
    the CPU as ``{alias: {"layer", "alias", "output_shape", "data": {(epoch,
    batch_idx): value}}}``; the last forward of a batch wins.
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
        self.layers = _parse_layers(layers_to_monitor)
        self.epochs_to_record = set(epochs_to_record or ())
        if not self.epochs_to_record:
            raise ValueError("epochs_to_record is empty: give the epochs to record, e.g. [0, 5]")
        self.batch_indices = None if batch_indices is None else set(batch_indices)
        if self.batch_indices is not None and not self.batch_indices:
            raise ValueError("batch_indices is empty: give batch indices, or None for all")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        names = {s.internal: s.layer for s in self.layers}
        try:
            extractor = capture(model, names, **capture_kwargs)
        except ValueError as err:
            raise _unknown_layers_error(model, self.layers, capture_kwargs, err) from err
        self._keys = self._group_keys(extractor)
        self.model = MonitoredModel(model, extractor, self)
        self.current_epoch: int | None = None
        self.current_batch_idx: int | None = None
        self.single_data: dict[str, dict] = {}
        self.epoch_data: dict[str, dict] = {}
        self._active = True
        self._warned_no_epoch = False

    def _group_keys(self, extractor: nn.Module) -> dict[str, list[tuple[str, str]]]:
        """``{internal alias: [(extractor key, canonical key)]}`` in execution order."""
        grouped: dict[str, list[tuple[str, str]]] = {}
        for spec in self.layers:
            keys = [k for k in extractor.names if k.partition("@")[0] == spec.internal]
            canonical = [r.key for r in match(extractor.catalogue, spec.layer)]
            if len(canonical) != len(keys):  # cannot happen unless resolve changes
                canonical = keys
            grouped[spec.internal] = list(zip(keys, canonical))
        return grouped

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

    def create_epoch_callback(self) -> Callable[[int], None]:
        return self.set_epoch

    def create_batch_callback(self) -> Callable[[int], None]:
        return self.set_batch_idx

    def is_recording(self) -> bool:
        """Whether a forward now would record anything."""
        return self._active and self.current_epoch in self.epochs_to_record

    # -- recording -----------------------------------------------------------------
    def _wants(self, spec: LayerSpec, batch_idx: int | None) -> bool:
        """Whether ``spec`` records the batch ``batch_idx`` of a recorded epoch."""
        if spec.record_type == "epoch_full" or self.batch_indices is None:
            return True  # epoch_full: every batch; single: the last batch (overwritten)
        return batch_idx in self.batch_indices

    def _flush(self) -> None:
        pending = self.model._pending
        if pending.features is not None:
            features, pending.features = pending.features, None
            self._record(features)

    def _record(self, feats: dict[str, Any]) -> None:
        if not self._active:
            return
        epoch, batch_idx = self.current_epoch, self.current_batch_idx
        if epoch is None:
            if not self._warned_no_epoch:
                self._warned_no_epoch = True
                warnings.warn(
                    "Monitor: the model ran before monitor.set_epoch(epoch); nothing is "
                    "recorded until set_epoch is called", stacklevel=3,
                )  # fmt: skip
            return
        if epoch not in self.epochs_to_record:
            return
        for spec in self.layers:
            if not self._wants(spec, batch_idx):
                continue
            if batch_idx is None:
                raise RuntimeError(
                    f"Monitor: epoch {epoch} is recorded but no batch index is set; call "
                    "monitor.set_batch_idx(batch_idx) before each forward "
                    "(or pass monitor.create_batch_callback() to your training function)"
                )
            self._store(spec, epoch, batch_idx, self._value(spec, feats))

    def _value(self, spec: LayerSpec, feats: dict[str, Any]) -> Any:
        keys = self._keys[spec.internal]
        if len(keys) == 1:
            return _to_cpu(feats[keys[0][0]])
        return {canonical: _to_cpu(feats[key]) for key, canonical in keys}

    def _store(self, spec: LayerSpec, epoch: int, batch_idx: int, value: Any) -> None:
        store = self.single_data if spec.record_type == "single" else self.epoch_data
        entry = store.setdefault(
            spec.alias, {"layer": spec.layer, "alias": spec.alias, "output_shape": None, "data": {}}
        )
        if spec.record_type == "single" and self.batch_indices is None:
            entry["data"] = {k: v for k, v in entry["data"].items() if k[0] != epoch}
        entry["data"][(epoch, batch_idx)] = value
        entry["output_shape"] = output_shape(value)

    # -- access ------------------------------------------------------------------------
    def _select(self, store: dict[str, dict], layers: Iterable[str] | None) -> dict[str, dict]:
        self._flush()
        if layers is None:
            chosen = list(store)
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
                if alias in store:
                    chosen.append(alias)
        return {a: {**store[a], "data": dict(store[a]["data"])} for a in chosen}

    def get_single_data(self, layers: Iterable[str] | None = None) -> dict[str, dict]:
        """``{alias: {"layer", "alias", "output_shape", "data": {(epoch, batch): value}}}``.

        A copy of the structure (the tensors, detached CPU copies, are shared).
        """
        return self._select(self.single_data, layers)

    def get_epoch_data(self, layers: Iterable[str] | None = None) -> dict[str, dict]:
        """Like :meth:`get_single_data`, for the ``"epoch_full"`` layers."""
        return self._select(self.epoch_data, layers)

    def get_single_outputs(self) -> dict[str, list]:
        """``{alias: [values in (epoch, batch) order]}`` of the single layers."""
        return {a: list(e["data"].values()) for a, e in self.get_single_data().items()}

    def get_epoch_buffers(self) -> dict[str, list]:
        """``{alias: [values in batch order]}`` of the epoch_full layers."""
        return {a: list(e["data"].values()) for a, e in self.get_epoch_data().items()}

    # -- saving ------------------------------------------------------------------------
    def _dir(self, alias: str) -> Path:
        if self.output_dir is None:
            raise ValueError("this Monitor has no output_dir: pass output_dir=... to save")
        path = self.output_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", alias)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _item(entry: dict, epoch: int, batch_idx: int, value: Any) -> dict[str, Any]:
        layer = entry["layer"] if isinstance(entry["layer"], str) else repr(entry["layer"])
        return {"epoch": epoch, "batch_idx": batch_idx, "layer": layer, "alias": entry["alias"],
                "output_shape": output_shape(value), "output": value}  # fmt: skip

    def save_single_outputs(self, layers: Iterable[str] | None = None) -> list[Path]:
        """One file per alias and (epoch, batch):
        ``<output_dir>/<alias>/single_epoch{e}_batch{b}.pt``; returns the paths."""
        written = []
        for alias, entry in self.get_single_data(layers).items():
            for (epoch, batch_idx), value in entry["data"].items():
                path = self._dir(alias) / f"single_epoch{epoch}_batch{batch_idx}.pt"
                _save_atomic(self._item(entry, epoch, batch_idx, value), path)
                written.append(path)
        return written

    def save_epoch_outputs(self, layers: Iterable[str] | None = None) -> list[Path]:
        """One file per alias and epoch, a list of items in batch order:
        ``<output_dir>/<alias>/epoch_full_epoch{e}.pt``."""
        written = []
        for alias, entry in self.get_epoch_data(layers).items():
            by_epoch: dict[int, list] = {}
            for (epoch, batch_idx), value in entry["data"].items():
                by_epoch.setdefault(epoch, []).append(self._item(entry, epoch, batch_idx, value))
            for epoch, items in by_epoch.items():
                path = self._dir(alias) / f"epoch_full_epoch{epoch}.pt"
                _save_atomic(items, path)
                written.append(path)
        return written

    def save_custom_output(self, obj: Any, filename: str) -> Path:
        """``torch.save(obj)`` to ``<output_dir>/<filename>``."""
        if self.output_dir is None:
            raise ValueError("this Monitor has no output_dir: pass output_dir=... to save")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / filename
        _save_atomic(obj, path)
        return path

    @staticmethod
    def load(output_dir: str | Path, record_type: str = "single") -> dict[str, dict]:
        """Read back what ``save_single_outputs`` (or ``save_epoch_outputs`` with
        ``record_type="epoch_full"``) wrote, in the layout of :meth:`get_single_data`.
        """
        if record_type not in RECORD_TYPES:
            raise ValueError(f"record_type must be 'single' or 'epoch_full', got {record_type!r}")
        pattern = "single_epoch*_batch*.pt" if record_type == "single" else "epoch_full_epoch*.pt"
        result: dict[str, dict] = {}
        files = sorted(Path(output_dir).glob(f"*/{pattern}"), key=_file_order)
        for path in files:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            for item in loaded if isinstance(loaded, list) else [loaded]:
                entry = result.setdefault(item["alias"], {
                    "layer": item["layer"], "alias": item["alias"],
                    "output_shape": item["output_shape"], "data": {},
                })  # fmt: skip
                entry["data"][(item["epoch"], item["batch_idx"])] = item["output"]
        for entry in result.values():
            entry["data"] = dict(sorted(entry["data"].items()))
        return result

    # -- cleanup -------------------------------------------------------------------------
    def clear_current_epoch_data(self) -> None:
        """Drop every recorded value held in memory."""
        self._flush()
        self.single_data.clear()
        self.epoch_data.clear()

    clear_epoch_data = clear_current_epoch_data

    def remove_hooks(self) -> None:
        """Stop recording (``monitor.model`` keeps working and returns the model's output)."""
        self._flush()
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


def _file_order(path: Path) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


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

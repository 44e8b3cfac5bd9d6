"""The layers a :class:`~fxcapture.compat.monitor.Monitor` records: parsing and checks.

``layers_to_monitor`` is a list of layers or ``{layer: {"alias", "record_type"}}``
(the seed doc's two forms); a layer is anything :func:`fxcapture.capture` accepts.

Example::

    >>> parse_layers({"blocks.0.attn": {"alias": "attention"}})
    [LayerSpec(layer='blocks.0.attn', alias='attention', record_type='single', internal='_m0')]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch.nn as nn

from ..core.build import trace_symbolic
from ..core.records import build_catalogue
from ..core.select import match
from ..core.spec import CaptureSpec
from .monitor_store import RECORD_TYPES


@dataclass(frozen=True)
class LayerSpec:
    """One monitored layer: what to capture, under which alias, how to record it."""

    layer: Any  # a capture() selector
    alias: str
    record_type: str
    internal: str  # the alias given to capture(), free of user characters


def parse_layers(layers: Any) -> list[LayerSpec]:
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


def unknown_layers_error(model: nn.Module, specs: list[LayerSpec], capture_kwargs: dict,
                          cause: ValueError) -> ValueError:  # fmt: skip
    """The seed's error, listing every unknown layer at once, with close matches."""
    try:
        spec = CaptureSpec((), leaf_modules=capture_kwargs.get("leaf_modules", ()),
                           autowrap_functions=capture_kwargs.get("autowrap_functions", ()),
                           concrete_args=capture_kwargs.get("concrete_args"))  # fmt: skip
        catalogue = build_catalogue(trace_symbolic(model, spec), model)
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


def module_keys(model: nn.Module, keys: list[tuple[str, str]]) -> list[tuple[str, int]] | None:
    """``[(module path, call index)]`` of canonical keys that are all module outputs."""
    modules = dict(model.named_modules())
    found = []
    for _, key in keys:
        base, _, call = key.partition("@")
        if base not in modules or ":" in base or base.startswith("%"):
            return None
        found.append((base, int(call) if call.isdigit() else 0))
    return found

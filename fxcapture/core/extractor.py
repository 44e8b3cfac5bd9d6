"""The extractor: an ``nn.Module`` that runs the model and returns what was asked for.

:class:`Extractor` shares the model's submodules, parameters and buffers and runs one
:class:`~.build.Program` per training mode and call pattern, built on first use.

Example::

    >>> ex = Extractor(model, CaptureSpec(["layer4"]))
    >>> out, feats = ex(images)
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.fx as fx

from .build import Program, build_program
from .records import Catalogue
from .spec import INPUT, CaptureSpec, constant_defaults


def share_state(model: torch.nn.Module, into: torch.nn.Module) -> None:
    """Register ``model``'s children, parameters and buffers on ``into`` (the same
    objects), so that ``into.state_dict()`` has the model's keys and shares its tensors."""
    for name, child in model.named_children():
        into.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        into.register_parameter(name, param)
    non_persistent = getattr(model, "_non_persistent_buffers_set", set())
    for name, buf in model.named_buffers(recurse=False):
        into.register_buffer(name, buf, persistent=name not in non_persistent)


class Extractor(torch.nn.Module):
    """The model's forward, rewritten to return ``(output, {key: value})``.

    It shares the model's submodules, parameters and buffers (``state_dict()`` keys
    are the model's), so weight changes show in both. ``train()``/``eval()`` switch
    the model and the extractor together, between graphs traced in each mode. Build
    it with :func:`fxcapture.capture`.
    """

    def __init__(self, model: torch.nn.Module, spec: CaptureSpec) -> None:
        super().__init__()
        # The model itself is kept out of the module tree: its children are ours.
        object.__setattr__(self, "_model", model)
        self._spec = spec
        share_state(model, self)
        self.training = model.training
        self._params, self._defaults = constant_defaults(model)
        self._programs: dict[tuple[bool, tuple], Program] = {}
        self._build_lock = threading.Lock()
        self._program = self._program_for(self.training, ())

    # -- programs per mode and call pattern ---------------------------------------
    def _program_for(self, mode: bool, specialization: tuple) -> Program:
        program = self._programs.get((mode, specialization))
        if program is None:
            with self._build_lock:
                program = self._programs.get((mode, specialization))
                if program is None:
                    program = self._build(mode, specialization)
                    self._programs[(mode, specialization)] = program
        return program

    def _build(self, mode: bool, specialization: tuple = ()) -> Program:
        model = self._model
        previous = model.training
        model.training = mode  # forwards that branch on self.training see this mode
        try:
            return build_program(model, self._spec.replace(specialization=specialization))
        finally:
            model.training = previous

    def _specialization(self, args: tuple, kwargs: dict) -> tuple[tuple, list]:
        """Which optional arguments this call sets, and all arguments by position."""
        values = dict(zip(self._params, args))
        for name, value in kwargs.items():
            if name not in self._params:
                raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
            values[name] = value
        specialization = []
        for name, default in self._defaults.items():
            value = values.get(name, default)
            if isinstance(value, torch.Tensor) or (default is None and value is not None):
                specialization.append((name, INPUT))
            elif value != default:
                specialization.append((name, value))
        positional = [values.get(n, self._defaults.get(n)) for n in self._params]
        return tuple(specialization), positional

    def train(self, mode: bool = True) -> "Extractor":
        """Switch the extractor and the model to training (or eval) mode, together.

        The program of the new mode is built first: if that fails, nothing switched.
        """
        program = self._program_for(mode, ())
        super().train(mode)
        self._model.training = mode
        self._program = program
        return self

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        program = self._program
        if self._defaults and (kwargs or len(args) > len(self._params) - len(self._defaults)):
            # optional arguments given: the graph traced for this call pattern
            specialization, args = self._specialization(args, kwargs)
            program = self._program_for(self.training, specialization)
            kwargs = {}
        runtime = program.runtime
        if runtime is None:
            return program.module(*args, **kwargs)
        with runtime.session() as session:
            out, feats = program.module(*args, **kwargs)
        feats.update(runtime.collect(session))
        return out, feats

    # -- introspection -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The keys of the feature dict, in execution order (graph values first).

        Values captured at run time are known after the first call.
        """
        runtime = self._program.runtime
        return list(self._program.features) + (list(runtime.features) if runtime else [])

    @property
    def graph(self) -> fx.Graph | None:
        """The rewritten fx graph of the current mode (``None`` if nothing traced)."""
        return self._program.graph

    @property
    def code(self) -> str:
        """The Python source of the current mode's forward."""
        return self._program.code

    @property
    def catalogue(self) -> Catalogue | None:
        return self._program.catalogue

    @property
    def untraced(self) -> dict[str, str]:
        """``{module path: why fx failed}`` for the modules that run eagerly."""
        return dict(self._program.untraced)

    def explain(self) -> str:
        """How each key is captured (graph / leaf hook / run-time local) and what fell back.

        Example::

            >>> print(capture(gpt2, ["attn_weights"]).explain())
            untraced: '' (the model's own forward): ValueError: code: co_varnames is too small
            transformer.h.0.attn:attn_weights: run-time local (profile function)
        """
        lines = [
            f"untraced: {path!r} ({'the whole model' if not path else 'runs eagerly'}): {why}"
            for path, why in self._program.untraced.items()
        ]
        for key, info in self._program.features.items():
            cloned = key in self._program.cloned
            via = "graph, cloned before a later in-place op" if cloned else "graph"
            lines.append(f"{key}: {info.kind} {info.key} ({info.op}) <- {via}")
        runtime = self._program.runtime
        if runtime is not None:
            if not runtime.discovered:
                pending = ", ".join(repr(s) for _, s in runtime.selectors)
                lines.append(f"run-time selectors {pending}: resolved on the first call")
            for key in runtime.features:
                lines.append(f"{key} <- {runtime.how(key)}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"names={self.names}"

    # -- copy / pickle: graphs hold generated code, so rebuild them from the model ----
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_programs"] = {}
        for key in ("_program", "_build_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._build_lock = threading.Lock()
        self._program = self._program_for(self.training, ())

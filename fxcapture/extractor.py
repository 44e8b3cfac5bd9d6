"""Stage 5: the extractor module, built from a rewritten graph per train/eval mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.fx.graph_module import _forward_from_src

from .catalogue import Catalogue, NameInfo, build_catalogue, value_nodes
from .resolve import Names, resolve
from .rewrite import add_feature_outputs, protect_from_inplace, prune, substitute
from .tracing import CaptureTracer, TraceResult


@dataclass(frozen=True)
class CaptureSpec:
    """Everything :func:`fxcapture.capture` was asked for, to re-trace on demand."""

    names: Names
    leaf_modules: tuple = ()
    autowrap_functions: tuple = ()
    concrete_args: dict[str, Any] | None = None
    keep_output: bool = True
    attention: str | None = None  # "weights": decompose fused attention (fxcapture.attention)
    edit: Any = None  # {selector: fn(value, key)} (fxcapture.edit)


@dataclass
class Program:
    """One compiled graph: the forward function and what it returns."""

    graph: fx.Graph
    forward: Callable[..., Any]
    code: str
    features: dict[str, NameInfo]
    catalogue: Catalogue
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    cloned: set[str] = field(default_factory=set)  # keys copied before an in-place op


def trace(model: torch.nn.Module, spec: CaptureSpec) -> tuple[TraceResult, Catalogue]:
    tracer = CaptureTracer(spec.leaf_modules, spec.autowrap_functions)
    result = tracer.trace_model(model, spec.concrete_args)
    if spec.attention is not None:
        from .attention import expose_attention_weights

        expose_attention_weights(result, model, mode=spec.attention)
    return result, build_catalogue(result, model)


def build_program(model: torch.nn.Module, spec: CaptureSpec) -> Program:
    """Trace ``model``, resolve ``spec.names`` and rewrite the graph to return them."""
    result, catalogue = trace(model, spec)
    features = resolve(catalogue, spec.names, model, result.leaf_paths)
    graph = result.graph
    modules = dict(model.named_modules())
    edited: dict[fx.Node, fx.Node] = {}
    if spec.edit:
        from .edit import apply_edits

        # {original node: replacement}; downstream nodes already use the replacement
        edited = apply_edits(graph, catalogue, spec.edit, model, result.leaf_paths)
    values = {key: substitute(info.value, edited) for key, info in features.items()}
    captured = [n for value in values.values() for n in value_nodes(value)]
    clones = protect_from_inplace(graph, captured, modules)
    outputs = {key: substitute(value, clones) for key, value in values.items()}
    add_feature_outputs(graph, outputs, keep_output=spec.keep_output)
    if not spec.keep_output:
        prune(graph, modules)
    graph.lint()
    code = graph.python_code(root_module="self")
    return Program(
        graph=graph,
        forward=_forward_from_src(code.src, code.globals),
        code=code.src,
        features=features,
        catalogue=catalogue,
        constants=result.constants,
        cloned={k for k, v in values.items() if set(value_nodes(v)) & set(clones)},
    )


class Extractor(torch.nn.Module):
    """The model's forward, rewritten to return ``(output, {key: value})``.

    It shares the model's submodules, parameters and buffers (``state_dict()`` keys
    are the model's), so weight changes show in both. ``train()``/``eval()`` switch
    between graphs traced in each mode. Build it with :func:`fxcapture.capture`.
    """

    def __init__(self, model: torch.nn.Module, spec: CaptureSpec) -> None:
        super().__init__()
        # The model itself is kept out of the module tree: its children are ours.
        object.__setattr__(self, "_model", model)
        self._spec = spec
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        non_persistent = getattr(model, "_non_persistent_buffers_set", set())
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in non_persistent)
        self.training = model.training
        self._programs: dict[bool, Program] = {}
        self._activate(self.training)

    # -- graphs per mode ---------------------------------------------------------
    def _activate(self, mode: bool) -> None:
        program = self._programs.get(mode)
        if program is None:
            program = self._programs[mode] = self._build(mode)
        self._program = program
        self._forward = program.forward

    def _build(self, mode: bool) -> Program:
        model = self._model
        previous = model.training
        model.training = mode  # forwards that branch on self.training see this mode
        try:
            program = build_program(model, self._spec)
        finally:
            model.training = previous
        self._attach_attributes(program)
        return program

    def _attach_attributes(self, program: Program) -> None:
        """Make every ``get_attr`` of the graph resolve on this module."""
        for node in program.graph.nodes:
            if node.op != "get_attr":
                continue
            head = node.target.split(".")[0]
            if hasattr(self, head):
                continue
            value = program.constants.get(head)
            if value is None:
                value = getattr(self._model, head)
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                self.register_buffer(head, value, persistent=False)
            else:
                setattr(self, head, value)

    def train(self, mode: bool = True) -> "Extractor":
        super().train(mode)
        self._activate(mode)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        return self._forward(self, *args, **kwargs)

    # -- introspection -------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The keys of the feature dict, in execution order."""
        return list(self._program.features)

    @property
    def graph(self) -> fx.Graph:
        """The rewritten fx graph of the current mode."""
        return self._program.graph

    @property
    def code(self) -> str:
        """The Python source of the current mode's forward."""
        return self._program.code

    @property
    def catalogue(self) -> Catalogue:
        return self._program.catalogue

    def explain(self) -> str:
        """One line per key: what it captures and how."""
        lines = []
        for key, info in self._program.features.items():
            cloned = key in self._program.cloned
            via = "graph, cloned before a later in-place op" if cloned else "graph"
            lines.append(f"{key}: {info.kind} {info.key} ({info.op}) <- {via}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"names={self.names}"

    # -- copy / pickle: graphs hold generated code, so rebuild them from the model ----
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_programs"] = {}
        state.pop("_program", None)
        state.pop("_forward", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._activate(self.training)


def make_spec(
    names: Names,
    leaf_modules: Iterable[Any] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    keep_output: bool = True,
    attention: str | None = None,
    edit: Any = None,
) -> CaptureSpec:
    return CaptureSpec(
        names=names,
        leaf_modules=tuple(leaf_modules),
        autowrap_functions=tuple(autowrap_functions),
        concrete_args=concrete_args,
        keep_output=keep_output,
        attention=attention,
        edit=edit,
    )

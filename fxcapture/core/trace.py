"""Stage 1: trace a model with torch.fx and record where every value came from.

:class:`CaptureTracer` is a ``torch.fx.Tracer`` that, besides building the graph,
records

* every module call: the module's path and the value its ``forward`` returned
  (a proxy, or a tuple/dict of proxies), and
* every local variable of the Python functions that run while tracing (module
  ``forward`` methods and helper functions they call), read from the frame at the
  moment the function returns, and attributed to the innermost module being called.

Example::

    >>> tracer = CaptureTracer()
    >>> result = tracer.trace_model(torchvision.models.resnet18())
    >>> [path for path, _ in result.module_calls][:3]
    ['conv1', 'bn1', 'relu']
"""

from __future__ import annotations

import math
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from .._util.tree import all_leaves, is_container, tree_map
from .frames import FrameFilter, ProfileScope
from .hazards import HAZARD_CODES, ModelSnapshot, custom_function
from .._util.internals import global_hooks

# functions fx cannot follow (they read tensor values) whose results are containers
# the graph passes along whole: recorded as one node each where the model's module
# imported them by name (fx's autowrap patches module globals)
AUTOWRAP_FUNCTIONS = (
    torch.nn.utils.rnn.pack_padded_sequence,
    torch.nn.utils.rnn.pad_packed_sequence,
    torch.nn.utils.rnn.pack_sequence,
    torch.nn.utils.rnn.unpack_sequence,
    torch.nn.utils.rnn.unpad_sequence,
)

# torch.fx patches torch.nn.Module.__call__ globally while it traces, and we install
# a profile function: serialise traces so that two threads never interleave them.
_TRACE_LOCK = threading.RLock()


@dataclass
class LocalRecord:
    """A local variable seen when a function returned during tracing."""

    module: str  # innermost module being called ("" for the root)
    function: str  # qualified name of the function whose frame held it
    name: str
    value: Any  # the local's value with every Proxy replaced by its fx.Node
    returned_after: fx.Node | None = None  # last graph node when the function returned


@dataclass
class TraceResult:
    """A graph and what the tracer saw on the way, for :mod:`.records`."""

    graph: fx.Graph
    module_calls: list[tuple[str, Any]]  # (module path, returned value with Nodes)
    locals: list[LocalRecord]
    constants: dict[str, torch.Tensor]  # tensors the graph reads that the model does not own
    leaf_paths: set[str] = field(default_factory=set)
    hazards: list[str] = field(default_factory=list)  # why the graph may differ from the model
    # modules that must run eagerly to stay exact (they call a custom autograd.Function)
    eager_modules: dict[str, str] = field(default_factory=dict)
    root: torch.nn.Module | None = None  # what the graph's get_attr/call_module read, if not the model
    codes: set = field(default_factory=set)  # the model's own code objects that ran (see FrameFilter)
    unselected: set = field(default_factory=set)  # "module:variable" of locals seen but not kept


def _to_nodes(value: Any) -> Any:
    return tree_map(lambda v: v.node, value, fx.Proxy)


_PLAIN_TYPES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _is_capturable(value: Any) -> bool:
    """True if ``value`` holds at least one graph node and nothing the graph cannot return."""
    others = all_leaves(value)
    return any(isinstance(v, fx.Node) for v in others) and all(
        isinstance(v, (fx.Node,) + _PLAIN_TYPES) for v in others
    )


def _resolve_leaf_spec(leaf_modules: Iterable[Any]) -> tuple[tuple[type, ...], set[str]]:
    types, paths = [], set()
    for leaf in leaf_modules:
        if isinstance(leaf, type):
            types.append(leaf)
        elif isinstance(leaf, str):
            paths.add(leaf)
        else:
            raise TypeError(
                f"leaf_modules entries must be module classes or module paths, got {leaf!r}"
            )
    return tuple(types), paths


# One function per augmented assignment, as graph nodes: ``a op= b`` is in place for
# tensors and a new value for immutables. Not operator.iadd & co as targets, whose fx
# code ``a += b; node = a`` would rebind ``a`` for ints too.
def iadd(a: Any, b: Any) -> Any:
    a += b
    return a


def isub(a: Any, b: Any) -> Any:
    a -= b
    return a


def imul(a: Any, b: Any) -> Any:
    a *= b
    return a


def itruediv(a: Any, b: Any) -> Any:
    a /= b
    return a


def ifloordiv(a: Any, b: Any) -> Any:
    a //= b
    return a


def imod(a: Any, b: Any) -> Any:
    a %= b
    return a


def ipow(a: Any, b: Any) -> Any:
    a **= b
    return a


def iand(a: Any, b: Any) -> Any:
    a &= b
    return a


def ior(a: Any, b: Any) -> Any:
    a |= b
    return a


def ixor(a: Any, b: Any) -> Any:
    a ^= b
    return a


def ilshift(a: Any, b: Any) -> Any:
    a <<= b
    return a


def irshift(a: Any, b: Any) -> Any:
    a >>= b
    return a


def imatmul(a: Any, b: Any) -> Any:
    a @= b
    return a


INPLACE_FUNCTIONS = {
    fn.__name__: fn
    for fn in (iadd, isub, imul, itruediv, ifloordiv, imod, ipow, iand, ior, ixor, ilshift, irshift, imatmul)
}


class InplaceProxy(fx.Proxy):
    """An ``fx.Proxy`` that records ``x += y`` and ``x[i] = v`` as in-place ops.

    Plain fx traces ``x += y`` as ``x = x + y`` (so a tensor aliasing ``x`` misses the
    write the eager model makes) and rejects ``x[i] = v``.
    """

    def __setitem__(self, key: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


for _name, _fn in INPLACE_FUNCTIONS.items():
    setattr(
        InplaceProxy,
        f"__{_name}__",
        lambda self, other, _fn=_fn: self.tracer.create_proxy(
            "call_function", _fn, (self, other), {}
        ),
    )


class CaptureTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` that records module return values and function locals.

    Args:
        leaf_modules: module classes or module paths not to trace through (they
            become single ``call_module`` nodes, like ``torch.nn`` layers).
        autowrap_functions: functions recorded as single nodes instead of traced.
    """

    def __init__(
        self,
        leaf_modules: Iterable[Any] = (),
        autowrap_functions: Iterable[Callable] = (),
    ) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=AUTOWRAP_FUNCTIONS + tuple(autowrap_functions))
        # buffers as get_attr proxies: `self.steps += 1` and `num_batches_tracked.add_(1)`
        # become graph ops that run on every call, not a write at trace time
        self.proxy_buffer_attributes = True
        self._leaf_types, self._leaf_paths = _resolve_leaf_spec(leaf_modules)
        self._module_stack: list[str] = []
        self.failed_module: str | None = None  # innermost module whose trace raised
        self.module_calls: list[tuple[str, Any]] = []
        self.local_records: list[LocalRecord] = []
        self.constants: dict[str, torch.Tensor] = {}
        self.leaf_paths: set[str] = set()
        self.hazards: list[str] = []
        self.eager_modules: dict[str, str] = {}
        self.frames = FrameFilter()
        self._thread = threading.get_ident()

    # -- module structure ---------------------------------------------------
    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._leaf_types) or module_qualified_name in self._leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    # torch.fx patches nn.Module.__call__ and __getattr__ for every thread while it
    # traces: calls from other threads (any model's) go through untouched
    def _foreign_thread(self) -> bool:
        return threading.get_ident() != self._thread

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        if self._foreign_thread():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._foreign_thread():
            return forward(*args, **kwargs)
        path = self.path_of_module(m)
        self._module_stack.append(path)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                self.failed_module = path
            raise
        finally:
            self._module_stack.pop()
        if self.is_leaf_module(m, path):
            self.leaf_paths.add(path)
        self.module_calls.append((path, _to_nodes(out)))
        return out

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return InplaceProxy(node, self)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["fxcapture_module"] = self._module_stack[-1] if self._module_stack else ""
        return node

    def create_arg(self, a: Any):
        # fx stores unknown tensor constants with setattr on the root module; keep
        # them to ourselves instead so that the user's model is never modified.
        if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter):
            qualname = self.tensor_attrs.get(a)
            if qualname is None:
                qualname = f"_fxcapture_constant{len(self.constants)}"
                self.tensor_attrs[a] = qualname
                self.constants[qualname] = a
            return self.create_node("get_attr", qualname, (), {})
        return super().create_arg(a)

    # -- locals ----------------------------------------------------------------
    def _on_profile_event(self, frame, event: str, arg: Any) -> None:
        if event == "call":
            hazard = HAZARD_CODES.get(frame.f_code)
            if hazard is not None and hazard not in self.hazards:
                self.hazards.append(hazard)
            return
        if event == "c_call":
            function = custom_function(arg)
            if function is not None:  # its backward lives only in eager calls
                self.eager_modules[self._module_stack[-1] if self._module_stack else ""] = f"calls {function}"
            return
        if event != "return" or not self.frames.watches(frame.f_code):
            return
        self.codes.add(frame.f_code)
        module = self._module_stack[-1] if self._module_stack else ""
        function = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
        found = [(name, self._constant_local(value)) for name, value in frame.f_locals.items()
                 if name != "self" and not name.startswith((".", "__"))]  # fmt: skip
        last = next(reversed(self.graph.nodes), None)
        for name, value in found:
            if isinstance(value, fx.Proxy):
                value = value.node
            elif is_container(value):
                value = _to_nodes(value)
                if not _is_capturable(value):
                    continue
            else:
                continue
            self.local_records.append(LocalRecord(module, function, name, value, last))

    def _constant_local(self, value: Any) -> Any:
        """A tensor fx computed while tracing (``torch.zeros(4) + 1``: no input reaches it),
        alone or in a container, is the same on every call: the graph returns a copy of it,
        as the model makes a new one."""
        if is_container(value):
            return tree_map(self._constant_local, value)
        if not isinstance(value, torch.Tensor) or isinstance(value, (fx.Proxy, torch.nn.Parameter)):
            return value
        node = self.create_node("call_function", torch.clone, (self.create_arg(value),), {})
        node.meta["fxcapture_read"] = True  # fxcapture's copy, not an op of the model: no `%` key
        return fx.Proxy(node, self)

    def _python_state(self, root: torch.nn.Module, state: dict[str, list[str]]) -> None:
        """Modules whose Python state the trace changed run eagerly: the graph would
        keep the value it had while tracing. A leaf did not run here, so what changed
        its state is the module around it."""
        modules = dict(root.named_modules(remove_duplicate=False))
        for path, keys in state.items():
            owner = path
            while owner and self.is_leaf_module(modules[owner], owner):
                owner = owner.rpartition(".")[0]
            attrs = ", ".join(f"{path}.{k}".lstrip(".") for k in keys)
            self.eager_modules.setdefault(owner, f"keeps Python state ({attrs})")

    # -- entry point -----------------------------------------------------------
    def trace_model(
        self, root: torch.nn.Module, concrete_args: dict[str, Any] | None = None
    ) -> TraceResult:
        """Trace ``root`` and return the graph with everything recorded on the way.

        The model is left as it was: attributes the trace assigned are removed, the
        random number generator is restored; either is reported in ``hazards``.
        """
        model = root if isinstance(root, torch.nn.Module) else None
        self.frames = FrameFilter(root)
        self.codes: set = set()
        self._thread = threading.get_ident()
        with _TRACE_LOCK:
            snapshot = ModelSnapshot(model) if model is not None else None
            rng = torch.random.get_rng_state()
            try:
                with ProfileScope(self._on_profile_event):
                    graph = self.trace(root, concrete_args)
                for node in graph.nodes:
                    if node.target in AUTOWRAP_FUNCTIONS:
                        # fx's code would run fx.wrap("torch.nn.utils.rnn...."), breaking
                        # every later trace in the process (a dotted name is no global)
                        node.meta.pop("is_wrapped", None)
            finally:
                state = snapshot.python_state() if snapshot is not None else {}
                changed = snapshot.restore() if snapshot is not None else []
                written = snapshot.written() if snapshot is not None else []
                advanced = not torch.equal(rng, torch.random.get_rng_state())
                torch.random.set_rng_state(rng)
        self._python_state(root, state)
        python = {f"{path}.{key}".lstrip(".") for path, keys in state.items() for key in keys}
        self.hazards += [f"forward assigns {name}" for name in changed if name not in python]
        self.hazards += [f"tracing wrote into {name}" for name in written]
        if advanced:
            self.hazards.append("random numbers drawn outside the graph (frozen by a symbolic trace)")
        if global_hooks():
            self.hazards.append("global module hooks")
        return TraceResult(
            graph=graph,
            module_calls=self.module_calls,
            locals=self.local_records,
            constants=self.constants,
            leaf_paths=self.leaf_paths,
            hazards=self.hazards,
            eager_modules=self.eager_modules,
            codes=self.codes,
        )

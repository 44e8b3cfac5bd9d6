"""The running tracer: trace a model by running its real Python on fake tensors.

``torch.export.export(model, args, kwargs, strict=False)`` runs ``forward`` as Python,
so everything the model does is recorded as the model does it: buffer updates, random
ops, ``torch.no_grad()``/``torch.autocast`` regions, custom autograd functions, any
control flow that depends only on shapes and Python values. While it runs,

* a forward hook on every module and
* a trace (or profile) function reading the locals of the model's own frames at return

pass each tensor they see through ``fxcapture::tag``, an identity op carrying a key.
After export the tags tell which graph node holds which module output or local; they
are then removed, so the graph computes exactly what the model does. The result is a
:class:`~.trace.TraceResult` like the symbolic tracer's: records, selectors and passes
are the same for both.

The graph holds for inputs like the example (see :mod:`.guards`); batch and sequence
dimensions are dynamic. It shares the model's parameters and buffers (the very
tensors) and is specialised to the training mode the model was in.

Example::

    >>> result, guard = trace_by_running(gpt2, (), {"input_ids": ids, "attention_mask": mask})
    >>> [path for path, _ in result.module_calls][:2]
    ['transformer.wte', 'transformer.wpe']
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import sys
import threading
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from .._util.tree import all_leaves, holds_tensors, leaves, map_all, tree_map
from .aliasing import written_bases
from .attention import PROBS, PROBS_MEAN, ExplicitAttentionMode
from .frames import FrameFilter
from .guards import InputGuard
from .hazards import ModelSnapshot, PythonState
from .._util.internals import export_quietly, pytree, region_ops, tensor_version, watch_returns
from .pytrees import is_registered_object, state_specs
from .quiet import hold_output
from .trace import LocalRecord, TraceResult


@torch.library.custom_op("fxcapture::tag", mutates_args=())
def tag(x: torch.Tensor, key: str) -> torch.Tensor:
    """Identity carrying ``key`` (a custom op may not return its input: a copy, only
    while tracing; the node is removed afterwards)."""
    return x.clone()


@tag.register_fake
def _tag_fake(x: torch.Tensor, key: str) -> torch.Tensor:
    return torch.empty_like(x)


_TAG = torch.ops.fxcapture.tag.default
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


class _Collector:
    """Tags module outputs and locals while export runs; everything it installs is
    removed in :meth:`uninstall`."""

    def __init__(self, model: torch.nn.Module, attention: str | None, wants: Callable[[str], bool] | None) -> None:
        self.model = model
        self.wants = wants  # which locals to tag (None: all); each tag costs export an op
        self.unselected: set[str] = set()
        self.frames = FrameFilter(model)
        self.codes: set = set()  # the model's own code objects that ran
        self.stack: list[str] = []
        self.module_calls: list[tuple[str, Any]] = []
        self.locals: list[LocalRecord] = []
        self.alias: dict[str, str] = {}  # key -> key of the same tensor tagged before
        self._seen: dict[tuple[int, int], tuple[torch.Tensor, str]] = {}
        self._handles: list[Any] = []
        self._watching = contextlib.ExitStack()
        on_mean = self._on_mean if wants is None or wants(PROBS_MEAN) else None  # an op only if selectable
        self.attention = ExplicitAttentionMode(self._on_probs, on_mean) if attention else None

    def _tag_tree(self, prefix: str, tree: Any) -> Any:
        """``tree`` with each tensor replaced by its key (tagged now) and each other
        leaf by itself (a plain value) or ``None``; ``None`` if it holds no tensor."""
        if not leaves(tree):
            return None
        count = iter(range(sys.maxsize))
        return map_all(lambda v: self._tag(f"{prefix}|{next(count)}", v), tree)

    def _tag(self, key: str, v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v if isinstance(v, _PLAIN) else None
        ident = (id(v), tensor_version(v))  # the same tensor, unchanged since: one node
        hit = self._seen.get(ident)
        if hit is not None and hit[0] is v:
            self.alias[key] = hit[1]
        else:
            _TAG(v, key)
            self._seen[ident] = (v, key)
        return key

    def _on_probs(self, probs: torch.Tensor, function: str, name: str = PROBS) -> None:
        module = self.stack[-1] if self.stack else ""
        value = self._tag_tree(f"l|{len(self.locals)}", probs)
        self.locals.append(LocalRecord(module, function, name, value))

    def _on_mean(self, mean: torch.Tensor, function: str) -> None:
        self._on_probs(mean, function, PROBS_MEAN)

    def _assign_buffer(self, module: torch.nn.Module, name: str, new: Any) -> Any:
        """``sub.buf = new`` in a submodule's forward: export keeps only the root's
        buffer assignments, so write ``new`` into the buffer in place instead (the
        graph then updates the model's buffer, as eager assigns it)."""
        old = module._buffers.get(name)
        if module is self.model or module not in self.submodules or not isinstance(new, torch.Tensor) \
                or not isinstance(old, torch.Tensor) or threading.get_ident() != self.thread:  # fmt: skip
            return None
        if (new.shape, new.dtype, new.device) != (old.shape, old.dtype, old.device):
            raise TypeError(
                f"buffer {name!r} of {type(module).__name__} is assigned a tensor of another shape, "
                "dtype or device in forward: the running tracer cannot follow it"
            )
        with torch.no_grad():
            old.copy_(new)
        return old

    def install(self) -> None:
        self.thread = threading.get_ident()
        self.submodules = set(self.model.modules())
        self._handles.append(torch.nn.modules.module.register_module_buffer_registration_hook(self._assign_buffer))
        for path, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(path)))
            self._handles.append(module.register_forward_hook(self._post(path), always_call=True))
        # only the model's own code objects are watched (see internals.watch_returns)
        self._watching.enter_context(watch_returns(self._watches, self._on_return))
        if self.attention is not None:
            self.attention.__enter__()

    def _watches(self, code: Any) -> bool:
        if not self.frames.watches(code):
            return False
        self.codes.add(code)
        return True

    def uninstall(self) -> None:
        if self.attention is not None:
            self.attention.__exit__(None, None, None)
        self._watching.close()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def _pre(self, path: str):
        def pre(module, args):
            if threading.get_ident() == self.thread:  # another thread's call of the model: not traced
                self.stack.append(path)

        return pre

    def _post(self, path: str):
        def post(module, args, output):
            if threading.get_ident() != self.thread:
                return
            if self.stack and self.stack[-1] == path:
                self.stack.pop()
            if path:  # the root's output is the model output, not a module key
                value = self._tag_tree(f"m|{len(self.module_calls)}", output)
                self.module_calls.append((path, value))

        return post

    def _on_return(self, frame) -> None:
        if not self.stack:  # outside the model's forward
            return
        module = self.stack[-1]
        code = frame.f_code
        function = getattr(code, "co_qualname", code.co_name)
        for name, value in list(frame.f_locals.items()):
            if name == "self" or name.startswith((".", "__")) or isinstance(value, torch.nn.Module):
                continue
            if self.wants is not None and not self.wants(name):
                if holds_tensors(value):
                    self.unselected.add(f"{module}:{name}")
                continue
            try:
                tagged = self._tag_tree(f"l|{len(self.locals)}", value)
            except Exception:  # a container that cannot be walked: not capturable
                continue
            if tagged is not None:
                self.locals.append(LocalRecord(module, function, name, tagged))


def _untag(owner: torch.nn.Module, graph: fx.Graph, points: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """Remove the tag nodes of ``graph`` and of the region subgraphs (whose tagged
    values become extra outputs, read with ``getitem``); returns key -> node, and
    fills ``points``: key -> the last node run when it was tagged."""
    found: dict[str, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is _TAG:
            value, key = node.args
            points[key] = node.prev  # earlier tags are gone already
            node.replace_all_uses_with(value)
            graph.erase_node(node)
            found[key] = value
        elif node.op == "call_function" and node.target in region_ops():
            sub_node = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"), None)
            sub = owner.get_submodule(sub_node.target) if sub_node is not None else None
            if not isinstance(sub, fx.GraphModule):
                continue
            inner = _untag(sub, sub.graph, {})
            if inner:
                output = sub.graph.output_node()
                old = output.args[0]
                old = tuple(old) if isinstance(old, (tuple, list)) else (old,)
                output.args = (old + tuple(inner.values()),)
                anchor = node
                for j, key in enumerate(inner):
                    with graph.inserting_after(anchor):
                        anchor = graph.call_function(operator.getitem, (node, len(old) + j))
                    found[key] = points[key] = anchor
            sub.recompile()
    return found


def _drop_self_copies(graph: fx.Graph) -> None:
    """``copy_(buffer, new)`` where ``new`` already is the buffer, written in place
    (``self.steps += 1``): export adds the copy back; it would only bump the
    buffer's version and break autograd of ops that saved it."""
    for node in list(graph.nodes):
        if node.target is torch.ops.aten.copy_.default and not node.users:
            target, source = node.args[0], node.args[1]
            if isinstance(source, fx.Node) and target in written_bases(source, {}):
                graph.erase_node(node)


def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Batch (dim 0 of every tensor input) and sequence (dim 1 of integer 2-D inputs,
    such as ``input_ids`` and ``attention_mask``) are dynamic, unless of size 0 or 1."""
    auto = torch.export.Dim.AUTO
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None

    def dims(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        spec = {0: auto}
        if x.dim() == 2 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool:
            spec[1] = auto
        # export specializes a dim of size 0 or 1 anyway, with a warning: keep it static
        # (the guard then traces again for another size)
        return {d: auto for d in spec if x.shape[d] > 1} or None

    return pytree.tree_map(lambda x: registered_dims(x) if is_registered_object(x) else dims(x), dict(bound),
                           is_leaf=is_registered_object)  # fmt: skip


def registered_dims(x: Any) -> list:
    """Export's dynamic shapes for a registered object (export takes them as a list,
    one entry per child): every dimension of its tensors left to export (a cache grows
    along its sequence dimension, encoder outputs along the prompt's)."""
    children, _ = pytree.SUPPORTED_NODES[type(x)].flatten_fn(x)
    auto = torch.export.Dim.AUTO
    return [
        registered_dims(c) if is_registered_object(c)
        else {d: auto for d in range(c.dim()) if c.shape[d] > 1} or None if isinstance(c, torch.Tensor)
        else None
        for c in children
    ]  # fmt: skip


def _substitute_keys(tree: Any, nodes: dict[str, fx.Node]) -> Any:
    return tree_map(lambda k: nodes.get(k) if k[1:2] == "|" else k, tree, str)


def _returned_after(value: Any, points: dict[str, fx.Node]) -> fx.Node | None:
    """Where a local was read (its function returned): in-place writes before then
    (``y[0, 1] = 5``) are part of its value (see :func:`~.aliasing.value_at`)."""
    keys = [k for k in all_leaves(value) if isinstance(k, str) and k in points]
    return points[keys[-1]] if keys else None


def _node_modules(graph: fx.Graph) -> None:
    """``meta["fxcapture_module"]``: the module each op ran in, from export's stack."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        node.meta["fxcapture_module"] = next(reversed(stack.values()))[0] if stack else ""


def _register_output_types(model: torch.nn.Module) -> None:
    """transformers models return ``Cache`` objects: let export flatten them, with
    transformers' own registration (once per class; a no-op for other models)."""
    for module in model.modules():
        if type(module).__module__.startswith("transformers."):
            try:  # optional dependency
                from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
            except ImportError:
                return
            register_cache_pytrees_for_model(module)
            return


def _changed_ints(before: Any, after: Any, where: str = "") -> list[str]:
    if type(before) is int and type(after) is int:
        return [where] if before != after else []
    if isinstance(before, dict) and isinstance(after, dict):
        if before.get("_t") in ("tensor", "sym"):  # a leaf's position, not a value of the model's
            return []
        return [w for k in before.keys() & after.keys() for w in _changed_ints(before[k], after[k], f"{where}.{k}")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [w for i, (a, b) in enumerate(zip(before, after)) for w in _changed_ints(a, b, f"{where}[{i}]")]
    return []


def check_state_counters(in_spec: pytree.TreeSpec, out_spec: pytree.TreeSpec) -> None:
    """Refuse a graph that could never hold for the next call: the model changed a Python
    int of a state object it was given (a sliding-window cache's ``cumulative_length``),
    which the guards hold constant, so every decoding step would be traced again."""
    outputs: dict[type, list] = {}
    for spec in state_specs(out_spec):
        outputs.setdefault(spec.type, []).append(spec)
    for spec in state_specs(in_spec):
        pending = outputs.get(spec.type)
        changed = _changed_ints(spec.context, pending.pop(0).context) if pending else []
        if changed:
            raise RuntimeError(
                f"the model changes the Python int(s) {changed[:3]} of the {spec.type.__name__} it is "
                "given: a graph would hold for one call only (run-time capture instead)"
            )


def _normal_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_inference() else t


def trace_by_running(
    model: torch.nn.Module, args: tuple, kwargs: dict, *, attention: str | None = None,
    wants: Callable[[str], bool] | None = None,
) -> tuple[TraceResult, InputGuard]:
    """Export ``model`` on the example inputs, recording module outputs and locals.

    ``wants``: which local variables to keep, by name (``None``: every one; see
    :func:`~.select.wanted_locals`). Returns the :class:`~.trace.TraceResult`
    (``result.root`` is the module the graph runs on) and the :class:`~.guards.InputGuard` saying which inputs it holds for.
    Raises what ``torch.export`` raises for code it cannot trace.
    """
    collector = _Collector(model, attention, wants)
    devices = sorted({t.device.index or 0 for t in leaves((args, kwargs)) if t.device.type == "cuda"})
    # tracing draws no random numbers of the caller's; hooks and trace functions go
    _register_output_types(model)
    snapshot = ModelSnapshot(model)
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        # inputs made under torch.inference_mode (a loader's batches moved to the device there)
        # cannot enter a graph traced with autograd: trace on normal copies of them
        args, kwargs = tree_map(_normal_tensor, (tuple(args), dict(kwargs)))
        collector.install()
        try:
            # export's advice on attributes set in forward; its log records about a failed attempt
            with warnings.catch_warnings(), hold_output() as held:
                warnings.simplefilter("ignore", UserWarning)
                exported = export_quietly(model, tuple(args), dict(kwargs), dynamic_shapes(model, args, kwargs))
                held.keep = True
        finally:
            collector.uninstall()
            state = snapshot.python_state()
            snapshot.restore()  # caches and attributes forward set while exporting
    if state:  # a graph would keep what they held while exporting
        raise PythonState(state)
    check_state_counters(pytree.tree_structure((tuple(args), dict(kwargs))), exported.call_spec.out_spec)
    unlifted = exported.module()
    graph = unlifted.graph
    points: dict[str, fx.Node] = {}
    nodes = _untag(unlifted, graph, points)
    for node in list(graph.nodes):  # fxcapture checks the guards itself (core.guards)
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    for key, first in collector.alias.items():
        if first in nodes:
            nodes[key], points[key] = nodes[first], points[first]
    _drop_self_copies(graph)
    _node_modules(graph)
    graph.lint()
    module_calls = [(path, _substitute_keys(v, nodes)) for path, v in collector.module_calls]
    records = [
        LocalRecord(r.module, r.function, r.name, _substitute_keys(r.value, nodes), _returned_after(r.value, points))
        for r in collector.locals
    ]
    result = TraceResult(graph, module_calls, records, constants={}, root=unlifted, codes=collector.codes,
                         unselected=collector.unselected)
    return result, InputGuard.from_export(unlifted, exported, args, kwargs, model)

"""Attention probabilities of every attention layer: the local ``attn_probs``.

Most models compute attention with ``F.scaled_dot_product_attention`` (timm's
default ``fused_attn``, transformers' ``sdpa``) or ``nn.MultiheadAttention`` called
with ``need_weights=False`` (torchvision ``vit_b_16``): the attention matrix never
exists as a tensor. A selector naming ``attn_probs`` (or ``attention="weights"``)
rewrites the traced graph before names are resolved:

* every ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
  scale, enable_gqa)`` call becomes its explicit form (:mod:`.sdpa`), and the softmax
  output is a new local **``attn_probs``** of the calling module, ``(B, heads, L, S)``;
* every ``nn.MultiheadAttention`` call is run with ``need_weights=True,
  average_attn_weights=False``: per-head **``attn_probs``** and their mean over heads
  **``attn_probs_mean``**, owned by the MultiheadAttention module; a torch.nn module
  holding some (``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``: fx leaves) is
  run by :func:`run_exposing_probs`, keys ``encoder.layers.0.self_attn:attn_probs``;
* unfused attention (``softmax(scores)``, through dropout or a cast, into a matmul)
  names its softmax output ``attn_probs`` too.

Downstream code, and each module's own capture key, get exactly what the original
call returned. Code fx cannot trace gets the same at run time from
:class:`ExplicitAttentionMode`.

Example::

    >>> model = timm.create_model("vit_small_patch16_224")  # fused attention
    >>> out, feats = capture(model, "attn_probs")(images)
    >>> feats["blocks.0.attn:attn_probs"].shape
    torch.Size([2, 6, 197, 197])

Probabilities are taken after the softmax, before attention dropout (after it for
``nn.MultiheadAttention``, as it reports them). With ``dropout_p > 0`` in training the
explicit form draws its mask with ``F.dropout`` (not bit-identical to the fused kernel).
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .._util.tree import map_nodes
from .._util.internals import SDPA_FUNCTIONS, caller_frame
from .sdpa import attention_output, attention_probs, attention_scores, explicit_sdpa
from .trace import LocalRecord, TraceResult

MODES = ("weights",)
PROBS = "attn_probs"
PROBS_MEAN = "attn_probs_mean"
SDPA_FUNCTION = "scaled_dot_product_attention"
MHA_FUNCTION = "MultiheadAttention.forward"

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}  # fmt: skip


def _sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    if len(node.args) > len(_SDPA_PARAMS):
        raise ValueError(f"{node.name}: too many arguments for scaled_dot_product_attention")
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, node.args))
    unknown = set(node.kwargs) - set(_SDPA_PARAMS)
    if unknown:
        raise ValueError(
            f"{node.name}: scaled_dot_product_attention got unsupported arguments {sorted(unknown)}; "
            "capture without attention='weights' to keep the fused kernel"
        )
    bound.update(node.kwargs)
    return bound


# -- graph rewriting ------------------------------------------------------------------
def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_FUNCTIONS


def _new_node(graph: fx.Graph, module: str, op: str, target: Any, args: tuple, kwargs=None):
    node = graph.create_node(op, target, args, kwargs or {})
    node.meta["fxcapture_module"] = module
    return node


def _substitute_records(result: TraceResult, old: fx.Node, new: fx.Node) -> None:
    """Point every recorded module return / local that held ``old`` at ``new``."""

    def swap(value: Any) -> Any:
        return map_nodes(lambda v: new if v is old else v, value)

    result.module_calls[:] = [(path, swap(value)) for path, value in result.module_calls]
    for record in result.locals:
        record.value = swap(record.value)


def _decompose_sdpa(result: TraceResult, node: fx.Node) -> None:
    graph = result.graph
    a = _sdpa_arguments(node)
    module = node.meta.get("fxcapture_module", "")
    with graph.inserting_before(node):
        scores = _new_node(graph, module, "call_function", attention_scores,
                           (a["query"], a["key"], a["attn_mask"], a["is_causal"], a["scale"], a["enable_gqa"]))  # fmt: skip
        probs = _new_node(graph, module, "call_function", attention_probs, (scores,))
        out = _new_node(graph, module, "call_function", attention_output,
                        (probs, a["value"], a["dropout_p"], a["enable_gqa"]))  # fmt: skip
    node.replace_all_uses_with(out)
    _substitute_records(result, node, out)
    graph.erase_node(node)
    result.locals.append(LocalRecord(module, SDPA_FUNCTION, PROBS, probs))


def _original_return(
    output: torch.Tensor, per_head: torch.Tensor, mean: torch.Tensor,
    need_weights: bool, average_attn_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """What ``nn.MultiheadAttention`` returns for the caller's own flags."""
    if not need_weights:
        return output, None
    return output, mean if average_attn_weights else per_head


_MHA_PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
               "average_attn_weights", "is_causal")  # fmt: skip


def _expose_mha(result: TraceResult, node: fx.Node) -> None:
    graph = result.graph
    bound = {"need_weights": True, "average_attn_weights": True}
    bound.update(zip(_MHA_PARAMS, node.args))
    bound.update(node.kwargs)
    module = node.meta.get("fxcapture_module", node.target)
    # The same call with weights requested; its first output equals the original's.
    kwargs = {k: v for k, v in bound.items() if k in _MHA_PARAMS[3:]}
    kwargs.update(need_weights=True, average_attn_weights=False)
    node.args = tuple(bound[k] for k in _MHA_PARAMS[:3])
    node.kwargs = kwargs
    users = list(node.users)
    with graph.inserting_after(node):
        output = _new_node(graph, module, "call_function", operator.getitem, (node, 0))
    with graph.inserting_after(output):
        probs = _new_node(graph, module, "call_function", operator.getitem, (node, 1))
    with graph.inserting_after(probs):
        mean = _new_node(graph, module, "call_method", "mean", (probs,), {"dim": -3})
    with graph.inserting_after(mean):
        original = _new_node(graph, module, "call_function", _original_return,
                             (output, probs, mean, bound["need_weights"], bound["average_attn_weights"]))  # fmt: skip
    for user in users:
        user.replace_input_with(node, original)
    _substitute_records(result, node, original)
    result.locals.append(LocalRecord(module, MHA_FUNCTION, PROBS, probs))
    result.locals.append(LocalRecord(module, MHA_FUNCTION, PROBS_MEAN, mean))


# -- unfused attention: softmax(scores) (-> dropout / dtype cast) -> matmul with values ---
SOFTMAX_FUNCTION = "softmax"
SOFTMAX, PASS, MATMUL = "softmax", "pass", "matmul"
# functions and Tensor methods (by name), and module classes, by their part in attention
_ROLES: dict[Any, str] = {
    **dict.fromkeys((F.softmax, torch.softmax, torch.Tensor.softmax, "softmax", torch.nn.Softmax), SOFTMAX),
    # a probability tensor stays one through these
    **dict.fromkeys((F.dropout, torch.dropout, torch.nn.Dropout, "to", "type_as", "float", "half",
                     "bfloat16", "contiguous"), PASS),  # fmt: skip
    **dict.fromkeys((operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.Tensor.matmul,
                     "matmul", "bmm", "__matmul__"), MATMUL),  # fmt: skip
}


def attention_role(op: Any) -> str | None:
    """The part of ``op`` (a function, a Tensor method or its name, a module) in unfused
    attention, ``softmax(scores)`` -> dropout or casts -> ``probs @ values``: the one
    recogniser of the graph rewrite and of :class:`ExplicitAttentionMode`.

    Example::

        >>> attention_role(F.softmax), attention_role("to"), attention_role(nn.Dropout())
        ('softmax', 'pass', 'pass')
    """
    if isinstance(op, torch.nn.Module):
        return next((_ROLES[c] for c in type(op).__mro__ if c in _ROLES), None)
    role = _ROLES.get(op) if getattr(op, "__hash__", None) else None
    return role if role is not None or isinstance(op, str) else _ROLES.get(getattr(op, "__name__", None))


def _node_role(node: fx.Node, modules: dict[str, torch.nn.Module]) -> str | None:
    if node.op == "call_module":
        return attention_role(modules.get(node.target))
    return attention_role(node.target) if node.op in ("call_function", "call_method") else None


def _feeds_matmul(node: fx.Node, modules: dict[str, torch.nn.Module], depth: int = 4) -> bool:
    """Is ``node`` (through dropout / casts) the left operand of a matmul?"""
    for user in node.users:
        role = _node_role(user, modules)
        if role == MATMUL and (node in user.args if user.op == "call_function" else user.args[0] is node):
            return True
        if depth and role == PASS and _feeds_matmul(user, modules, depth - 1):
            return True
    return False


def _name_unfused(result: TraceResult, modules: dict[str, torch.nn.Module]) -> None:
    """Unfused attention (``softmax(q @ k^T) @ v``): its softmax output is ``attn_probs`` too."""
    for node in result.graph.nodes:
        if _node_role(node, modules) == SOFTMAX and _feeds_matmul(node, modules):
            module = node.meta.get("fxcapture_module", "")
            result.locals.append(LocalRecord(module, SOFTMAX_FUNCTION, PROBS, node))


def _holds_mha(module: torch.nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules())


def check_mode(mode: str) -> None:
    """Raise a clear ``ValueError`` unless ``mode`` is a supported ``attention=`` value."""
    if mode not in MODES:
        raise ValueError(
            f"attention={mode!r} is not supported: use attention='weights' to expose the "
            "probabilities of fused attention, or attention=None (default) to keep the fused kernels"
        )


def _mha_call_with_weights(func: Callable, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """Run ``F.multi_head_attention_forward`` asking for per-head weights; return what the
    caller's own flags would have returned, and the per-head probabilities."""
    params = inspect.signature(F.multi_head_attention_forward).parameters
    bound = dict(zip(params, args))
    bound.update(kwargs)
    need = bound.get("need_weights", True)
    average = bound.get("average_attn_weights", True)
    bound.update(need_weights=True, average_attn_weights=False)
    output, per_head = func(**bound)
    if not need:
        return (output, None), per_head
    return (output, per_head.mean(dim=-3) if average else per_head), per_head


class ExplicitAttentionMode(torch.overrides.TorchFunctionMode):
    """Run-time counterpart of the graph rewrite, for code fx cannot trace.

    Inside this mode every ``F.scaled_dot_product_attention`` call is computed by
    :func:`explicit_sdpa`, every ``nn.MultiheadAttention`` call computes its per-head
    weights (its fast path is off while a mode is active), and ``on_probs(probs, function)``
    gets the probabilities ``(B, heads, L, S)`` of each call and the function that made them
    as the graph finder names it (``on_mean``: their mean over heads for MultiheadAttention).
    Callers get what the original call returned.

    Example::

        >>> maps = []
        >>> with ExplicitAttentionMode(lambda probs, function: maps.append(probs)):
        ...     out = model(input_ids)
    """

    def __init__(self, on_probs: Callable[[torch.Tensor, str], None], on_mean: Callable | None = None) -> None:
        super().__init__()
        self.on_probs, self.on_mean = on_probs, on_mean
        # unfused attention: id(softmax output, or a dropout/cast of it) -> (it, softmax output)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out, probs = explicit_sdpa(*args, **kwargs)
            self.on_probs(probs, SDPA_FUNCTION)
            return out
        if func is F.multi_head_attention_forward:
            result, probs = _mha_call_with_weights(func, args, kwargs)
            self.on_probs(probs, MHA_FUNCTION)
            if self.on_mean is not None:  # the very weights returned when the caller averaged them
                averaged = result[1] is not None and result[1].dim() < probs.dim()
                self.on_mean(result[1] if averaged else probs.mean(dim=-3), MHA_FUNCTION)
            return result
        out = func(*args, **kwargs)
        self._follow_unfused(func, args, out)
        return out

    def _follow_unfused(self, func: Any, args: tuple, out: Any) -> None:
        """softmax -> (dropout, casts) -> matmul: report the softmax output at the matmul."""
        role = attention_role(func)
        if role == SOFTMAX:
            if isinstance(out, torch.Tensor):
                self._pending[id(out)] = (out, out)
            return
        first = args[0] if args else None
        held = self._pending.get(id(first)) if role and isinstance(first, torch.Tensor) else None
        if held is None or held[0] is not first:
            return
        if role == PASS:
            if isinstance(out, torch.Tensor):
                self._pending[id(out)] = (out, held[1])
        else:
            self._pending = {k: v for k, v in self._pending.items() if v[1] is not held[1]}
            self.on_probs(held[1], SOFTMAX_FUNCTION)

    def __exit__(self, *exc: Any) -> Any:
        self._pending.clear()
        return super().__exit__(*exc)


# -- torch.nn leaf modules holding MultiheadAttention (nn.TransformerEncoderLayer ...) --
def _calling_module(candidates: dict[int, str]) -> str | None:
    """Path of the innermost running module (a frame's ``self``) among ``candidates``."""
    frame = caller_frame()
    while frame is not None:
        path = candidates.get(id(frame.f_locals.get("self")))
        if path is not None:
            return path
        frame = frame.f_back
    return None


def run_exposing_probs(module: torch.nn.Module, paths: tuple[str, ...], *args: Any, **kwargs: Any):
    """Call a leaf ``module`` (e.g. ``nn.TransformerEncoderLayer``) under
    :class:`ExplicitAttentionMode`; return ``(output, probs)`` with one probability
    tensor per MultiheadAttention submodule, in the order of ``paths`` (relative paths).

    Example::

        >>> out, (probs,) = run_exposing_probs(layer, ("self_attn",), x)
    """
    candidates = {id(module.get_submodule(p)): p for p in paths}
    found: dict[str, list[torch.Tensor]] = {p: [] for p in paths}

    def on_probs(probs: torch.Tensor, function: str) -> None:
        owner = _calling_module(candidates)
        if owner is not None:
            found[owner].append(probs)

    with ExplicitAttentionMode(on_probs):
        output = module(*args, **kwargs)
    for path, calls in found.items():
        if len(calls) != 1:
            raise RuntimeError(
                f"fxcapture: {type(module).__name__}.{path} ran {len(calls)} times in one call, "
                "so its attention probabilities have no single key; capture them at run time "
                "(fallback='always')"
            )
    return output, tuple(found[p][0] for p in paths)


# functions that torch.fx records as one node (``torch.fx.wrap``) and that compute one
# attention inside: they are run under ExplicitAttentionMode to expose it
WRAPPED_ATTENTION_FUNCTIONS = ("shifted_window_attention",)  # torchvision Swin


def run_function_exposing_probs(fn: Callable, *args: Any, **kwargs: Any):
    """``(fn(*args, **kwargs), probs)`` for a function computing one attention.

    Example::

        >>> out, probs = run_function_exposing_probs(shifted_window_attention, x, ...)
    """
    found: list[torch.Tensor] = []
    with ExplicitAttentionMode(lambda probs, function: found.append(probs)):
        output = fn(*args, **kwargs)
    if len(found) != 1:
        raise RuntimeError(f"fxcapture: {fn.__name__} computed {len(found)} attention maps, expected 1")
    return output, found[0]


@functools.lru_cache(maxsize=64)
def _exposing(fn: Callable) -> Callable:
    """``fn`` returning ``(output, probs)``: a graph target (fx cannot pass a function as
    an argument in generated code)."""

    def run(*args: Any, **kwargs: Any):
        return run_function_exposing_probs(fn, *args, **kwargs)

    run.__name__ = run.__qualname__ = f"{fn.__name__}_exposing_probs"
    return run


def _expose_function(result: TraceResult, node: fx.Node) -> None:
    graph = result.graph
    module = node.meta.get("fxcapture_module", "")
    with graph.inserting_before(node):
        call = _new_node(graph, module, "call_function", _exposing(node.target), node.args, dict(node.kwargs))
        output = _new_node(graph, module, "call_function", operator.getitem, (call, 0))
        probs = _new_node(graph, module, "call_function", operator.getitem, (call, 1))
    node.replace_all_uses_with(output)
    _substitute_records(result, node, output)
    graph.erase_node(node)
    result.locals.append(LocalRecord(module, node.target.__name__, PROBS, probs))


def _expose_leaf(result: TraceResult, node: fx.Node, module: torch.nn.Module) -> None:
    """Replace a call of a torch.nn leaf holding MultiheadAttention modules by
    :func:`run_exposing_probs`; each MHA gets the locals ``attn_probs``/``attn_probs_mean``."""
    graph = result.graph
    paths = tuple(p for p, m in module.named_modules() if isinstance(m, torch.nn.MultiheadAttention))
    owner = node.target
    with graph.inserting_before(node):
        holder = _new_node(graph, owner, "get_attr", owner, ())
        call = _new_node(graph, owner, "call_function", run_exposing_probs,
                         (holder, paths, *node.args), dict(node.kwargs))  # fmt: skip
        output = _new_node(graph, owner, "call_function", operator.getitem, (call, 0))
        locals_ = []
        for i, path in enumerate(paths):
            probs = _new_node(graph, owner, "call_function", operator.getitem, (call, 1))
            probs = _new_node(graph, owner, "call_function", operator.getitem, (probs, i))
            mean = _new_node(graph, owner, "call_method", "mean", (probs,), {"dim": -3})
            locals_ += [(f"{owner}.{path}", PROBS, probs), (f"{owner}.{path}", PROBS_MEAN, mean)]
    node.replace_all_uses_with(output)
    _substitute_records(result, node, output)
    graph.erase_node(node)
    for path, name, value in locals_:
        result.locals.append(LocalRecord(path, MHA_FUNCTION, name, value))


def expose_attention_weights(result: TraceResult, root: torch.nn.Module, mode: str) -> None:
    """Rewrite fused attention in ``result.graph`` so its probabilities can be captured.

    Called by :func:`fxcapture.capture` with ``attention="weights"``, before the
    catalogue is built. Adds the locals ``attn_probs`` (and ``attn_probs_mean`` for
    ``nn.MultiheadAttention``) to the module owning each call site.

    Example::

        >>> ex = capture(model, "attn_probs", attention="weights")
    """
    check_mode(mode)
    modules = dict(root.named_modules())
    for node in list(result.graph.nodes):
        if _is_sdpa(node):
            _decompose_sdpa(result, node)
        elif node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.MultiheadAttention):
            _expose_mha(result, node)
        elif node.op == "call_function" and getattr(node.target, "__name__", "") in WRAPPED_ATTENTION_FUNCTIONS:
            _expose_function(result, node)
        elif node.op == "call_module" and _holds_mha(modules.get(node.target)):
            _expose_leaf(result, node, modules[node.target])
    _name_unfused(result, modules)
    result.graph.lint()


__all__ = [
    "ExplicitAttentionMode", "PROBS", "PROBS_MEAN", "attention_output", "attention_probs", "attention_scores",
    "check_mode", "expose_attention_weights", "explicit_sdpa", "run_exposing_probs", "run_function_exposing_probs",
]  # fmt: skip

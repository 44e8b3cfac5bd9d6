"""Attention probabilities out of fused kernels: ``capture(..., attention="weights")``.

Most models compute attention with ``F.scaled_dot_product_attention`` (timm's
default ``fused_attn``, transformers' ``sdpa``) or ``nn.MultiheadAttention`` called
with ``need_weights=False`` (torchvision ``vit_b_16``): the attention matrix never
exists as a tensor. With ``attention="weights"`` the traced graph is rewritten
before names are resolved:

* every ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal,
  scale, enable_gqa)`` call becomes its explicit form (scores, mask, softmax,
  dropout, weighted sum of ``v``), and the softmax output is a new local named
  **``attn_probs``** of the module that made the call, shape ``(B, heads, L, S)``;
* every ``nn.MultiheadAttention`` call is run with ``need_weights=True,
  average_attn_weights=False``; its per-head weights are the local **``attn_probs``**
  ``(B, heads, L, S)`` and their mean over heads **``attn_probs_mean``** ``(B, L, S)``,
  both owned by the MultiheadAttention module itself. Downstream code, and the
  module's own capture key, still get exactly what the original call returned.

Keys follow the usual scheme: ``"attn_probs"`` selects every call site,
``"blocks.3.attn:attn_probs"`` one of them, ``"encoder.layers.encoder_layer_0.self_attention:attn_probs_mean"``
the head-averaged map of one MultiheadAttention.

Example::

    >>> model = timm.create_model("vit_small_patch16_224")  # fused attention
    >>> ex = capture(model, ["attn_probs"], attention="weights")
    >>> out, feats = ex(images)
    >>> feats["blocks.0.attn:attn_probs"].shape
    torch.Size([2, 6, 197, 197])

The probabilities are taken after the softmax and before attention dropout. In
training mode with ``dropout_p > 0`` the explicit form draws its dropout mask with
``F.dropout``, so the output is not bit-identical to the fused kernel's (whose RNG
use differs); in eval mode it is ``allclose`` to the fused path.
"""

from __future__ import annotations

import inspect
import math
import operator
import sys
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from .._util.tree import map_nodes
from .trace import LocalRecord, TraceResult

MODES = ("weights",)
PROBS = "attn_probs"
PROBS_MEAN = "attn_probs_mean"
SDPA_FUNCTION = "scaled_dot_product_attention"
MHA_FUNCTION = "MultiheadAttention.forward"


# -- the explicit form of scaled_dot_product_attention (called from the graph) ----------
def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Pre-softmax scores of ``F.scaled_dot_product_attention``, mask and causal flag applied.

    Example::

        >>> probs = attention_scores(q, k, is_causal=True).softmax(-1)
    """
    if attn_mask is not None and is_causal:
        raise ValueError(
            "scaled_dot_product_attention: pass either attn_mask or is_causal=True, not both"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    if enable_gqa:
        key = _repeat_kv(key, query.size(-3))
    scores = (query @ key.transpose(-2, -1)) * scale
    L, S = query.size(-2), key.size(-2)
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def attention_probs(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; fully masked rows give zeros (as the math SDPA kernel)."""
    safe_softmax = getattr(torch, "_safe_softmax", None)
    if safe_softmax is not None:
        return safe_softmax(scores, -1)
    return scores.softmax(-1)


def attention_output(
    probs: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0, enable_gqa: bool = False
) -> torch.Tensor:
    """``dropout(probs) @ value`` (dropout applied whenever ``dropout_p > 0``, as SDPA does)."""
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    if enable_gqa:
        value = _repeat_kv(value, probs.size(-3))
    return probs @ value


def explicit_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention`` computed explicitly: returns ``(output, probs)``.

    Example::

        >>> out, probs = explicit_sdpa(q, k, v, is_causal=True)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
        True
    """
    probs = attention_probs(attention_scores(query, key, attn_mask, is_causal, scale, enable_gqa))
    return attention_output(probs, value, dropout_p, enable_gqa), probs


def _repeat_kv(x: torch.Tensor, query_heads: int) -> torch.Tensor:
    heads = x.size(-3)
    if query_heads % heads:
        raise ValueError(
            f"enable_gqa: {query_heads} query heads are not a multiple of {heads} key/value heads"
        )
    return x.repeat_interleave(query_heads // heads, dim=-3)


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
    return node.op == "call_function" and node.target in (
        F.scaled_dot_product_attention,
        getattr(torch._C._nn, "scaled_dot_product_attention", None),
    )


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
    weights (its fast path is off while a mode is active), and ``on_probs(probs)`` is
    called with the probabilities ``(B, heads, L, S)`` of each call. Callers get what
    the original call returned.

    Example::

        >>> maps = []
        >>> with ExplicitAttentionMode(maps.append):
        ...     out = model(input_ids)
    """

    def __init__(self, on_probs: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.on_probs = on_probs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out, probs = explicit_sdpa(*args, **kwargs)
            self.on_probs(probs)
            return out
        if func is F.multi_head_attention_forward:
            result, probs = _mha_call_with_weights(func, args, kwargs)
            self.on_probs(probs)
            return result
        return func(*args, **kwargs)


# -- torch.nn leaf modules holding MultiheadAttention (nn.TransformerEncoderLayer ...) --
def _calling_module(candidates: dict[int, str]) -> str | None:
    """Path of the innermost running module (a frame's ``self``) among ``candidates``."""
    frame = sys._getframe(1)
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

    def on_probs(probs: torch.Tensor) -> None:
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
        elif node.op == "call_module" and _holds_mha(modules.get(node.target)):
            _expose_leaf(result, node, modules[node.target])
    result.graph.lint()


__all__ = [
    "ExplicitAttentionMode",
    "PROBS",
    "PROBS_MEAN",
    "attention_output",
    "attention_probs",
    "attention_scores",
    "check_mode",
    "expose_attention_weights",
    "explicit_sdpa",
    "run_exposing_probs",
]

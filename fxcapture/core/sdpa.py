"""The explicit form of ``F.scaled_dot_product_attention``: scores, mask, softmax,
dropout, weighted sum, so that the probabilities exist as a tensor.

Used by the graph rewrite and the run-time mode of :mod:`.attention`.

Example::

    >>> out, probs = explicit_sdpa(q, k, v, is_causal=True)
    >>> probs.shape  # (B, heads, L, S)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


__all__ = ["attention_output", "attention_probs", "attention_scores", "explicit_sdpa"]

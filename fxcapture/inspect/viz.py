"""Pictures of captured values: attention maps, rollout, conv feature maps.

matplotlib is an optional extra (``pip install "fxcapture[viz]"``), imported when a
figure is drawn. Figures are plain ``matplotlib.figure.Figure`` objects drawn
without ``pyplot`` (no global state, no GUI backend needed); pass ``save="a.png"``
(or ``.svg``/``.pdf``) to write them.

Example::

    >>> out, feats = capture(model, "attn_probs")(images)
    >>> attention_grid(feats, save="grid.png")            # layers x heads
    >>> attention_overlay(feats, images, save="cls.png")   # the last layer, CLS row
    >>> rollout = attention_rollout(feats)                  # (B, N, N)
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image  # a dependency of torchvision (and of matplotlib)

from .._util.atomic import atomic_file

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Maps = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]
_FORMATS = (".png", ".svg", ".pdf")


def _figure(**kwargs: Any) -> "Figure":
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            'fxcapture.inspect.viz needs matplotlib: pip install "fxcapture[viz]"'
        ) from err
    return Figure(layout="constrained", **kwargs)


def _save(fig: "Figure", save: str | Path | None, dpi: int) -> None:
    if save is None:
        return
    path = Path(save)
    if path.suffix.lower() not in _FORMATS:
        raise ValueError(f"save={str(save)!r}: use a file name ending in {', '.join(_FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a figure is whole or absent, never half-written
        if path.suffix.lower() == ".png":
            _save_png(fig, tmp, dpi)
        else:
            fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower())


def _save_png(fig: "Figure", path: Path | str, dpi: int) -> None:
    """A 256-colour PNG: figures use 256-entry colormaps, and the file is ~3x smaller."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, format="png", optimize=True)


_PROBS = "attn_probs"
_ATTENTION_WORDS = ("attn", "attention")


def _variable(key: str) -> str:
    return key.rpartition(":")[2].partition("@")[0]


def attention_maps(feats: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The attention maps among captured values, in order: the ``attn_probs`` keys if
    any, else locals named like attention (``attn``, ``attn_weights``), else every
    tensor of shape ``(B, heads, L, S)``/``(heads, L, S)``/``(L, S)``.

    Example::

        >>> out, feats = capture(vit, ["attn_probs", "head"])(images)
        >>> list(attention_maps(feats))[:1]
        ['blocks.0.attn:attn_probs']
    """
    tensors = {k: v for k, v in feats.items() if isinstance(v, torch.Tensor) and 2 <= v.dim() <= 4}
    for wanted in (
        lambda k: _variable(k) == _PROBS,
        lambda k: ":" in k and any(w in _variable(k) for w in _ATTENTION_WORDS),
        lambda k: True,
    ):
        found = {k: v for k, v in tensors.items() if wanted(k)}
        if found:
            return found
    raise ValueError(
        f"no attention maps among the values {list(feats)[:6]}: capture 'attn_probs' "
        "(the probabilities of every attention layer, shape (B, heads, L, S))"
    )


def _label(key: str) -> str:
    """Row label: the module path of ``blocks.3.attn:attn_probs``."""
    return key[: -len(":" + _PROBS)] if key.endswith(":" + _PROBS) else key


def _layers(attn: Maps) -> tuple[list[str], list[torch.Tensor]]:
    """Labels and tensors, one per layer, from a tensor, a list or a feature dict."""
    if isinstance(attn, torch.Tensor):
        return [""], [attn]
    if isinstance(attn, Mapping):
        items = attention_maps(attn)
        return [_label(k) for k in items], list(items.values())
    maps = list(attn)
    return [f"layer {i}" for i in range(len(maps))], maps


def _one_layer(attn: Maps) -> torch.Tensor:
    """One layer's maps: the tensor itself, or the last layer of a list / feature dict."""
    if isinstance(attn, torch.Tensor):
        return attn
    _, layers = _layers(attn)
    if not layers:
        raise ValueError("no attention maps given")
    return layers[-1]


def _heads(attn: torch.Tensor, sample: int) -> torch.Tensor:
    """(heads, L, S) of one sample, from (B, H, L, S), (H, L, S) or (L, S)."""
    attn = attn.detach().float().cpu()
    if attn.dim() == 4:
        if not -attn.shape[0] <= sample < attn.shape[0]:
            raise ValueError(f"sample={sample} but the batch has {attn.shape[0]} items")
        return attn[sample]
    if attn.dim() == 3:
        return attn
    if attn.dim() == 2:
        return attn[None]
    raise ValueError(
        f"attention maps must be (B, heads, L, S), (heads, L, S) or (L, S); got shape {tuple(attn.shape)}"
    )


def attention_grid(
    attn: Maps,
    *,
    sample: int = 0,
    max_heads: int = 12,
    max_layers: int = 12,
    cmap: str = "viridis",
    title: str | None = None,
    panel_size: float = 1.6,
    max_tokens: int = 64,
    dpi: int = 100,
    save: str | Path | None = None,
) -> "Figure":
    """A grid of attention matrices: one row per layer, one column per head.

    ``attn`` is one layer's maps (``(B, heads, L, S)``) or several layers' (a list, or
    the feature dict of an extractor: its keys label the rows). All panels share one
    colour scale (shown by the colorbar), capped at the 99.5th percentile so that a
    few large entries do not wash the rest out. Maps longer than ``max_tokens`` are
    average-pooled to that size for display (a panel has fewer pixels than a 197-token
    map has rows; this also keeps a 12 x 6 grid PNG under 1 MB).

    Example::

        >>> fig = attention_grid(feats, save="attention.png")
    """
    labels, layers = _layers(attn)
    maps = [_pooled(_heads(a, sample), max_tokens) for a in layers[:max_layers]]
    labels = labels[:max_layers]
    rows, cols = len(maps), min(max(m.shape[0] for m in maps), max_heads)
    fig = _figure(figsize=(panel_size * cols + 1.2, panel_size * rows + 0.6), dpi=dpi)
    values = torch.cat([m[:cols].flatten() for m in maps])
    vmax = torch.quantile(values[torch.randperm(len(values))[:1_000_000]], 0.995).item()
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for r, (label, heads) in enumerate(zip(labels, maps)):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < heads.shape[0]:
                image = ax.imshow(heads[c].numpy(), cmap=cmap, vmin=0.0, vmax=vmax or None,
                                  interpolation="nearest")  # fmt: skip
            else:
                ax.set_axis_off()
            if r == 0:
                ax.set_title(f"head {c}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{_short(label) or 'attention'}\nquery", fontsize=8)
            if r == rows - 1:
                ax.set_xlabel("key", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention probability")
    fig.suptitle(title or f"Attention maps, sample {sample} ({rows} layer(s) x {cols} head(s))")
    _save(fig, save, dpi)
    return fig


def _pooled(heads: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """(heads, L, S) average-pooled to at most ``max_tokens`` per side."""
    size = (min(heads.shape[-2], max_tokens), min(heads.shape[-1], max_tokens))
    return heads if size == tuple(heads.shape[-2:]) else F.adaptive_avg_pool2d(heads, size)


def _short(label: str, width: int = 22) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]


def _prefix_tokens(n_tokens: int, num_prefix_tokens: int | None) -> tuple[int, int]:
    """(prefix tokens, patch grid side) for a sequence of ``n_tokens`` tokens."""
    candidates = [num_prefix_tokens] if num_prefix_tokens is not None else range(0, 9)
    for prefix in candidates:
        side = math.isqrt(n_tokens - prefix)
        if side * side == n_tokens - prefix and side > 0:
            return prefix, side
    raise ValueError(
        f"cannot lay {n_tokens} tokens out as [prefix tokens] + a square patch grid; "
        "pass num_prefix_tokens= (CLS and register tokens before the patches)"
    )


def _image_hwc(image: Any, sample: int) -> torch.Tensor:
    """An (H, W, C) float image in [0, 1] from a (B, C, H, W)/(C, H, W) tensor or HWC array."""
    img = torch.as_tensor(image).detach().float().cpu()
    if img.dim() == 4:
        img = img[sample]
    if img.dim() == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = img.permute(1, 2, 0)
    if img.dim() != 3:
        raise ValueError(f"image must be (B, C, H, W), (C, H, W) or (H, W, C); got {tuple(img.shape)}")
    low, high = img.min(), img.max()
    return (img - low) / (high - low) if high > low else torch.zeros_like(img)


def cls_attention(
    attn: Maps, *, sample: int = 0, head: int | str = "mean", query: int = 0,
    num_prefix_tokens: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The attention of token ``query`` (CLS) to every patch, as a (side, side) map.

    Example::

        >>> cls_attention(feats["blocks.11.attn:attn"]).shape
        torch.Size([14, 14])
    """
    heads = _heads(_one_layer(attn), sample)
    row = heads.mean(0)[query] if head == "mean" else heads[int(head)][query]
    prefix, side = _prefix_tokens(row.shape[-1], num_prefix_tokens)
    return row[prefix:].reshape(side, side)


def attention_overlay(
    attn: Maps,
    image: Any,
    *,
    sample: int = 0,
    head: int | str = "mean",
    query: int = 0,
    num_prefix_tokens: int | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    title: str | None = None,
    dpi: int = 100,
    save: str | Path | None = None,
) -> "Figure":
    """The image, the CLS-to-patch attention map, and the map laid over the image.

    ``attn`` is one layer's maps ``(B, heads, N, N)`` (a rollout ``(B, N, N)`` works
    too) or a feature dict (its last attention layer); ``head`` picks a head or
    averages them (``"mean"``).

    Example::

        >>> attention_overlay(feats["blocks.11.attn:attn"], images, save="cls.png")
    """
    attn = _one_layer(attn)
    grid = cls_attention(attn, sample=sample, head=head, query=query,
                         num_prefix_tokens=num_prefix_tokens)  # fmt: skip
    img = _image_hwc(image, sample)
    size = img.shape[:2]
    upsampled = F.interpolate(grid[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    fig = _figure(figsize=(11, 3.8), dpi=dpi)
    axes = fig.subplots(1, 3)
    axes[0].imshow(img.squeeze(-1).numpy(), cmap="gray" if img.shape[-1] == 1 else None)
    axes[0].set_title("input")
    shown = axes[1].imshow(grid.numpy(), cmap=cmap, interpolation="nearest")
    axes[1].set_title(f"token {query} -> patches ({grid.shape[0]}x{grid.shape[1]})")
    fig.colorbar(shown, ax=axes[1], shrink=0.8, label="attention")
    axes[2].imshow(img.squeeze(-1).numpy(), cmap="gray" if img.shape[-1] == 1 else None)
    axes[2].imshow(upsampled.numpy(), cmap=cmap, alpha=alpha)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.set_xlabel("x (pixels)" if ax is not axes[1] else "patch column")
        ax.set_ylabel("y (pixels)" if ax is not axes[1] else "patch row")
    which = "mean over heads" if head == "mean" else f"head {head}"
    fig.suptitle(title or f"Attention of token {query}, {which}, sample {sample}")
    _save(fig, save, dpi)
    return fig


def attention_rollout(attns: Maps, *, head_fusion: str = "mean", residual: bool = True) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input.

    Per layer the heads are fused (``"mean"``, ``"max"`` or ``"min"``), the residual
    connection is added as ``0.5 * A + 0.5 * I`` and rows renormalised; the layers are
    multiplied from first to last. ``attns`` is a list of ``(B, heads, N, N)`` maps in
    layer order, or the feature dict of an extractor. Returns ``(B, N, N)``.

    Example::

        >>> rollout = attention_rollout(feats)
        >>> attention_overlay(rollout, images)
    """
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion={head_fusion!r}: use one of {', '.join(fuse)}")
    _, layers = _layers(attns)
    result = None
    for attn in layers:
        a = attn.detach().float()
        a = fuse[head_fusion](a if a.dim() == 4 else a[None])
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("attention_rollout needs at least one attention map")
    return result


def feature_grid(
    fmap: torch.Tensor,
    *,
    sample: int = 0,
    channels: int | Sequence[int] = 16,
    cmap: str = "magma",
    title: str | None = None,
    panel_size: float = 1.5,
    dpi: int = 100,
    save: str | Path | None = None,
) -> "Figure":
    """Channels of a conv feature map ``(B, C, H, W)`` side by side.

    ``channels`` is a count (the most active channels, by mean absolute activation)
    or explicit channel indices. Each panel has its own colour scale, printed under it.

    Example::

        >>> feature_grid(feats["layer1"], channels=8, save="layer1.png")
    """
    fm = fmap.detach().float().cpu()
    if fm.dim() == 4:
        fm = fm[sample]
    if fm.dim() != 3:
        raise ValueError(f"feature maps must be (B, C, H, W) or (C, H, W); got {tuple(fmap.shape)}")
    if isinstance(channels, int):
        order = fm.abs().mean((1, 2)).argsort(descending=True)
        picked = order[: min(channels, fm.shape[0])].tolist()
    else:
        picked = list(channels)
    cols = min(len(picked), 8)
    rows = math.ceil(len(picked) / cols)
    # each panel is a cell (a subfigure) holding its image, title and range caption:
    # the layout keeps a caption inside its cell, clear of the next row's titles
    title = title or f"Feature maps {tuple(fm.shape)}, sample {sample} (each panel: own scale)"
    width = max(panel_size * cols, 0.1 * len(title) + 0.5)  # the title fits over few panels
    fig = _figure(figsize=(width, (panel_size + 0.45) * rows + 0.5), dpi=dpi)
    cells = fig.subfigures(rows, cols, squeeze=False)
    for i, cell in enumerate(cells.flat):
        if i >= len(picked):
            continue
        ax = cell.subplots()
        ax.set_xticks([])
        ax.set_yticks([])
        panel = fm[picked[i]]
        ax.imshow(panel.numpy(), cmap=cmap, interpolation="nearest")
        ax.set_title(f"ch {picked[i]}", fontsize=9)
        ax.set_xlabel(f"[{panel.min().item():.2g}, {panel.max().item():.2g}]", fontsize=7)
    fig.suptitle(title)
    _save(fig, save, dpi)
    return fig


__all__ = ["attention_maps", "attention_grid", "attention_overlay", "attention_rollout", "cls_attention", "feature_grid"]

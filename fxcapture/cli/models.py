"""Model specs for the command line: ``torchvision:resnet50``, ``timm:vit_small_patch16_224``,
``demo:vit``. Models are always built with random weights (no download); a
``state_dict`` file can be loaded on top.

Example::

    >>> model = build_model("torchvision:resnet18")
    >>> example_input(model).shape
    torch.Size([1, 3, 224, 224])
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F



class Attention(nn.Module):
    """Multi-head self-attention with the attention map in the local ``attn``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // self.heads))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer (the built-in default model of the CLI and demo)."""

    def __init__(
        self, image_size: int = 64, patch: int = 8, dim: int = 96, depth: int = 4,
        heads: int = 3, num_classes: int = 10,
    ) -> None:  # fmt: skip
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _torchvision(name: str) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise ValueError(_unknown("torchvision", name, known))
    kwargs = {"weights": None}
    if "fasterrcnn" in name or "retinanet" in name or "maskrcnn" in name or "ssd" in name:
        kwargs["weights_backbone"] = None
    return torchvision.models.get_model(name, **kwargs)


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ValueError("timm models need `pip install timm`") from err
    known = timm.list_models()
    if name not in known:
        raise ValueError(_unknown("timm", name, known))
    return timm.create_model(name, pretrained=False)


def _demo(name: str) -> nn.Module:
    if name != "vit":
        raise ValueError(_unknown("demo", name, ["vit"]))
    return TinyViT()


_SOURCES = {"torchvision": _torchvision, "timm": _timm, "demo": _demo}


def _unknown(source: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(f'{source}:{c}' for c in close)}?" if close else ""
    return f"unknown {source} model {name!r}.{hint}"


def build_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build ``"source:name"`` with random weights, then load ``weights`` if given."""
    source, sep, name = spec.partition(":")
    if not sep or source not in _SOURCES:
        raise ValueError(
            f"bad model spec {spec!r}: use SOURCE:NAME with SOURCE one of "
            f"{', '.join(_SOURCES)}, e.g. torchvision:resnet50 or demo:vit"
        )
    model = _SOURCES[source](name)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    return model.eval()


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects, from timm's config or torchvision defaults."""
    if isinstance(model, TinyViT):
        return (3, model.image_size, model.image_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if cfg and "input_size" in cfg:
        return tuple(cfg["input_size"])
    size = getattr(model, "image_size", 224)
    return (3, size, size)


def example_input(model: nn.Module, batch_size: int = 1) -> torch.Tensor:
    return torch.randn(batch_size, *input_size(model))


# -- `fxcapture names MODEL` ------------------------------------------------------

"""Visualizer / AnyCapture's attention example, ported to fxcapture.

The seed tools' workflow, with only the import changed: decorate the function that
computes the attention map with ``@get_local("attention_map")``, activate, run the
model, read ``get_local.cache``. Unlike the seed, ``activate()`` may come after the
model was imported and built. The same maps are then taken with ``capture()``
without any decorator, and an optional figure is drawn (needs matplotlib).

    python examples/visualizer_attention.py [--plot attention.png]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn

from fxcapture import capture, get_local


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    @get_local("attention_map")
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention_map = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attention_map @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size=64, patch=16, dim=64, depth=4, heads=4, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.blocks(x)[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", default=None, help="save a figure of block 0's heads here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = VisionTransformer().eval()  # random weights: no download
    image = torch.randn(1, 3, 64, 64)

    get_local.activate()  # after the import and the model: fine with fxcapture
    with torch.no_grad():
        model(image)
    cache = get_local.cache
    maps = cache["Attention.forward.attention_map"]
    print(f"{len(maps)} attention maps, each {maps[0].shape} ({type(maps[0]).__name__})")

    # the same maps, without the decorator doing anything: capture them by name
    extractor = capture(model, ["attention_map"])
    _, feats = extractor(image)
    for key, cached in zip(extractor.names, maps):
        np.testing.assert_allclose(feats[key].detach().numpy(), cached, rtol=1e-5, atol=1e-6)
    print("capture() gives the same maps:", ", ".join(extractor.names))

    cls_to_patches = maps[-1][0, :, 0, 1:]  # last block, every head, [CLS] -> patches
    print("last block, [CLS] attention per head (4x4 patches):")
    print(np.round(cls_to_patches.reshape(-1, 4, 4), 3))
    get_local.clear()

    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise SystemExit('plotting needs matplotlib: pip install "fxcapture[viz]"') from err
        heads = maps[0][0]
        fig, axes = plt.subplots(1, len(heads), figsize=(3 * len(heads), 3))
        for h, ax in enumerate(axes):
            ax.imshow(heads[h], cmap="viridis")
            ax.set_title(f"block 0, head {h}")
            ax.axis("off")
        fig.savefig(args.plot, bbox_inches="tight")
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()

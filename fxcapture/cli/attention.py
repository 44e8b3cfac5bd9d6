"""``fxcapture attention MODEL``: attention grid, CLS overlay and rollout of a model spec.

The probabilities come from ``capture(model, "attn_probs")``: fused attention
(``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) is computed explicitly
for this run. Without ``--image`` the input is a synthetic picture.

Example::

    $ fxcapture attention timm:vit_small_patch16_224 --image cat.png --out maps/
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..core.api import capture
from ..core.select import PROBS_NAMES, UnknownSelectorError
from ..dataset.files import check_output_folder
from ..inspect import viz
from .demo import synthetic_batch
from .extract import image_transform, positive, read_image
from .models import build_model, check_takes_images, existing_file, input_size


def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("model", help="SOURCE:NAME, e.g. timm:vit_small_patch16_224, torchvision:vit_b_16, demo:vit")
    parser.add_argument("--image", default=None, help="an image file (default: a synthetic picture)")
    parser.add_argument("--out", default="fxcapture-attention", help="folder for the PNGs (default: fxcapture-attention/)")
    parser.add_argument("--weights", default=None, help="a state_dict file to load (default: random weights)")
    parser.add_argument("--image-size", type=positive, default=None, help="input size (default: the model's)")
    parser.add_argument("--names", default="attn_probs",
                        help="selector of the maps (default attn_probs: every attention layer)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the synthetic image")


def load_input(model: torch.nn.Module, image: str | None, size: int | None, seed: int) -> torch.Tensor:
    """One image as a (1, C, H, W) batch: the file through the model's transform, or synthetic."""
    if image is not None:
        return image_transform(model, size)(read_image(str(existing_file(image, "--image"))))[None]
    channels, height, _ = input_size(model)
    return synthetic_batch(1, size or height, seed)[:, :channels]


def write_attention_figures(maps: dict, images: torch.Tensor, out: Path, title: str) -> dict[str, str]:
    """Grid, overlay of the last layer and rollout overlay; {figure: path or why skipped}."""
    written = {}
    written["grid"] = out / "attention_grid.png"
    viz.attention_grid(maps, save=written["grid"], title=f"{title}: attention probabilities")
    last = list(maps)[-1]
    jobs = {
        "overlay": (lambda: maps[last], f"{title}: CLS attention, {last}"),
        "rollout": (lambda: viz.attention_rollout(maps), f"{title}: attention rollout over {len(maps)} layers"),
    }
    for name, (value, caption) in jobs.items():
        try:
            viz.attention_overlay(value(), images, save=out / f"attention_{name}.png", title=caption)
            written[name] = out / f"attention_{name}.png"
        except ValueError as err:  # windowed attention (Swin) has no CLS row over a square grid
            written[name] = f"skipped: {err}"
    return written


def attention_features(model: torch.nn.Module, names: str, images: torch.Tensor, spec: str) -> dict:
    """The captured maps; a model without attention layers is said to be one."""
    try:
        with torch.no_grad():
            return capture(model, names)(images)[1]
    except UnknownSelectorError as err:
        if err.selector not in PROBS_NAMES:  # a misspelled path keeps its own message
            raise
        raise ValueError(
            f"{spec} has no attention layers (no softmax attention, no fused attention, no "
            f"nn.MultiheadAttention), so there are no attention maps to draw; `fxcapture attention` "
            f"needs a transformer, e.g. timm:vit_small_patch16_224 or demo:vit"
        ) from None


def run_cli(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    check_output_folder(args.out, "--out")
    for path, option in ((args.weights, "--weights"), (args.image, "--image")):
        if path is not None:
            existing_file(path, option)
    model = build_model(args.model, args.weights)
    check_takes_images(model, args.model, args.image_size)
    images = load_input(model, args.image, args.image_size, args.seed)
    feats = attention_features(model, args.names, images, args.model)
    maps = viz.attention_maps(feats)
    first = next(iter(maps.values()))
    print(f"{args.model}: {len(maps)} attention maps, {tuple(first.shape)} each (B, heads, queries, keys)")
    out = Path(args.out)
    for name, where in write_attention_figures(maps, images, out, args.model).items():
        print(f"  {name}: {where}")
    return 0

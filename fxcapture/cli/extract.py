"""``fxcapture extract``: run a dataset through a model spec and store intermediates."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ..dataset.reduce import check_reducer
from ..dataset.run import extract
from ..dataset.sources import SyntheticImages
from .models import build_model, input_size


def image_transform(model: torch.nn.Module, size: int | None = None) -> Callable:
    """Resize, center crop, to tensor, normalize: timm's ``pretrained_cfg`` values when the
    model has them, ImageNet's otherwise; ``size`` defaults to the model's input size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = size or input_size(model)[-1]
    crop_pct = cfg.get("crop_pct", 0.875)
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    return transforms.Compose([
        transforms.Resize(int(round(size / crop_pct))),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])  # fmt: skip


def cli_dataset(spec: str, model: torch.nn.Module, image_size: int | None = None, seed: int = 0) -> Dataset:
    """``synthetic:N`` or an image folder (one subfolder per class, torchvision ``ImageFolder``)."""
    if spec.startswith("synthetic:"):
        count = spec.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--data {spec!r}: use synthetic:N with N a positive number of images")
        c, h, w = input_size(model)
        size = (c, image_size, image_size) if image_size else (c, h, w)
        return SyntheticImages(int(count), size, seed)
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {spec!r}: no such folder (give an image folder or synthetic:N)")
    try:
        return ImageFolder(str(root), transform=image_transform(model, image_size))
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--data {spec!r}: {err} (an image folder holds one subfolder of images per class)"
        ) from err


def parse_reduce(values: list[str] | None) -> Any:
    """``["mean"]`` -> ``"mean"``; ``["layer4=mean", "cls"]`` -> ``{"layer4": "mean", "**": "cls"}``."""
    if not values:
        return None
    table: dict[str, str] = {}
    default = None
    for value in values:
        name, sep, how = value.rpartition("=")
        check_reducer(how)  # a clear error for an unknown reducer
        if sep:
            table[name] = how
        else:
            default = how
    if not table:
        return default
    if default is not None:
        table["**"] = default
    return table


# -- `fxcapture extract` ----------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--model", required=True,
                        help="SOURCE:NAME, e.g. torchvision:resnet50, timm:vit_small_patch16_224, demo:vit")
    parser.add_argument("--names", required=True, nargs="+", action="extend",
                        help="what to store: module paths, locals, globs (see `fxcapture names MODEL`)")
    parser.add_argument("--reduce", action="append", metavar="[NAME=]HOW",
                        help="mean, max, cls, flatten or none, for all names or NAME=HOW for one (repeatable)")
    parser.add_argument("--data", required=True, help="an image folder (one subfolder per class) or synthetic:N")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--weights", default=None, help="a state_dict file to load (default: random weights)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights (the same in every process and on resume)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: 0 for synthetic data, else min(8, CPUs))")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16"], help="store values as this dtype")
    parser.add_argument("--autocast", action="store_true", help="run under torch.autocast")
    parser.add_argument("--output", action="store_true", help="store the model output too (key 'output')")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk file (default: ~16 MiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished output")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.weights)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
    dataset = cli_dataset(args.data, model, args.image_size, args.seed)
    workers = args.num_workers
    if workers is None:
        workers = 0 if isinstance(dataset, SyntheticImages) else min(8, os.cpu_count() or 1)
    data_name = args.data if isinstance(dataset, SyntheticImages) else str(Path(args.data).resolve())
    started = time.perf_counter()
    try:
        feats = _cli_extract(args, model, dataset, device, workers, data_name)
    except KeyboardInterrupt:
        print(f"fxcapture extract: interrupted; {args.out} keeps its complete chunks: run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - started
        rows = len(next(iter(feats.values())))
        print(f"wrote {rows} rows to {args.out} in {seconds:.1f} s ({rows / seconds:.1f} samples/s)")
        for key, array in feats.items():
            print(f"  {key}: {array.shape} {array.dtype}")
    return 0


def _cli_extract(args: argparse.Namespace, model: torch.nn.Module, dataset: Dataset, device: str,
                 workers: int, data_name: str) -> dict[str, np.ndarray]:  # fmt: skip
    return extract(
        model, list(args.names), dataset, out=args.out, reduce=parse_reduce(args.reduce), device=device,
        autocast=args.autocast or None, dtype=args.dtype, batch_size=args.batch_size, num_workers=workers,
        output=args.output, chunk_size=args.chunk_size, progress=False if args.no_progress else None,
        resume=not args.no_resume, overwrite=args.overwrite,
        model_name=args.model + (f" + {args.weights}" if args.weights else ""), data_name=data_name,
    )  # fmt: skip

"""``fxcapture extract``: run a dataset through a model spec and store intermediates.

Images (a folder, ``synthetic:N``) or text (``.txt`` a document per line, ``.jsonl`` /
``.parquet`` with ``--text-field``, ``synthetic-text:N``) through a model spec
(see :mod:`.models`). Text is tokenized with the model's tokenizer and batched as
``input_ids`` + ``attention_mask``, so the reducers skip padding; a text output also
gets ``text_samples.npy``: for every row its document, first token and length.

Example::

    $ fxcapture extract --model hf-config:gpt2 --config-overrides n_layer=4 --names 'h.*' \
        --reduce tokens --data corpus.txt --max-length 256 --stride 256 --dtype bfloat16 --out acts/
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from .._util.atomic import atomic_file
from ..dataset.files import check_output_folder
from ..dataset.generation import check_generate
from ..dataset.reduce import REDUCERS, check_reducer
from ..dataset.run import extract
from ..dataset.sources import SyntheticImages
from ..dataset.text import TextDataset, is_text_spec, read_texts
from .models import (
    build_model,
    build_tokenizer,
    check_takes_images,
    existing_file,
    input_size,
    max_positions,
    parse_overrides,
)


class UnreadableImage(ValueError):
    """An image file PIL cannot read (``extract`` names the item and batch it was)."""


def read_image(path: str) -> Image.Image:
    """An RGB PIL image; a corrupt or non-image file raises :class:`UnreadableImage`."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImage(f"cannot read image {path} ({err}): remove or replace the file") from err


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
    check_data_path(spec)
    try:
        return ImageFolder(spec, transform=image_transform(model, image_size), loader=read_image)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"--data {spec!r}: {err} (an image folder holds one subfolder of images per class)"
        ) from err


def check_data_path(spec: str) -> None:
    """``--data`` names an existing image folder or text file (``synthetic*:N`` always exists)."""
    if spec.startswith(("synthetic:", "synthetic-text:")):
        return
    path = Path(spec)
    if is_text_spec(spec):
        if not path.is_file():
            raise FileNotFoundError(f"--data {spec!r}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    elif not path.is_dir():
        raise FileNotFoundError(
            f"--data {spec!r}: no such folder (give an image folder, synthetic:N, a .txt/.jsonl/.parquet "
            "file or synthetic-text:N)"
        )


# options that apply to one kind of --data only: given for the other, they would be ignored
TEXT_OPTIONS = {"text_field": "--text-field", "max_length": "--max-length", "stride": "--stride",
                "sort_batches": "--sort-batches", "padding_side": "--padding-side",
                "generate_max_new_tokens": "--generate-max-new-tokens"}  # fmt: skip
IMAGE_OPTIONS = {"image_size": "--image-size"}


def check_options(args: argparse.Namespace, text: bool) -> None:
    """Before any model is built: options that fit the data, files that exist, an ``--out``
    that can be written."""
    check_output_folder(args.out, "--out")
    if args.weights is not None:
        existing_file(args.weights, "--weights")
    check_data_path(args.data)
    wrong = IMAGE_OPTIONS if text else TEXT_OPTIONS
    given = [flag for dest, flag in wrong.items() if getattr(args, dest) not in (None, 0)]
    if given:
        kind, other = ("text", "image") if text else ("image", "text")
        raise ValueError(f"{', '.join(given)} applies to {other} data, but --data {args.data!r} is {kind}: leave it out")


def text_dataset(args: argparse.Namespace, model: torch.nn.Module) -> TextDataset:
    """``--data`` text through the model's tokenizer: windows of ``--max-length`` tokens
    (default: the model's position limit), sorted by length within ``--sort-batches``."""
    tokenizer = build_tokenizer(args.model, model)
    max_length = args.max_length or max_positions(model)
    window = args.sort_batches * args.batch_size if args.sort_batches else None
    texts = read_texts(args.data, args.text_field or "text", args.seed)
    return TextDataset(texts, tokenizer, max_length=max_length, stride=args.stride, sort_window=window,
                       padding_side=args.padding_side)  # fmt: skip


def cli_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; anything else must be a device torch has here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:1, mps or auto") from err
    backend = getattr(torch, kind, None)
    if kind != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"--device {name}: no {kind} device is available here (use --device cpu)")
    return name


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


def cli_generate(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--generate-max-new-tokens N``: the options of ``extract(..., generate=...)`` (greedy)."""
    if args.generate_max_new_tokens is None:
        return None
    return {"max_new_tokens": args.generate_max_new_tokens, "do_sample": False}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


# -- `fxcapture extract` ----------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--model", required=True,
                        help="SOURCE:NAME, e.g. torchvision:resnet50, timm:vit_small_patch16_224, demo:vit, "
                             "hf:PATH (a local transformers folder), hf-config:gpt2 (random weights)")
    parser.add_argument("--config-overrides", default=None, metavar="K=V,...",
                        help="change an hf-config: model's config, e.g. n_layer=2,n_embd=64")
    parser.add_argument("--names", required=True, nargs="+", action="extend",
                        help="what to store: module paths, locals, globs (see `fxcapture names MODEL`)")
    parser.add_argument("--reduce", action="append", metavar="[NAME=]HOW",
                        help=f"{', '.join(REDUCERS)}: for all names, or NAME=HOW for one (repeatable); "
                             "text batches are reduced over real tokens only, tokens stores one row per token")
    parser.add_argument("--data", required=True,
                        help="an image folder (one subfolder per class), synthetic:N, or text: a .txt file "
                             "(a document per line), .jsonl/.parquet (--text-field), synthetic-text:N")
    parser.add_argument("--text-field", default=None, help="the text of a .jsonl/.parquet row (default: text)")
    parser.add_argument("--max-length", type=positive, default=None,
                        help="tokens per sample (default: the model's position limit); longer documents "
                             "are truncated, or cut into windows with --stride")
    parser.add_argument("--stride", type=positive, default=None,
                        help="a new window of --max-length tokens every STRIDE tokens (each window a sample)")
    parser.add_argument("--sort-batches", type=int, default=0, metavar="K",
                        help="sort text samples by length within windows of K batches to cut padding "
                             "(rows keep that order: see text_samples.npy)")
    parser.add_argument("--max-tokens", type=positive, default=None,
                        help="with --reduce tokens: stop once this many tokens are stored (a rerun continues)")
    parser.add_argument("--padding-side", choices=["left", "right"], default=None,
                        help="pad text batches on this side (default: the tokenizer's)")
    parser.add_argument("--generate-max-new-tokens", type=positive, default=None, metavar="N",
                        help="complete each text sample with N tokens of the model's greedy generate and "
                             "store prompt and completion (with --reduce tokens: a 'generated' flag per token); "
                             "hf:/hf-config: models are built with their language-modeling head "
                             "(names such as transformer.h.0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=positive, default=64)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--weights", default=None, help="a state_dict file to load (default: random weights)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights (the same in every process and on resume)")
    parser.add_argument("--image-size", type=positive, default=None, help="input size (default: the model's)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers (default: 0 for synthetic data, else min(8, CPUs))")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="store values as this dtype")
    parser.add_argument("--autocast", action="store_true", help="run under torch.autocast")
    parser.add_argument("--output", action="store_true", help="store the model output too (key 'output')")
    parser.add_argument("--attention", choices=["weights"], default=None, help="compute fused attention explicitly so its probabilities can be stored (implied by --names attn_probs)")  # fmt: skip
    parser.add_argument("--chunk-size", type=positive, default=None, help="rows per chunk file (default: ~16 MiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-resume", action="store_true", help="refuse to continue an unfinished output")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    text = is_text_spec(args.data)
    check_options(args, text)
    device = cli_device(args.device)
    generate = cli_generate(args)
    model = build_model(args.model, args.weights, parse_overrides(args.config_overrides), causal_lm=bool(generate))
    check_generate(model, generate, args.output)
    if not text:
        check_takes_images(model, args.model, args.image_size)
    dataset = text_dataset(args, model) if text else cli_dataset(args.data, model, args.image_size, args.seed)
    workers = args.num_workers
    if workers is None:
        workers = 0 if isinstance(dataset, (SyntheticImages, TextDataset)) else min(8, os.cpu_count() or 1)
    synthetic = args.data.startswith("synthetic")
    data_name = args.data if synthetic else str(Path(args.data).resolve())
    if text:
        data_name = f"{data_name}: {dataset.data_name()}"
    started = time.perf_counter()
    try:
        feats = _cli_extract(args, model, dataset, device, workers, data_name)
    except KeyboardInterrupt:
        print(f"fxcapture extract: interrupted; {args.out} keeps its complete chunks: run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = time.perf_counter() - started
        rows = stored_rows(feats)
        if text:
            _write_text_samples(Path(args.out), dataset, rows)
        print(f"wrote {rows} rows to {args.out} in {seconds:.1f} s ({rows / seconds:.1f} samples/s)")
        for key, array in feats.items():
            print(f"  {key}: {getattr(array, 'shape', '?')} {getattr(array, 'dtype', '')}")
    return 0


def stored_rows(feats: Any) -> int:
    """Samples in an output: a per-token key's samples, else any key's rows."""
    column = next(iter(feats.values()))
    return int(getattr(column, "samples", len(column)))


def _write_text_samples(out: Path, dataset: TextDataset, rows: int) -> None:
    """``text_samples.npy``: per row (in stored order) its document index, first token, tokens."""
    table = np.stack([dataset.documents, dataset.starts, dataset.lengths], axis=1)[:rows]
    with atomic_file(out / "text_samples.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, table)


def _cli_extract(args: argparse.Namespace, model: torch.nn.Module, dataset: Dataset, device: str,
                 workers: int, data_name: str) -> dict[str, np.ndarray]:  # fmt: skip
    return extract(
        model, list(args.names), dataset, out=args.out, reduce=parse_reduce(args.reduce), device=device,
        autocast=args.autocast or None, dtype=args.dtype, batch_size=args.batch_size, num_workers=workers,
        output=args.output, chunk_size=args.chunk_size, progress=False if args.no_progress else None,
        resume=not args.no_resume, overwrite=args.overwrite, max_tokens=args.max_tokens,
        model_name=args.model + (f" + {args.weights}" if args.weights else ""), data_name=data_name,
        capture_options={"attention": args.attention} if args.attention else None, generate=cli_generate(args),
    )  # fmt: skip

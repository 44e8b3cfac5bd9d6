"""``fxcapture demo``: capture a random-weight ViT's attention maps and module outputs.

Builds :class:`fxcapture.models.TinyViT` (seeded random weights), captures the local
``attn`` of every block and a few module outputs on a synthetic batch, prints the
names and shapes, the overhead against a plain forward, writes figures (attention
grid, CLS overlay, rollout) when matplotlib is installed, and runs
:func:`fxcapture.extract` over a small synthetic dataset into ``out/features``.

Example::

    $ fxcapture demo --out fxcapture-demo/
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..core.api import capture
from ..dataset.files import check_output_folder
from ..dataset.run import extract
from ..dataset.sources import SyntheticImages
from ..inspect import viz
from .models import TinyViT

MODULES = ["patch_embed", "blocks.0", "blocks.3.mlp", "norm"]


def synthetic_batch(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients with a bright square at a random place: easy to look at."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1, 1, size)
    images = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                          (ramp[None, :] * ramp[:, None])])[None].repeat(batch, 1, 1, 1)  # fmt: skip
    for i in range(batch):
        side = size // 4
        top, left = torch.randint(0, size - side, (2,), generator=g).tolist()
        images[i, :, top : top + side, left : left + side] = 2.0
    return images + 0.1 * torch.randn(images.shape, generator=g)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 15, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation (noise hits all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _shape(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_shape(v) for v in value) + ")"
    return type(value).__name__


def write_figures(feats: dict, images: torch.Tensor, out_dir: Path) -> list[Path]:
    """Attention grid, CLS overlay (last block) and rollout overlay; [] without matplotlib."""
    attn = {k: v for k, v in feats.items() if k.endswith(":attn")}
    last = list(attn.values())[-1]
    paths = [out_dir / "attention_grid.png", out_dir / "attention_overlay.png",
             out_dir / "attention_rollout.png", out_dir / "patch_embed_features.png"]  # fmt: skip
    viz.attention_grid(attn, save=paths[0], title="TinyViT attention maps (random weights), sample 0")
    viz.attention_overlay(last, images, save=paths[1], title=f"CLS attention, {list(attn)[-1]}")
    rollout = viz.attention_rollout(attn)
    viz.attention_overlay(rollout, images, save=paths[2], title="Attention rollout over all blocks")
    viz.feature_grid(feats["patch_embed"], channels=8, save=paths[3], title="patch_embed output, 8 most active channels")
    return paths


def run_demo(
    out_dir: Path, batch: int = 4, rounds: int = 15, seed: int = 0, threads: int = 1, samples: int = 256
) -> dict:
    """Run the demo; returns what it printed as data (names, shapes, timings, figures).

    The model is tiny: one thread (the default) gives steady timings, while several
    threads on a busy machine spend most of their time waiting for each other.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, batch, rounds, seed, samples)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out_dir: Path, batch: int, rounds: int, seed: int, samples: int) -> dict:
    torch.manual_seed(seed)
    model = TinyViT().eval()
    images = synthetic_batch(batch, model.image_size, seed)
    start = time.perf_counter()
    extractor = capture(model, ["attn", *MODULES])
    build_s = time.perf_counter() - start
    with torch.inference_mode():
        out, feats = extractor(images)
        assert torch.equal(out, model(images)), "the extractor's output differs from the model's"
        timings = interleaved_medians(
            {"plain": lambda: model(images), "fxcapture": lambda: extractor(images)}, rounds
        )
    print(f"TinyViT (random weights, seed {seed}), input {tuple(images.shape)}: "
          f"{len(feats)} values captured, graph built in {build_s * 1e3:.0f} ms\n")  # fmt: skip
    width = max(map(len, feats))
    for key, value in feats.items():
        print(f"  {key.ljust(width)}  {_shape(value)}")
    ratio = timings["fxcapture"] / timings["plain"]
    print(f"\nforward, median of {rounds} interleaved runs: plain {timings['plain'] * 1e3:.2f} ms, "
          f"fxcapture {timings['fxcapture'] * 1e3:.2f} ms ({ratio:.2f}x), "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    try:
        figures = write_figures(feats, images, out_dir)
    except ImportError:
        figures = []
        print('\nmatplotlib is not installed: no figures (pip install "fxcapture[viz]")')
    else:
        print(f"\nfigures in {out_dir}/:")
        for path in figures:
            print(f"  {path.name}")
    stored = extract_features(model, out_dir / "features", samples)
    return {"names": list(feats), "timings": timings, "figures": figures, "build_s": build_s, "stored": stored}


def extract_features(model: torch.nn.Module, out: Path, samples: int) -> dict:
    """The dataset job: CLS token and mean-pooled last block of ``samples`` synthetic images."""
    data = SyntheticImages(samples, (3, model.image_size, model.image_size))
    start = time.perf_counter()
    stored = extract(model, {"cls": "norm", "block3_mean": "blocks.3"}, data, out=out,
                     reduce={"cls": "cls", "block3_mean": "mean"}, batch_size=32, overwrite=True)  # fmt: skip
    seconds = time.perf_counter() - start
    print(f"\nextract: {samples} synthetic images in {seconds:.2f} s ({samples / seconds:.0f} samples/s) -> {out}/")
    for key, array in stored.items():
        print(f"  {key}  {array.shape} {array.dtype}")
    print(f'  read back with fxcapture.load("{out}")')
    return {key: array.shape for key, array in stored.items()}


# -- `fxcapture demo` ----------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default="fxcapture-demo", help="folder for the figures (default: fxcapture-demo/)")
    parser.add_argument("--batch", type=int, default=4, help="synthetic batch size (default 4)")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (default 15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while the demo runs (default 1)")
    parser.add_argument("--samples", type=int, default=256, help="synthetic images run through extract (default 256)")


def run_cli(args: argparse.Namespace) -> int:
    if min(args.batch, args.rounds, args.threads, args.samples) < 1:
        raise ValueError("--batch, --rounds, --threads and --samples must be at least 1")
    check_output_folder(args.out, "--out")
    run_demo(Path(args.out), batch=args.batch, rounds=args.rounds, seed=args.seed, threads=args.threads,
             samples=args.samples)  # fmt: skip
    return 0

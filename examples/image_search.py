"""Image search with fxcapture: embed a folder of images, then find nearest neighbours.

Run: ``python examples/image_search.py [IMAGE_FOLDER]`` (random-weight resnet18; with
no folder, a small synthetic one with two "classes" of coloured images is made in a
temporary directory). A folder holds one subfolder per class, as torchvision's
``ImageFolder`` reads it.

The dataset job is one call: :func:`fxcapture.extract` stores ``layer4`` mean-pooled
and ``layer3`` max-pooled to disk (resumable, memory flat in the dataset size), and
:func:`fxcapture.load` memory-maps the result, rows in dataset order. Running the
script again finds the finished output and does not recompute it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from fxcapture import extract, load


# extract recognises a dataset by its files' paths, sizes and times: synthetic images made
# again get the same time, so that a rerun finds its finished output
SYNTHETIC_MTIME_NS = 1_700_000_000 * 10**9


def synthetic_folder(root: Path, per_class: int = 8, size: int = 48) -> Path:
    """Two classes: reddish and bluish noise images, as PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, channel in (("red", 0), ("blue", 2)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(150, 256, (size, size), dtype=np.uint8)
            path = root / cls / f"{i}.png"
            Image.fromarray(pixels).save(path)
            os.utime(path, ns=(SYNTHETIC_MTIME_NS, SYNTHETIC_MTIME_NS))  # the same files on every run
    return root


def embed(folder: Path, out: Path, image_size: int = 64) -> tuple[dict[str, np.ndarray], ImageFolder]:
    """Store ``layer4`` (mean over positions) and ``layer3`` (max) of every image."""
    torch.manual_seed(0)  # random weights, the same on every run (so a rerun resumes)
    model = torchvision.models.resnet18().eval()
    prep = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    dataset = ImageFolder(str(folder), prep)
    loader = DataLoader(dataset, batch_size=16)
    feats = extract(model, ["layer3", "layer4"], loader, out=out, reduce={"layer4": "mean", "layer3": "max"},
                    data_name=str(folder))  # fmt: skip
    return feats, dataset


def nearest(embeddings: np.ndarray, k: int = 3) -> np.ndarray:
    """Indices of the ``k`` nearest rows of each row by cosine similarity (itself excluded)."""
    x = torch.from_numpy(np.array(embeddings))
    x = torch.nn.functional.normalize(x, dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(k, dim=1).indices.numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="image folder (default: a synthetic one)")
    parser.add_argument("--out", default=None, help="where the features go (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    # one fixed temporary folder (the synthetic images keep their paths, so a rerun with the
    # same --out finds its finished output), removed at the end: nothing is left behind
    work = Path(tempfile.gettempdir()) / "fxcapture-image-search"
    try:
        folder = Path(args.folder) if args.folder else synthetic_folder(work / "images")
        out = Path(args.out) if args.out else work / "features"
        return search(folder, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def search(folder: Path, out: Path) -> dict:
    """Embed ``folder`` into ``out`` (or reuse the finished output) and print neighbours."""
    feats, dataset = embed(folder, out)
    print(f"{len(dataset)} images -> {out}/: " + ", ".join(f"{k} {v.shape}" for k, v in feats.items()))
    assert np.array_equal(load(out)["layer4"], feats["layer4"])  # what any later process reads
    neighbours = nearest(feats["layer4"])
    labels = np.array(dataset.targets)
    agreement = float((labels[neighbours] == labels[:, None]).mean())
    for i in (0, len(dataset) - 1):
        names = [Path(dataset.samples[j][0]).relative_to(folder).as_posix() for j in neighbours[i]]
        print(f"  {Path(dataset.samples[i][0]).relative_to(folder).as_posix()}: nearest {names}")
    print(f"neighbours of the same class: {agreement:.0%} (random weights: colour statistics only)")
    features = {k: np.array(v) for k, v in feats.items()}  # in memory: the output may be temporary
    return {"features": features, "dataset": dataset, "neighbours": neighbours, "agreement": agreement, "out": out}


if __name__ == "__main__":
    main()

"""Train on a token store: a tiny sparse autoencoder and a linear probe on GPT-2's residual stream.

Run: ``python examples/token_probe.py [--out DIR] [--documents N] [--steps N]``.

1. :func:`fxcapture.extract` with ``reduce="tokens"`` stores one row per real token
   (no padding) of a random-weight GPT-2 layer over a synthetic corpus, in bfloat16,
   with the token ids beside them (key ``input_ids``).
2. A sparse autoencoder trains on shuffled token batches streamed from the store by
   ``load(out).loader(key, batch_size)``: it never holds the whole store in memory.
3. A linear probe learns, from the same activations, whether a token is a space; its
   labels are the stored ``input_ids`` rows beside the activations, read by slicing.

Nothing is downloaded. Running again with the same ``--out`` reuses the finished store;
without ``--out`` a temporary folder is used and removed.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from fxcapture import extract, load
from fxcapture.dataset.text import ByteTokenizer, TextDataset, synthetic_texts


def build_model(layers: int, width: int) -> torch.nn.Module:
    """A random-weight GPT-2 base model (seeded: a rerun builds the same one)."""
    import transformers

    config = transformers.AutoConfig.for_model(
        "gpt2", n_layer=layers, n_embd=width, n_head=max(1, width // 32), vocab_size=257, n_positions=256,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


class SparseAutoencoder(torch.nn.Module):
    """``x -> relu(W_e (x - b) + c) -> W_d f + b`` with an L1 penalty on ``f``."""

    def __init__(self, dim: int, features: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(dim))
        self.encoder = torch.nn.Linear(dim, features)
        self.decoder = torch.nn.Linear(features, dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.encoder(x - self.bias))
        return self.decoder(f) + self.bias, f


def train_autoencoder(feats, key: str, args: argparse.Namespace) -> dict:
    """Shuffled token batches from the store's loader; returns the variance left unexplained."""
    column = feats[key]
    probe = np.asarray(column[: min(len(column), 4096)], dtype=np.float32)
    mean, scale = torch.from_numpy(probe.mean(0)), float(probe.std()) or 1.0
    sae = SparseAutoencoder(column.shape[1], args.features)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    losses, step = [], 0
    while step < args.steps:
        for batch in feats.loader(key, args.batch_size, shuffle=True, seed=step, dtype=torch.float32):
            x = (batch - mean) / scale
            recon, f = sae(x)
            loss = (recon - x).pow(2).sum(-1).mean() + args.l1 * f.abs().sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step == args.steps:
                break
    with torch.no_grad():
        x = (torch.from_numpy(probe) - mean) / scale
        recon, f = sae(x)
        unexplained = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        active = float((f > 0).float().sum(-1).mean())
    return {"losses": losses, "unexplained": unexplained, "active_features": active}


def train_probe(feats, key: str, target_id: int, args: argparse.Namespace) -> dict:
    """Logistic regression ``is this token target_id?`` on random slices of rows; labels are
    the stored ``input_ids`` of the same rows."""
    column, ids = feats[key], feats["input_ids"]
    n, dim = column.shape
    probe = torch.nn.Linear(dim, 1)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    size = min(args.batch_size, n)
    for _ in range(args.steps):
        a = int(rng.integers(0, n - size + 1))
        x = torch.from_numpy(np.asarray(column[a : a + size], dtype=np.float32))
        y = torch.from_numpy(np.asarray(ids[a : a + size]) == target_id).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(-1), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(column[:], dtype=np.float32))
        y = np.asarray(ids[:]) == target_id
        accuracy = float(((probe(x).squeeze(-1) > 0).numpy() == y).mean())
    return {"accuracy": accuracy, "base_rate": float(max(y.mean(), 1 - y.mean()))}


def run(out: Path, args: argparse.Namespace) -> dict:
    model, tokenizer = build_model(args.layers, args.width), ByteTokenizer(257)
    data = TextDataset(synthetic_texts(args.documents), tokenizer, max_length=128, stride=128,
                       sort_window=8 * args.extract_batch)  # fmt: skip
    key = f"h.{args.layer}"
    extract(model, [key], data, out=out, reduce="tokens", dtype="bfloat16", batch_size=args.extract_batch,
            data_name=f"token_probe synthetic-text:{args.documents}", progress=False)  # fmt: skip
    feats = load(out)
    column = feats[key]
    print(f"{column.samples} samples, {len(column)} tokens of {key} ({column.shape[1]} wide, bfloat16) in {out}")
    sae = train_autoencoder(feats, key, args)
    print(f"sparse autoencoder: loss {sae['losses'][0]:.3f} -> {sae['losses'][-1]:.3f}, variance unexplained "
          f"{sae['unexplained']:.1%}, {sae['active_features']:.1f} active features/token")  # fmt: skip
    space = tokenizer.encode(" ")[0]
    probe = train_probe(feats, key, space, args)
    print(f"linear probe 'is a space': accuracy {probe['accuracy']:.1%} (majority class {probe['base_rate']:.1%})")
    return {"feats": feats, "key": key, "data": data, "sae": sae, "probe": probe}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="the token store (default: a temporary folder, removed)")
    parser.add_argument("--documents", type=int, default=400, help="synthetic documents")
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 layers")
    parser.add_argument("--layer", type=int, default=1, help="whose output (residual stream) to store")
    parser.add_argument("--width", type=int, default=64, help="GPT-2 hidden size")
    parser.add_argument("--extract-batch", type=int, default=16, help="documents per forward pass")
    parser.add_argument("--batch-size", type=int, default=256, help="tokens per training step")
    parser.add_argument("--steps", type=int, default=200, help="training steps (each model)")
    parser.add_argument("--features", type=int, default=128, help="autoencoder features")
    parser.add_argument("--l1", type=float, default=0.1, help="autoencoder sparsity penalty")
    args = parser.parse_args(argv)
    if args.out is not None:
        return run(Path(args.out), args)
    with tempfile.TemporaryDirectory(prefix="fxcapture-tokens-") as work:
        return run(Path(work) / "tokens", args)


if __name__ == "__main__":
    main()

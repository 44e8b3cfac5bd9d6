"""Reading a token store back: shuffled ``loader`` batches against a plain sequential read.

Writes a per-token store (``tokens`` x ``dim`` in bfloat16, chunks of ~16 MiB, through the
same writer ``extract`` uses), then measures in tokens/s:

- ``sequential read``: every chunk file read whole with ``np.fromfile`` (the disk/page
  cache speed, the ceiling);
- ``loader, shuffled``: ``load(out).loader(key, batch_size, shuffle=True)``, a full epoch
  of torch batches (blocks in random order, rows shuffled within 8 blocks); the first
  epoch also checks each chunk's CRC-32 as it maps it;
- ``loader, in order``: the same without shuffling;
- ``random rows``: ``column[index]`` for a random index array of one batch (no locality).

Also the bytes on disk over the bytes of the arrays (target <= 1.05) and the time of
``load`` itself (manifest, no data read). Numbers are warm page cache (the store was just
written): on a cold disk the sequential read is the disk's speed and the loader follows it.

    python -m benchmarks.readback                        # 2M tokens x 768, ~3 GB
    python -m benchmarks.readback --tokens 200000 --dim 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fxcapture
from fxcapture.dataset.output import finalize, prepare_output
from fxcapture.dataset.ragged import Ragged
from fxcapture.dataset.writer import ChunkWriter, file_names

KEY = "resid"


def write_store(out: Path, tokens: int, dim: int, per_sample: int = 128) -> None:
    """``tokens`` random bfloat16 rows of ``dim``, ``per_sample`` tokens a sample."""
    prepare_output(out, {"benchmark": "readback", "tokens": tokens, "dim": dim}, resume=False, overwrite=True)
    samples = tokens // per_sample
    batch = 64
    writer = ChunkWriter(out, 10**9, file_names([KEY]), chunk_bytes=16 * 2**20).start()
    g = torch.Generator().manual_seed(0)
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        values = torch.randn(n * per_sample, dim, generator=g).bfloat16()
        writer.put(start, {KEY: Ragged(values, torch.full((n,), per_sample))})
    writer.close()
    finalize(out, samples)


def measure(out: Path, batch_size: int) -> dict[str, float]:
    started = time.perf_counter()
    feats = fxcapture.load(out)
    col = feats[KEY]
    load_s = time.perf_counter() - started
    total = len(col)
    found: dict[str, float] = {"load (s)": load_s}
    files = sorted((out / "chunks").glob(f"*/{KEY}.npy"))
    started = time.perf_counter()
    for path in files:
        np.fromfile(path, dtype=np.uint8)
    found["sequential read"] = total / (time.perf_counter() - started)
    runs = (("loader, shuffled, 1st epoch (CRC checks)", True), ("loader, shuffled", True), ("loader, in order", False))
    for name, shuffle in runs:
        started = time.perf_counter()
        seen = sum(len(b) for b in feats.loader(KEY, batch_size, shuffle=shuffle, seed=0))
        found[name] = seen / (time.perf_counter() - started)
        assert seen == total
    index = np.random.default_rng(0).integers(0, total, batch_size)
    rounds, started = 20, time.perf_counter()
    for _ in range(rounds):
        col.raw[index]
    found["random rows"] = rounds * batch_size / (time.perf_counter() - started)
    arrays = total * col.shape[1] * 2
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    found["disk / arrays"] = on_disk / arrays
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    args = parser.parse_args(argv)
    out = Path(args.dir or tempfile.mkdtemp(prefix="fxcapture-readback-")) / "store"
    try:
        started = time.perf_counter()
        write_store(out, args.tokens, args.dim)
        written = time.perf_counter() - started
        found = measure(out, args.batch_size)
    finally:
        if args.dir is None:
            shutil.rmtree(out.parent, ignore_errors=True)
    gib = args.tokens * args.dim * 2 / 2**30
    print(f"token store: {args.tokens} tokens x {args.dim} bfloat16 ({gib:.2f} GiB), batches of {args.batch_size}")
    print(f"  write (ChunkWriter, with CRC-32 and fsync): {args.tokens / written:,.0f} tokens/s")
    for name, value in found.items():
        unit = "" if name in ("load (s)", "disk / arrays") else " tokens/s"
        print(f"  {name}: {value:,.3f}{unit}" if unit == "" else f"  {name}: {value:,.0f}{unit}")
    print(json.dumps({"tokens": args.tokens, "dim": args.dim, **{k: round(v, 4) for k, v in found.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

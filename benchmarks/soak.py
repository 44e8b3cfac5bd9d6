"""Soak test of ``fxcapture.extract`` under kills: random SIGKILL / SIGINT / SIGTERM at random
moments (start-up, a chunk, finalize), each followed by a rerun that resumes, until the
output is finished; every finished output is compared row by row to an uninterrupted run.

Prints, over all kills: rows lost, duplicated and wrong, and fxcapture temporary files
left in finished outputs. All must be zero.

    python -m benchmarks.soak --kills 50            # a few minutes on 2 CPU cores
    python -m benchmarks.soak job OUT               # one extraction (what the soak kills)

The job stores a pooled key and a per-token key (``reduce="tokens"``) of a tiny ViT over
a slow synthetic dataset, in small chunks, with a 1 s time flush.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

import fxcapture
from fxcapture.cli.models import TinyViT

ROOT = Path(__file__).resolve().parents[1]
ROWS = 48
KEYS = ("blocks.1", "blocks.2")


class SlowImages(Dataset):
    """``ROWS`` images seeded by index, each taking ``delay`` seconds to load."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(i))


def job(out: str, delay: float = 0.004) -> dict:
    """One extraction into ``out`` (rows seeded by index: any rerun computes the same)."""
    torch.manual_seed(0)
    model = TinyViT(image_size=32, depth=3).eval()
    feats = fxcapture.extract(model, list(KEYS), SlowImages(delay), out=out, reduce={"blocks.1": "mean", "blocks.2": "tokens"},
                              batch_size=4, chunk_size=8, data_name="soak images", progress=False,
                              flush_seconds=1.0)  # fmt: skip
    return {k: np.asarray(feats[k]) for k in KEYS}


def compare(got: dict, ref: dict) -> dict[str, int]:
    """Rows lost (in the reference, nowhere in the output), duplicated (stored twice) and
    wrong (differing from the reference row at that index), over every key."""
    counts = {"lost": 0, "duplicated": 0, "wrong": 0}
    for key in ref:
        a, b = got[key], ref[key]
        rows_a = {r.tobytes() for r in a}
        counts["lost"] += sum(r.tobytes() not in rows_a for r in b)
        counts["duplicated"] += len(a) - len(rows_a)
        n = min(len(a), len(b))
        counts["wrong"] += int(np.sum(np.any(a[:n].reshape(n, -1) != b[:n].reshape(n, -1), axis=1))) + abs(len(a) - len(b))
    return counts


def leftovers(out: Path) -> list[str]:
    """fxcapture temporary files (of this or an older naming) anywhere in ``out``."""
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith((".fxcapture-tmp-", ".tmp-"))]


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "benchmarks.soak", "job", str(out)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _finished(out: Path) -> bool:
    return (out / "manifest.json").exists()


def soak(kills: int, seed: int = 0, workdir: str | None = None, log=print) -> dict[str, int]:
    """``kills`` random kills and reruns; returns the totals of :func:`compare` plus temporaries."""
    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="fxcapture-soak-"))
    started = time.monotonic()
    ref_proc = _start(work / "ref")
    _, err = ref_proc.communicate()
    if ref_proc.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{err.decode()[-3000:]}")
    span = time.monotonic() - started  # start-up + rows + finalize of one whole run
    ref = {k: np.asarray(v) for k, v in fxcapture.load(work / "ref").items()}
    totals = {"kills": 0, "finished outputs": 0, "lost": 0, "duplicated": 0, "wrong": 0, "temporaries": 0, "failed reruns": 0}
    out, attempt = work / "out0", 0
    while totals["kills"] < kills:
        proc = _start(out)
        time.sleep(rng.uniform(0, span))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(rng.choice([signal.SIGKILL] * 4 + [signal.SIGINT, signal.SIGTERM]))
            totals["kills"] += 1
        _, err = proc.communicate()
        # a killed run may end any way (SIGINT inside torch's C++ code aborts it); its data is what counts
        if proc.returncode != 0 and not killed:
            totals["failed reruns"] += 1
            log(f"run {attempt} failed ({proc.returncode}): {err.decode()[-2000:]}")
        attempt += 1
        if _finished(out):
            _check(out, ref, totals)
            shutil.rmtree(out)
            out = work / f"out{attempt}"
    proc = _start(out)  # the last one runs to the end
    _, err = proc.communicate()
    if proc.returncode != 0:
        totals["failed reruns"] += 1
        log(f"the last run failed: {err.decode()[-2000:]}")
    _check(out, ref, totals)
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return totals


def _check(out: Path, ref: dict, totals: dict) -> None:
    feats = fxcapture.load(out)
    feats.verify()
    for k, v in compare({k: np.asarray(feats[k]) for k in ref}, ref).items():
        totals[k] += v
    totals["temporaries"] += len(leftovers(out))
    totals["finished outputs"] += 1


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["job"]:
        job(argv[1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    totals = soak(args.kills, args.seed)
    print(f"soak: {args.kills} kills in {time.monotonic() - started:.0f} s")
    for name, value in totals.items():
        print(f"  {name}: {value}")
    bad = totals["lost"] + totals["duplicated"] + totals["wrong"] + totals["temporaries"] + totals["failed reruns"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

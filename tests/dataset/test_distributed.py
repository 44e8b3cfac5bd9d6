"""``fxcapture extract`` under torchrun: 2 CPU processes on gloo, each with its shard,
give the same arrays, in the same order, as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxcapture
from fxcapture import cli
from fxcapture.dataset.distributed import Group

ROOT = Path(__file__).resolve().parents[2]


def test_shards_are_contiguous_batch_aligned_and_cover_everything():
    for total, align, world in [(20, 4, 2), (23, 5, 3), (3, 4, 2), (64, 1, 8)]:
        shards = [Group(rank=r, world_size=world).shard(total, align) for r in range(world)]
        assert shards[0][0] == 0 and shards[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
        assert all(lo % align == 0 for lo, _ in shards)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_torchrun_two_processes_equal_one_process(tmp_path, capsys):
    args = ["extract", "--model", "demo:vit", "--names", "blocks.1", "blocks.3", "--reduce", "blocks.1=mean",
            "--reduce", "cls", "--data", "synthetic:22", "--batch-size", "4", "--chunk-size", "4",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fxcapture", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("wrote 22 rows") == 1, "only rank 0 reports"

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels
    try:
        assert cli.main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = fxcapture.load(tmp_path / "one"), fxcapture.load(tmp_path / "two")
    assert list(two) == list(one) == ["blocks.1", "blocks.3"]
    for key in one:
        assert two[key].shape == one[key].shape == (22, 96)
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["rows"] == 22
    assert sorted(os.listdir(tmp_path / "two")) == [".fxcapture.lock", "chunks", "manifest.json"]
    # rank 0 has rows 0-11 (three batches), rank 1 rows 12-21: each writes its own chunks
    assert [c["rows"] for c in manifest["chunks"]] == [[0, 4], [4, 8], [8, 12], [12, 16], [16, 20], [20, 22]]

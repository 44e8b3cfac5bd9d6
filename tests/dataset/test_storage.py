"""The chunk writer, the manifest, ``load`` and the state checks of an output directory.

References are plain numpy: the rows handed to the writer, concatenated in order.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from fxcapture.dataset import storage
from fxcapture.dataset.storage import (
    ChunkWriter,
    UnfinishedOutputError,
    complete_chunks,
    file_names,
    finalize,
    load,
    prepare_output,
    read_manifest,
    remove_temporaries,
    uncovered,
)

CONFIG = {"model": "m", "names": ["a"], "rows": 10}


def batches(sizes, seed=0):
    """Row batches of two keys, a float matrix and an int vector, numbered by global row."""
    rng = np.random.default_rng(seed)
    start = 0
    for n in sizes:
        yield start, {"a:x": rng.standard_normal((n, 3, 2)).astype(np.float32),
                      "b": np.arange(start, start + n, dtype=np.int64)}  # fmt: skip
        start += n


def write(out, sizes, chunk_rows, **kw):
    prepare_output(out, dict(CONFIG, rows=sum(sizes)), resume=True, overwrite=False)
    parts = list(batches(sizes))
    writer = ChunkWriter(out, chunk_rows, file_names(parts[0][1]), **kw).start()
    for start, arrays in parts:
        writer.put(start, arrays)
    writer.close()
    return {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}


def test_file_names_are_portable_and_unique():
    names = file_names(["blocks.0.attn:attn", "blocks.0.attn_attn", "%add_3", "x@1", "manifest"])
    assert names["blocks.0.attn:attn"] == "blocks.0.attn_attn.npy"
    assert len(set(n.lower() for n in names.values())) == 5
    assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz0123456789._@-") for n in names.values())
    assert names["manifest"] != "manifest.npy"  # never clashes with manifest.json's stem


def test_writer_splits_batches_into_fixed_chunks(tmp_path):
    expected = write(tmp_path, [3, 5, 2, 4], chunk_rows=4)
    chunks = complete_chunks(tmp_path)
    assert [(c.start, c.stop) for c in chunks] == [(0, 4), (4, 8), (8, 12), (12, 14)]
    got = np.concatenate([np.load(c.path / "a_x.npy") for c in chunks])
    np.testing.assert_array_equal(got, expected["a:x"])
    assert not [p for p in (tmp_path / "chunks").iterdir() if p.name.startswith(".tmp")]


def test_rows_not_contiguous_start_a_new_chunk(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 10, {"b": "b.npy"}).start()
    writer.put(0, {"b": np.arange(3)})
    writer.put(7, {"b": np.arange(7, 9)})  # rows 3-6 belong to someone else
    writer.close()
    assert [(c.start, c.stop) for c in complete_chunks(tmp_path)] == [(0, 3), (7, 9)]


def test_finalize_streams_one_plain_npy_per_key_then_manifest(tmp_path):
    expected = write(tmp_path, [3, 5, 2, 4], chunk_rows=4)
    manifest = finalize(tmp_path, 14, extra={"world_size": 1})
    assert manifest["rows"] == 14 and manifest["names"] == ["a:x", "b"]
    assert manifest["arrays"]["a:x"] == {"file": "a_x.npy", "shape": [14, 3, 2], "dtype": "<f4"}
    # plain numpy reads the files, with and without memory mapping
    np.testing.assert_array_equal(np.load(tmp_path / "a_x.npy"), expected["a:x"])
    feats = load(tmp_path)
    assert list(feats) == ["a:x", "b"] and isinstance(feats["b"], np.memmap)
    np.testing.assert_array_equal(feats["b"], np.arange(14))
    assert not (tmp_path / "chunks").exists() and not (tmp_path / "run.json").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["config"] == dict(CONFIG, rows=14)


def test_finalize_refuses_missing_rows(tmp_path):
    write(tmp_path, [4, 4], chunk_rows=4)
    (tmp_path / "chunks" / storage.chunk_name(0, 4)).rename(tmp_path / "chunks" / ".tmp-gone")
    with pytest.raises(RuntimeError, match=r"\(0, 4\)"):
        finalize(tmp_path, 8)
    assert not (tmp_path / "manifest.json").exists()


def test_uncovered_ranges():
    chunks = [storage.Chunk(0, 4, None), storage.Chunk(8, 12, None), storage.Chunk(12, 13, None)]
    assert uncovered(chunks, 0, 20) == [(4, 8), (13, 20)]
    assert uncovered(chunks, 2, 9) == [(4, 8)]
    assert uncovered(chunks, 8, 13) == []
    assert uncovered([], 5, 7) == [(5, 7)]


def test_load_tells_unfinished_from_missing(tmp_path):
    write(tmp_path, [4, 4, 2], chunk_rows=4)
    with pytest.raises(UnfinishedOutputError, match=r"10 of 10 rows.*resume"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an fxcapture output"):
        load(tmp_path / "nothing")


def test_prepare_output_checks_the_configuration(tmp_path):
    out = tmp_path / "out"
    assert prepare_output(out, CONFIG, resume=True, overwrite=False) == "run"
    storage.write_chunk(out, 0, {"b": np.arange(4)}, {"b": "b.npy"})
    assert prepare_output(out, CONFIG, resume=True, overwrite=False) == "run"  # resume
    assert len(complete_chunks(out)) == 1
    with pytest.raises(FileExistsError, match="unfinished run of the same configuration"):
        prepare_output(out, CONFIG, resume=False, overwrite=False)
    other = dict(CONFIG, names=["b"])
    with pytest.raises(FileExistsError, match=r"another configuration \(names: \['a'\] there, \['b'\] now\).*overwrite"):
        prepare_output(out, other, resume=True, overwrite=False)
    assert prepare_output(out, other, resume=True, overwrite=True) == "run"
    assert complete_chunks(out) == []
    assert json.loads((out / "run.json").read_text())["config"] == other


def test_a_run_stopped_before_its_first_chunk_is_started_again(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    other = dict(CONFIG, names=["b"])
    assert prepare_output(tmp_path, other, resume=False, overwrite=False) == "run"
    assert json.loads((tmp_path / "run.json").read_text())["config"] == other


def test_a_finished_output_is_not_redone_and_a_foreign_folder_is_refused(tmp_path):
    write(tmp_path / "out", [4], chunk_rows=4)
    finalize(tmp_path / "out", 4)
    assert prepare_output(tmp_path / "out", dict(CONFIG, rows=4), resume=True, overwrite=False) == "finished"
    with pytest.raises(FileExistsError, match="a finished output of another configuration"):
        prepare_output(tmp_path / "out", CONFIG, resume=True, overwrite=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an fxcapture output"):
        prepare_output(tmp_path / "mine", CONFIG, resume=True, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_temporaries_of_a_killed_run_are_removed_in_range_only(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    for start in (0, 8):
        (tmp_path / "chunks" / f".tmp-{storage.chunk_name(start, start + 4)}-123-4").mkdir()
    remove_temporaries(tmp_path, 0, 8)
    left = sorted(p.name for p in (tmp_path / "chunks").iterdir())
    assert left == [f".tmp-{storage.chunk_name(8, 12)}-123-4"]


def test_abort_keeps_complete_chunks_and_drops_the_partial_one(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 4, {"b": "b.npy"}).start()
    for start in range(0, 6, 2):
        writer.put(start, {"b": np.arange(start, start + 2)})
    writer.abort()
    assert [(c.start, c.stop) for c in complete_chunks(tmp_path)] == [(0, 4)]


def test_writer_errors_reach_the_caller_and_release_buffers(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    released = []
    (tmp_path / "a_file").write_text("")  # chunks cannot go under a file
    writer = ChunkWriter(tmp_path / "a_file", 2, {"b": "b.npy"}, max_pending=1).start()
    with pytest.raises(RuntimeError, match="writing features to .*a_file failed"):
        for start in range(0, 40, 2):
            writer.put(start, {"b": np.arange(2)}, release=lambda: released.append(1))
        writer.close()
    writer.abort()
    assert released, "the buffers handed to a failed writer are released"


def test_writer_takes_cpu_tensors_without_copying_them_first(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 8, {"t": "t.npy"}).start()
    t = torch.arange(6.0).reshape(3, 2)
    writer.put(0, {"t": t[:, 1]})  # a strided view
    writer.close()
    np.testing.assert_array_equal(np.load(complete_chunks(tmp_path)[0].path / "t.npy"), [1.0, 3.0, 5.0])


def test_read_manifest_rejects_newer_versions(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": storage.FORMAT, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        read_manifest(tmp_path)
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    from fxcapture._util.atomic import atomic_file

    path = tmp_path / "values.pt"
    with atomic_file(path) as tmp:
        torch.save({"v": 1}, tmp)
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half a fi")
            raise KeyboardInterrupt  # Ctrl-C in the middle of a write
    assert torch.load(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["values.pt"]

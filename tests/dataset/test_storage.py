"""The chunk writer, the manifest, ``load`` (lazy columns, per-token keys, 16-bit dtypes, the
shuffled loader, format version 1) and the state checks of an output directory.

References are plain numpy: the rows handed to the writer, concatenated in order.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from fxcapture.dataset import storage
from fxcapture.dataset.ragged import Ragged
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
    TokenColumn,
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


def test_finalize_lists_the_chunks_and_copies_nothing(tmp_path):
    expected = write(tmp_path, [3, 5, 2, 4], chunk_rows=4)
    inodes = {p: p.stat().st_ino for p in (tmp_path / "chunks").rglob("*.npy")}
    manifest = finalize(tmp_path, 14, extra={"world_size": 1})
    assert manifest["rows"] == 14 and manifest["names"] == ["a:x", "b"]
    assert manifest["arrays"]["a:x"] == {"dtype": "<f4", "shape": [14, 3, 2], "per_token": False}
    assert [c["rows"] for c in manifest["chunks"]] == [[0, 4], [4, 8], [8, 12], [12, 14]]
    assert {p: p.stat().st_ino for p in (tmp_path / "chunks").rglob("*.npy")} == inodes  # the same files
    arrays = sum(v.nbytes for v in expected.values())
    stored = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".npy")
    assert stored <= arrays + 8 * 128, "a .npy header per chunk file, nothing more"
    feats = load(tmp_path)
    assert list(feats) == ["a:x", "b"] and feats["b"].shape == (14,) and len(feats["a:x"]) == 14
    np.testing.assert_array_equal(feats["b"], np.arange(14))
    np.testing.assert_array_equal(feats["a:x"][:], expected["a:x"])
    assert not (tmp_path / "run.json").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["config"] == dict(CONFIG, rows=14)


def test_numpy_alone_reads_the_layout_the_docstring_gives(tmp_path):
    expected = write(tmp_path, [3, 5, 2, 4], chunk_rows=4)
    finalize(tmp_path, 14)
    m = json.loads((tmp_path / "manifest.json").read_text())
    got = np.concatenate([np.load(tmp_path / "chunks" / c["dir"] / c["arrays"]["a:x"]["file"], mmap_mode="r")
                          for c in m["chunks"]])  # fmt: skip
    np.testing.assert_array_equal(got, expected["a:x"])


def test_columns_index_like_numpy_across_chunks(tmp_path):
    expected = write(tmp_path, [3, 5, 2, 4, 7], chunk_rows=4)
    finalize(tmp_path, 21)
    col, ref = load(tmp_path)["a:x"], expected["a:x"]
    rng = np.random.default_rng(1)
    for index in [5, -1, slice(None), slice(2, 19), slice(3, 4), slice(None, None, 3), slice(20, 2, -2),
                  [20, 0, 5, 5], np.array([[1, 2], [16, 3]]), rng.random(21) > 0.5, (slice(1, 9), 1),
                  (7, 1, 0), (..., 0), slice(30, 40)]:  # fmt: skip
        np.testing.assert_array_equal(col[index], ref[index], err_msg=str(index))
    assert col.shape == ref.shape and col.dtype == ref.dtype and col.ndim == 3
    np.testing.assert_array_equal(np.asarray(col), ref)
    with pytest.raises(IndexError, match="row 21 out of range"):
        col[21]


def test_bfloat16_and_float16_are_stored_as_16_bits(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    values = torch.randn(10, 6)
    writer = ChunkWriter(tmp_path, 4, {"bf": "bf.npy", "h": "h.npy"}).start()
    for start in range(0, 10, 5):
        writer.put(start, {"bf": values[start:start + 5].bfloat16(), "h": values[start:start + 5].half()})
    writer.close()
    manifest = finalize(tmp_path, 10)
    assert manifest["arrays"]["bf"]["dtype"] == "bfloat16" and manifest["arrays"]["h"]["dtype"] == "<f2"
    feats = load(tmp_path)
    np.testing.assert_array_equal(feats["bf"][:], values.bfloat16().float().numpy())
    assert feats["bf"].dtype == np.float32 and feats["bf"].raw.dtype == np.uint16
    np.testing.assert_array_equal(feats["bf"].raw[:], values.bfloat16().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(feats["h"][:], values.half().numpy())
    assert np.load(complete_chunks(tmp_path)[0].path / "bf.npy").dtype == np.uint16


def test_per_token_keys_are_flat_with_offsets_and_per_sample_access(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 5, (11,), generator=g)
    values = torch.randn(int(lengths.sum()), 3, generator=g)
    writer = ChunkWriter(tmp_path, 4, file_names(["tok", "pooled"])).start()
    offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
    for start, stop in [(0, 3), (3, 9), (9, 11)]:
        part = Ragged(values[offsets[start]:offsets[stop]], lengths[start:stop])
        writer.put(start, {"tok": part, "pooled": torch.arange(start, stop)})
    writer.close()
    manifest = finalize(tmp_path, 11)
    assert manifest["arrays"]["tok"]["per_token"] and manifest["arrays"]["tok"]["shape"] == [len(values), 3]
    tok = load(tmp_path)["tok"]
    assert isinstance(tok, TokenColumn) and tok.shape == (len(values), 3) and tok.samples == 11
    np.testing.assert_array_equal(tok[:], values.numpy())
    np.testing.assert_array_equal(tok[2:-3], values[2:-3].numpy())
    np.testing.assert_array_equal(tok.offsets, offsets)
    for i, expected in enumerate(torch.split(values, lengths.tolist())):
        np.testing.assert_array_equal(tok.sample(i), expected.numpy())
    np.testing.assert_array_equal(load(tmp_path)["pooled"], np.arange(11))


@pytest.mark.parametrize("shuffle", [True, False])
def test_loader_streams_every_row_once_in_batches(tmp_path, shuffle):
    expected = write(tmp_path, [3, 5, 2, 4, 7, 6], chunk_rows=4)
    finalize(tmp_path, 27)
    loader = load(tmp_path).loader("a:x", batch_size=5, shuffle=shuffle, seed=0, buffer_blocks=2)
    epochs = [torch.cat(list(loader)).numpy() for _ in range(2)]
    assert [len(b) for b in loader] == [5, 5, 5, 5, 5, 2] and len(loader) == 6
    for got in epochs:
        key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
        assert key(got) == key(expected["a:x"])  # every row exactly once
    if shuffle:
        assert not np.array_equal(epochs[0], expected["a:x"]) and not np.array_equal(epochs[0], epochs[1])
    else:
        np.testing.assert_array_equal(epochs[0], expected["a:x"])


def test_format_version_1_outputs_still_load(tmp_path):
    a, b = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32), np.arange(6)
    np.save(tmp_path / "a_x.npy", a)
    np.save(tmp_path / "b.npy", b)
    arrays = {"a:x": {"file": "a_x.npy", "shape": [6, 4], "dtype": "<f4"},
              "b": {"file": "b.npy", "shape": [6], "dtype": b.dtype.str}}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"format": storage.FORMAT, "version": 1, "names": ["a:x", "b"],
                                                         "rows": 6, "arrays": arrays, "config": CONFIG}))  # fmt: skip
    feats = load(tmp_path)
    np.testing.assert_array_equal(feats["a:x"], a)
    np.testing.assert_array_equal(feats["b"][2:5], b[2:5])
    assert torch.cat(list(feats.loader("a:x", 4, seed=0))).shape == (6, 4)
    (tmp_path / "notes.npy").write_bytes(b"the user's own")
    prepare_output(tmp_path, dict(CONFIG, names=["z"]), resume=True, overwrite=True)  # overwrite: ours only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks", "notes.npy", "run.json"]


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
    writer = ChunkWriter(out, 4, {"b": "b.npy"}).start()
    writer.put(0, {"b": np.arange(4)})
    writer.close()
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
        (tmp_path / "chunks" / f".fxcapture-tmp-{storage.chunk_name(start, start + 4)}-0123abcd").mkdir()
    remove_temporaries(tmp_path, 0, 8)
    left = sorted(p.name for p in (tmp_path / "chunks").iterdir())
    assert left == [f".fxcapture-tmp-{storage.chunk_name(8, 12)}-0123abcd"]


def test_abort_writes_every_whole_row_it_was_given(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 4, {"b": "b.npy"}).start()
    for start in range(0, 6, 2):
        writer.put(start, {"b": np.arange(start, start + 2)})
    writer.abort()
    assert [(c.start, c.stop) for c in complete_chunks(tmp_path)] == [(0, 4), (4, 6)]


def test_a_partial_chunk_is_written_once_its_first_row_waited_flush_seconds(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 100, {"b": "b.npy"}, flush_seconds=0.5).start()
    writer.put(0, {"b": np.arange(3)})
    deadline = time.monotonic() + 30
    while not complete_chunks(tmp_path):  # the writer is idle: only the clock writes it
        assert time.monotonic() < deadline, "the partial chunk was never written"
        time.sleep(0.05)
    writer.put(3, {"b": np.arange(3, 5)})
    writer.close()
    assert [(c.start, c.stop) for c in complete_chunks(tmp_path)] == [(0, 3), (3, 5)]


def test_writer_errors_reach_the_caller_and_release_buffers(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    released = []
    (tmp_path / "a_file").write_text("")  # chunks cannot go under a file
    writer = ChunkWriter(tmp_path / "a_file", 2, {"b": "b.npy"}, max_pending=1).start()
    with pytest.raises(OSError, match="a_file/chunks.* failed: not a directory"):
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

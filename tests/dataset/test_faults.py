"""Faults injected for real: a full disk (a tmpfs too small), a name too long, two writers,
kills at start-up, in a chunk and in finalize, crafted indexes and manifests, links, corrupt
chunks; the identity of a run; non-reproducible data. Results of reruns are compared row
by row to an uninterrupted run (plain numpy)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxcapture
from benchmarks.soak import compare, leftovers, soak
from conftest import SUBPROCESS_ENV
from fxcapture import cli
from fxcapture.cli.models import TinyViT
from fxcapture.dataset.files import WriteError
from fxcapture.dataset.lock import OutputLock, OutputLockedError
from fxcapture.dataset.sources import SyntheticImages
from fxcapture.dataset.storage import ChunkWriter, complete_chunks, finalize, load, prepare_output

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"model": "m", "names": ["a"], "rows": 10}


def tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT(image_size=32).eval()


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


@contextlib.contextmanager
def small_disk(path: Path, size: str, inodes: int | None = None):
    """A real tmpfs of ``size`` mounted at ``path`` (needs root, as in CI containers)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def finishes_within(seconds: float, fn, *args, **kwargs):
    """Run ``fn`` on a thread; fail (instead of hanging the suite) if it takes longer."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # handed back to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(fn, '__name__', fn)} hung for more than {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- write failures: an error naming the file and the cause, within seconds ------------------
def test_a_full_disk_is_refused_before_writing_with_the_space_needed(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())
        with pytest.raises(OSError, match=r"no space left on device .*: 2\.\d MiB needed") as info:
            fxcapture.extract(model, ["1"], torch.randn(200, 3, 32, 32), out=disk / "o", batch_size=50)
        assert isinstance(info.value, WriteError)
        assert complete_chunks(disk / "o") == [] and not leftovers(disk / "o")


def test_the_disk_filling_up_mid_write_names_the_file_and_does_not_hang(tmp_path):
    """Bytes to spare but no inode left: the real ENOSPC of a write, not the early check."""
    with small_disk(tmp_path / "disk", "64m", inodes=12) as disk:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())
        x = torch.randn(64, 3, 8, 8)
        with pytest.raises(OSError, match=r"writing .*disk/o/\S+ failed: no space left on device"):
            finishes_within(60, fxcapture.extract, model, ["1"], x, out=disk / "o", batch_size=4, chunk_size=4)
        assert not leftovers(disk / "o"), "temporaries of the failed chunk are removed by the next run or now"
        stored = complete_chunks(disk / "o")
    rows = sum(c.stop - c.start for c in stored)
    assert rows % 4 == 0  # only whole chunks


def test_the_last_chunk_failing_inside_close_is_raised_not_a_hang(tmp_path):
    """The hang of issue 17: the last, partial chunk is written by close() and fails."""
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 4, {"a": "a.npy", "b": "b.npy"}).start()
    writer.put(0, {"a": np.arange(4), "b": np.arange(4)})
    deadline = time.monotonic() + 30
    while not complete_chunks(tmp_path):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    writer.files["b"] = "k" * 300 + ".npy"  # longer than any file system allows
    writer.put(4, {"a": np.arange(2), "b": np.arange(2)})
    with pytest.raises(OSError, match=r"writing .*kkkk\.npy failed: file name too long"):
        finishes_within(20, writer.close)
    assert [(c.start, c.stop) for c in complete_chunks(tmp_path)] == [(0, 4)]  # what was complete stays
    assert not leftovers(tmp_path)


def test_a_failed_writer_stops_the_producer_and_releases_its_buffers(tmp_path):
    prepare_output(tmp_path, CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path, 2, {"a": "k" * 300 + ".npy"}, max_pending=1).start()
    released = []

    def produce():
        for start in range(0, 400, 2):
            writer.put(start, {"a": np.arange(2)}, release=lambda: released.append(1))

    with pytest.raises(OSError, match="file name too long"):
        finishes_within(20, produce)
    finishes_within(20, writer.abort)
    assert released, "the buffers handed to a failed writer are released"
    assert not leftovers(tmp_path)


def test_keys_with_very_long_names_get_portable_file_names(tmp_path):
    model, x = torch.nn.Sequential(torch.nn.Flatten()), torch.randn(6, 2, 2)
    key = "x" * 400
    feats = fxcapture.extract(model, {key: "0"}, x, out=tmp_path / "o", batch_size=3)
    np.testing.assert_array_equal(feats[key], x.flatten(1).numpy())
    assert all(len(p.name) < 200 for p in (tmp_path / "o").rglob("*"))


# -- one writer per folder -------------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    model, x = tiny_vit(), images(4)
    with OutputLock(tmp_path / "o"):
        with pytest.raises(OutputLockedError, match=rf"{tmp_path / 'o'} is being written by another fxcapture run \(pid {os.getpid()}"):
            fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean")
    # a lock file left by a killed process (the kernel dropped its flock) is simply taken over
    (tmp_path / "o" / ".fxcapture.lock").write_text("pid 999999 on a dead host\n")
    feats = fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean")
    assert feats["blocks.1"].shape == (4, 96)


CLI = ["extract", "--model", "demo:vit", "--names", "blocks.1", "--reduce", "mean", "--batch-size", "2",
       "--chunk-size", "2", "--no-progress"]  # fmt: skip


def _cli(out: Path, data: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fxcapture", *CLI, "--data", data, "--out", str(out), *extra],
                            env=SUBPROCESS_ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_cli_processes_into_one_folder(tmp_path):
    out = tmp_path / "o"
    first = _cli(out, "synthetic:40")
    deadline = time.monotonic() + 120
    while not complete_chunks(out):  # the first one is writing
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second one needs
    try:
        second = _cli(out, "synthetic:40")
        _, err2 = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "is being written by another fxcapture run (pid" in err2
    assert "Traceback" not in err2
    reference = tmp_path / "ref"
    assert cli.main([*CLI, "--data", "synthetic:40", "--out", str(reference)]) == 0
    assert compare({"b": np.asarray(load(out)["blocks.1"])}, {"b": np.asarray(load(reference)["blocks.1"])}) == \
        {"lost": 0, "duplicated": 0, "wrong": 0}  # fmt: skip
    np.testing.assert_array_equal(load(out)["blocks.1"], load(reference)["blocks.1"])
    assert json.loads((out / "manifest.json").read_text())["names"] == ["blocks.1"]


# -- kills: start-up, a chunk, finalize ------------------------------------------------------
def test_kill_during_start_up_leaves_a_folder_the_rerun_uses(tmp_path):
    out = tmp_path / "o"
    proc = _cli(out, "synthetic:40")
    deadline = time.monotonic() + 120
    while not (out / "run.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli.main([*CLI, "--data", "synthetic:40", "--out", str(out)]) == 0
    assert cli.main([*CLI, "--data", "synthetic:40", "--out", str(tmp_path / "ref")]) == 0
    np.testing.assert_array_equal(load(out)["blocks.1"], load(tmp_path / "ref")["blocks.1"])


def test_a_folder_with_only_a_temporary_run_json_is_usable_again(tmp_path):
    """What a kill while run.json is being written leaves (any fxcapture temporary naming)."""
    model, x = tiny_vit(), images(4)
    for name in (".fxcapture-tmp-run.json-0a1b2c3d4e5f6a7b", ".tmp-run.json-123-456"):
        out = tmp_path / name[1:8]
        out.mkdir()
        (out / name).write_text('{"format": "fxcapt')
        (out / ".fxcapture.lock").write_text("pid 1 on a dead host")
        feats = fxcapture.extract(model, "blocks.1", x, out=out, reduce="mean")
        assert feats["blocks.1"].shape == (4, 96) and not leftovers(out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "run.json.bak").write_text("")  # the user's own file is not ours
    with pytest.raises(FileExistsError, match="not an fxcapture output"):
        fxcapture.extract(model, "blocks.1", x, out=tmp_path / "mine", reduce="mean", overwrite=True)


def test_kill_during_finalize_states_all_resume_to_the_same_rows(tmp_path):
    """The states finalize passes through: before the manifest's rename (a temporary manifest),
    after it (run.json still there). Each one reruns to the same output."""
    model, x = tiny_vit(), images(10)
    kw = dict(reduce="mean", batch_size=2, chunk_size=4)
    reference = np.asarray(fxcapture.extract(model, "blocks.1", x, out=tmp_path / "ref", **kw)["blocks.1"])
    run = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    run_json = {"format": run["format"], "version": run["version"], "config": run["config"], "config_hash": run["config_hash"]}
    for state in ("before", "after"):
        out = tmp_path / state
        shutil.copytree(tmp_path / "ref", out)
        (out / "run.json").write_text(json.dumps(run_json))
        if state == "before":
            (out / "manifest.json").rename(out / ".fxcapture-tmp-manifest.json-00ff00ff00ff00ff")
        feats = fxcapture.extract(model, "blocks.1", x, out=out, **kw)
        np.testing.assert_array_equal(feats["blocks.1"], reference)
        assert not leftovers(out) and not (out / "run.json").exists()


@pytest.mark.slow
def test_soak_five_random_kills_lose_duplicate_and_change_nothing(tmp_path):
    totals = soak(5, seed=1, workdir=str(tmp_path))
    assert totals["kills"] == 5
    assert {k: totals[k] for k in ("lost", "duplicated", "wrong", "temporaries", "failed reruns")} == \
        {"lost": 0, "duplicated": 0, "wrong": 0, "temporaries": 0, "failed reruns": 0}  # fmt: skip


SLOW_THEN_KILLED = '''
import sys, time, torch, fxcapture

def batches():
    for i in range(3):
        yield torch.full((2, 3), float(i))
        if i == 0:
            time.sleep(60)  # killed while waiting here

fxcapture.extract(torch.nn.Sequential(torch.nn.Identity()), ["0"], batches(), out=sys.argv[1],
                  flush_seconds=1.0, progress=False)
'''


def test_a_batch_done_more_than_flush_seconds_ago_survives_sigkill(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SLOW_THEN_KILLED)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "o")], env=SUBPROCESS_ENV)
    deadline = time.monotonic() + 120
    while not complete_chunks(tmp_path / "o"):
        assert proc.poll() is None and time.monotonic() < deadline, "no chunk was flushed by time"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (chunk,) = complete_chunks(tmp_path / "o")
    assert (chunk.start, chunk.stop) == (0, 2)
    np.testing.assert_array_equal(np.load(chunk.path / "0.npy"), np.zeros((2, 3)))


# -- nothing written or followed outside the folder -------------------------------------------
def _finished(tmp_path: Path) -> Path:
    prepare_output(tmp_path / "o", CONFIG, resume=True, overwrite=False)
    writer = ChunkWriter(tmp_path / "o", 4, {"a": "a.npy"}).start()
    writer.put(0, {"a": np.arange(10.0)})
    writer.close()
    return tmp_path / "o"


def test_a_crafted_index_cannot_make_finalize_touch_anything_outside(tmp_path):
    out = _finished(tmp_path)
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"precious")
    index = out / "chunks" / "000000000000-000000000004" / "index.json"
    data = json.loads(index.read_text())
    data["arrays"]["a"]["file"] = "../../../victim.npy"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"index.json names the file of 'a' '\.\./\.\./\.\./victim\.npy'.*refusing"):
        finalize(out, 10)
    assert victim.read_bytes() == b"precious" and not (out / "manifest.json").exists()


@pytest.mark.parametrize("edit", ["dir", "file", "link", "chunks-link"])
def test_load_never_follows_a_crafted_manifest_or_a_link_outside(tmp_path, edit):
    out = _finished(tmp_path)
    finalize(out, 10)
    outside = tmp_path / "outside"
    shutil.copytree(out / "chunks" / "000000000000-000000000004", outside)
    manifest = json.loads((out / "manifest.json").read_text())
    first = out / "chunks" / "000000000000-000000000004"
    if edit == "dir":
        manifest["chunks"][0]["dir"] = "../../outside"
    elif edit == "file":
        manifest["chunks"][0]["arrays"]["a"]["file"] = "../../../outside/a.npy"
    elif edit == "link":
        (first / "a.npy").unlink()
        (first / "a.npy").symlink_to(outside / "a.npy")
    else:
        shutil.rmtree(first)
        first.symlink_to(outside)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises((ValueError, FileNotFoundError), match=r"not a chunk folder inside|not a plain file name|not a regular file"):
        np.asarray(load(out)["a"])


def test_a_malformed_manifest_is_named(tmp_path):
    out = _finished(tmp_path)
    finalize(out, 10)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["chunks"][1]["arrays"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{out / 'manifest.json'} is malformed"):
        load(out)
    (out / "manifest.json").write_text('{"format": "fxcapture.features", "vers')
    with pytest.raises(ValueError, match=rf"{out / 'manifest.json'} is not valid JSON"):
        load(out)


def test_chunks_are_never_written_through_a_link(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "chunks").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "o" / "run.json").write_text(json.dumps({"format": "fxcapture.features", "version": 2, "config": {}}))
    with pytest.raises(FileExistsError, match="is a link: fxcapture writes only inside"):
        fxcapture.extract(torch.nn.Sequential(torch.nn.Identity()), ["0"], torch.randn(4, 2), out=tmp_path / "o",
                          overwrite=True)  # fmt: skip
    assert not any((tmp_path / "elsewhere").iterdir())


def test_overwrite_removes_only_what_fxcapture_wrote(tmp_path):
    model, x = tiny_vit(), images(4)
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean", chunk_size=2)
    (tmp_path / "o" / "my_labels.npy").write_bytes(b"mine")
    (tmp_path / "o" / "chunks" / "notes.txt").write_text("mine too")
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="cls", overwrite=True, chunk_size=4)
    assert (tmp_path / "o" / "my_labels.npy").read_bytes() == b"mine"
    assert (tmp_path / "o" / "chunks" / "notes.txt").read_text() == "mine too"
    assert [c["rows"] for c in json.loads((tmp_path / "o" / "manifest.json").read_text())["chunks"]] == [[0, 4]]


# -- load checks what it maps ------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["shape", "truncated", "flipped", "missing"])
def test_load_names_the_bad_file(tmp_path, damage):
    out = _finished(tmp_path)
    finalize(out, 10)
    bad = out / "chunks" / "000000000004-000000000008" / "a.npy"
    if damage == "shape":
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["chunks"][1]["arrays"]["a"]["shape"] = [4, 2]
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-8])
    elif damage == "flipped":
        data = bytearray(bad.read_bytes())
        data[-3] ^= 0x40
        bad.write_bytes(bytes(data))
    else:
        bad.unlink()
    feats = load(out)
    np.testing.assert_array_equal(feats["a"][:4], np.arange(4.0))  # the other chunks read fine
    with pytest.raises((ValueError, FileNotFoundError), match=str(bad)):
        feats["a"][5]


# -- identity: everything that changes rows ----------------------------------------------------
def test_other_data_of_the_same_length_is_another_identity(tmp_path):
    model = tiny_vit()
    kw = dict(out=tmp_path / "o", reduce="mean")
    fxcapture.extract(model, "blocks.1", SyntheticImages(6, (3, 32, 32), seed=0), **kw)
    with pytest.raises(FileExistsError, match="data_fingerprint"):
        fxcapture.extract(model, "blocks.1", SyntheticImages(6, (3, 32, 32), seed=1), **kw)
    with pytest.raises(FileExistsError, match="data_fingerprint"):
        fxcapture.extract(model, "blocks.1", images(6), **kw)


def test_reducers_are_told_apart_by_code_and_weights_by_every_value(tmp_path):
    model, x = tiny_vit(), images(4)
    kw = dict(out=tmp_path / "o")
    fxcapture.extract(model, "blocks.1", x, reduce=lambda v: v.mean(1), **kw)
    fxcapture.extract(model, "blocks.1", x, reduce=lambda v: v.mean(1), **kw)  # the same code: finished
    with pytest.raises(FileExistsError, match="reduce"):
        fxcapture.extract(model, "blocks.1", x, reduce=lambda v: v.amax(1), **kw)
    scale = 2.0
    with pytest.raises(FileExistsError, match="reduce"):
        fxcapture.extract(model, "blocks.1", x, reduce=lambda v: v.mean(1) * scale, **kw)
    with torch.no_grad():  # one value in the middle of one tensor: a strided sample would miss it
        w = model.blocks[0].mlp[0].weight
        w.view(-1)[w.numel() // 2 + 1] += 1e-3
    with pytest.raises(FileExistsError, match="model_fingerprint"):
        fxcapture.extract(model, "blocks.1", x, reduce=lambda v: v.mean(1), **kw)
    with pytest.raises(FileExistsError, match="identity"):
        fxcapture.extract(model, "blocks.1", x, reduce=lambda v: v.mean(1), identity={"image_size": 48}, out=kw["out"])


def test_cli_image_size_and_seed_change_the_identity(tmp_path, capsys):
    base = [*CLI, "--data", "synthetic:4", "--out", str(tmp_path / "o")]
    assert cli.main(base) == 0
    assert cli.main(base) == 0
    assert "already complete" in capsys.readouterr().err
    cnn = ["extract", "--model", "torchvision:squeezenet1_0", "--names", "features.3", "--reduce", "mean",
           "--data", "synthetic:2", "--no-progress", "--out", str(tmp_path / "c")]  # fmt: skip
    assert cli.main(cnn) == 0  # a CNN takes any image size
    for options, extra in ((base, ["--seed", "1"]), (cnn, ["--image-size", "48"])):
        assert cli.main([*options, *extra]) == 2
        assert "another configuration" in capsys.readouterr().err


# -- data that cannot be resumed ---------------------------------------------------------------
def _interrupt_after(loader, n):
    for i, batch in enumerate(loader):
        if i == n:
            raise KeyboardInterrupt
        yield batch


@pytest.mark.parametrize("kind", ["shuffled loader", "generator"])
def test_a_non_reproducible_iterable_is_refused_for_resume(tmp_path, kind):
    model, x = tiny_vit(), images(12)
    if kind == "shuffled loader":
        data = DataLoader(TensorDataset(x), batch_size=2, shuffle=True)

        class Interrupting(DataLoader):
            def __iter__(self):
                return _interrupt_after(super().__iter__(), 3)

        first = Interrupting(TensorDataset(x), batch_size=2, shuffle=True)
    else:
        data, first = (b for b in x.split(2)), _interrupt_after(x.split(2), 3)
    with pytest.raises(KeyboardInterrupt):
        fxcapture.extract(model, "blocks.1", first, out=tmp_path / "o", reduce="mean", data_name="d")
    assert complete_chunks(tmp_path / "o")
    with pytest.raises(ValueError, match="cannot be resumed: .*(shuffle|iterator).*overwrite"):
        fxcapture.extract(model, "blocks.1", data, out=tmp_path / "o", reduce="mean", data_name="d")
    feats = fxcapture.extract(model, "blocks.1", data, out=tmp_path / "o", reduce="mean", data_name="d", overwrite=True)
    assert feats["blocks.1"].shape == (12, 96)


class NoisyImages(torch.utils.data.Dataset):
    """A random transform: every read of an item gives other values; Ctrl-C at a given read."""

    def __init__(self, interrupt_at=None):
        self.reads, self.interrupt_at = 0, interrupt_at

    def __len__(self):
        return 12

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.interrupt_at:
            raise KeyboardInterrupt
        return torch.randn(3, 32, 32)


def test_a_dataset_with_a_random_transform_is_refused_for_resume(tmp_path):
    model = tiny_vit()
    kw = dict(out=tmp_path / "o", reduce="mean", batch_size=2, chunk_size=2)
    with pytest.raises(KeyboardInterrupt):
        fxcapture.extract(model, "blocks.1", NoisyImages(interrupt_at=9 + 7), **kw)
    assert complete_chunks(tmp_path / "o")
    with pytest.raises(ValueError, match="cannot be resumed: the dataset gives other values each time .*random transform"):
        fxcapture.extract(model, "blocks.1", NoisyImages(), **kw)
    assert fxcapture.extract(model, "blocks.1", NoisyImages(), overwrite=True, **kw)["blocks.1"].shape == (12, 96)


# -- arguments, progress ---------------------------------------------------------------------
NO_GPU = [] if torch.cuda.is_available() else [(dict(device="cuda"), "no CUDA GPU is available here")]


@pytest.mark.parametrize("kwargs, message", NO_GPU + [
    (dict(device="gpu"), "is not a device"),
    (dict(dtype="int8"), "dtype='int8' cannot store features"),
    (dict(names=[]), "selects nothing"),
    (dict(max_tokens=0), "max_tokens must be a positive"),
])  # fmt: skip
def test_bad_arguments_are_clear_value_errors(tmp_path, kwargs, message):
    args = dict(names="blocks.1", out=tmp_path / "o")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        fxcapture.extract(tiny_vit(), args.pop("names"), images(2), **args)
    assert not (tmp_path / "o").exists()


def test_without_a_terminal_progress_is_a_log_line(tmp_path, capsys):
    model, x = tiny_vit(), images(6)
    fxcapture.extract(model, "blocks.1", x, out=tmp_path / "o", reduce="mean", batch_size=2, log_seconds=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fxcapture extract")]
    assert lines[-1].startswith("fxcapture extract: 6/6 rows (100.0%)") and "rows/s, ETA" in lines[-1]
    assert len(lines) >= 3

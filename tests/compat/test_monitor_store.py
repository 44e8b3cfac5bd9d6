"""Monitor saving and loading never write or read outside ``output_dir`` (issue 17),
and the files are written through ``atomic_file`` (random temp name, ``O_EXCL |
O_NOFOLLOW``). The references are the file system itself: what exists where, and the
bytes of files outside the folder, before and after.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from fxcapture import Monitor
from fxcapture._util.atomic import atomic_file


def recorded(output_dir, layers=("0",)) -> Monitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    monitor = Monitor(model, list(layers), [0], output_dir, batch_indices=[0])
    monitor.set_epoch(0)
    monitor.set_batch_idx(0)
    model(torch.randn(1, 2))
    return monitor


@pytest.mark.parametrize("alias", ["../escape", "a/b", "/tmp/abs", "..", ".", "a\\b", ""])
def test_path_aliases_are_refused(tmp_path, alias):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="alias"):
        Monitor(model, {"0": {"alias": alias}}, [0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_aliases_sharing_a_folder_are_refused(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="'a:b' and 'a_b' would be saved into the same folder"):
        Monitor(model, {"0": {"alias": "a:b"}, "1": {"alias": "a_b"}}, [0], tmp_path)


@pytest.mark.parametrize("name", ["../x.pt", "sub/x.pt", "/tmp/x.pt", "..", "", ".tmp-x"])
def test_custom_file_names_that_are_paths_are_refused(tmp_path, name):
    monitor = recorded(tmp_path / "out")
    with pytest.raises(ValueError, match="filename"):
        monitor.save_custom_output({"v": 1}, name)
    assert list(tmp_path.iterdir()) == []  # refused before anything is created


def test_links_out_of_the_folder_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.pt"
    victim.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "0").symlink_to(outside, target_is_directory=True)  # the alias folder
    (out / "custom.pt").symlink_to(victim)  # a custom file
    monitor = recorded(out)
    with pytest.raises(ValueError, match="outside the output folder"):
        monitor.save_single_outputs()
    with pytest.raises(ValueError, match="outside the output folder"):
        monitor.save_custom_output({"v": 1}, "custom.pt")
    assert sorted(p.name for p in outside.iterdir()) == ["victim.pt"]
    assert victim.read_bytes() == b"keep me"


def test_load_does_not_follow_links_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    recorded(outside).save_single_outputs()  # outside/0/single_epoch0_batch0.pt
    out = tmp_path / "out"
    out.mkdir()
    (out / "0").symlink_to(outside / "0", target_is_directory=True)
    with pytest.raises(ValueError, match="outside the output folder"):
        Monitor.load(out)


def test_saves_land_inside_and_load_round_trips(tmp_path):
    out = tmp_path / "out"
    monitor = recorded(out, layers=("0", "1"))
    data = monitor.get_single_data()
    paths = monitor.save_single_outputs() + [monitor.save_custom_output([1, 2], "custom_0.pt")]
    assert sorted(p.relative_to(out).as_posix() for p in paths) == [
        "0/single_epoch0_batch0.pt", "1/single_epoch0_batch0.pt", "custom_0.pt"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/0", "out/0/single_epoch0_batch0.pt", "out/1",
        "out/1/single_epoch0_batch0.pt", "out/custom_0.pt"]  # no temp file left
    loaded = Monitor.load(out)
    for alias in ("0", "1"):
        assert torch.equal(loaded[alias]["data"][(0, 0)], data[alias]["data"][(0, 0)])


def test_load_of_a_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Monitor.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Monitor.load(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no 'single' outputs"):
        Monitor.load(tmp_path)
    monitor = recorded(tmp_path / "out")
    monitor.save_single_outputs()
    with pytest.raises(FileNotFoundError, match="has 'single' files"):
        Monitor.load(tmp_path / "out", "epoch_full")


def test_atomic_file_temp_names_are_unpredictable_exclusive_and_not_followed(tmp_path):
    path = tmp_path / "values.pt"
    names = []
    for _ in range(2):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-values.pt-")
            assert tmp.is_file() and not tmp.is_symlink()  # created before the yield
            assert str(os.getpid()) not in tmp.name
            names.append(tmp.name)
            torch.save({"v": len(names)}, tmp)
    assert names[0] != names[1]
    assert torch.load(path) == {"v": 2}

    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    link = tmp_path / "link.pt"
    link.symlink_to(outside)
    with atomic_file(link) as tmp:
        tmp.write_bytes(b"new")
    assert outside.read_text() == "keep me"  # the link is replaced, not followed
    assert not link.is_symlink() and link.read_bytes() == b"new"
    with pytest.raises(OSError):
        with atomic_file(tmp_path / "missing-folder" / "x.pt"):
            pass

"""``extract`` and ``load`` given bad inputs, failing data and hostile folders: a clear error
naming the problem and the fix, before the model is traced; columns that index like numpy
(the reference: the same rows as a plain numpy array)."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

import fxcapture
from fxcapture import WriteError
from fxcapture.dataset.lock import OutputLock
from fxcapture.dataset.sources import DataError


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()


def rows(n: int) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(n))


class Breaks(Dataset):
    """Items ``i`` of ``x``; item ``bad`` raises."""

    def __init__(self, x: torch.Tensor, bad: int | None) -> None:
        self.x, self.bad = x, bad

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise KeyError(f"record {i} is missing")
        return self.x[i]


# -- arguments: refused by name before any trace -----------------------------------------------
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(out=None), TypeError, "out=None: give the output folder as a path, e.g. out='features/'"),
    (dict(out="{tmp}/a-file"), FileExistsError, "out='{tmp}/a-file' is a file, not a folder: choose a new"),
    (dict(out="{tmp}/a-file/sub"), WriteError, "cannot create out='{tmp}/a-file/sub': {tmp}/a-file is a file, not"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive number, got 0"),
    (dict(batch_size=2.5), ValueError, "batch_size must be a positive number, got 2.5"),
    (dict(names="0.weight"), ValueError, "'0.weight' is not a module of Sequential. It is a tensor the model "
     "holds, not one it computes: capture the module '0'."),
    (dict(data="{tmp}"), TypeError, "data='{tmp}' is a path, not data: give a Dataset, a DataLoader or a "
     "tensor, e.g. torchvision.datasets.ImageFolder('{tmp}', transform)"),
    (dict(model="resnet18"), TypeError, "extract() got the str 'resnet18', not a model"),
    (dict(model="{tmp}"), TypeError, "extract() got the str '{tmp}', not a model"),
    (dict(model=nn.Linear), TypeError, "extract() got the class Linear, not a model: build one first"),
])  # fmt: skip
def test_bad_arguments_are_named_before_the_trace(tmp_path, no_trace, kwargs, error, message):
    (tmp_path / "a-file").write_text("mine")
    args = dict(model=tiny(), names="0", data=rows(4), out=tmp_path / "o")
    args.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(error) as err:
        fxcapture.extract(args.pop("model"), args.pop("names"), args.pop("data"), **args)
    assert str(err.value).startswith(message.format(tmp=tmp_path)), str(err.value)
    assert not (tmp_path / "o").exists() and (tmp_path / "a-file").read_text() == "mine"


def test_a_read_only_file_system_is_a_write_error_naming_the_path(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "o")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WriteError) as err:
        OutputLock(tmp_path / "o").acquire()
    assert err.value.errno == errno.EROFS
    assert str(err.value) == f"writing {tmp_path / 'o' / '.fxcapture.lock'} failed: read-only file system"


def test_reducing_a_feature_map_to_cls_says_cls_and_what_fits(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(ValueError) as err:
        fxcapture.extract(model, "0", torch.randn(2, 3, 8, 8), out=tmp_path / "o", reduce="cls")
    assert "'cls' picks tokens of a (batch, tokens, dim) value, got shape (2, 4, 6, 6): use 'mean', 'max' or " \
           "'flatten' (a feature map has no tokens)" in str(err.value)  # fmt: skip


def test_float16_overflow_names_the_key_and_the_largest_value(tmp_path):
    model = tiny()
    x = rows(4)
    x[2] *= 1e6  # the model's own values below tell how far they go
    with torch.no_grad():
        largest = model[0](x).abs().max().item()
    assert largest > 65504
    with pytest.raises(ValueError) as err:
        fxcapture.extract(model, "0", x, out=tmp_path / "o", dtype="float16")
    assert str(err.value).startswith(f"'0' has values up to {largest:.6g}, beyond float16's largest 65504: "
                                     "dtype='float16' would store them as inf")  # fmt: skip
    stored = fxcapture.extract(model, "0", x, out=tmp_path / "b", dtype="bfloat16")["0"][:]
    assert np.isfinite(stored).all()


# -- failing data ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_the_item_a_dataset_fails_at_is_named_and_a_rerun_works_in_the_same_process(tmp_path, workers):
    model, x = tiny(), rows(12)
    out = tmp_path / "o"
    with pytest.raises(DataError) as err:
        fxcapture.extract(model, "0", Breaks(x, bad=7), out=out, batch_size=4, num_workers=workers, chunk_size=4)
    assert str(err.value) == "dataset[7] (batch 1, rows 4-7) raised KeyError: 'record 7 is missing'"
    with pytest.raises(DataError, match=re.escape("dataset[3] (read for the data's fingerprint) raised KeyError")):
        fxcapture.extract(model, "0", Breaks(x, bad=3), out=tmp_path / "p", batch_size=4)
    # the failed run's lock is free (no worker holds it) and its complete chunk is kept
    feats = fxcapture.extract(model, "0", Breaks(x, bad=None), out=out, batch_size=4, num_workers=workers,
                              chunk_size=4)  # fmt: skip
    with torch.no_grad():
        np.testing.assert_allclose(feats["0"][:], model[0](x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_says_what_it_kept_and_how_it_knew_the_data(tmp_path, capsys):
    model, x = tiny(), rows(12)
    out = tmp_path / "o"
    with pytest.raises(DataError):
        fxcapture.extract(model, "0", Breaks(x, bad=10), out=out, batch_size=4, chunk_size=4, progress=False)
    capsys.readouterr()
    fxcapture.extract(model, "0", Breaks(x, bad=None), out=out, batch_size=4, chunk_size=4, progress=False)
    assert (f"fxcapture: resuming {out}: 8 rows kept from complete chunks, 4 left. The data was recognised by its "
            "length (12) and a hash of items [0, 2, 3, 5, 6, 8, 9, 11] only: verify_data=True hashes every item."
            ) in capsys.readouterr().err  # fmt: skip


def test_verify_data_tells_apart_data_that_differs_outside_the_hashed_items(tmp_path, capsys):
    model, x = tiny(), rows(10)
    out = tmp_path / "o"
    other = x.clone()
    other[2] += 1  # item 2 is not among the hashed items of 10
    fxcapture.extract(model, "0", x, out=out, progress=False)
    fxcapture.extract(model, "0", other, out=out, progress=False)  # recognised as the same: says how
    err = capsys.readouterr().err
    assert "already complete (10 rows)" in err and "a hash of items [0, 1, 3, 4, 5, 6, 8, 9] only" in err
    out2 = tmp_path / "v"
    fxcapture.extract(model, "0", x, out=out2, progress=False, verify_data=True)
    with pytest.raises(FileExistsError, match="another configuration .*data_fingerprint"):
        fxcapture.extract(model, "0", other, out=out2, progress=False, verify_data=True)
    fxcapture.extract(model, "0", x, out=out2, progress=False, verify_data=True)
    assert "a hash of every one of its 10 items" in capsys.readouterr().err


# -- load: numpy semantics, links ------------------------------------------------------------------
@pytest.fixture
def stored(tmp_path):
    model, x = tiny(), rows(10)
    feats = fxcapture.extract(model, "0", x, out=tmp_path / "o", chunk_size=3, progress=False)
    with torch.no_grad():
        return feats["0"], model[0](x).numpy()


@pytest.mark.parametrize("index", [1, -1, slice(2, 9), slice(None, None, 3), [4, 1, 9], np.array([[0, 5]]),
                                   True, False, None, (True, 2), (None, slice(1, 3)), (slice(None), 1),
                                   np.arange(10) % 3 == 0, np.int64(7), np.array(True)])  # fmt: skip
def test_columns_index_like_numpy(stored, index):
    col, reference = stored
    np.testing.assert_array_equal(col[index], reference[index])
    assert np.shape(col[index]) == np.shape(reference[index])


@pytest.mark.parametrize("index", [1.5, np.float32(2), "1", np.array(1.0)])
def test_float_indices_raise_index_error_like_numpy(stored, index):
    col, reference = stored
    with pytest.raises(IndexError):
        reference[index]
    with pytest.raises(IndexError, match=re.escape("are indexed by integers, slices, integer arrays or boolean masks")):
        col[index]


def test_np_array_is_a_writable_copy(stored):
    col, reference = stored
    for array in (np.array(col), np.asarray(col), np.array(col, dtype=np.float64)):
        assert type(array) is np.ndarray and array.flags.writeable
        np.testing.assert_array_equal(array, reference)
        array[0] = 0
    np.testing.assert_array_equal(col[0], reference[0])  # the stored rows are untouched
    assert not torch.from_numpy(np.asarray(col)).isnan().any()  # no read-only warning, see the example
    with pytest.raises(ValueError, match="an array of it is always a copy"):
        np.array(col, copy=False)


def test_sample_of_a_pooled_column_says_what_a_sample_is(stored):
    col, _ = stored
    with pytest.raises(TypeError, match=re.escape("'0' holds one row per sample (a reduced key): sample 3 is col[3]")):
        col.sample(3)


def test_load_refuses_a_linked_chunks_folder(tmp_path, stored):
    out = tmp_path / "o"
    (out / "chunks").rename(tmp_path / "elsewhere")
    (out / "chunks").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError) as err:
        fxcapture.load(out)
    assert str(err.value).startswith(f"{out / 'chunks'} is a link: fxcapture reads an output only inside {out}")

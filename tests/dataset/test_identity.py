"""A run's identity: the weight checksum sees every byte and does not depend on the
order the kernel adds in (checked against numpy's exact int64 sums)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from fxcapture.dataset.identity import model_fingerprint, tensor_checksum


def test_wrapping_column_sums_equal_exact_sums_modulo_2_to_32():
    # large integers so that every column overflows int32 many times
    x = torch.randint(-(2**31), 2**31 - 1, (64, 4096), dtype=torch.int64).to(torch.int32)
    wrapped = x.sum(0, dtype=torch.int32).numpy().astype(np.int64) % 2**32
    exact = x.numpy().astype(np.int64).sum(0) % 2**32
    np.testing.assert_array_equal(wrapped, exact)


def test_checksum_sees_every_byte_and_only_the_bytes():
    t = torch.randn(3 * 4096 + 17)
    assert tensor_checksum(t) == tensor_checksum(t.clone())
    assert tensor_checksum(t[::2]) == tensor_checksum(t[::2].contiguous())  # layout is not content
    for i in (0, 4096, 2 * 4096 + 5, len(t) - 1):  # in a column, and in the leftover tail
        flipped = t.clone()
        flipped.view(torch.int32)[i] ^= 1  # one bit
        assert tensor_checksum(flipped) != tensor_checksum(t), i
    swapped = t.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # two columns
    assert tensor_checksum(swapped) != tensor_checksum(t)
    assert tensor_checksum(torch.zeros(5, dtype=torch.uint8)) != tensor_checksum(torch.zeros(6, dtype=torch.uint8))


def test_model_fingerprint_changes_with_one_ulp_of_one_weight():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    same = copy.deepcopy(model)
    assert model_fingerprint(model) == model_fingerprint(same)
    with torch.no_grad():
        w = same[0].weight
        w[10, 3] = torch.nextafter(w[10, 3], torch.tensor(1.0))
    assert model_fingerprint(model) != model_fingerprint(same)

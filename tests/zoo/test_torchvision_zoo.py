"""Every torchvision classifier: output, module captures vs hooks, locals vs eager
frames, train mode vs a deep copy (see zoo_checker.check_model)."""

from __future__ import annotations

import pytest

import torchvision_models as tv
import zoo_checker as zc


def _assert_conforms(name: str) -> None:
    zc.assert_conforms(*tv.build_torchvision(name), name)


@pytest.mark.parametrize("name", tv.CI_TORCHVISION)
def test_ci_subset(name):
    _assert_conforms(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zc.zoo_params(tv.torchvision_models(), "torchvision"))
def test_torchvision_model(name):
    _assert_conforms(name)

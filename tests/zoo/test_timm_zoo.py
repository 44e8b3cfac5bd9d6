"""timm across families (tests/zoo/timm_models.py): output, feature_info modules vs
hooks, three SGD steps vs an eager copy (outputs, features, gradients, buffers)."""

from __future__ import annotations

import pytest

import timm_models as tm
import zoo_checker as zc


def test_sample_covers_every_family():
    """At least 150 models; every family of timm.list_models() but the huge-only ones."""
    import timm

    names = tm.sample_names()
    assert len(names) >= 150 and len(set(names)) == len(names)
    all_families = {tm.family(n) for n in timm.list_models()}
    left_out = all_families - {tm.family(n) for n in names}
    assert all(all(tm._HUGE.search(n) for n in timm.list_models() if tm.family(n) == f) for f in left_out)
    assert len(left_out) < 10, left_out


def test_feature_modules_are_what_timm_hooks():
    model, _ = tm.build_timm("resnet18")
    assert tm.feature_modules(model) == ["act1", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name", tm.CI_TIMM)
def test_ci_subset(name):
    tm.assert_timm_conforms(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zc.zoo_params(tm.sample_names(), "timm"))
def test_timm_model(name):
    tm.assert_timm_conforms(name)

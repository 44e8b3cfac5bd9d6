"""timm families at tiny configs (fused attention off, so attention maps are locals)."""

from __future__ import annotations

import pytest

import zoo_checker as zc


def _assert_conforms(name: str) -> None:
    zc.assert_conforms(*zc.build_timm(name), name)


def test_vit_attention_maps_are_checked():
    """The block-forward locals of a timm ViT include the softmax map ``attn``."""
    model, x = zc.build_timm("vit_tiny_patch16_224")
    plan = zc.plan_captures(model, x)
    assert plan.locals_module == "blocks.0.attn"
    assert "blocks.0.attn:attn" in plan.local_keys


@pytest.mark.parametrize("name", zc.CI_TIMM)
def test_ci_subset(name):
    _assert_conforms(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zc.zoo_params(list(zc.TIMM_MODELS), "timm"))
def test_timm_model(name):
    _assert_conforms(name)

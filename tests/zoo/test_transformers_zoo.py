"""transformers from tiny configs: attention weights (local ``attn_weights``) against
``output_attentions=True``, module captures against hooks, train mode against a copy.
These models do not fx-trace: they need ``capture(..., fallback="auto")``."""

from __future__ import annotations

import pytest

import hf_models
import zoo_checker as zc

CI_HF = ["gpt2"]


def _assert_conforms(name: str) -> None:
    result = hf_models.check_hf(name)
    assert result.status != "failed", "\n".join([result.reason] + result.problems[:10])
    assert result.n_locals >= 2  # one attention map per layer (2 layers; T5: 6)
    assert result.n_modules > 0


@pytest.mark.parametrize("name", CI_HF)
def test_ci_subset(name):
    _assert_conforms(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zc.zoo_params(list(hf_models.CONFIGS), "transformers"))
def test_transformers_model(name):
    _assert_conforms(name)

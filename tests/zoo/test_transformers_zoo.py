"""transformers from small configs, eager and sdpa (tests/zoo/hf_models.py): captured
in a graph by the running tracer, ten calls at varying batch and sequence length,
attention maps equal to the model's own ``output_attentions``."""

from __future__ import annotations

import pytest

import hf_models
import zoo_checker as zc


@pytest.mark.parametrize("name", hf_models.CI_HF)
def test_ci_subset(name):
    hf_models.assert_hf_conforms(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", zc.zoo_params(hf_models.CONFIGS, "transformers"))
def test_transformers_model(name):
    hf_models.assert_hf_conforms(name)

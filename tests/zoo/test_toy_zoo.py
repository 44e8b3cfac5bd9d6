"""The toy-model zoo (see ``toy_models.py``) under every tracer: for each model, three
calls in training mode beside an eager copy with forward hooks on every module, the
same seed per call. Outputs, every module output, and every buffer after the calls
equal the eager model's.

The symbolic column runs with ``fallback="never"``: a model torch.fx cannot follow
(control flow on tensor values) is refused with fxcapture's error, which skips it.

    python -m pytest tests/zoo/test_toy_zoo.py -m zoo
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import TRACERS, assert_matches_hooks, assert_same, capture_under, hooked, under
from fxcapture.core.spec import TraceFailure
from toy_models import TOYS, module_paths, sample

CALLS = 3


@pytest.mark.zoo
@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_model_equals_eager(name, tracer):
    build, _ = TOYS[name]
    torch.manual_seed(0)
    model = build().train()
    names = module_paths(model, sample(name, 0))
    root, key = under(tracer, model)
    reference = copy.deepcopy(root)
    paths = [key(p) for p in names]
    try:
        ex = capture_under(tracer, root, names, sample(name, 0), key)
        for i in range(CALLS):
            args = sample(name, i)
            torch.manual_seed(100 + i)
            out, feats = ex(*args)
            torch.manual_seed(100 + i)
            with hooked(reference, paths) as seen:
                ref = reference(*args)
            assert_same(out, ref)
            assert_matches_hooks(feats, {p: calls for p, calls in seen.items() if calls})
    except TraceFailure as err:
        assert tracer == "symbolic", err
        pytest.skip(f"torch.fx refuses it (fallback='never'): {str(err).splitlines()[0][:120]}")
    for (buffer, value), expected in zip(root.named_buffers(), reference.buffers()):
        assert torch.equal(value, expected), f"buffer {buffer} differs after {CALLS} calls"

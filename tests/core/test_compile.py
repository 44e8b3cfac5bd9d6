"""torch.compile (one graph, no breaks, no recompile per batch size) and torch.export.

resnet18 compiles with backend="aot_eager"; the ViTs with a recording backend that runs
dynamo's graph eagerly (one dynamo pass: fast). torch._dynamo.explain checks graph breaks.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from conftest import assert_same, hook_values, timm_vit_small
from fxcapture import capture


def compile_counting(ex):
    """``torch.compile(ex, fullgraph=True)`` with a backend that records each graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(ex, fullgraph=True, backend=backend), graphs


def explain(ex, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(ex)(*args)


def assert_close_results(actual, expected):
    assert_same(actual, expected, exact=False)


@pytest.fixture(scope="module")
def resnet_ex():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    return model, capture(model, ["bn1", "layer1.0:out", "layer3", "layer4", "fc"])


def test_resnet18_compiles_to_one_graph(resnet_ex):
    model, ex = resnet_ex
    x = torch.randn(2, 3, 32, 32)
    report = explain(ex, x)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
    compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = ex(x)
        got = compiled(x)
        _, seen = hook_values(model, ["bn1", "layer3"], x)
    assert_close_results(got, eager)
    torch.testing.assert_close(got[1]["bn1"], seen["bn1"][0])  # in-place safety survives
    assert (got[1]["bn1"] < 0).any()


def test_batch_size_change_recompiles_once(resnet_ex):
    _, ex = resnet_ex
    compiled, compiles = compile_counting(ex)
    with torch.no_grad():
        for batch in (2, 3, 4, 5, 7):
            x = torch.randn(batch, 3, 32, 32)
            out, feats = compiled(x)
            assert out.shape[0] == batch and feats["layer4"].shape[0] == batch
            assert_close_results((out, feats), ex(x))
    # the first static compile, one dynamic recompile, then nothing per size
    assert len(compiles) == 2, compiles


def test_export_returns_same_output_and_features(resnet_ex):
    _, ex = resnet_ex
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(ex, (x,))
    got = program.module()(x)
    with torch.no_grad():
        eager = ex(x)
    assert_close_results(got, eager)
    assert list(got[1]) == ex.names


def test_export_with_dynamic_batch(resnet_ex):
    _, ex = resnet_ex
    batch = torch.export.Dim("batch", min=2, max=16)
    program = torch.export.export(
        ex, (torch.randn(2, 3, 32, 32),), dynamic_shapes=(({0: batch},),)
    )  # the extractor's forward is forward(*args, **kwargs): one spec per element of args
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert_close_results(program.module()(x), ex(x))


def test_vit_b_16_compiles_to_one_graph():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    ex = capture(model, ["encoder.layers.encoder_layer_0", "encoder.layers.*.ln_1", "heads"])
    x = torch.randn(1, 3, 32, 32)
    report = explain(ex, x)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
    # dynamo's graph run eagerly (aot_eager is exercised on resnet18; this keeps it fast)
    compiled, graphs = compile_counting(ex)
    with torch.no_grad():
        assert_close_results(compiled(x), ex(x))
    assert len(graphs) == 1


def test_timm_vit_small_attention_maps_compile_to_one_graph():
    model = timm_vit_small()
    ex = capture(model, ["attn"])
    x = torch.randn(1, 3, 224, 224)
    report = explain(ex, x)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
    compiled, graphs = compile_counting(ex)
    with torch.no_grad():
        got = compiled(x)
        eager = ex(x)
    assert len(graphs) == 1
    assert_close_results(got, eager)
    assert len(got[1]) == 12 and got[1]["blocks.11.attn:attn"].shape == (1, 6, 197, 197)

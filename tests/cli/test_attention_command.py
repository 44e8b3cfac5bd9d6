"""`fxcapture attention MODEL`: grid, overlay and rollout PNGs, probabilities from the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxcapture.cli import main

pytest.importorskip("matplotlib")


def test_attention_command_draws_a_picture_file(tmp_path, capsys):
    from matplotlib.image import imread
    from PIL import Image

    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((80, 96, 3)) * 255).astype("uint8")).save(picture)
    out = tmp_path / "maps"
    assert main(["attention", "demo:vit", "--image", str(picture), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "demo:vit: 4 attention maps, (1, 3, 65, 65)" in printed  # TinyViT: 4 blocks, 3 heads
    for name in ("grid", "overlay", "rollout"):
        pixels = imread(out / f"attention_{name}.png")
        assert pixels[..., :3].std() > 0.05, name
        assert (out / f"attention_{name}.png").stat().st_size < 1_000_000


def test_attention_command_synthetic_image_and_errors(tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["attention", "demo:vit", "--out", str(out), "--names", "blocks.3.attn:attn_probs"]) == 0
    assert "1 attention maps" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == [
        "attention_grid.png", "attention_overlay.png", "attention_rollout.png"
    ]
    assert main(["attention", "demo:vit", "--image", str(tmp_path / "missing.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["attention", "demo:vit", "--names", "blocks.9.attn:attn_probs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not a capturable name" in err and "Traceback" not in err


def test_probabilities_match_the_models_own_softmax(tmp_path):
    """The demo ViT computes softmax(q k^T) itself: the maps drawn are those values."""
    from fxcapture import capture
    from fxcapture.cli.models import TinyViT

    torch.manual_seed(0)
    model = TinyViT().eval()
    seen = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats = capture(model, "attn_probs")(x)
        model(x)
    for (key, probs), inp, block in zip(feats.items(), seen[-4:], model.blocks):
        a = block.attn
        B, N, C = inp.shape
        q, k, _ = a.qkv(inp).reshape(B, N, 3, a.heads, C // a.heads).permute(2, 0, 3, 1, 4)
        expected = ((q @ k.transpose(-2, -1)) / (C // a.heads) ** 0.5).softmax(-1)
        torch.testing.assert_close(probs, expected, msg=key)

"""`fxcapture demo`: runs on CPU, prints names and shapes, writes readable figures."""

from __future__ import annotations

import numpy as np
import torch

from fxcapture.cli import main


def test_demo_runs_and_writes_figures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rounds", "3", "--batch", "2", "--samples", "40"]) == 0
    printed = capsys.readouterr().out
    for key in ["blocks.0.attn:attn", "blocks.3.attn:attn", "patch_embed", "norm"]:
        assert key in printed
    assert "(2, 3, 65, 65)" in printed  # batch 2, 3 heads, 64 patches + CLS
    assert "plain" in printed and "fxcapture" in printed
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["attention_grid.png", "attention_overlay.png", "attention_rollout.png",
                    "patch_embed_features.png"]  # fmt: skip
    from matplotlib.image import imread

    import fxcapture
    from fxcapture.dataset.sources import SyntheticImages
    from fxcapture.cli.models import TinyViT

    stored = fxcapture.load(tmp_path / "features")  # the dataset job: rows equal a plain forward's
    torch.manual_seed(0)
    model = TinyViT().eval()
    images = torch.stack([SyntheticImages(40, (3, 64, 64))[i][0] for i in range(40)])
    with torch.no_grad():
        tokens = model.norm.register_forward_hook(lambda m, i, o: seen.append(o[:, 0]))
        seen: list = []
        model(images)
        tokens.remove()
    assert stored["cls"].shape == (40, 96) and "extract: 40 synthetic images" in printed
    torch.testing.assert_close(torch.from_numpy(np.array(stored["cls"])), seen[0], rtol=1e-5, atol=1e-5)

    for name in pngs:
        pixels = imread(tmp_path / name)
        assert min(pixels.shape[:2]) > 150 and pixels[..., :3].std() > 0.05, name


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err

"""`fxcapture demo`: runs on CPU, prints names and shapes, writes readable figures."""

from __future__ import annotations

from fxcapture.cli import main


def test_demo_runs_and_writes_figures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rounds", "3", "--batch", "2"]) == 0
    printed = capsys.readouterr().out
    for key in ["blocks.0.attn:attn", "blocks.3.attn:attn", "patch_embed", "norm"]:
        assert key in printed
    assert "(2, 3, 65, 65)" in printed  # batch 2, 3 heads, 64 patches + CLS
    assert "plain" in printed and "fxcapture" in printed
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["attention_grid.png", "attention_overlay.png", "attention_rollout.png",
                    "patch_embed_features.png"]  # fmt: skip
    from matplotlib.image import imread

    for name in pngs:
        pixels = imread(tmp_path / name)
        assert min(pixels.shape[:2]) > 150 and pixels[..., :3].std() > 0.05, name


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err

"""fxcapture.viz: figures are written, have the size asked for and are not blank; rollout math."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from fxcapture import capture
from fxcapture.inspect import viz  # noqa: E402
from fxcapture.cli.models import TinyViT  # noqa: E402


@pytest.fixture(scope="module")
def vit_maps():
    torch.manual_seed(0)
    model = TinyViT().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, feats = capture(model, ["attn", "patch_embed"])(images)
    return feats, images


def _check_png(fig, path):
    assert path.exists()
    pixels = imread(path)
    width, height = fig.get_size_inches() * fig.dpi
    assert pixels.shape[:2] == (round(height), round(width)), "PNG size != figure size"
    assert pixels[..., :3].std() > 0.05, "the picture is (nearly) blank"
    return pixels


def test_attention_grid_layers_by_heads(vit_maps, tmp_path):
    feats, _ = vit_maps
    attn = {k: v for k, v in feats.items() if k.endswith(":attn")}
    fig = viz.attention_grid(attn, save=tmp_path / "grid.png")
    _check_png(fig, tmp_path / "grid.png")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 4 * 3  # 4 layers x 3 heads
    assert image_axes[0].get_title() == "head 0" and "blocks.0.attn" in image_axes[0].get_ylabel()
    assert any(ax.get_ylabel() == "attention probability" for ax in fig.axes)  # the colorbar
    one_layer = viz.attention_grid(attn["blocks.0.attn:attn"], save=tmp_path / "one.svg")
    assert len([ax for ax in one_layer.axes if ax.images]) == 3
    assert (tmp_path / "one.svg").read_text().lstrip().startswith("<?xml")


def test_attention_overlay_shows_the_cls_row(vit_maps, tmp_path):
    feats, images = vit_maps
    attn = feats["blocks.3.attn:attn"]
    fig = viz.attention_overlay(attn, images, sample=1, save=tmp_path / "overlay.png")
    _check_png(fig, tmp_path / "overlay.png")
    grid_panel = fig.axes[1].images[0].get_array()
    expected = attn[1].mean(0)[0, 1:].reshape(8, 8)  # CLS row, patch tokens, 8x8 grid
    torch.testing.assert_close(torch.as_tensor(grid_panel.data), expected)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        viz.attention_overlay(attn[..., :-2], images)  # 63 keys: no square grid


def test_attention_rollout_matches_manual_product():
    torch.manual_seed(0)
    a1, a2 = (torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(2))
    eye = torch.eye(5)

    def step(a):
        m = 0.5 * a.mean(1) + 0.5 * eye
        return m / m.sum(-1, keepdim=True)

    expected = step(a2) @ step(a1)
    rollout = viz.attention_rollout([a1, a2])
    torch.testing.assert_close(rollout, expected)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5))
    with pytest.raises(ValueError, match="head_fusion"):
        viz.attention_rollout([a1], head_fusion="median")


def test_feature_grid_picks_most_active_channels(vit_maps, tmp_path):
    feats, _ = vit_maps
    fmap = feats["patch_embed"]
    fig = viz.feature_grid(fmap, channels=6, save=tmp_path / "features.png")
    _check_png(fig, tmp_path / "features.png")
    cells = [cell for cell in fig.subfigs if cell.axes]
    titles = [cell.axes[0].get_title() for cell in cells]
    top = fmap[0].abs().mean((1, 2)).argsort(descending=True)[:6].tolist()
    assert titles == [f"ch {c}" for c in top]
    for cell, c in zip(cells, top):  # the caption is the panel's own range
        lo, hi = fmap[0, c].min().item(), fmap[0, c].max().item()
        assert cell.axes[0].get_xlabel() == f"[{lo:.2g}, {hi:.2g}]"


@pytest.mark.parametrize("channels, scale", [(16, 1.0), (12, 1e-4), (3, 1.0)])
def test_feature_grid_captions_stay_inside_their_cells(tmp_path, channels, scale):
    """Each panel's title and range caption lie inside its cell: a caption never runs
    into the next row's titles, the figure title never off the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = viz.feature_grid(torch.randn(1, 32, 14, 9) * scale, channels=channels)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    cells = [cell for cell in fig.subfigs if cell.axes]
    assert len(cells) == channels
    labels = []
    for cell in cells:
        ax = cell.axes[0]
        for label in (ax.title, ax.xaxis.label):
            box = label.get_window_extent(renderer)
            assert cell.bbox.x0 <= box.x0 and box.x1 <= cell.bbox.x1
            assert cell.bbox.y0 <= box.y0 and box.y1 <= cell.bbox.y1
            labels.append(box)
    for i, a in enumerate(labels):
        assert all(not a.overlaps(b) for b in labels[i + 1 :]), "two captions overlap"
    (title,) = [t.get_window_extent(renderer) for t in fig.texts]  # the suptitle
    assert 0 <= title.x0 and title.x1 <= fig.bbox.x1


def test_bad_save_suffix_and_shapes(vit_maps, tmp_path):
    feats, _ = vit_maps
    with pytest.raises(ValueError, match=".png"):
        viz.feature_grid(feats["patch_embed"], save=tmp_path / "x.jpeg")
    with pytest.raises(ValueError, match="B, C, H, W"):
        viz.feature_grid(torch.randn(4, 4))


def test_figures_take_the_feature_dict_of_capture(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, feats = capture(model, ["attn_probs", "blocks.0", "head"])(images)
    maps = viz.attention_maps(feats)
    assert list(maps) == [f"blocks.{i}.attn:attn_probs" for i in range(3)]
    fig = viz.attention_grid(feats)
    assert [ax.get_ylabel().split("\n")[0] for ax in fig.axes if ax.images and ax.get_ylabel()] == [
        f"blocks.{i}.attn" for i in range(3)
    ]
    overlay = viz.attention_overlay(feats, images)  # the last layer's CLS row
    expected = feats["blocks.2.attn:attn_probs"][0].mean(0)[0, 1:].reshape(4, 4)
    torch.testing.assert_close(torch.as_tensor(overlay.axes[1].images[0].get_array().data), expected)
    rollout = viz.attention_rollout(feats)
    torch.testing.assert_close(rollout, viz.attention_rollout([feats[k] for k in maps]))
    with pytest.raises(ValueError, match="capture 'attn_probs'"):
        viz.attention_maps({"head": feats["head"].flatten()})


def test_a_12_by_6_grid_is_small_and_its_labels_do_not_overlap(tmp_path):
    torch.manual_seed(0)
    maps = {f"encoder.layers.encoder_layer_{i}.self_attention:attn_probs": torch.softmax(torch.randn(1, 6, 197, 197), -1)
            for i in range(12)}  # fmt: skip  (noise: the worst case for PNG compression)
    fig = viz.attention_grid(maps, save=tmp_path / "grid.png")
    _check_png(fig, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size < 1_000_000
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [ax.yaxis.label.get_window_extent(renderer) for ax in fig.axes if ax.images and ax.get_ylabel()]
    boxes += [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.images and ax.get_title()]
    assert len(boxes) == 12 + 6
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), "two labels overlap"

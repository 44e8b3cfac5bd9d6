"""Grad-CAM with fxcapture: the activation and its gradient, no hooks.

Run: ``python examples/grad_cam.py [--out grad_cam.png]`` (random-weight resnet18,
synthetic images); writes the picture (images, maps, overlays) when matplotlib is installed.

The extractor returns ``layer4``'s output as a value of the autograd graph, so
``torch.autograd.grad(score, feats["layer4"])`` is the gradient Grad-CAM needs. The
script checks the map against the classic hook-based Grad-CAM.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from fxcapture import capture


def grad_cam(model: torch.nn.Module, layer: str, images: torch.Tensor, cls: int) -> torch.Tensor:
    """Grad-CAM of class ``cls`` on the output of ``layer``: (B, H, W) in [0, 1], image size.

    Example::

        >>> cam = grad_cam(torchvision.models.resnet18(), "layer4", images, cls=3)
    """
    extractor = capture(model, [layer])
    out, feats = extractor(images)
    activation = feats[layer]
    (grad,) = torch.autograd.grad(out[:, cls].sum(), activation)
    return _cam(activation.detach(), grad, images.shape[-2:])


def hook_grad_cam(model: torch.nn.Module, layer: str, images: torch.Tensor, cls: int) -> torch.Tensor:
    """The same map the classic way: a forward hook and a tensor hook on ``layer``."""
    store: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        store["activation"] = output.detach()
        output.register_hook(lambda g: store.__setitem__("grad", g))

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        model(images)[:, cls].sum().backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    return _cam(store["activation"], store["grad"], images.shape[-2:])


def _cam(activation: torch.Tensor, grad: torch.Tensor, size) -> torch.Tensor:
    weights = grad.mean(dim=(2, 3), keepdim=True)  # one weight per channel
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cam / peak


def save_picture(images: torch.Tensor, cam: torch.Tensor, path: Path, cls: int) -> bool:
    """Each image, its map and the overlay in one PNG; False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(9, 3 * len(images)), layout="constrained")
    axes = fig.subplots(len(images), 3, squeeze=False)
    for row, (image, heat) in zip(axes, zip(images, cam)):
        shown = image.permute(1, 2, 0)
        shown = ((shown - shown.min()) / (shown.max() - shown.min())).numpy()
        for ax, title in zip(row, ("input", f"Grad-CAM, class {cls}", "overlay")):
            ax.set_title(title)
            ax.set_axis_off()
        row[0].imshow(shown)
        row[1].imshow(heat.numpy(), cmap="jet", vmin=0, vmax=1)
        row[2].imshow(shown)
        row[2].imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return True


def main(argv: list[str] | None = None) -> torch.Tensor:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="grad_cam.png", help="the picture to write (default: grad_cam.png)")
    parser.add_argument("--cls", type=int, default=207, help="the class whose map is drawn (default 207)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images = torch.randn(2, 3, 224, 224)
    cam = grad_cam(model, "layer4", images, args.cls)
    reference = hook_grad_cam(model, "layer4", images, args.cls)
    diff = (cam - reference).abs().max().item()
    print(f"Grad-CAM of class {args.cls} on layer4: shape {tuple(cam.shape)}, range "
          f"[{cam.min().item():.3f}, {cam.max().item():.3f}]")  # fmt: skip
    print(f"max |fxcapture - hook Grad-CAM| = {diff:.2e}")
    torch.testing.assert_close(cam, reference)
    print("matches the hook-based Grad-CAM")
    if save_picture(images, cam, Path(args.out), args.cls):
        print(f"wrote {args.out}")
    else:
        print('no picture: matplotlib is not installed (pip install "fxcapture[viz]")')
    return cam


if __name__ == "__main__":
    main()

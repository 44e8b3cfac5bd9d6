"""Every torchvision classifier at its smallest input (random weights), for the zoo.

Example::

    >>> model, x = build_torchvision("resnet18")
    >>> x.shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from zoo_checker import SEED, make_input

# Smallest square input (batch 2) that each torchvision classifier accepts in eval and
# train mode, found with `find_min_size` over SIZES (random weights, torch 2.14,
# torchvision 0.29). Models missing here are searched at run time.
SIZES = (32, 64, 96, 128, 160, 192, 224, 299)
# (alexnet needs 64, inception_v3 299 for its train-mode aux head, maxvit_t 224.)
TORCHVISION_MIN_SIZE: dict[str, int] = {
    "alexnet": 64, "convnext_base": 32, "convnext_large": 32, "convnext_small": 32,
    "convnext_tiny": 32, "densenet121": 32, "densenet161": 32, "densenet169": 32,
    "densenet201": 32, "efficientnet_b0": 32, "efficientnet_b1": 32, "efficientnet_b2":
    32, "efficientnet_b3": 32, "efficientnet_b4": 32, "efficientnet_b5": 32,
    "efficientnet_b6": 32, "efficientnet_b7": 32, "efficientnet_v2_l": 32,
    "efficientnet_v2_m": 32, "efficientnet_v2_s": 32, "googlenet": 32, "inception_v3":
    299, "maxvit_t": 224, "mnasnet0_5": 32, "mnasnet0_75": 32, "mnasnet1_0": 32,
    "mnasnet1_3": 32, "mobilenet_v2": 32, "mobilenet_v3_large": 32,
    "mobilenet_v3_small": 32, "regnet_x_16gf": 32, "regnet_x_1_6gf": 32,
    "regnet_x_32gf": 32, "regnet_x_3_2gf": 32, "regnet_x_400mf": 32, "regnet_x_800mf":
    32, "regnet_x_8gf": 32, "regnet_y_128gf": 32, "regnet_y_16gf": 32, "regnet_y_1_6gf":
    32, "regnet_y_32gf": 32, "regnet_y_3_2gf": 32, "regnet_y_400mf": 32,
    "regnet_y_800mf": 32, "regnet_y_8gf": 32, "resnet101": 32, "resnet152": 32,
    "resnet18": 32, "resnet34": 32, "resnet50": 32, "resnext101_32x8d": 32,
    "resnext101_64x4d": 32, "resnext50_32x4d": 32, "shufflenet_v2_x0_5": 32,
    "shufflenet_v2_x1_0": 32, "shufflenet_v2_x1_5": 32, "shufflenet_v2_x2_0": 32,
    "squeezenet1_0": 32, "squeezenet1_1": 32, "swin_b": 32, "swin_s": 32, "swin_t": 32,
    "swin_v2_b": 32, "swin_v2_s": 32, "swin_v2_t": 32, "vgg11": 32, "vgg11_bn": 32,
    "vgg13": 32, "vgg13_bn": 32, "vgg16": 32, "vgg16_bn": 32, "vgg19": 32, "vgg19_bn":
    32, "vit_b_16": 32, "vit_b_32": 32, "vit_h_14": 28, "vit_l_16": 32, "vit_l_32": 32,
    "wide_resnet101_2": 32, "wide_resnet50_2": 32,
}  # fmt: skip

# ViTs fix their input size at construction: build them for a tiny image instead.
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
}

# The small subset that always runs (tests/zoo/test_torchvision_zoo.py::test_ci_subset).
CI_TORCHVISION = ["resnet18", "mobilenet_v3_small", "vit_b_32", "shufflenet_v2_x0_5"]


def torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _runs(model: nn.Module, size: int) -> bool:
    x = make_input(size)
    try:
        with torch.no_grad():
            model.eval()(x)
            model.train()(x)
        return True
    except Exception:  # noqa: BLE001 - any failure means "too small"
        return False
    finally:
        model.eval()


def find_min_size(model: nn.Module, sizes: tuple[int, ...] = SIZES) -> int:
    """The smallest size in ``sizes`` at which the plain model runs in eval and train.

    Running in train mode updates BatchNorm statistics: call it on a copy.
    """
    for size in sizes:
        if _runs(model, size):
            return size
    raise RuntimeError(f"the model does not run at any of the sizes {sizes}")


def build_torchvision(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A torchvision classifier with random weights and its smallest input."""
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.get_model(name, weights=None, **TORCHVISION_KWARGS.get(name, {}))
    model.eval()
    fixed = TORCHVISION_KWARGS.get(name, {}).get("image_size")
    size = TORCHVISION_MIN_SIZE.get(name) or find_min_size(
        copy.deepcopy(model), (fixed,) if fixed else SIZES
    )
    return model, make_input(size)

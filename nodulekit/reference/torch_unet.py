"""The PyTorch reference U-Net: the same architecture as ``nodulekit.nn.unet.UNet``.

Used only to check our gradients and to time our engine against cuDNN / oneDNN. Parameter
names are ours (``enc0.conv1.w`` ...), so weights convert both ways by name:

- 3x3 / 1x1 convolution: ours ``[K, R, S, C]`` <-> torch ``[K, C, R, S]``
- 2x2 up-convolution:    ours ``[K, 2, 2, C]`` <-> torch ConvTranspose2d ``[C, K, 2, 2]``
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nodulekit.nn.layout import unet_parameter_shapes


def ours_to_torch(name: str, value: np.ndarray) -> np.ndarray:
    """One parameter from our layout to torch's."""
    if value.ndim == 1:
        return value
    if ".up." in name:
        return np.ascontiguousarray(value.transpose(3, 0, 1, 2))
    return np.ascontiguousarray(value.transpose(0, 3, 1, 2))


def torch_to_ours(name: str, value: np.ndarray) -> np.ndarray:
    """One parameter from torch's layout to ours."""
    if value.ndim == 1:
        return value
    if ".up." in name:
        return np.ascontiguousarray(value.transpose(1, 2, 3, 0))
    return np.ascontiguousarray(value.transpose(0, 2, 3, 1))


class TorchUNet(nn.Module):
    """Same layers, same order, same names as ours; NCHW in, logits out."""

    def __init__(self, depth: int = 4, width: int = 64, in_channels: int = 1):
        super().__init__()
        self.depth, self.width, self.in_channels = depth, width, in_channels
        self.shapes = unet_parameter_shapes(depth, width, in_channels)
        # one nn.Parameter per tensor, registered under a dotless name
        for name, shape in self.shapes:
            torch_shape = ours_to_torch(name, np.empty(shape, dtype=np.float32)).shape
            self.register_parameter(name.replace(".", "__"),
                                    nn.Parameter(torch.zeros(torch_shape)))

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def conv(name, t, relu=True):
            w = self.p(name + ".w")
            y = F.conv2d(t, w, self.p(name + ".b"), padding=w.shape[-1] // 2)
            return F.relu(y) if relu else y

        skips = []
        for level in range(self.depth):
            x = conv(f"enc{level}.conv2", conv(f"enc{level}.conv1", x))
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = conv("bottom.conv2", conv("bottom.conv1", x))
        for level in reversed(range(self.depth)):
            up = F.conv_transpose2d(x, self.p(f"dec{level}.up.w"), self.p(f"dec{level}.up.b"),
                                    stride=2)
            x = torch.cat([skips[level], up], dim=1)
            x = conv(f"dec{level}.conv2", conv(f"dec{level}.conv1", x))
        return conv("head", x, relu=False)

    # ---- weight conversion
    def load_ours(self, params: dict[str, np.ndarray]) -> TorchUNet:
        """Copy our parameters (name -> array in our layout) into this module."""
        with torch.no_grad():
            for name, _ in self.shapes:
                t = self.p(name)
                t.copy_(torch.from_numpy(ours_to_torch(name, np.asarray(params[name]))))
        return self

    def export_ours(self) -> dict[str, np.ndarray]:
        """This module's parameters in our layout (float32 NumPy)."""
        return {name: torch_to_ours(name, self.p(name).detach().cpu().float().numpy())
                for name, _ in self.shapes}

    def grads_ours(self) -> dict[str, np.ndarray]:
        """The parameters' .grad in our layout."""
        return {name: torch_to_ours(name, self.p(name).grad.detach().cpu().double().numpy())
                for name, _ in self.shapes}


def torch_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0):
    """Per-sample soft Dice on sigmoid(logits), averaged: the same math as ours."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1).to(p.dtype)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return (1 - dice).mean()

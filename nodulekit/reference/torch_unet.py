"""The PyTorch reference U-Net: the same architecture as ``nodulekit.nn.unet.UNet``.

Used only to check our gradients and to time our engine against cuDNN / oneDNN. Parameter
names are ours (``enc0.conv1.w`` ...), so weights convert both ways by name:

- 3x3 / 1x1 convolution: ours ``[K, R, S, C]`` <-> torch ``[K, C, R, S]``
- 2x2 up-convolution:    ours ``[K, 2, 2, C]`` <-> torch ConvTranspose2d ``[C, K, 2, 2]``
- a norm's gamma, beta and batch norm's running mean and variance: ``[K]`` both ways

``norm`` as ours ("none", "instance", "batch"): conv3x3 without bias -> ``F.instance_norm`` /
``F.batch_norm`` (gamma, beta; PyTorch's eps and momentum) -> ReLU. Batch norm's running
statistics are buffers (``register_buffer``), updated in ``train()`` mode and used in
``eval()`` mode, as ``nn.BatchNorm2d`` does; `load_ours` / `export_buffers` carry them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nodulekit.engine.ops import BN_MOMENTUM, NORM_EPS
from nodulekit.nn.layout import norm_name, unet_buffer_shapes, unet_parameter_shapes


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

    def __init__(self, depth: int = 4, width: int = 64, in_channels: int = 1,
                 norm: str = "none"):
        super().__init__()
        self.depth, self.width, self.in_channels, self.norm = depth, width, in_channels, norm
        self.shapes = unet_parameter_shapes(depth, width, in_channels, norm)
        self.buffer_shapes = unet_buffer_shapes(depth, width, norm)
        # one nn.Parameter per tensor, registered under a dotless name
        for name, shape in self.shapes:
            torch_shape = ours_to_torch(name, np.empty(shape, dtype=np.float32)).shape
            self.register_parameter(name.replace(".", "__"),
                                    nn.Parameter(torch.zeros(torch_shape)))
        for name, shape in self.buffer_shapes:  # running mean 0, running variance 1
            fill = 1.0 if name.endswith(".running_var") else 0.0
            self.register_buffer(name.replace(".", "__"), torch.full(shape, fill))

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def conv(name, t, relu=True):
            w = self.p(name + ".w")
            if self.norm == "none" or not relu:
                y = F.conv2d(t, w, self.p(name + ".b"), padding=w.shape[-1] // 2)
                return F.relu(y) if relu else y
            return F.relu(self._norm(norm_name(name), F.conv2d(t, w, None, padding=1)))

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

    def _norm(self, name: str, z: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.p(name + ".gamma"), self.p(name + ".beta")
        if self.norm == "instance":
            return F.instance_norm(z, weight=gamma, bias=beta, eps=NORM_EPS)
        return F.batch_norm(z, self.p(name + ".running_mean"), self.p(name + ".running_var"),
                            weight=gamma, bias=beta, training=self.training,
                            momentum=BN_MOMENTUM, eps=NORM_EPS)

    # ---- weight conversion
    def load_ours(self, params: dict[str, np.ndarray],
                  buffers: dict[str, np.ndarray] | None = None) -> TorchUNet:
        """Copy our parameters (name -> array in our layout) into this module, and batch
        norm's running statistics (`UNet.buffer_dict`) where given."""
        with torch.no_grad():
            for name, _ in self.shapes:
                t = self.p(name)
                t.copy_(torch.from_numpy(ours_to_torch(name, np.asarray(params[name]))))
            for name, _ in self.buffer_shapes if buffers is not None else ():
                self.p(name).copy_(torch.from_numpy(np.asarray(buffers[name])))
        return self

    def export_buffers(self) -> dict[str, np.ndarray]:
        """Batch norm's running statistics (float32 NumPy), named as ours."""
        return {name: self.p(name).detach().cpu().float().numpy().copy()
                for name, _ in self.buffer_shapes}

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

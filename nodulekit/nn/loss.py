"""The Dice loss and the training step built on it."""

from __future__ import annotations

from nodulekit.nn.optim import Adam
from nodulekit.nn.unet import UNet


def dice_loss(model: UNet, logits, target, smooth: float = 1.0):
    """(loss, per-sample dice, dlogits): sigmoid + per-sample soft Dice, one fused op."""
    return model.backend.sigmoid_dice_loss(logits, target, smooth)


def training_step(model: UNet, optimizer: Adam, image, target, smooth: float = 1.0):
    """forward, Dice loss, backward, Adam. Returns the loss (a 0-d backend array)."""
    logits = model.forward(image)
    loss, _, dlogits = dice_loss(model, logits, target, smooth)
    model.backward(dlogits)
    optimizer.step()
    return loss

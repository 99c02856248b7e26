"""The network: U-Net, Dice loss and Adam, built only from engine ops."""

from nodulekit.nn.loss import dice_loss, training_step
from nodulekit.nn.optim import Adam
from nodulekit.nn.unet import UNet

__all__ = ["UNet", "Adam", "dice_loss", "training_step"]

"""The network: U-Net, Dice loss, Adam and the training step, built only from engine ops."""

from nodulekit.nn.inputs import center_crop, window_input
from nodulekit.nn.loss import add_bce, dice_loss
from nodulekit.nn.optim import LR_SCALINGS, Adam, lr_scale
from nodulekit.nn.step import StepLosses, TrainStep
from nodulekit.nn.unet import UNet

__all__ = ["UNet", "Adam", "TrainStep", "StepLosses", "dice_loss", "add_bce", "lr_scale",
           "LR_SCALINGS", "window_input", "center_crop"]

"""The network: U-Net, Dice loss, Adam and the training step, built only from engine ops."""

from nodulekit.nn.inputs import center_crop, window_input
from nodulekit.nn.loss import (
    DICE_MODES,
    add_bce,
    batch_dice_loss,
    dice_loss,
    nodule_bce_loss,
    nodule_dice_loss,
)
from nodulekit.nn.optim import LR_SCALINGS, LR_SCHEDULES, Adam, lr_scale, scheduled_lr
from nodulekit.nn.step import StepLosses, TrainStep
from nodulekit.nn.unet import UNet

__all__ = ["UNet", "Adam", "TrainStep", "StepLosses", "dice_loss", "batch_dice_loss",
           "DICE_MODES", "add_bce", "lr_scale", "LR_SCALINGS", "LR_SCHEDULES", "scheduled_lr",
           "window_input", "center_crop", "nodule_dice_loss", "nodule_bce_loss"]

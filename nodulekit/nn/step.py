"""The training step: the one that `nodulekit train`, `bench step` and `bench gpus` all run.

    logits = model.forward(image, comm=comm)                           (batch norm: global stats)
    loss, dlogits = sigmoid + Dice (+ bce_weight x BCE)                per sample: one fused
                                                                       engine op; or over the
                                                                       batch (`nn.loss`)
                    (+ nodule_dice_weight x Dice per nodule            `nn.loss`; the
                     + nodule_bce_weight x BCE per nodule)             nodules found once
    model.backward(dlogits)                                            grads in one flat buffer
    comm.allreduce_mean(grads)                                         data-parallel only
    Adam on the flat buffer, each entry's step times lr_scale          one engine call

The paper's step is the first, second, fourth and fifth line with smoothing 1 and no BCE
term or scaling. `comm` is anything with ``allreduce_mean(buffer)`` (a communicator of
`nodulekit.distributed`), and ``allreduce_sum(buffer)`` for a U-Net with batch norm (its
statistics are the global batch's: one sum of a few per-channel values per layer, forward
and backward); the network code does not know how ranks talk.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodulekit.nn.loss import (
    DICE_MODES,
    add_bce,
    batch_dice_loss,
    batch_nodules,
    nodule_bce_loss,
    nodule_dice_loss,
)
from nodulekit.nn.optim import Adam
from nodulekit.nn.unet import UNet


@dataclass(frozen=True)
class StepLosses:
    """One step's loss terms on this process's samples, as backend scalars (0-d arrays) so
    that reading them (a device-to-host copy) is the caller's choice."""

    dice: object  # mean_i (1 - dice_i), or the batch's 1 - Dice (dice="batch")
    bce: object  # bce_weight x mean_i sum_pixels BCE (+ nodule_bce_weight x the per-nodule
    # BCE), or 0.0 without either term
    nodule: object = 0.0  # mean over the batch's nodules of 1 - their Dice (unweighted), or 0.0


class TrainStep:
    """forward, loss, backward, gradient all-reduce, Adam; see the module docstring.

    smooth: the Dice loss's s. dice: "sample" (mean of per-sample Dice losses, the paper's)
    or "batch" (one Dice over the batch's pixels, `nn.loss.batch_dice_loss`). bce_weight:
    > 0 adds that much BCE (`nn.loss.add_bce`). nodule_dice_weight, nodule_bce_weight: > 0
    add that much of the per-nodule Dice (`nn.loss.nodule_dice_loss`) or BCE
    (`nn.loss.nodule_bce_loss`); the batch's nodules are labelled once for both.
    lr_scale: None, or a backend float32 array [P] of per-parameter learning-rate factors
    (`nn.optim.lr_scale`). comm: None (one process) or a communicator.
    """

    def __init__(self, model: UNet, optimizer: Adam, *, smooth: float = 1.0,
                 bce_weight: float = 0.0, lr_scale=None, comm=None, dice: str = "sample",
                 nodule_dice_weight: float = 0.0, nodule_bce_weight: float = 0.0):
        if dice not in DICE_MODES:
            raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
        self.model, self.optimizer = model, optimizer
        self.dice = dice
        self.smooth, self.bce_weight = float(smooth), float(bce_weight)
        self.nodule_dice_weight = float(nodule_dice_weight)
        self.nodule_bce_weight = float(nodule_bce_weight)
        self.lr_scale, self.comm = lr_scale, comm

    def __call__(self, image, target) -> StepLosses:
        model = self.model
        logits = model.forward(image, comm=self.comm)
        if self.dice == "batch":
            loss, dlogits = batch_dice_loss(model.backend, logits, target, self.smooth,
                                            self.comm)
        else:
            loss, _, dlogits = model.backend.sigmoid_dice_loss(logits, target, self.smooth)
        nodule = 0.0
        nodules = (batch_nodules(model.backend, target, self.comm)
                   if self.nodule_dice_weight or self.nodule_bce_weight else None)
        if self.nodule_dice_weight:
            nodule, extra = nodule_dice_loss(model.backend, logits, target, self.smooth,
                                             self.comm, nodules)
            if extra is not None:
                dlogits += extra * dlogits.dtype.type(self.nodule_dice_weight)
        bce = (add_bce(model.backend, logits, target, dlogits, self.bce_weight)
               if self.bce_weight else 0.0)
        if self.nodule_bce_weight:
            value, extra = nodule_bce_loss(model.backend, logits, target, self.comm, nodules)
            if extra is not None:
                dlogits += extra * dlogits.dtype.type(self.nodule_bce_weight)
                bce = bce + self.nodule_bce_weight * value
        model.backward(dlogits)
        if self.comm is not None:
            self.comm.allreduce_mean(model.grads)
        if self.lr_scale is None:
            self.optimizer.step()
        else:
            self._scaled_adam_step()
        return StepLosses(loss, bce, nodule)

    def _scaled_adam_step(self) -> None:
        # params = before + scale * (Adam's step): Adam with lr * scale per entry
        xp = self.model.backend.xp
        params = self.model.params
        before = params.copy()
        self.optimizer.step()
        xp.subtract(params, before, out=params)
        xp.multiply(params, self.lr_scale, out=params)
        xp.add(params, before, out=params)

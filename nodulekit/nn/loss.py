"""The training loss: sigmoid + soft Dice, per sample (one fused engine op) or over the
whole batch, optionally plus a small BCE term.

Per sample (the paper's, ``dice="sample"``): mean_i [1 - (2 I_i + s) / (P_i + G_i + s)] with
I, P, G the sums of p t, p and t over sample i's pixels. With s = 1 a sample without a
nodule pixel scores 0 only when its P is ~0: a crop with one faint false blob (P = 10) loses
0.91, nearly what a missed nodule costs. On data where nodules and vessels look alike, "no
nodule anywhere" is then the loss's best answer: its value is the share of samples holding a
nodule (0.35 on the demo's crops), and runs slide into it (README, "Recipes").

Over the batch (nnU-Net's "batch Dice" for 2-D, ``dice="batch"``): one Dice of the batch's
pixels taken together, 1 - (2 I + s) / (P + G + s) with I, P, G summed over every sample (and
every data-parallel rank). A false blob then costs its share of the batch's pixels, not a
whole sample's loss, and predicting nothing scores 1.
"""

from __future__ import annotations

DICE_MODES = ("sample", "batch")


def dice_loss(model, logits, target, smooth: float = 1.0):
    """(loss, per-sample dice, dlogits): sigmoid + per-sample soft Dice, one fused op."""
    return model.backend.sigmoid_dice_loss(logits, target, smooth)


def batch_dice_loss(backend, logits, target, smooth: float = 1.0, comm=None):
    """(loss, dlogits): sigmoid + one soft Dice over every pixel of the batch.

    loss = 1 - (2 I + s) / D, D = P + G + s; d loss / d z = p (1 - p) (num - 2 t D) / D^2,
    num = 2 I + s. The sums are float64. comm: data-parallel ranks (anything with
    ``allreduce_sum`` and ``size``): I, P, G are summed over them, and each rank's gradient
    is multiplied by the rank count, because the step then takes the mean of the ranks'
    gradients where this loss wants their sum. The loss is a backend float64 scalar.
    """
    xp = backend.xp
    p = 0.5 * (1.0 + xp.tanh(0.5 * logits))  # sigmoid without overflow, logits' dtype
    t = target.astype(logits.dtype)
    sums = xp.stack([(p * t).sum(dtype=xp.float64), p.sum(dtype=xp.float64),
                     t.sum(dtype=xp.float64)])
    ranks = 1
    if comm is not None:
        comm.allreduce_sum(sums)
        ranks = int(comm.size)
    numerator = 2.0 * sums[0] + smooth
    denominator = sums[1] + sums[2] + smooth
    loss = 1.0 - numerator / denominator
    on_target = (-2.0 * ranks / denominator).astype(logits.dtype)  # the 2 t D term
    everywhere = (ranks * numerator / denominator ** 2).astype(logits.dtype)
    e = xp.exp(-xp.abs(logits))
    slope = e / ((1.0 + e) * (1.0 + e))  # p (1 - p) without 1 - p's cancellation near p = 1
    dlogits = (on_target * t + everywhere) * slope
    return loss, dlogits


def add_bce(backend, logits, target, dlogits, weight: float):
    """Add the gradient of weight * mean_i sum_pixels BCE(sigmoid(z), t) to `dlogits` (in
    place) and return that term's value (a backend float64 scalar).

    BCE = softplus(z) - t z per pixel (stable for any z); its gradient is sigmoid(z) - t,
    which never vanishes on a missed nodule pixel (the Dice loss's carries p (1 - p)), so a
    small weight keeps the net from settling on "no nodule anywhere".
    """
    xp = backend.xp
    n = logits.shape[0]
    t = target.astype(logits.dtype)
    p = 0.5 * (1.0 + xp.tanh(0.5 * logits))  # sigmoid without overflow
    dlogits += (p - t) * logits.dtype.type(weight / n)
    return (weight / n) * (xp.logaddexp(0.0, logits, dtype=xp.float64).sum()
                           - (t * logits).sum(dtype=xp.float64))

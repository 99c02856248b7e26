"""The training loss: sigmoid + per-sample soft Dice (one fused engine op), optionally plus a
small BCE term."""

from __future__ import annotations


def dice_loss(model, logits, target, smooth: float = 1.0):
    """(loss, per-sample dice, dlogits): sigmoid + per-sample soft Dice, one fused op."""
    return model.backend.sigmoid_dice_loss(logits, target, smooth)


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

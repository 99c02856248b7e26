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

Per nodule (``nodule_dice_loss``, added with a weight to either): one Dice per connected
nodule of the truth, each over its own pixels and its sample's background, averaged over
the batch's nodules (the "blob loss" of Kofler et al. 2022). Pixel-summed losses, batch Dice
and BCE alike, push on a missed nodule in proportion to its pixels: a 4 mm nodule of 30
pixels weighs 1/50 of a 30 mm one, and three quarters of real nodules are that small. Here
each nodule weighs the same.
"""

from __future__ import annotations

import numpy as np

from nodulekit.data.nodules import label_slices

DICE_MODES = ("sample", "batch")


def _sigmoid(xp, z):
    """sigmoid(z) in z's dtype, without exp's overflow for large |z|."""
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def _sigmoid_slope(xp, z):
    """p (1 - p) = sigmoid'(z), without 1 - p's cancellation near p = 1."""
    e = xp.exp(-xp.abs(z))
    return e / ((1.0 + e) * (1.0 + e))


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
    p = _sigmoid(xp, logits)
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
    dlogits = (on_target * t + everywhere) * _sigmoid_slope(xp, logits)
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
    p = _sigmoid(xp, logits)
    dlogits += (p - t) * logits.dtype.type(weight / n)
    return (weight / n) * (xp.logaddexp(0.0, logits, dtype=xp.float64).sum()
                           - (t * logits).sum(dtype=xp.float64))


def batch_nodules(backend, target, comm=None):
    """(labels int32 [N, H, W] on the host, sample of each label, K: the nodule count over
    every rank, the rank count) of a batch's target: what both per-nodule terms start from
    (the step finds it once and hands it to both, `nodules=`)."""
    labels, sample_of = label_slices(backend.to_host(target)[..., 0])
    count = np.array([len(sample_of)], np.float64)
    ranks = 1
    if comm is not None:  # every rank calls this, with or without nodules of its own
        total = backend.xp.asarray(count)
        comm.allreduce_sum(total)
        count = backend.to_host(total)
        ranks = int(comm.size)
    return labels, sample_of, float(count[0]), ranks


def nodule_dice_loss(backend, logits, target, smooth: float = 1.0, comm=None, nodules=None):
    """(loss, dlogits or None): sigmoid + one soft Dice per nodule of the truth, averaged.

    Nodule c of sample i (an 8-connected component of its mask, `data.nodules.label_slices`):
    D_c = (2 Q_c + s) / (B_i + Q_c + G_c + s), with
    Q_c the sum of p over c's pixels, G_c its pixel count and B_i the sum of p over sample i's
    pixels outside every nodule (other nodules' pixels count for neither). loss = mean_c
    (1 - D_c) over the K nodules of the batch (of every rank). Gradients, u = 1 / (K den_c):

        on c's pixels:           -u (2 - num_c / den_c) p (1 - p)
        on i's background:      sum_{c in i} u (num_c / den_c) p (1 - p)

    A batch without a nodule gives (0.0, None). The per-nodule sums are float64. comm:
    data-parallel ranks (``allreduce_sum``, ``size``): K is summed over them and each rank's
    gradient multiplied by the rank count, as in `batch_dice_loss`; so is its loss (its
    nodules' share), whose mean over the ranks is then the batch's. The labels come from the
    host's copy of the target (a few kB a step), where scipy finds the components;
    ``nodules``: `batch_nodules` of this target, when the caller has it already.
    """
    xp = backend.xp
    labels_host, sample_of, k_all, ranks = nodules or batch_nodules(backend, target, comm)
    if not sample_of.size:  # nothing here; other ranks' nodules need no gradient from us
        return 0.0, None
    n = logits.shape[0]
    k = len(sample_of)
    labels = xp.asarray(labels_host.reshape(n, -1))
    p = _sigmoid(xp, logits).reshape(n, -1)
    per_label = xp.bincount(labels.ravel(), weights=p.ravel().astype(xp.float64),
                            minlength=k + 1)
    q = per_label[1:]
    g = xp.asarray(np.bincount(labels_host.ravel(), minlength=k + 1)[1:].astype(np.float64))
    of = xp.asarray(sample_of)
    on_nodules = xp.bincount(of, weights=q, minlength=n)
    background = p.sum(axis=1, dtype=xp.float64) - on_nodules  # B_i
    numerator = 2.0 * q + smooth
    denominator = background[of] + q + g + smooth
    loss = ranks * (1.0 - numerator / denominator).sum() / k_all  # ranks: see above
    u = ranks / (k_all * denominator)
    ratio = numerator / denominator
    inside = xp.concatenate([xp.zeros(1), -u * (2.0 - ratio)])  # by label; 0: background
    outside = xp.bincount(of, weights=u * ratio, minlength=n)
    coefficient = xp.where(labels > 0, inside[labels], outside[:, None])
    slope = _sigmoid_slope(xp, logits).reshape(n, -1)
    dlogits = (coefficient.astype(logits.dtype) * slope).reshape(logits.shape)
    return loss, dlogits


def nodule_bce_loss(backend, logits, target, comm=None, nodules=None):
    """(loss, dlogits or None): the BCE of each nodule of the truth over its own pixels,
    averaged, then averaged over the batch's nodules.

    Nodule c (as in `nodule_dice_loss`), G_c pixels: L_c = (1 / G_c) sum_{x in c}
    softplus(-z_x) = mean -log p over c. loss = mean_c L_c over the K nodules of the batch
    (of every rank); d loss / d z_x = -(1 - p_x) / (K G_c) on c's pixels, 0 elsewhere. Why:
    each nodule gets a push of total size 1 / K towards being found, which a Dice does not
    give once the net is sure a small nodule is background (the Dice's gradient carries
    p (1 - p), ~0.02 at p = 0.02). Nothing here pushes down: false positives are the other
    terms' business. comm, nodules and the rank factor as in `nodule_dice_loss`.
    """
    xp = backend.xp
    labels_host, sample_of, k_all, ranks = nodules or batch_nodules(backend, target, comm)
    if not sample_of.size:
        return 0.0, None
    k = len(sample_of)
    labels = xp.asarray(labels_host.reshape(-1))
    z = logits.reshape(-1)
    g = xp.asarray(np.bincount(labels_host.ravel(), minlength=k + 1).astype(np.float64))
    g[0] = 1.0  # the background's slot: never used below
    per_label = xp.bincount(labels, weights=xp.logaddexp(0.0, -z, dtype=xp.float64),
                            minlength=k + 1)
    loss = ranks * (per_label[1:] / g[1:]).sum() / k_all
    scale = xp.where(labels > 0, (ranks / k_all) / g[labels], 0.0).astype(logits.dtype)
    e = xp.exp(-xp.abs(z))
    q = xp.where(z >= 0, e, 1.0) / (1.0 + e)  # 1 - p, exact in the tails (no 1 - 0.9999)
    dlogits = (-scale * q).reshape(logits.shape)
    return loss, dlogits

"""The per-nodule Dice loss (`nn.loss.nodule_dice_loss`, written with the backend's array
module): its components, against torch autograd in float64 on every backend, what it is for
(each nodule weighs the same, whatever its pixels), split over data-parallel ranks, and in
the training step."""

from __future__ import annotations

import numpy as np
import pytest
from backends import ALL_BACKENDS, each_backend, to_device

from nodulekit.data.nodules import label_slices
from nodulekit.engine import get_backend
from nodulekit.nn import batch_dice_loss, nodule_dice_loss

# float32 logits and gradient, float64 sums: the gradient's float32 rounding (~6e-8
# relative) dominates, as for the batch Dice
RTOL_GRAD, ATOL_GRAD = 1e-5, 1e-10


def _inputs(seed=0, shape=(3, 11, 13, 1), scale=4.0):
    """Logits, and a target with nodules of 1 to 12 pixels (two touching only at a corner,
    one sample without any)."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * scale).astype(np.float32)
    t = np.zeros(shape, np.uint8)
    t[0, 1:4, 1:5] = 1  # 12 pixels
    t[0, 4, 5] = 1  # touches it at a corner: the same nodule (8-connected)
    t[0, 8:10, 9:11] = 1  # 4 pixels, apart
    t[2, 6, 6] = 1  # 1 pixel; sample 1 has none
    return z, t


def test_label_slices_numbers_8_connected_components_across_the_batch():
    _, t = _inputs()
    t[1, 0, 0] = t[2, 0, 0] = 1  # the same pixel in two slices: two components, not one
    labels, slice_of = label_slices(t[..., 0])
    assert labels.shape == t.shape[:3] and labels.dtype == np.int32
    assert slice_of.tolist() == [0, 0, 1, 2, 2]
    assert labels[0, 4, 5] == labels[0, 1, 1] == 1  # corner contact joins
    assert labels[0, 8, 9] == 2 and labels[1, 0, 0] == 3
    assert labels[2, 0, 0] == 4 and labels[2, 6, 6] == 5
    assert ((labels > 0) == (t[..., 0] > 0)).all()
    empty, none = label_slices(np.zeros((2, 4, 4), np.uint8))
    assert empty.max() == 0 and none.size == 0
    with pytest.raises(ValueError, match="stack"):
        label_slices(np.zeros((4, 4)))


def _torch_reference(z, t, smooth):
    """The loss written the slow, obvious way: per nodule, a mask of its own pixels and of
    its sample's background, autograd for the gradient."""
    import torch

    labels, sample_of = label_slices(t[..., 0])
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(zt)
    lab = torch.tensor(labels)[..., None]  # [N, H, W, 1], as z
    terms = []
    for c, i in enumerate(sample_of.tolist(), start=1):
        own = (lab[i] == c).double()
        region = ((lab[i] == 0) | (lab[i] == c)).double()
        dice = (2 * (p[i] * own).sum() + smooth) / ((p[i] * region).sum() + own.sum() + smooth)
        terms.append(1 - dice)
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.item(), zt.grad.numpy()


@each_backend(*ALL_BACKENDS)
@pytest.mark.parametrize("smooth", [1.0, 1e-5])
def test_nodule_dice_against_torch(backend, smooth):
    be = backend
    z, t = _inputs(1)
    loss, grad = nodule_dice_loss(be, *to_device(be, z, t), smooth)
    loss, grad = float(be.to_host(loss)), be.to_host(grad)
    ref_loss, ref_grad = _torch_reference(z, t, smooth)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    assert grad.dtype == be.dtype and grad.shape == z.shape
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL_GRAD, atol=ATOL_GRAD)


def test_a_batch_without_a_nodule_has_no_term():
    be = get_backend("cpu")
    loss, grad = nodule_dice_loss(be, np.zeros((2, 8, 8, 1), np.float32),
                                  np.zeros((2, 8, 8, 1), np.uint8))
    assert loss == 0.0 and grad is None


def test_each_nodule_weighs_the_same_whatever_its_pixels():
    """A found 30 mm nodule (400 pixels) and a missed 4 mm one (4 pixels): the batch Dice
    barely sees the miss, the per-nodule Dice loses about half; and the push on the missed
    nodule's pixels is two orders of magnitude stronger."""
    be = get_backend("cpu")
    z = np.full((2, 32, 32, 1), -8.0, np.float32)
    t = np.zeros((2, 32, 32, 1), np.uint8)
    t[0, 6:26, 6:26] = 1
    z[0, 6:26, 6:26] = 8.0  # found
    t[1, 14:16, 14:16] = 1  # missed: its logits stay at -8
    batch, batch_grad = batch_dice_loss(be, z, t, 1.0)
    nodule, nodule_grad = nodule_dice_loss(be, z, t, 1.0)
    # the missed one scores 1 - s / (4 + s + its background's p), about 0.8 with s = 1; the
    # found one about 0: their mean
    assert float(batch) < 0.02 and 0.35 < float(nodule) < 0.5
    small = (slice(1, 2), slice(14, 16), slice(14, 16))
    assert nodule_grad[small].mean() < 50 * batch_grad[small].mean() < 0  # descent raises them


class _SummedRanks:
    """Two ranks of one batch, run one after the other: allreduce_sum hands back the sum
    of what both contributed (`total`, measured beforehand)."""

    size = 2

    def __init__(self, total=None):
        self.total, self.parts = total, []

    def allreduce_sum(self, buf):
        self.parts.append(buf.copy())
        if self.total is not None:
            buf[...] = self.total


def test_nodule_dice_over_ranks_is_the_whole_batch():
    """Split over two ranks (one of them with a sample without a nodule), the mean of the
    ranks' losses is the whole batch's, and so are the ranks' gradients averaged as the
    step's all-reduce does."""
    be = get_backend("cpu")
    z, t = _inputs(3, (4, 11, 13, 1))
    t[3, 2:4, 2:4] = 1
    loss, grad = nodule_dice_loss(be, z, t, 1.0)
    halves = (slice(0, 2), slice(2, 4))
    counting = _SummedRanks()
    for h in halves:
        nodule_dice_loss(be, z[h], t[h], 1.0, counting)
    total = counting.parts[0] + counting.parts[1]
    parts = [nodule_dice_loss(be, z[h], t[h], 1.0, _SummedRanks(total)) for h in halves]
    assert np.mean([float(p_loss) for p_loss, _ in parts]) == pytest.approx(float(loss),
                                                                            rel=1e-12)
    averaged = np.concatenate([g for _, g in parts]) / 2
    np.testing.assert_allclose(averaged, grad, rtol=1e-6, atol=1e-12)


def step_grads(**weights):
    """(gradient, losses) of one training step of a tiny U-Net (batch Dice) on fixed inputs
    with nodules, with the step's per-nodule weights as given (the two per-nodule terms'
    step tests share it)."""
    from nodulekit.nn import Adam, TrainStep, UNet

    be = get_backend("cpu")
    z, t = _inputs(4, (3, 16, 16, 1))
    model = UNet(be, depth=1, width=2, seed=0)
    step = TrainStep(model, Adam(be, model.params, model.grads, lr=0.0), dice="batch",
                     **weights)
    losses = step(z[..., :1] / 4.0, t)
    return model.grads.copy(), losses


def test_train_step_adds_the_weighted_term():
    """The step's gradient is the batch Dice's plus weight x the per-nodule Dice's, and it
    reports the term's (unweighted) value; weight 0 leaves the step as it was."""
    def grads(weight):
        return step_grads(nodule_dice_weight=weight)

    plain, plain_losses = grads(0.0)
    one, one_losses = grads(1.0)
    three, _ = grads(3.0)
    assert plain_losses.nodule == 0.0 and 0 < float(one_losses.nodule) < 1
    assert float(one_losses.dice) == float(plain_losses.dice)
    # linear in the weight: (three - plain) = 3 (one - plain), to float32 rounding
    np.testing.assert_allclose(three - plain, 3 * (one - plain), rtol=1e-3,
                               atol=1e-6 * np.abs(one - plain).max())
    assert np.abs(one - plain).max() > 1e-4 * np.abs(plain).max()

"""The batch Dice loss (`nn.loss.batch_dice_loss`, written with the backend's array module:
NumPy, or CuPy on a GPU): against torch autograd in float64 and against the engine's fused
per-sample op given the whole batch as one sample, on every backend; split over data-parallel
ranks; and the poly learning-rate schedule."""

from __future__ import annotations

import numpy as np
import pytest
from backends import ALL_BACKENDS, each_backend, to_device

from nodulekit.engine import get_backend
from nodulekit.nn import batch_dice_loss

# float32 logits, float64 sums: the gradient's float32 rounding (~6e-8 relative) dominates
RTOL_GRAD, ATOL_GRAD = 1e-5, 1e-10


def _inputs(seed=0, shape=(3, 7, 9, 1), scale=4.0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * scale).astype(np.float32)
    t = (rng.random(shape) < 0.15).astype(np.uint8)
    return z, t


@each_backend(*ALL_BACKENDS)
@pytest.mark.parametrize("smooth", [1.0, 1e-5, 0.0])
def test_batch_dice_against_torch(backend, smooth):
    import torch

    be = backend
    z, t = _inputs(1)
    loss, grad = batch_dice_loss(be, *to_device(be, z, t), smooth)
    loss, grad = float(be.to_host(loss)), be.to_host(grad)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    p, tt = torch.sigmoid(zt), torch.tensor(t, dtype=torch.float64)
    ref = 1 - (2 * (p * tt).sum() + smooth) / (p.sum() + tt.sum() + smooth)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-6)
    assert grad.dtype == be.dtype and grad.shape == z.shape
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=RTOL_GRAD, atol=ATOL_GRAD)


@each_backend(*ALL_BACKENDS)
def test_batch_dice_is_the_fused_op_on_one_sample(backend):
    """The batch's Dice is the per-sample op's with every sample stacked into one (rows
    after rows: NHWC with one channel reshapes for free)."""
    be = backend
    z, t = to_device(be, *_inputs(2, (4, 16, 12, 1)))
    loss, grad = batch_dice_loss(be, z, t, 1.0)
    one = (1, 4 * 16, 12, 1)
    fused_loss, _, fused_grad = be.sigmoid_dice_loss(z.reshape(one), t.reshape(one), 1.0)
    assert float(be.to_host(loss)) == pytest.approx(float(be.to_host(fused_loss)), rel=1e-5)
    np.testing.assert_allclose(be.to_host(grad), be.to_host(fused_grad).reshape(z.shape),
                               rtol=1e-4, atol=1e-10)


def test_batch_dice_differs_from_per_sample_where_a_sample_is_empty():
    """An empty sample with a faint blob: per sample it loses ~1 - 1/(1 + P); over the batch
    only its share. The two losses must differ (and the batch one be the smaller)."""
    be = get_backend("cpu")
    z = np.full((2, 8, 8, 1), -12.0, np.float32)
    t = np.zeros((2, 8, 8, 1), np.uint8)
    t[0, 2:6, 2:6] = 1
    z[0, 2:6, 2:6] = 6.0  # sample 0: its nodule found
    z[1, 0:2, 0:2] = 0.5  # sample 1: empty, a faint 4-pixel blob
    batch, _ = batch_dice_loss(be, z, t, 1.0)
    per_sample, _, _ = be.sigmoid_dice_loss(z, t, 1.0)
    assert float(batch) < 0.15 < float(per_sample)


class _Ranks:
    """Two ranks run one after the other: allreduce_sum adds what both handed in (the
    second call of a pair returns the total to both)."""

    size = 2

    def __init__(self):
        self.parts = []

    def allreduce_sum(self, buf):
        self.parts.append(buf.copy())


def test_batch_dice_over_ranks_is_the_whole_batch():
    """Split over two ranks, each gets the whole batch's loss, and the ranks' gradients,
    averaged as the step's all-reduce does, are the whole batch's."""
    be = get_backend("cpu")
    z, t = _inputs(3, (4, 6, 5, 1))
    loss, grad = batch_dice_loss(be, z, t, 1.0)
    ranks = _Ranks()
    for half in (slice(0, 2), slice(2, 4)):  # gather both ranks' sums first
        batch_dice_loss(be, z[half], t[half], 1.0, ranks)
    total = ranks.parts[0] + ranks.parts[1]

    class _Summed(_Ranks):
        def allreduce_sum(self, buf):
            buf[...] = total

    grads = [batch_dice_loss(be, z[h], t[h], 1.0, _Summed())
             for h in (slice(0, 2), slice(2, 4))]
    for part_loss, _ in grads:
        assert float(part_loss) == pytest.approx(float(loss), rel=1e-12)
    # the step's allreduce_mean over 2 ranks: each rank's samples' gradient halved
    averaged = np.concatenate([g for _, g in grads]) / 2
    np.testing.assert_allclose(averaged, grad, rtol=1e-6, atol=1e-12)


def test_train_step_rejects_an_unknown_dice_mode():
    from nodulekit.nn import Adam, TrainStep, UNet

    be = get_backend("cpu")
    model = UNet(be, depth=1, width=2)
    with pytest.raises(ValueError, match="dice must be one of"):
        TrainStep(model, Adam(be, model.params, model.grads), dice="global")


def test_poly_schedule_falls_to_zero_and_constant_stays():
    from nodulekit.nn import scheduled_lr

    assert scheduled_lr(1e-3, "constant", 50, 100) == 1e-3
    assert scheduled_lr(1e-3, "poly", 0, 100) == 1e-3
    assert scheduled_lr(1e-3, "poly", 50, 100) == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert scheduled_lr(1e-3, "poly", 99, 100) == pytest.approx(1e-3 * 0.01 ** 0.9)
    assert scheduled_lr(1e-3, "poly", 120, 100) == 0.0  # past the end (a shortened run)
    with pytest.raises(ValueError, match="lr schedule"):
        scheduled_lr(1e-3, "cosine", 1, 10)

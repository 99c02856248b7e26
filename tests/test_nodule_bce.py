"""The per-nodule BCE (`nn.loss.nodule_bce_loss`): against torch autograd in float64 on
every backend, what it is for (a push on a missed small nodule that does not fade as
p -> 0), split over data-parallel ranks, and in the training step."""

from __future__ import annotations

import numpy as np
import pytest
from backends import ALL_BACKENDS, each_backend, to_device
from test_nodule_dice import _inputs, _SummedRanks, step_grads  # same nodules, ranks, step

from nodulekit.data.nodules import label_slices
from nodulekit.engine import get_backend
from nodulekit.nn import nodule_bce_loss, nodule_dice_loss

# float32 logits and gradient, float64 sums (as the per-nodule Dice)
RTOL_GRAD, ATOL_GRAD = 1e-5, 1e-10


def _torch_reference(z, t):
    import torch

    labels, sample_of = label_slices(t[..., 0])
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor(labels)[..., None]
    terms = [torch.nn.functional.softplus(-zt[i][lab[i] == c]).mean()
             for c, i in enumerate(sample_of.tolist(), start=1)]
    loss = torch.stack(terms).mean()
    loss.backward()
    return loss.item(), zt.grad.numpy()


@each_backend(*ALL_BACKENDS)
def test_nodule_bce_against_torch(backend):
    be = backend
    z, t = _inputs(1)
    loss, grad = nodule_bce_loss(be, *to_device(be, z, t))
    loss, grad = float(be.to_host(loss)), be.to_host(grad)
    ref_loss, ref_grad = _torch_reference(z, t)
    assert loss == pytest.approx(ref_loss, rel=1e-9)
    assert grad.dtype == be.dtype and grad.shape == z.shape
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL_GRAD, atol=ATOL_GRAD)
    assert (grad[t == 0] == 0).all() and (grad[t > 0] < 0).all()  # it only pushes nodules up


def test_the_push_on_a_missed_small_nodule_does_not_fade():
    """A 4-pixel nodule the net is sure is background (p ~ 3e-4): the per-nodule Dice's
    push on it carries p (1 - p) and is ~1e-4 a pixel; this term's is ~1/4 (1/K/G)."""
    be = get_backend("cpu")
    z = np.full((1, 32, 32, 1), -8.0, np.float32)
    t = np.zeros((1, 32, 32, 1), np.uint8)
    t[0, 14:16, 14:16] = 1
    _, dice_grad = nodule_dice_loss(be, z, t, 1.0)
    loss, bce_grad = nodule_bce_loss(be, z, t)
    small = (0, slice(14, 16), slice(14, 16))
    assert float(loss) == pytest.approx(np.log1p(np.exp(8.0)), rel=1e-6)
    assert bce_grad[small] == pytest.approx(-0.25 * (1 - 1 / (1 + np.exp(8.0))), rel=1e-5)
    assert -bce_grad[small].mean() > 500 * -dice_grad[small].mean() > 0
    none, nothing = nodule_bce_loss(be, z, np.zeros_like(t))
    assert none == 0.0 and nothing is None


def test_nodule_bce_over_ranks_is_the_whole_batch():
    be = get_backend("cpu")
    z, t = _inputs(3, (4, 11, 13, 1))
    t[3, 2:4, 2:4] = 1
    loss, grad = nodule_bce_loss(be, z, t)
    halves = (slice(0, 2), slice(2, 4))
    counting = _SummedRanks()
    for h in halves:
        nodule_bce_loss(be, z[h], t[h], counting)
    total = counting.parts[0] + counting.parts[1]
    parts = [nodule_bce_loss(be, z[h], t[h], _SummedRanks(total)) for h in halves]
    assert np.mean([float(x) for x, _ in parts]) == pytest.approx(float(loss), rel=1e-12)
    averaged = np.concatenate([g for _, g in parts]) / 2
    np.testing.assert_allclose(averaged, grad, rtol=1e-6, atol=1e-12)


def test_train_step_adds_the_weighted_term():
    """The step's gradient gains weight x the term's; its weighted value joins the BCE
    column; weight 0 leaves the step as it was."""
    def grads(weight):
        return step_grads(nodule_bce_weight=weight)

    plain, plain_losses = grads(0.0)
    one, one_losses = grads(1.0)
    three, three_losses = grads(3.0)
    assert plain_losses.bce == 0.0 and float(three_losses.bce) == pytest.approx(
        3 * float(one_losses.bce), rel=1e-12)
    np.testing.assert_allclose(three - plain, 3 * (one - plain), rtol=1e-3,
                               atol=1e-6 * np.abs(one - plain).max())
    assert np.abs(one - plain).max() > 1e-4 * np.abs(plain).max()


def test_both_per_nodule_terms_in_one_step_add_up():
    """With both per-nodule terms on (their nodules labelled once, `nn.loss.batch_nodules`),
    the step's gradient is the plain one plus each term's share, and its BCE column holds
    the per-nodule BCE's weighted value."""
    plain, _ = step_grads()
    dice, dice_losses = step_grads(nodule_dice_weight=1.0)
    bce, bce_losses = step_grads(nodule_bce_weight=0.5)
    both, both_losses = step_grads(nodule_dice_weight=1.0, nodule_bce_weight=0.5)
    np.testing.assert_allclose(both - plain, (dice - plain) + (bce - plain), rtol=1e-3,
                               atol=1e-6 * np.abs(both - plain).max())
    assert float(both_losses.nodule) == float(dice_losses.nodule) > 0
    assert float(both_losses.bce) == float(bce_losses.bce) > 0

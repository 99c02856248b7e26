"""Every engine op, forward and backward, on every backend, against the reference and torch.

``reference`` is checked against torch in float64; each backend in ``BACKENDS`` against
the reference (float64) and torch (its own dtype), with the tolerances of
``tests/opcheck.py``. Shapes are small (the reference is plain NumPy) and include odd
sizes, C = 1, K = 1 and batch 1. Each test seeds its generator from its own id.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from opcheck import (
    GRID32_ATOL,
    TOLERANCES,
    WINDOW32_ATOL,
    assert_close,
    check_op,
    rand,
    reference,
)

from nodulekit.engine import get_backend
from nodulekit.engine.ops import AIR_HU, WINDOW_CENTER, WINDOW_WIDTH, identity_augmentation
from nodulekit.reference import torch_ops as T

BACKENDS = ["cpu"]
ALL = ["reference", *BACKENDS]


def on(backend, *arrays):
    """Host arrays -> the backend's arrays, floats cast to its dtype."""
    be = get_backend(backend)
    out = tuple(be.asarray(a, dtype=be.dtype if a.dtype.kind == "f" else None) for a in arrays)
    return out if len(out) > 1 else out[0]


def host(backend, *arrays):
    be = get_backend(backend)
    out = tuple(None if a is None else np.asarray(be.to_host(a)) for a in arrays)
    return out if len(out) > 1 else out[0]


# --------------------------------------------------------------------------- convolution

CONV = [  # N, H, W, C, K, R, relu, need_dx
    pytest.param(1, 7, 9, 1, 1, 3, False, True, id="n1-7x9-c1-k1-3x3"),
    pytest.param(2, 13, 11, 3, 4, 3, True, True, id="n2-13x11-c3-k4-3x3-relu"),
    pytest.param(1, 8, 8, 3, 1, 3, True, True, id="n1-8x8-c3-k1-3x3-relu"),
    pytest.param(3, 2, 3, 5, 2, 3, True, True, id="n3-2x3-c5-k2-3x3-relu"),
    pytest.param(1, 1, 1, 2, 3, 3, False, True, id="n1-1x1-c2-k3-3x3"),
    pytest.param(2, 5, 6, 4, 3, 1, False, True, id="n2-5x6-c4-k3-1x1"),
    pytest.param(1, 7, 9, 3, 1, 1, True, True, id="n1-7x9-c3-k1-1x1-relu"),
    pytest.param(2, 9, 10, 16, 1, 1, False, True, id="n2-9x10-c16-k1-1x1-head"),
    pytest.param(1, 5, 5, 4, 1, 1, True, False, id="n1-5x5-c4-k1-1x1-relu-nodx"),
    pytest.param(2, 6, 5, 1, 4, 3, True, False, id="n2-6x5-c1-k4-3x3-relu-nodx"),
    # shapes the CPU backend gives to its register-blocked kernels (cpu_conv.py): K a
    # multiple of 16 and rows of >= 32 pixels (forward, dx) or >= 16 (dW)
    pytest.param(2, 6, 32, 1, 16, 3, True, False, id="n2-6x32-c1-k16-3x3-relu-nodx"),
    pytest.param(1, 5, 33, 3, 16, 3, True, True, id="n1-5x33-c3-k16-3x3-relu"),
    pytest.param(2, 3, 35, 16, 32, 3, True, True, id="n2-3x35-c16-k32-3x3-relu"),
    pytest.param(1, 3, 40, 5, 16, 3, False, True, id="n1-3x40-c5-k16-3x3"),
    pytest.param(1, 2, 16, 4, 64, 3, True, True, id="n1-2x16-c4-k64-3x3-relu"),
    pytest.param(2, 4, 34, 16, 8, 3, True, True, id="n2-4x34-c16-k8-3x3-relu"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,c,k,r,relu,need_dx", CONV)
def test_conv2d(backend, rng, n, h, w, c, k, r, relu, need_dx):
    _check_conv2d(backend, rng, n, h, w, c, k, r, relu, need_dx)


@pytest.mark.parametrize("variant", ["v1_patches_blas", "v2_register_blocked"])
@pytest.mark.parametrize("n,h,w,c,k,r,relu,need_dx", CONV)
def test_conv2d_cpu_versions(variant, rng, n, h, w, c, k, r, relu, need_dx):
    """Each CPU convolution version held to wherever it applies (v2 needs K % 16 == 0;
    'auto', tested above, mixes them per shape)."""
    from nodulekit.engine.cpu import CPUBackend

    _check_conv2d(CPUBackend(conv_variant=variant), rng, n, h, w, c, k, r, relu, need_dx)


def test_cpu_conv_variant_must_be_known():
    from nodulekit.engine.cpu import CPUBackend

    with pytest.raises(ValueError, match="unknown cpu convolution variant 'v3'; choose auto, "
                                         "v1_patches_blas, v2_register_blocked"):
        CPUBackend(conv_variant="v3")


def _check_conv2d(backend, rng, n, h, w, c, k, r, relu, need_dx):
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, r, r, c, scale=(2 / (r * r * c)) ** .5),
                  b=rand(rng, k, scale=0.5), dy=rand(rng, n, h, w, k))

    def run(be, x, w, b, dy):
        y = be.conv2d_forward(x, w, b, relu)
        dx, dw, db = be.conv2d_backward(dy, x, w, y, relu, need_dx)
        return dict(y=y, dx=dx, dw=dw, db=db)

    def run_torch(x, w, b, dy):
        dx, dw, db = T.conv2d_backward(dy, x, w, b, relu, need_dx)
        return dict(y=T.conv2d_forward(x, w, b, relu), dx=dx, dw=dw, db=db)

    got = check_op(backend, run, run_torch, inputs,
                   reduce=dict(y=r * r * c, dx=k * r * r, dw=n * h * w, db=n * h * w))
    assert (got["dx"] is None) == (not need_dx)


# --------------------------------------------------------------------------- max-pool

POOL = [  # N, H, W, C
    pytest.param(1, 7, 9, 1, id="n1-7x9-c1"),
    pytest.param(2, 8, 8, 3, id="n2-8x8-c3"),
    pytest.param(2, 13, 11, 2, id="n2-13x11-c2"),
    pytest.param(1, 2, 3, 1, id="n1-2x3-c1"),
    pytest.param(3, 3, 2, 4, id="n3-3x2-c4"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,c", POOL)
def test_maxpool2x2(backend, rng, n, h, w, c):
    inputs = dict(x=rand(rng, n, h, w, c), dy=rand(rng, n, h // 2, w // 2, c))

    def run(be, x, dy):
        y, argmax = be.maxpool2x2_forward(x)
        return dict(y=y, argmax=argmax, dx=be.maxpool2x2_backward(dy, argmax, (h, w)))

    def run_torch(x, dy):
        y, argmax = T.maxpool2x2_forward(x)
        return dict(y=y, argmax=argmax, dx=T.maxpool2x2_backward(dy, x))

    got = check_op(backend, run, run_torch, inputs, exact=("y", "argmax", "dx"))
    assert got["y"].shape == (n, h // 2, w // 2, c)
    assert got["dx"].shape == (n, h, w, c)


@pytest.mark.parametrize("backend", ALL)
def test_maxpool2x2_first_max_wins(backend, rng):
    """Ties (values in {0, 1}, all-equal windows included): the first in row-major order."""
    x = rng.integers(0, 2, (2, 6, 8, 3)).astype(np.float64)
    x[0, :2, :2, :] = 1.0  # a window of four equal values
    y, argmax = host(backend, *get_backend(backend).maxpool2x2_forward(on(backend, x)))
    expect = np.zeros((2, 3, 4, 3), np.uint8)
    for idx in np.ndindex(*expect.shape):
        nn, i, j, cc = idx
        window = [x[nn, 2 * i + a, 2 * j + b, cc] for a in (0, 1) for b in (0, 1)]
        expect[idx] = window.index(max(window))
    np.testing.assert_array_equal(argmax, expect)
    assert argmax[0, 0, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(y, x.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4)))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("h,w", [(7, 9), (5, 4), (4, 7)], ids=["7x9", "5x4", "4x7"])
def test_maxpool2x2_odd_size_drops_last(backend, rng, h, w):
    """H // 2, W // 2 as in PyTorch: the odd last row/column is never picked, gets dx = 0."""
    x = rand(rng, 1, h, w, 2)
    x[:, h - 1, :, :] += 100.0 * (h % 2)  # would win every window if it took part
    x[:, :, w - 1, :] += 100.0 * (w % 2)
    be = get_backend(backend)
    y, argmax = be.maxpool2x2_forward(on(backend, x))
    dx = host(backend, be.maxpool2x2_backward(on(backend, np.ones((1, h // 2, w // 2, 2))),
                                              argmax, (h, w)))
    assert host(backend, y).shape == (1, h // 2, w // 2, 2)
    np.testing.assert_array_equal(host(backend, y),
                                  x[:, :h // 2 * 2, :w // 2 * 2].reshape(
                                      1, h // 2, 2, w // 2, 2, 2).max(axis=(2, 4)))
    assert dx.shape == (1, h, w, 2)
    assert not dx[:, h // 2 * 2:].any() and not dx[:, :, w // 2 * 2:].any()
    assert dx.sum() == (h // 2) * (w // 2) * 2


# --------------------------------------------------------------------------- up-convolution

UPCONV = [  # N, H, W, C, K
    pytest.param(1, 3, 5, 1, 1, id="n1-3x5-c1-k1"),
    pytest.param(2, 4, 4, 3, 2, id="n2-4x4-c3-k2"),
    pytest.param(1, 7, 6, 2, 3, id="n1-7x6-c2-k3"),
    pytest.param(2, 1, 1, 4, 1, id="n2-1x1-c4-k1"),
    # the CPU backend's register-blocked version: forward needs K % 16, backward C % 16
    pytest.param(2, 3, 5, 16, 16, id="n2-3x5-c16-k16"),
    pytest.param(1, 4, 7, 32, 48, id="n1-4x7-c32-k48"),
    pytest.param(1, 2, 3, 16, 20, id="n1-2x3-c16-k20"),
    pytest.param(2, 5, 3, 8, 16, id="n2-5x3-c8-k16"),
    pytest.param(1, 3, 4, 16, 8, id="n1-3x4-c16-k8"),
    pytest.param(2, 2, 5, 5, 24, id="n2-2x5-c5-k24"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,c,k", UPCONV)
def test_upconv2x2(backend, rng, n, h, w, c, k):
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, 2, 2, c, scale=c ** -.5),
                  b=rand(rng, k, scale=0.5), dy=rand(rng, n, 2 * h, 2 * w, k))

    def run(be, x, w, b, dy):
        dx, dw, db = be.upconv2x2_backward(dy, x, w)
        return dict(y=be.upconv2x2_forward(x, w, b), dx=dx, dw=dw, db=db)

    def run_torch(x, w, b, dy):
        dx, dw, db = T.upconv2x2_backward(dy, x, w)
        return dict(y=T.upconv2x2_forward(x, w, b), dx=dx, dw=dw, db=db)

    check_op(backend, run, run_torch, inputs,
             reduce=dict(y=c, dx=4 * k, dw=n * h * w, db=4 * n * h * w))


# --------------------------------------------------------------------------- concat / split

CONCAT = [  # N, H, W, CA, CB
    pytest.param(1, 7, 9, 1, 2, id="n1-7x9-ca1-cb2"),
    pytest.param(2, 4, 5, 3, 1, id="n2-4x5-ca3-cb1"),
    pytest.param(1, 3, 3, 2, 2, id="n1-3x3-ca2-cb2"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,ca,cb", CONCAT)
def test_concat_split_channels(backend, rng, n, h, w, ca, cb):
    inputs = dict(a=rand(rng, n, h, w, ca), b=rand(rng, n, h, w, cb),
                  dy=rand(rng, n, h, w, ca + cb))

    def run(be, a, b, dy):
        da, db = be.split_channels(dy, ca)
        return dict(y=be.concat_channels(a, b), da=da, db=db)

    def run_torch(a, b, dy):
        da, db = T.split_channels(dy, ca)
        return dict(y=T.concat_channels(a, b), da=da, db=db)

    got = check_op(backend, run, run_torch, inputs, exact=("y", "da", "db"))
    np.testing.assert_array_equal(got["y"][..., :ca], inputs["a"])  # the skip goes first


# ------------------------------------------------------- the decoder's fused up-conv + concat

UPCONCAT = [  # N, H, W, C, K, CS (skip channels)
    pytest.param(1, 3, 5, 4, 3, 2, id="n1-3x5-c4-k3-cs2"),
    pytest.param(2, 2, 3, 1, 5, 7, id="n2-2x3-c1-k5-cs7"),
    pytest.param(1, 1, 1, 3, 1, 1, id="n1-1x1-c3-k1-cs1"),
    pytest.param(2, 3, 7, 32, 16, 16, id="n2-3x7-c32-k16-cs16"),
    pytest.param(1, 5, 2, 16, 32, 3, id="n1-5x2-c16-k32-cs3"),
    pytest.param(2, 4, 7, 16, 8, 8, id="n2-4x7-c16-k8-cs8"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,c,k,cs", UPCONCAT)
def test_upconv2x2_concat_and_split_backward(backend, rng, n, h, w, c, k, cs):
    """The U-Net's decoder pair as one op equals concat(skip, upconv) and, backward,
    split then upconv backward (the CPU backend scatters into / gathers from the concat
    buffer directly)."""
    _check_upconv_concat(backend, rng, n, h, w, c, k, cs)


@pytest.mark.parametrize("variant", ["v1_patches_blas", "v2_register_blocked"])
@pytest.mark.parametrize("n,h,w,c,k,cs", UPCONCAT)
def test_upconv2x2_concat_cpu_versions(variant, rng, n, h, w, c, k, cs):
    """Each CPU version held to (v2 reads and writes the concat buffer in place where
    K % 16 == 0 forward and C % 16 == 0 backward; v1 goes through a temporary)."""
    from nodulekit.engine.cpu import CPUBackend

    _check_upconv_concat(CPUBackend(conv_variant=variant), rng, n, h, w, c, k, cs)


def _check_upconv_concat(backend, rng, n, h, w, c, k, cs):
    inputs = dict(skip=rand(rng, n, 2 * h, 2 * w, cs), x=rand(rng, n, h, w, c),
                  w=rand(rng, k, 2, 2, c, scale=c ** -.5), b=rand(rng, k, scale=0.5),
                  dcat=rand(rng, n, 2 * h, 2 * w, cs + k))

    def run(be, skip, x, w, b, dcat):
        dskip, dx, dw, db = be.upconv2x2_split_backward(dcat, cs, x, w)
        return dict(y=be.upconv2x2_concat_forward(skip, x, w, b), dskip=dskip, dx=dx,
                    dw=dw, db=db)

    def run_torch(skip, x, w, b, dcat):
        dskip, dup = T.split_channels(dcat, cs)
        dx, dw, db = T.upconv2x2_backward(dup, x, w)
        return dict(y=T.concat_channels(skip, T.upconv2x2_forward(x, w, b)), dskip=dskip,
                    dx=dx, dw=dw, db=db)

    got = check_op(backend, run, run_torch, inputs, exact=("dskip",),
                   reduce=dict(y=c, dx=4 * k, dw=n * h * w, db=4 * n * h * w))
    np.testing.assert_array_equal(got["y"][..., :cs], inputs["skip"])  # the skip goes first


# --------------------------------------------------------------------------- Dice loss

DICE = [  # N, H, W, target, smooth, logit scale
    pytest.param(1, 7, 9, "random", 1.0, 3.0, id="n1-7x9-random"),
    pytest.param(3, 13, 11, "one-empty", 1.0, 3.0, id="n3-13x11-one-empty"),
    pytest.param(2, 8, 8, "empty", 1.0, 3.0, id="n2-8x8-all-empty"),
    pytest.param(2, 5, 6, "empty", 0.0, 3.0, id="n2-5x6-all-empty-smooth0"),
    pytest.param(2, 4, 4, "full", 0.5, 3.0, id="n2-4x4-full-smooth0.5"),
    pytest.param(2, 6, 7, "random", 1.0, 20.0, id="n2-6x7-random-saturated"),
]


def _target(rng, kind, n, h, w):
    t = (rng.random((n, h, w, 1)) < 0.3).astype(np.uint8)
    if kind == "empty":
        t[:] = 0
    elif kind == "full":
        t[:] = 1
    elif kind == "one-empty":
        t[1] = 0
    return t


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,kind,smooth,scale", DICE)
def test_sigmoid_dice_loss(backend, rng, n, h, w, kind, smooth, scale):
    inputs = dict(z=rand(rng, n, h, w, 1, scale=scale), t=_target(rng, kind, n, h, w))

    def run(be, z, t):
        loss, dice, dz = be.sigmoid_dice_loss(z, t, smooth)
        return dict(loss=loss, dice=dice, dlogits=dz)

    def run_torch(z, t):
        loss, dice, dz = T.sigmoid_dice_loss(z, t, smooth)
        return dict(loss=loss, dice=dice, dlogits=dz)

    got = check_op(backend, run, run_torch, inputs,
                   reduce=dict(loss=n * h * w, dice=h * w, dlogits=h * w),
                   free_float=("loss", "dice"))
    assert got["loss"].shape == () and got["dice"].shape == (n,)
    assert_close(got["loss"], np.mean(1 - got["dice"]), get_backend(backend).precision, n,
                 "loss = mean(1 - dice)")


# --------------------------------------------------------------------------- Adam

ADAM = [  # size, step, lr, beta1, beta2, eps
    pytest.param(1, 1, 1e-3, 0.9, 0.999, 1e-8, id="size1-step1"),
    pytest.param(7, 3, 1e-3, 0.9, 0.999, 1e-8, id="size7-step3"),
    pytest.param(1000, 1, 1e-4, 0.9, 0.999, 1e-8, id="size1000-step1-lr1e-4"),
    pytest.param(257, 10, 0.1, 0.5, 0.9, 1e-6, id="size257-step10-betas.5-.9"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("size,step,lr,beta1,beta2,eps", ADAM)
def test_adam_step(backend, rng, size, step, lr, beta1, beta2, eps):
    """One step from a given state (m, v after step - 1 steps) against torch.optim.Adam."""
    inputs = dict(param=rand(rng, size), grad=rand(rng, size), m=rand(rng, size, scale=0.1),
                  v=np.abs(rand(rng, size, scale=0.1)))

    def run(be, param, grad, m, v):
        out = be.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps)
        assert out is None, "adam_step works in place"
        return dict(param=param, m=m, v=v)

    def run_torch(param, grad, m, v):
        p, m, v = T.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps)
        return dict(param=p, m=m, v=v)

    check_op(backend, run, run_torch, inputs)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("size", [5, 300])
def test_adam_20_steps(backend, rng, size):
    """Twenty steps from zero state against one torch.optim.Adam stepping 20 times."""
    steps = 20
    inputs = dict(param=rand(rng, size), grads=rand(rng, steps, size))

    def run(be, param, grads):
        m, v = be.zeros(param.shape), be.zeros(param.shape)
        for i in range(steps):
            be.adam_step(param, grads[i], m, v, i + 1, 1e-2)
        return dict(param=param, m=m, v=v)

    def run_torch(param, grads):
        p, m, v = T.adam_steps(param, list(grads), 1e-2)
        return dict(param=p, m=m, v=v)

    check_op(backend, run, run_torch, inputs, reduce=dict(param=steps, m=steps, v=steps))


# --------------------------------------------------------------------------- window_augment


def _slices(rng, n, h, w):
    hu = rng.integers(-1200, 1500, (n, h, w)).astype(np.int16)  # past both ends of windows
    mask = np.where(rng.random((n, h, w)) < 0.4, 255, 0).astype(np.uint8)  # nonzero -> 1
    return hu, mask


def _augment(backend, hu, mask, aug, center=WINDOW_CENTER, width=WINDOW_WIDTH):
    be = get_backend(backend)
    out = be.window_augment(be.asarray(hu), be.asarray(mask),
                            be.asarray(np.asarray(aug, np.float32)), center, width)
    return host(backend, *out)


def _window(hu, center, width):
    """The ops.py formula, in float64."""
    return np.clip((hu.astype(np.float64) - (center - width / 2)) / width, 0, 1)


def _window_tol(backend):
    """Exact for float64; within float32 rounding of the formula otherwise."""
    return 0.0 if get_backend(backend).dtype == np.float64 else WINDOW32_ATOL


WINDOW = [  # N, H, W
    pytest.param(4, 16, 16, id="n4-16x16"),
    pytest.param(4, 13, 11, id="n4-13x11"),
    pytest.param(2, 7, 9, id="n2-7x9"),
    pytest.param(1, 2, 3, id="n1-2x3"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w", WINDOW)
def test_window_augment(backend, rng, n, h, w):
    """Random flips and angles in [-20, 20]: against the reference and grid_sample."""
    hu, mask = _slices(rng, n, h, w)
    aug = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.5, rng.uniform(-20, 20, n)], 1)
    inputs = dict(hu=hu, mask=mask, aug=aug.astype(np.float32))

    def run(be, hu, mask, aug):
        image, m = be.window_augment(hu, mask, be.asarray(aug, dtype=np.float32))
        return dict(image=image, mask=m)

    def run_torch(hu, mask, aug):  # grid_sample rounds nearest half-to-even: no ties here
        image, m = T.window_augment(hu, mask, aug.astype(np.float32), dtype=aug.dtype)
        return dict(image=image, mask=m)

    got = check_op(backend, run, run_torch, inputs, reduce=dict(image=4), exact=("mask",),
                   torch32_atol=dict(image=GRID32_ATOL))
    assert got["image"].shape == (n, h, w, 1) and got["mask"].shape == (n, h, w, 1)
    assert set(np.unique(got["mask"])) <= {0, 1}


WINDOWS = [
    pytest.param(WINDOW_CENTER, WINDOW_WIDTH, id="lung-c-500-w1600"),
    pytest.param(40.0, 400.0, id="soft-c40-w400"),
    pytest.param(0.5, 3.0, id="narrow-c0.5-w3"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("center,width", WINDOWS)
def test_window_augment_identity_is_the_window_formula(backend, rng, center, width):
    hu, mask = _slices(rng, 3, 9, 12)
    hu[0, 0, :4] = [-32768, 32767, int(center - width / 2), int(center + width / 2)]
    image, m = _augment(backend, hu, mask, identity_augmentation(3), center, width)
    np.testing.assert_allclose(image[..., 0], _window(hu, center, width), rtol=0,
                               atol=_window_tol(backend))
    np.testing.assert_array_equal(m[..., 0], (mask != 0).astype(np.uint8))


SQUARE_AND_NOT = [pytest.param(8, 8, id="8x8"), pytest.param(9, 9, id="9x9"),
                  pytest.param(7, 10, id="7x10")]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("h,w", SQUARE_AND_NOT)
@pytest.mark.parametrize("flip_h,flip_v,axes", [(1, 0, (2,)), (0, 1, (1,)), (1, 1, (1, 2))],
                         ids=["hflip", "vflip", "both"])
def test_window_augment_flips_are_np_flip(backend, rng, h, w, flip_h, flip_v, axes):
    hu, mask = _slices(rng, 2, h, w)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(2))
    image, m = _augment(backend, hu, mask, [[flip_h, flip_v, 0.0]] * 2)
    np.testing.assert_array_equal(image, np.flip(image0, axis=axes))
    np.testing.assert_array_equal(m, np.flip(mask0, axis=axes))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("size", [8, 9], ids=["8x8", "9x9"])
@pytest.mark.parametrize("k", [1, 2, 3], ids=["90deg", "180deg", "270deg"])
def test_window_augment_rotation_by_90_is_np_rot90(backend, rng, size, k):
    """Counter-clockwise as np.rot90: exact on the mask, to rounding on the image."""
    hu, mask = _slices(rng, 2, size, size)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(2))
    image, m = _augment(backend, hu, mask, [[0, 0, 90.0 * k]] * 2)
    np.testing.assert_array_equal(m, np.rot90(mask0, k, axes=(1, 2)))
    np.testing.assert_allclose(image, np.rot90(image0, k, axes=(1, 2)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_window_augment_mask_rounds_half_up(backend):
    """floor(s + 0.5), not round-half-to-even: 90 degrees on 7x10 puts the centre row
    (dy = 0 exactly) at sy = x - 1.5 exactly, a tie for every x."""
    h, w = 7, 10
    rows = (np.arange(h) % 2 == 0).astype(np.uint8)  # alternate: one row off always shows
    mask = np.repeat(rows[:, None], w, axis=1)[None]  # depends on the row only
    _, m = _augment(backend, np.zeros((1, h, w), np.int16), mask, [[0, 0, 90.0]])
    cy = (h - 1) // 2
    for x in range(w):
        sy = x - 1.5  # cy + sin(90) * (x - cx)
        src = math.floor(sy + 0.5)
        want = rows[src] if 0 <= src < h else 0
        assert m[0, cy, x, 0] == want, f"x={x}: sy={sy} should take row {src}"


@pytest.mark.parametrize("backend", ALL)
def test_window_augment_flips_before_rotating(backend, rng):
    hu, mask = _slices(rng, 1, 9, 9)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(1))
    image, m = _augment(backend, hu, mask, [[1, 0, 90.0]])
    np.testing.assert_array_equal(m, np.rot90(np.flip(mask0, 2), 1, axes=(1, 2)))
    np.testing.assert_allclose(image, np.rot90(np.flip(image0, 2), 1, axes=(1, 2)), atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("h,w", [(16, 16), (15, 13)], ids=["16x16", "15x13"])
@pytest.mark.parametrize("angle", [20.0, -20.0], ids=["20deg", "-20deg"])
def test_window_augment_rotation_outside_is_air(backend, h, w, angle):
    """Water (0 HU) everywhere, mask all set: what maps off the slice is air and mask 0."""
    hu = np.zeros((1, h, w), np.int16)
    mask = np.ones((1, h, w), np.uint8)
    image, m = _augment(backend, hu, mask, [[0, 0, angle]])
    # source coordinates by the ops.py formula
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
    t = math.radians(angle)
    sy, sx = cy + math.cos(t) * y + math.sin(t) * x, cx + math.cos(t) * x - math.sin(t) * y
    far = (sy < -1) | (sy >= h) | (sx < -1) | (sx >= w)  # all four neighbours off
    inner = (sy >= 0) & (sy < h - 1) & (sx >= 0) & (sx < w - 1)  # all four on
    assert far[0, 0] and far[-1, -1] and far.sum() >= 4
    air, water = _window(np.array(AIR_HU), WINDOW_CENTER, WINDOW_WIDTH), _window(
        np.array(0.0), WINDOW_CENTER, WINDOW_WIDTH)
    np.testing.assert_allclose(image[0, far, 0], air, rtol=0, atol=1e-6)
    np.testing.assert_allclose(image[0, inner, 0], water, rtol=0, atol=1e-6)
    assert ((image >= air - 1e-6) & (image <= water + 1e-6)).all()
    on_slice = (np.floor(sy + 0.5) >= 0) & (np.floor(sy + 0.5) < h) & \
               (np.floor(sx + 0.5) >= 0) & (np.floor(sx + 0.5) < w)
    np.testing.assert_array_equal(m[0, ..., 0], on_slice.astype(np.uint8))
    assert not m[0, far, 0].any()


# --------------------------------------------------------------------------- confusion counts


def _count(logits, target):
    """TP, FP, FN per sample by explicit loops."""
    out = np.zeros((logits.shape[0], 3), np.int64)
    for i in range(logits.shape[0]):
        for z, t in zip(logits[i].ravel(), target[i].ravel(), strict=True):
            out[i] += [z > 0 and t != 0, z > 0 and t == 0, z <= 0 and t != 0]
    return out


CONFUSION = [  # N, H, W, target
    pytest.param(1, 7, 9, "random", id="n1-7x9"),
    pytest.param(3, 13, 11, "one-empty", id="n3-13x11-one-empty"),
    pytest.param(2, 4, 4, "empty", id="n2-4x4-all-empty"),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("n,h,w,kind", CONFUSION)
def test_confusion_counts(backend, rng, n, h, w, kind):
    z = rand(rng, n, h, w, 1)
    z[0, 0, :3, 0] = [0.0, -0.0, 1e-30]  # exactly zero is not positive; a tiny logit is
    inputs = dict(z=z, t=_target(rng, kind, n, h, w))

    def run(be, z, t):
        return dict(counts=be.confusion_counts(z, t))

    def run_torch(z, t):
        return dict(counts=T.confusion_counts(z, t))

    got = check_op(backend, run, run_torch, inputs, exact=("counts",))
    np.testing.assert_array_equal(got["counts"], _count(z, inputs["t"]))
    assert got["counts"].dtype == np.int64 and got["counts"].shape == (n, 3)


# --------------------------------------------------------------------------- argument errors


def _other_float(be):
    return np.float32 if be.dtype == np.float64 else np.float64


def _arr(be, *shape, dtype=None):
    return np.zeros(shape, dtype=be.dtype if dtype is None else dtype)


ERRORS = [  # id, call(backend), substrings the message must contain
    ("conv-x-wrong-dtype",
     lambda be: be.conv2d_forward(_arr(be, 1, 4, 4, 2, dtype=_other_float(be)),
                                  _arr(be, 3, 3, 3, 2), _arr(be, 3)),
     lambda be: ["conv2d_forward: x", f"must be a {be.dtype.name} NHWC array",
                 f"got {np.dtype(_other_float(be)).name} array of shape (1, 4, 4, 2)"]),
    ("conv-w-torch-layout-KCRS",
     lambda be: be.conv2d_forward(_arr(be, 1, 4, 4, 2), _arr(be, 3, 2, 3, 3), _arr(be, 3)),
     lambda be: ["conv2d_forward: w must be [K,3,3,C] or [K,1,1,C]", "got (3, 2, 3, 3)"]),
    ("conv-x-NCHW",
     lambda be: be.conv2d_forward(_arr(be, 1, 2, 8, 8), _arr(be, 3, 3, 3, 2), _arr(be, 3)),
     lambda be: ["conv2d_forward: w must have shape (", "3, 3, 8) (KRSC)", "got (3, 3, 3, 2)",
                 "axis 3: expected 8, got 2"]),
    ("upconv-w-torch-layout-CK22",
     lambda be: be.upconv2x2_forward(_arr(be, 1, 4, 4, 3), _arr(be, 3, 5, 2, 2), _arr(be, 5)),
     lambda be: ["upconv2x2_forward: w must have shape (", "2, 2, 3) (K22C)",
                 "got (3, 5, 2, 2)", "axis 1: expected 2, got 5"]),
    ("conv-x-3d",
     lambda be: be.conv2d_forward(_arr(be, 4, 4, 2), _arr(be, 3, 3, 3, 2), _arr(be, 3)),
     lambda be: ["conv2d_forward: x", "NHWC array (4 dims)", "got", "shape (4, 4, 2)"]),
    ("dice-logits-3d",
     lambda be: be.sigmoid_dice_loss(_arr(be, 2, 4, 4), _arr(be, 2, 4, 4, dtype=np.uint8)),
     lambda be: ["sigmoid_dice_loss: logits", "(4 dims)", "shape (2, 4, 4)"]),
    ("conv-x-strided",
     lambda be: be.conv2d_forward(_arr(be, 1, 8, 4, 2)[:, ::2], _arr(be, 3, 3, 3, 2),
                                  _arr(be, 3)),
     lambda be: ["conv2d_forward: x must be C-contiguous (NHWC)", "strided view"]),
    ("pool-x-transposed",
     lambda be: be.maxpool2x2_forward(_arr(be, 1, 2, 4, 4).transpose(0, 2, 3, 1)),
     lambda be: ["maxpool2x2_forward: x must be C-contiguous (NHWC)", "strided view"]),
    ("adam-grad-strided",
     lambda be: be.adam_step(_arr(be, 4), _arr(be, 8)[::2], _arr(be, 4), _arr(be, 4), 1, 1e-3),
     lambda be: ["adam_step: grad must be C-contiguous", "strided view"]),
    ("conv-dy-wrong-K",
     lambda be: be.conv2d_backward(_arr(be, 1, 4, 4, 3), _arr(be, 1, 4, 4, 2),
                                   _arr(be, 4, 3, 3, 2)),
     lambda be: ["conv2d_backward: dy must have shape (1, 4, 4, 4) (NHWK)",
                 "got (1, 4, 4, 3)", "axis 3: expected 4, got 3"]),
    ("upconv-dy-not-2x",
     lambda be: be.upconv2x2_backward(_arr(be, 1, 4, 4, 5), _arr(be, 1, 4, 4, 3),
                                      _arr(be, 5, 2, 2, 3)),
     lambda be: ["upconv2x2_backward: dy must have shape (1, 8, 8, 5)", "got (1, 4, 4, 5)",
                 "axis 1: expected 8, got 4"]),
    ("pool-dy-wrong-hw",
     lambda be: be.maxpool2x2_backward(_arr(be, 1, 3, 3, 2),
                                       _arr(be, 1, 3, 3, 2, dtype=np.uint8), (7, 9)),
     lambda be: ["maxpool2x2_backward: dy must have shape (", "3, 4,", "got (1, 3, 3, 2)",
                 "axis 2: expected 4, got 3"]),
    ("window-hu-float",
     lambda be: be.window_augment(np.zeros((1, 4, 4), np.float32),
                                  np.zeros((1, 4, 4), np.uint8), identity_augmentation(1)),
     lambda be: ["window_augment: hu must be a int16 NHW array", "got float32 array"]),
    ("window-aug-float64",
     lambda be: be.window_augment(np.zeros((1, 4, 4), np.int16),
                                  np.zeros((1, 4, 4), np.uint8), np.zeros((1, 3))),
     lambda be: ["window_augment: aug must be a float32", "got float64 array of shape (1, 3)"]),
    ("dice-target-bool",
     lambda be: be.sigmoid_dice_loss(_arr(be, 1, 4, 4, 1), np.zeros((1, 4, 4, 1), bool)),
     lambda be: ["sigmoid_dice_loss: target must be a uint8 NHW1 array", "got bool array"]),
]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("call,expect", [pytest.param(c, e, id=i) for i, c, e in ERRORS])
def test_bad_arguments_raise_value_error(backend, call, expect):
    be = get_backend(backend)
    with pytest.raises(ValueError) as info:
        call(be)
    for part in expect(be):
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_reference_is_float64():
    be = reference()
    assert be.name == "reference" and be.dtype == np.float64 and be.xp is np


@pytest.mark.parametrize("hw,c,k,r", [((40, 37), 16, 16, 3), ((40, 37), 32, 8, 3),
                                       ((4, 16), 4, 64, 3),
                                       ((40, 37), 16, 4, 1), ((9, 7), 64, 96, 3),
                                       ((9, 7), 64, 96, 1)])
def test_cpu_weight_gradient_is_bit_identical_for_any_thread_count(rng, hw, c, k, r):
    """dW is a sum over pixels; the CPU backend splits it the same way whatever the
    threads do (per-block partials added in block order at 40x37; at 9x7 the product is
    split over its columns instead), so the result cannot depend on how many threads
    there are or which thread took which block (exact resume relies on this)."""
    from nodulekit.engine.cpu import CPUBackend

    x = rng.standard_normal((2, *hw, c)).astype(np.float32)
    w = rng.standard_normal((k, r, r, c)).astype(np.float32)
    y = np.maximum(rng.standard_normal((2, *hw, k)), 0).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    results = [CPUBackend(threads=t).conv2d_backward(dy, x, w, y, relu=True)
               for t in (1, 2, 3, 2)]
    for dx, dw, db in results[1:]:
        assert np.array_equal(dw, results[0][1])
        assert np.array_equal(db, results[0][2])
        assert np.array_equal(dx, results[0][0])


# The register-blocked CPU kernels on their own, at the shapes where borders meet: one-pixel
# and one-row images, rows shorter than one 6-pixel block, leftovers after the last block,
# C not a multiple of 4 (weight-gradient groups of 1), K of several 16-channel blocks, and
# K % 16 == 8 (a last block of 8 channels).
V2_SHAPES = [  # N, H, W, C, K
    (1, 1, 1, 4, 16), (2, 1, 7, 3, 16), (1, 5, 2, 1, 32), (3, 4, 8, 8, 16),
    (1, 3, 13, 5, 32), (2, 7, 20, 16, 16), (1, 2, 9, 12, 48),
    (1, 4, 15, 8, 8), (2, 3, 9, 3, 24), (1, 1, 2, 16, 8),  # K % 16 == 8: an 8-channel block
]


@pytest.mark.parametrize("n,h,w,c,k", V2_SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_cpu_register_blocked_conv_kernels(rng, n, h, w, c, k, relu):
    """cpu_conv.conv3x3_rows and conv3x3_weight_grad_rows against the float64 reference,
    with the fp32 tolerance of opcheck (rounding of a sum of 9C or N*H*W terms)."""
    from nodulekit.engine import cpu_conv

    rtol, atol = TOLERANCES["fp32"]
    x64, w64 = rand(rng, n, h, w, c), rand(rng, k, 3, 3, c, scale=(2 / (9 * c)) ** .5)
    b64, dz64 = rand(rng, k, scale=0.5), rand(rng, n, h, w, k)
    ref = reference()
    want_y = ref.conv2d_forward(x64, w64, b64, relu)
    _, want_dw, _ = ref.conv2d_backward(dz64, x64, w64, want_y, False, False)
    x, wt, b, dz = (a.astype(np.float32) for a in (x64, w64, b64, dz64))

    y = np.full((n, h, w, k), np.nan, dtype=np.float32)
    cpu_conv.conv3x3_rows(x, np.ascontiguousarray(wt.reshape(k, -1).T), b, relu, y, 0, n * h)
    scale = np.abs(want_y).max()
    np.testing.assert_allclose(y, want_y, rtol=rtol, atol=atol * (9 * c) ** .5 * scale)

    # all rows at once, and one partial per row added up: both must agree
    whole = np.full((9 * c, k), np.nan, dtype=np.float32)
    cpu_conv.conv3x3_weight_grad_rows(x, dz, 0, n * h, whole)
    parts = np.zeros((9 * c, k))
    out = np.full((9 * c, k), np.nan, dtype=np.float32)
    for row in range(n * h):
        cpu_conv.conv3x3_weight_grad_rows(x, dz, row, row + 1, out)
        parts += out
    want_tk = want_dw.reshape(k, -1).T
    tol = atol * (n * h * w) ** .5 * np.abs(want_tk).max()
    np.testing.assert_allclose(whole, want_tk, rtol=rtol, atol=tol)
    np.testing.assert_allclose(parts, want_tk, rtol=rtol, atol=tol)


def test_cpu_register_blocked_relu_keeps_nan():
    """A NaN stays NaN through the fused ReLU (training's NaN check relies on seeing it)."""
    from nodulekit.engine import cpu_conv

    x = np.zeros((1, 3, 8, 1), dtype=np.float32)
    x[0, 1, 4, 0] = np.nan
    y = np.empty((1, 3, 8, 16), dtype=np.float32)
    cpu_conv.conv3x3_rows(x, np.ones((9, 16), dtype=np.float32), np.zeros(16, np.float32),
                          True, y, 0, 3)
    assert np.isnan(y[0, :, 3:6]).all() and not np.isnan(y[0, :, :3]).any()


def test_simd_refuses_arrays_its_flat_index_would_misread():
    """The vector loads index the data pointer flatly: a strided array must be refused
    when the kernel compiles, not read wrong."""
    from numba import njit
    from numba.core.errors import TypingError

    from nodulekit.engine.simd import load8, store8

    @njit
    def copy8(a, out):
        store8(out, 0, load8(a, 0))

    out = np.zeros(8, np.float32)
    copy8(np.arange(8, dtype=np.float32), out)
    assert np.array_equal(out, np.arange(8))
    with pytest.raises(TypingError, match="C-contiguous float32"):
        copy8(np.arange(16, dtype=np.float32)[::2], out)
    with pytest.raises(TypingError, match="C-contiguous float32"):
        copy8(np.arange(8, dtype=np.float64), out)

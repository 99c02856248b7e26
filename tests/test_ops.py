"""Every engine op, forward and backward side by side, on every backend, against the float64
reference and PyTorch: one suite, each test written once.

As tinygrad's test_ops.py has ``helper_test_op``, one helper, ``opcheck.check_op``, runs an op
on the backend under test, on the reference backend in float64 and in torch, and compares
every output, forward and backward, with the tolerance of the backend's precision
(``opcheck.TOLERANCES``). Each test is parametrised over the backends of tests/backends.py:
``reference`` (against torch in float64), ``cpu``, ``cuda-emu`` (the CUDA backend and its
kernels on the CPU emulator; runs in every CI run) and ``cuda`` (on a GPU: marked ``gpu``,
skipped saying why where none is usable). Ids end in the backend: ``-k cuda-emu`` selects the
emulator's share, ``-m gpu`` the GPU's.

Case tables hold small shapes every backend runs (odd sizes, C = 1, K = 1, batch 1) and, in
``*_CUDA_ONLY`` tables, shapes only the CUDA kernels need (several tiles and blocks, float4
and scalar paths, one and several reduction splits). Where an op has versions, they are
checked here too: the CPU convolution versions as backends ``cpu-<version>``, the CUDA
convolution versions and tf32 / bf16 precisions in their own tests beside the op's. Each test
seeds its generator from its own id.

Elsewhere: the CPU kernels on their own (test_cpu_backend.py), the tensor-core building
blocks (test_cuda_backend.py), the emulator itself (test_cuda_emu.py), the whole U-Net and
training runs on every backend (test_unet.py).
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
import pytest
from backends import (
    ALL_BACKENDS,
    CPU_CONV_VERSIONS,
    CUDA_BACKENDS,
    REFERENCE_AND_CPU,
    cuda_backend,
    each_backend,
    each_backend_and_case,
    on_gpu,
    to_device,
    to_host,
    torch_device,
)
from opcheck import (
    CONV_ATOL,
    GRID32_ATOL,
    ROUNDED_ATOL,
    WINDOW32_ATOL,
    assert_close,
    assert_outputs_within,
    check_op,
    rand,
    reference,
    round_operand,
)

from nodulekit.engine import get_backend
from nodulekit.engine.cuda import CONV_VARIANTS as CUDA_CONV_VARIANTS
from nodulekit.engine.ops import AIR_HU, WINDOW_CENTER, WINDOW_WIDTH, identity_augmentation
from nodulekit.reference import torch_ops as T

# --------------------------------------------------------------------------- convolution

ConvCase = namedtuple("ConvCase", "n h w c k r relu need_dx")  # NHWC in, K out, R x R

CONV = {
    "n1-7x9-c1-k1-3x3": ConvCase(1, 7, 9, 1, 1, 3, False, True),
    "n2-13x11-c3-k4-3x3-relu": ConvCase(2, 13, 11, 3, 4, 3, True, True),
    "n1-8x8-c3-k1-3x3-relu": ConvCase(1, 8, 8, 3, 1, 3, True, True),
    "n3-2x3-c5-k2-3x3-relu": ConvCase(3, 2, 3, 5, 2, 3, True, True),
    "n1-1x1-c2-k3-3x3": ConvCase(1, 1, 1, 2, 3, 3, False, True),
    "n2-5x6-c4-k3-1x1": ConvCase(2, 5, 6, 4, 3, 1, False, True),
    "n1-7x9-c3-k1-1x1-relu": ConvCase(1, 7, 9, 3, 1, 1, True, True),
    "n2-9x10-c16-k1-1x1-head": ConvCase(2, 9, 10, 16, 1, 1, False, True),
    "n1-5x5-c4-k1-1x1-relu-nodx": ConvCase(1, 5, 5, 4, 1, 1, True, False),
    "n2-6x5-c1-k4-3x3-relu-nodx": ConvCase(2, 6, 5, 1, 4, 3, True, False),
    # shapes the CPU backend gives to its register-blocked kernels (cpu_conv.py): K a
    # multiple of 16 and rows of >= 32 pixels (forward, dx) or >= 16 (dW)
    "n2-6x32-c1-k16-3x3-relu-nodx": ConvCase(2, 6, 32, 1, 16, 3, True, False),
    "n1-5x33-c3-k16-3x3-relu": ConvCase(1, 5, 33, 3, 16, 3, True, True),
    "n2-3x35-c16-k32-3x3-relu": ConvCase(2, 3, 35, 16, 32, 3, True, True),
    "n1-3x40-c5-k16-3x3": ConvCase(1, 3, 40, 5, 16, 3, False, True),
    "n1-2x16-c4-k64-3x3-relu": ConvCase(1, 2, 16, 4, 64, 3, True, True),
    "n2-4x34-c16-k8-3x3-relu": ConvCase(2, 4, 34, 16, 8, 3, True, True),
    # and to its packed kernels (cpu_conv_packed.py): K of 32-, 16- and 8-channel blocks,
    # rows narrower than a block and rows ending in an overlapping block, 3C not a
    # multiple of the weight gradient's tap groups
    "n2-5x9-c5-k56-3x3-relu": ConvCase(2, 5, 9, 5, 56, 3, True, True),
    "n1-4x3-c8-k40-3x3": ConvCase(1, 4, 3, 8, 40, 3, False, True),
    "n2-6x13-c12-k24-3x3-relu": ConvCase(2, 6, 13, 12, 24, 3, True, True),
    # and to Winograd's F(4x4, 3x3) (cpu_conv_winograd.py): sides multiples of 4, C and K of
    # 8; one tile (fewer than a register block's), blocks of 64 + 8 and 16 + 8 channels
    "n1-4x4-c16-k8-3x3": ConvCase(1, 4, 4, 16, 8, 3, False, True),
    "n3-12x8-c8-k72-3x3-relu": ConvCase(3, 12, 8, 8, 72, 3, True, True),
    "n2-8x20-c40-k24-3x3-relu": ConvCase(2, 8, 20, 40, 24, 3, True, True),
}
CONV_CUDA_ONLY = {  # several tiles of every CUDA kernel variant
    "n2-9x11-c20-k80-3x3-relu": ConvCase(2, 9, 11, 20, 80, 3, True, True),
    "n1-5x7-c33-k17-1x1": ConvCase(1, 5, 7, 33, 17, 1, False, True),
    "n2-16x17-c5-k40-3x3-relu": ConvCase(2, 16, 17, 5, 40, 3, True, True),
    "n3-12x10-c16-k16-3x3-relu": ConvCase(3, 12, 10, 16, 16, 3, True, True),
    "n2-12x12-c8-k1-1x1-head": ConvCase(2, 12, 12, 8, 1, 1, False, True),
    "n2-20x12-c1-k8-3x3-first": ConvCase(2, 20, 12, 1, 8, 3, True, False),
}


@each_backend_and_case((ALL_BACKENDS + CPU_CONV_VERSIONS, CONV), (CUDA_BACKENDS, CONV_CUDA_ONLY))
def test_conv2d(backend, case, rng):
    """Forward (bias + ReLU fused), data and weight gradients. ``cpu-<version>``: each CPU
    convolution version, held to it wherever it applies (plain ``cpu`` mixes them per
    shape); the CUDA versions: test_conv2d_every_version."""
    n, h, w, c, k, r, relu, need_dx = case
    device = torch_device(backend)
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, r, r, c, scale=(2 / (r * r * c)) ** .5),
                  b=rand(rng, k, scale=0.5), dy=rand(rng, n, h, w, k))

    def run(be, x, w, b, dy):
        y = be.conv2d_forward(x, w, b, relu)
        dx, dw, db = be.conv2d_backward(dy, x, w, y, relu, need_dx)
        return dict(y=y, dx=dx, dw=dw, db=db)

    def run_torch(x, w, b, dy):
        dx, dw, db = T.conv2d_backward(dy, x, w, b, relu, need_dx, device=device)
        return dict(y=T.conv2d_forward(x, w, b, relu, device=device), dx=dx, dw=dw, db=db)

    got = check_op(backend, run, run_torch, inputs,
                   reduce=dict(y=r * r * c, dx=k * r * r, dw=n * h * w, db=n * h * w))
    assert (got["dx"] is None) == (not need_dx)


@each_backend_and_case((ALL_BACKENDS + CPU_CONV_VERSIONS, CONV), (CUDA_BACKENDS, CONV_CUDA_ONLY))
def test_conv2d_bn_eval_forward(backend, case, rng):
    """The convolution with the batch norm of evaluation after it, as one op: against the
    float64 reference and torch (conv2d, then batch_norm on the running statistics), and
    bit for bit what the two ops give on the same backend (inference relies on it: a
    model validates the same either way)."""
    n, h, w, c, k, r, relu, _ = case
    device = torch_device(backend)
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, r, r, c, scale=(2 / (r * r * c)) ** .5),
                  gamma=1.0 + rand(rng, k, scale=0.5), beta=rand(rng, k, scale=0.5),
                  running_mean=rand(rng, k, scale=0.5), running_var=0.5 + rand(rng, k) ** 2)

    def run(be, x, w, gamma, beta, running_mean, running_var):
        return dict(y=be.conv2d_bn_eval_forward(x, w, gamma, beta, running_mean, running_var,
                                                relu=relu))

    def run_torch(x, w, gamma, beta, running_mean, running_var):
        z = T.conv2d_forward(x, w, np.zeros(k), device=device)
        y = T.batch_norm_forward(z, gamma, beta, running_mean, running_var, training=False,
                                 relu=relu, device=device)[0]
        return dict(y=y)

    got = check_op(backend, run, run_torch, inputs, reduce=dict(y=r * r * c))
    args = to_device(backend, *(inputs[name] for name in ("x", "w", "gamma", "beta",
                                                          "running_mean", "running_var")))
    x, wt, gamma, beta, rm, rv = args
    z = backend.conv2d_forward(x, wt, to_device(backend, np.zeros(k)))
    two_ops = backend.batch_norm_forward(z, gamma, beta, rm, rv, training=False, relu=relu)[0]
    np.testing.assert_array_equal(got["y"], to_host(backend, two_ops))
    if relu:
        assert (got["y"] >= 0).all()


@each_backend(*ALL_BACKENDS)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv2d_backward_without_bias_gradient(backend, rng, relu):
    """need_db=False (a convolution a norm follows has no bias): db is None, dx and dw are
    exactly what the full call gives."""
    x, w, b = to_device(backend, rand(rng, 2, 6, 9, 8), rand(rng, 16, 3, 3, 8, scale=0.2),
                        rand(rng, 16))
    y = backend.conv2d_forward(x, w, b, relu)
    dy = to_device(backend, rand(rng, 2, 6, 9, 16))
    full = to_host(backend, *backend.conv2d_backward(dy, x, w, y, relu))
    dx, dw, db = backend.conv2d_backward(dy, x, w, y, relu, need_db=False)
    assert db is None
    np.testing.assert_array_equal(to_host(backend, dx), full[0])
    np.testing.assert_array_equal(to_host(backend, dw), full[1])


# conv.cu / conv_mma.cu hold a progression of versions (cuda.CONV_VARIANTS, the first the
# readable direct kernel): each runs on its own backend, CudaBackend(precision,
# conv_variant=...), and is compared with the float64 reference, with the direct kernel on
# the same device and with torch, with the tolerance of its precision (opcheck.CONV_ATOL).
CUDA_DIRECT_CONV = next(iter(CUDA_CONV_VARIANTS))

CONV_VERSION_SHAPES = {  # odd sizes, channels off the tiles
    "n2-9x11-c20-k80-3x3-relu": ConvCase(2, 9, 11, 20, 80, 3, True, True),
    "n2-16x17-c5-k40-3x3-relu-splits": ConvCase(2, 16, 17, 5, 40, 3, True, True),
    "n1-5x7-c33-k17-1x1": ConvCase(1, 5, 7, 33, 17, 1, False, True),
    "n1-7x9-c3-k1-3x3": ConvCase(1, 7, 9, 3, 1, 3, False, True),
    "n2-6x5-c1-k4-3x3-first": ConvCase(2, 6, 5, 1, 4, 3, True, False),
    "n1-7x9-c8-k12-3x3-relu-vec4": ConvCase(1, 7, 9, 8, 12, 3, True, True),
    "n2-5x6-c16-k8-1x1-vec4": ConvCase(2, 5, 6, 16, 8, 1, False, True),
}


def _conv_all(be, inputs, case, mask=None):
    """Forward then backward on backend ``be``: host float64 arrays by name. With ``mask``
    (the tested kernel's y > 0) the backward takes dz = dy * mask and no ReLU: a y within
    rounding of 0 must not flip a gradient between two implementations."""
    x, w, b, dy = (inputs[key] for key in ("x", "w", "b", "dy"))
    xd, wd, bd = (be.asarray(a, dtype=be.dtype) for a in (x, w, b))
    y = be.conv2d_forward(xd, wd, bd, case.relu)
    if mask is None:
        dx, dw, db = be.conv2d_backward(be.asarray(dy, dtype=be.dtype), xd, wd, y, case.relu,
                                        case.need_dx)
    else:
        dz = be.asarray(dy * mask if case.relu else dy, dtype=be.dtype)
        dx, dw, db = be.conv2d_backward(dz, xd, wd, None, False, case.need_dx)
    return {k: None if v is None else np.asarray(be.to_host(v), dtype=np.float64)
            for k, v in dict(y=y, dx=dx, dw=dw, db=db).items()}


def _rounded(inputs, precision, keys):
    return {k: round_operand(v, precision) if k in keys else v for k, v in inputs.items()}


@each_backend_and_case((CUDA_BACKENDS, CONV_VERSION_SHAPES))
@pytest.mark.parametrize("variant", list(CUDA_CONV_VARIANTS))
def test_conv2d_every_version(backend, case, rng, variant):
    """Every CUDA convolution version: forward, data and weight gradients, against the
    float64 reference, the direct kernel on the same device and torch (float32, TF32 off),
    with the tolerance of the version's precision (CONV_ATOL); the tensor-core versions also
    against the reference on operands rounded as they round them (ROUNDED_ATOL)."""
    n, h, w, c, k, r, relu, need_dx = case
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, r, r, c, scale=(2 / (r * r * c)) ** .5),
                  b=rand(rng, k, scale=0.5), dy=rand(rng, n, h, w, k))
    be = cuda_backend(backend, conv_variant=variant)
    precision = be.precision
    reduce = dict(y=r * r * c, dx=k * r * r, dw=n * h * w, db=n * h * w)
    got = _conv_all(be, inputs, case)
    mask = (got["y"] > 0).astype(np.float64)
    ref = _conv_all(reference(), inputs, case, mask)
    atol = CONV_ATOL[precision]
    assert_outputs_within(got, ref, atol, reduce, f"{variant} vs reference")
    direct = _conv_all(cuda_backend(backend, conv_variant=CUDA_DIRECT_CONV), inputs, case, mask)
    assert_outputs_within(direct, ref, CONV_ATOL["fp32"], reduce,
                          f"{CUDA_DIRECT_CONV} vs reference")
    assert_outputs_within(got, direct, atol, reduce, f"{variant} vs {CUDA_DIRECT_CONV}")
    x, wt, b, dy = (inputs[key] for key in ("x", "w", "b", "dy"))
    dz = dy * mask if relu else dy
    device = torch_device(backend)
    dx_t, dw_t, db_t = T.conv2d_backward(dz, x, wt, b, False, need_dx, device=device)
    torch_out = {key: None if v is None else np.asarray(v, dtype=np.float64) for key, v in
                 dict(y=T.conv2d_forward(x, wt, b, relu, device=device), dx=dx_t, dw=dw_t,
                      db=db_t).items()}
    assert_outputs_within(got, torch_out, atol, reduce, f"{variant} vs torch")
    if precision != "fp32":  # exactly the rounding the kernels do, and nothing else
        ref_r = _conv_all(reference(), _rounded(inputs, precision, ("x", "w", "dy")), case,
                          mask)
        ref_r["db"] = ref["db"]  # the bias gradient sums dz in fp32 (reduce.cu), unrounded
        assert_outputs_within(got, ref_r, ROUNDED_ATOL, reduce,
                              f"{variant} vs reference on {precision} operands")
        if c * r * r > 8:  # the rounding is visible: fp32 results fail that check
            with pytest.raises(AssertionError):
                assert_outputs_within({"y": direct["y"]}, {"y": ref_r["y"]}, ROUNDED_ATOL,
                                      reduce, "")


# --------------------------------------------------------------------------- max-pool

PoolCase = namedtuple("PoolCase", "n h w c")

POOL = {
    "n1-7x9-c1": PoolCase(1, 7, 9, 1),
    "n2-8x8-c3": PoolCase(2, 8, 8, 3),
    "n2-13x11-c2": PoolCase(2, 13, 11, 2),
    "n1-2x3-c1": PoolCase(1, 2, 3, 1),
    "n3-3x2-c4": PoolCase(3, 3, 2, 4),
}
POOL_CUDA_ONLY = {  # the float4 path (C % 4 == 0), odd sizes, many blocks
    "n2-9x7-c8-vec4": PoolCase(2, 9, 7, 8),
    "n3-34x30-c12-vec4": PoolCase(3, 34, 30, 12),
    "n2-33x31-c5": PoolCase(2, 33, 31, 5),
}


@each_backend_and_case((ALL_BACKENDS, POOL), (CUDA_BACKENDS, POOL_CUDA_ONLY))
def test_maxpool2x2(backend, case, rng):
    n, h, w, c = case
    device = torch_device(backend)
    inputs = dict(x=rand(rng, n, h, w, c), dy=rand(rng, n, h // 2, w // 2, c))

    def run(be, x, dy):
        y, argmax = be.maxpool2x2_forward(x)
        return dict(y=y, argmax=argmax, dx=be.maxpool2x2_backward(dy, argmax, (h, w)))

    def run_torch(x, dy):
        y, argmax = T.maxpool2x2_forward(x, device=device)
        return dict(y=y, argmax=argmax, dx=T.maxpool2x2_backward(dy, x, device=device))

    got = check_op(backend, run, run_torch, inputs, exact=("y", "argmax", "dx"))
    assert got["y"].shape == (n, h // 2, w // 2, c)
    assert got["dx"].shape == (n, h, w, c)


def _first_max_codes(x, shape):
    """Argmax codes by explicit loops: the first maximum of each window in row-major order."""
    codes = np.zeros(shape, np.uint8)
    for idx in np.ndindex(*shape):
        nn, i, j, cc = idx
        window = [x[nn, 2 * i + a, 2 * j + b, cc] for a in (0, 1) for b in (0, 1)]
        codes[idx] = window.index(max(window))
    return codes


@each_backend(*ALL_BACKENDS)
def test_maxpool2x2_first_max_wins(backend, rng):
    """Ties (values in {0, 1}, all-equal windows included): the first in row-major order."""
    x = rng.integers(0, 2, (2, 6, 8, 3)).astype(np.float64)
    x[0, :2, :2, :] = 1.0  # a window of four equal values
    y, argmax = to_host(backend, *backend.maxpool2x2_forward(to_device(backend, x)))
    np.testing.assert_array_equal(argmax, _first_max_codes(x, (2, 3, 4, 3)))
    assert argmax[0, 0, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(y, x.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4)))


@each_backend(*ALL_BACKENDS)
@pytest.mark.parametrize("h,w", [(7, 9), (5, 4), (4, 7)], ids=["7x9", "5x4", "4x7"])
def test_maxpool2x2_odd_size_drops_last(backend, rng, h, w):
    """H // 2, W // 2 as in PyTorch: the odd last row/column is never picked, gets dx = 0."""
    x = rand(rng, 1, h, w, 2)
    x[:, h - 1, :, :] += 100.0 * (h % 2)  # would win every window if it took part
    x[:, :, w - 1, :] += 100.0 * (w % 2)
    y, argmax = backend.maxpool2x2_forward(to_device(backend, x))
    dy = to_device(backend, np.ones((1, h // 2, w // 2, 2)))
    dx = to_host(backend, backend.maxpool2x2_backward(dy, argmax, (h, w)))
    assert to_host(backend, y).shape == (1, h // 2, w // 2, 2)
    np.testing.assert_array_equal(to_host(backend, y),
                                  x[:, :h // 2 * 2, :w // 2 * 2].reshape(
                                      1, h // 2, 2, w // 2, 2, 2).max(axis=(2, 4)))
    assert dx.shape == (1, h, w, 2)
    assert not dx[:, h // 2 * 2:].any() and not dx[:, :, w // 2 * 2:].any()
    assert dx.sum() == (h // 2) * (w // 2) * 2


@each_backend(*ALL_BACKENDS)
@pytest.mark.parametrize("c", [3, 4], ids=["scalar", "vec4"])
def test_maxpool2x2_ties_and_odd_sizes(backend, rng, c):
    """Both at once, through the CUDA kernels' scalar and float4 paths (C = 3, 4): the first
    maximum in row-major order wins (values in {0, 1}); the odd last row/column is dropped."""
    x = rng.integers(0, 2, (2, 7, 9, c)).astype(np.float64)
    x[0, :2, :2, :] = 1.0
    x[:, 6, :, :] = x[:, :, 8, :] = 100.0  # would win every window it took part in
    y, argmax = to_host(backend, *backend.maxpool2x2_forward(to_device(backend, x)))
    expect = _first_max_codes(x, (2, 3, 4, c))
    np.testing.assert_array_equal(argmax, expect)
    np.testing.assert_array_equal(y, x[:, :6, :8].reshape(2, 3, 2, 4, 2, c).max(axis=(2, 4)))
    dx = to_host(backend, backend.maxpool2x2_backward(to_device(backend, np.ones((2, 3, 4, c))),
                                                      to_device(backend, expect), (7, 9)))
    assert dx.shape == (2, 7, 9, c) and dx.sum() == 2 * 3 * 4 * c
    assert not dx[:, 6].any() and not dx[:, :, 8].any()


# --------------------------------------------------------------------------- up-convolution

UpconvCase = namedtuple("UpconvCase", "n h w c k")  # NHWC in, K out, stride 2

UPCONV = {
    "n1-3x5-c1-k1": UpconvCase(1, 3, 5, 1, 1),
    "n2-4x4-c3-k2": UpconvCase(2, 4, 4, 3, 2),
    "n1-7x6-c2-k3": UpconvCase(1, 7, 6, 2, 3),
    "n2-1x1-c4-k1": UpconvCase(2, 1, 1, 4, 1),
    # the CPU backend's register-blocked version: forward needs K % 8, backward C % 16;
    # packed (version 3): K % 8 and, backward, C % 8
    "n2-3x5-c16-k16": UpconvCase(2, 3, 5, 16, 16),
    "n2-3x9-c24-k72": UpconvCase(2, 3, 9, 24, 72),
    "n1-4x7-c32-k48": UpconvCase(1, 4, 7, 32, 48),
    "n1-2x3-c16-k20": UpconvCase(1, 2, 3, 16, 20),
    "n2-5x3-c8-k16": UpconvCase(2, 5, 3, 8, 16),
    "n1-3x4-c16-k8": UpconvCase(1, 3, 4, 16, 8),
    "n2-2x5-c5-k24": UpconvCase(2, 2, 5, 5, 24),
}
UPCONV_CUDA_ONLY = {  # several row / column / reduction tiles
    "n2-9x10-c20-k19": UpconvCase(2, 9, 10, 20, 19),
    "n1-6x7-c130-k3": UpconvCase(1, 6, 7, 130, 3),
    "n3-11x9-c4-k40": UpconvCase(3, 11, 9, 4, 40),
}


def _upconv_inputs(rng, case):
    n, h, w, c, k = case
    return dict(x=rand(rng, n, h, w, c), w=rand(rng, k, 2, 2, c, scale=c ** -.5),
                b=rand(rng, k, scale=0.5), dy=rand(rng, n, 2 * h, 2 * w, k))


def _upconv_reduce(case):
    n, h, w, c, k = case
    return dict(y=c, dx=4 * k, dw=n * h * w, db=4 * n * h * w)


@each_backend_and_case((ALL_BACKENDS + CPU_CONV_VERSIONS, UPCONV),
                       (CUDA_BACKENDS, UPCONV_CUDA_ONLY))
def test_upconv2x2(backend, case, rng):
    device = torch_device(backend)

    def run(be, x, w, b, dy):
        dx, dw, db = be.upconv2x2_backward(dy, x, w)
        return dict(y=be.upconv2x2_forward(x, w, b), dx=dx, dw=dw, db=db)

    def run_torch(x, w, b, dy):
        dx, dw, db = T.upconv2x2_backward(dy, x, w, device=device)
        return dict(y=T.upconv2x2_forward(x, w, b, device=device), dx=dx, dw=dw, db=db)

    check_op(backend, run, run_torch, _upconv_inputs(rng, case), reduce=_upconv_reduce(case))


def _upconv_all(be, inputs):
    """Forward and backward on backend ``be``: host float64 arrays by name."""
    xd, wd, bd, dyd = (be.asarray(inputs[key], dtype=be.dtype) for key in ("x", "w", "b", "dy"))
    dx, dw, db = be.upconv2x2_backward(dyd, xd, wd)
    return {k: np.asarray(be.to_host(v), dtype=np.float64)
            for k, v in dict(y=be.upconv2x2_forward(xd, wd, bd), dx=dx, dw=dw, db=db).items()}


@each_backend_and_case((CUDA_BACKENDS, UPCONV | UPCONV_CUDA_ONLY))
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_upconv2x2_every_precision(backend, case, rng, precision):
    """The up-convolution on tensor cores (CudaBackend(precision=tf32/bf16)): against the
    float64 reference and torch with the precision's tolerance (CONV_ATOL), against the
    reference on operands rounded as the kernels round them (ROUNDED_ATOL), and against
    the fp32 kernels of upconv.cu."""
    inputs, reduce = _upconv_inputs(rng, case), _upconv_reduce(case)
    got = _upconv_all(cuda_backend(backend, precision), inputs)
    ref = _upconv_all(reference(), inputs)
    atol = CONV_ATOL[precision]
    assert_outputs_within(got, ref, atol, reduce, f"upconv {precision} vs reference")
    assert_outputs_within(got, _upconv_all(cuda_backend(backend, "fp32"), inputs), atol,
                          reduce, f"upconv {precision} vs fp32 kernels")
    x, wt, b, dy = (inputs[key] for key in ("x", "w", "b", "dy"))
    device = torch_device(backend)
    dx_t, dw_t, db_t = T.upconv2x2_backward(dy, x, wt, device=device)
    torch_out = {key: np.asarray(v, dtype=np.float64) for key, v in
                 dict(y=T.upconv2x2_forward(x, wt, b, device=device), dx=dx_t, dw=dw_t,
                      db=db_t).items()}
    assert_outputs_within(got, torch_out, atol, reduce, f"upconv {precision} vs torch")
    ref_r = _upconv_all(reference(), _rounded(inputs, precision, ("x", "w", "dy")))
    ref_r["db"] = ref["db"]  # summed in fp32 from the unrounded dy
    assert_outputs_within(got, ref_r, ROUNDED_ATOL, reduce,
                          f"upconv {precision} vs reference on {precision} operands")


# --------------------------------------------------------------------------- concat / split

ConcatCase = namedtuple("ConcatCase", "n h w ca cb")  # channels of the two halves

CONCAT = {
    "n1-7x9-ca1-cb2": ConcatCase(1, 7, 9, 1, 2),
    "n2-4x5-ca3-cb1": ConcatCase(2, 4, 5, 3, 1),
    "n1-3x3-ca2-cb2": ConcatCase(1, 3, 3, 2, 2),
}
CONCAT_CUDA_ONLY = {  # the float4 path, and halves that take different paths
    "n2-5x7-ca8-cb4-vec4": ConcatCase(2, 5, 7, 8, 4),
    "n2-9x40-ca16-cb16-vec4": ConcatCase(2, 9, 40, 16, 16),
    "n1-6x6-ca4-cb6-mixed": ConcatCase(1, 6, 6, 4, 6),
}


@each_backend_and_case((ALL_BACKENDS, CONCAT), (CUDA_BACKENDS, CONCAT_CUDA_ONLY))
def test_concat_split_channels(backend, case, rng):
    n, h, w, ca, cb = case
    device = torch_device(backend)
    inputs = dict(a=rand(rng, n, h, w, ca), b=rand(rng, n, h, w, cb),
                  dy=rand(rng, n, h, w, ca + cb))

    def run(be, a, b, dy):
        da, db = be.split_channels(dy, ca)
        return dict(y=be.concat_channels(a, b), da=da, db=db)

    def run_torch(a, b, dy):
        da, db = T.split_channels(dy, ca, device=device)
        return dict(y=T.concat_channels(a, b, device=device), da=da, db=db)

    got = check_op(backend, run, run_torch, inputs, exact=("y", "da", "db"))
    np.testing.assert_array_equal(got["y"][..., :ca], inputs["a"])  # the skip goes first


# ------------------------------------------------------- the decoder's fused up-conv + concat

UpconvConcatCase = namedtuple("UpconvConcatCase", "n h w c k cs")  # cs: skip channels

UPCONCAT = {
    "n1-3x5-c4-k3-cs2": UpconvConcatCase(1, 3, 5, 4, 3, 2),
    "n2-2x3-c1-k5-cs7": UpconvConcatCase(2, 2, 3, 1, 5, 7),
    "n1-1x1-c3-k1-cs1": UpconvConcatCase(1, 1, 1, 3, 1, 1),
    "n2-3x7-c32-k16-cs16": UpconvConcatCase(2, 3, 7, 32, 16, 16),
    "n1-5x2-c16-k32-cs3": UpconvConcatCase(1, 5, 2, 16, 32, 3),
    "n2-4x7-c16-k8-cs8": UpconvConcatCase(2, 4, 7, 16, 8, 8),
    "n2-3x9-c24-k40-cs5": UpconvConcatCase(2, 3, 9, 24, 40, 5),
}


@each_backend_and_case((REFERENCE_AND_CPU + CPU_CONV_VERSIONS, UPCONCAT))
def test_upconv2x2_concat_and_split_backward(backend, case, rng):
    """The U-Net's decoder pair as one op equals concat(skip, upconv) and, backward,
    split then upconv backward (the CPU backend scatters into / gathers from the concat
    buffer directly). ``cpu-<version>``: each CPU version held to it (register_blocked
    reads and writes the concat buffer in place where K % 8 == 0 forward and C % 16 == 0
    backward, packed where K % 8 == 0 and, backward, C % 8 == 0; patches_gemm goes through
    a temporary)."""
    n, h, w, c, k, cs = case
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


def _assert_fused_is_plain(be, rng, case):
    """The fused decoder entry points give exactly what concat / split around the plain
    up-convolution give, on backend ``be``."""
    n, h, w, c, k, cs = case
    skip, x, wt, b = to_device(be, rand(rng, n, 2 * h, 2 * w, cs), rand(rng, n, h, w, c),
                               rand(rng, k, 2, 2, c), rand(rng, k))
    fused = to_host(be, be.upconv2x2_concat_forward(skip, x, wt, b))
    plain = to_host(be, be.concat_channels(skip, be.upconv2x2_forward(x, wt, b)))
    np.testing.assert_array_equal(fused, plain)
    dcat = to_device(be, rand(rng, n, 2 * h, 2 * w, cs + k))
    fused = to_host(be, *be.upconv2x2_split_backward(dcat, cs, x, wt))
    dskip, dup = be.split_channels(dcat, cs)
    plain = (to_host(be, dskip), *to_host(be, *be.upconv2x2_backward(dup, x, wt)))
    for name, f, p in zip(("dskip", "dx", "dw", "db"), fused, plain, strict=True):
        np.testing.assert_array_equal(f, p, err_msg=name)


@each_backend_and_case((CUDA_BACKENDS, {"scalar": UpconvConcatCase(2, 3, 5, 4, 5, 3),
                                        "vec4": UpconvConcatCase(1, 4, 4, 12, 8, 8)}))
def test_upconv_straight_into_the_concat_buffer(backend, case, rng):
    """The CUDA kernels write and read their channels of the concat buffer exactly as the
    plain calls plus concat / split do (float4 and scalar copies)."""
    _assert_fused_is_plain(backend, rng, case)


@each_backend(*CUDA_BACKENDS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_upconv_mma_straight_into_the_concat_buffer(backend, rng, precision):
    """The same for the tensor-core up-convolution."""
    _assert_fused_is_plain(cuda_backend(backend, precision), rng,
                           UpconvConcatCase(2, 3, 5, 20, 19, 3))


# --------------------------------------------------------------------------- Dice loss

DiceCase = namedtuple("DiceCase", "n h w target smooth scale")  # scale: of the logits

DICE = {
    "n1-7x9-random": DiceCase(1, 7, 9, "random", 1.0, 3.0),
    "n3-13x11-one-empty": DiceCase(3, 13, 11, "one-empty", 1.0, 3.0),
    "n2-8x8-all-empty": DiceCase(2, 8, 8, "empty", 1.0, 3.0),
    "n2-5x6-all-empty-smooth0": DiceCase(2, 5, 6, "empty", 0.0, 3.0),
    "n2-4x4-full-smooth0.5": DiceCase(2, 4, 4, "full", 0.5, 3.0),
    "n2-6x7-random-saturated": DiceCase(2, 6, 7, "random", 1.0, 20.0),
}
DICE_CUDA_ONLY = {  # the float4 and scalar paths, several blocks; logits far past saturation
    "n3-40x36-random-vec4": DiceCase(3, 40, 36, "random", 1.0, 3.0),
    "n2-37x41-one-empty-scalar": DiceCase(2, 37, 41, "one-empty", 1.0, 3.0),
    "n2-16x16-extreme-logits": DiceCase(2, 16, 16, "random", 1.0, 200.0),
}


def _target(rng, kind, n, h, w):
    t = (rng.random((n, h, w, 1)) < 0.3).astype(np.uint8)
    if kind == "empty":
        t[:] = 0
    elif kind == "full":
        t[:] = 1
    elif kind == "one-empty":
        t[1] = 0
    return t


@each_backend_and_case((ALL_BACKENDS, DICE), (CUDA_BACKENDS, DICE_CUDA_ONLY))
def test_sigmoid_dice_loss(backend, case, rng):
    n, h, w, kind, smooth, scale = case
    device = torch_device(backend)
    inputs = dict(z=rand(rng, n, h, w, 1, scale=scale), t=_target(rng, kind, n, h, w))

    def run(be, z, t):
        loss, dice, dz = be.sigmoid_dice_loss(z, t, smooth)
        return dict(loss=loss, dice=dice, dlogits=dz)

    def run_torch(z, t):
        loss, dice, dz = T.sigmoid_dice_loss(z, t, smooth, device=device)
        return dict(loss=loss, dice=dice, dlogits=dz)

    got = check_op(backend, run, run_torch, inputs,
                   reduce=dict(loss=n * h * w, dice=h * w, dlogits=h * w),
                   free_float=("loss", "dice"))
    assert got["loss"].shape == () and got["dice"].shape == (n,)
    assert_close(got["loss"], np.mean(1 - got["dice"]), backend.precision, n,
                 "loss = mean(1 - dice)")
    assert np.isfinite(got["dlogits"]).all()
    if backend.name == "cuda":  # the CUDA backend keeps the sums and the loss in float64
        assert got["loss"].dtype == np.float64 and got["dice"].dtype == np.float64


# --------------------------------------------------------------------------- Adam

AdamCase = namedtuple("AdamCase", "size step lr beta1 beta2 eps offset")
# offset 1: param, grad, m and v are views that start one float into their buffers

ADAM = {
    "size1-step1": AdamCase(1, 1, 1e-3, 0.9, 0.999, 1e-8, 0),
    "size7-step3": AdamCase(7, 3, 1e-3, 0.9, 0.999, 1e-8, 0),
    "size1000-step1-lr1e-4": AdamCase(1000, 1, 1e-4, 0.9, 0.999, 1e-8, 0),
    "size257-step10-betas.5-.9": AdamCase(257, 10, 0.1, 0.5, 0.9, 1e-6, 0),
}
ADAM_CUDA_ONLY = {  # misaligned views take the scalar kernel (float4 needs 16-byte alignment)
    **{f"{case_id}-misaligned": case._replace(offset=1) for case_id, case in ADAM.items()},
    "size100003-step7": AdamCase(100003, 7, 1e-3, 0.9, 0.999, 1e-8, 0),
    "size100003-step7-misaligned": AdamCase(100003, 7, 1e-3, 0.9, 0.999, 1e-8, 1),
}


def _shifted(be, a):
    """The values of ``a`` in a view that starts one element into a longer buffer."""
    buf = be.zeros((a.size + 1,), a.dtype)
    buf[1:] = a
    return buf[1:]


@each_backend_and_case((ALL_BACKENDS, ADAM), (CUDA_BACKENDS, ADAM_CUDA_ONLY))
def test_adam_step(backend, case, rng):
    """One step from a given state (m, v after step - 1 steps) against torch.optim.Adam."""
    size, step, lr, beta1, beta2, eps, offset = case
    device = torch_device(backend)
    inputs = dict(param=rand(rng, size), grad=rand(rng, size), m=rand(rng, size, scale=0.1),
                  v=np.abs(rand(rng, size, scale=0.1)))

    def run(be, param, grad, m, v):
        if offset:
            param, grad, m, v = (_shifted(be, a) for a in (param, grad, m, v))
        out = be.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps)
        assert out is None, "adam_step works in place"
        return dict(param=param, m=m, v=v)

    def run_torch(param, grad, m, v):
        p, m, v = T.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, device=device)
        return dict(param=p, m=m, v=v)

    check_op(backend, run, run_torch, inputs)


@each_backend(*CUDA_BACKENDS)
def test_adam_step_where_eps_matters(backend, rng):
    """Gradients of ~1e-9 from zero state: sqrt(v_hat) ~ eps, so eps outside the square
    root (PyTorch) or anywhere else gives a visibly different step."""
    size, device = 64, torch_device(backend)
    inputs = dict(param=rand(rng, size), grad=rand(rng, size, scale=1e-9),
                  m=np.zeros(size), v=np.zeros(size))

    def run(be, param, grad, m, v):
        be.adam_step(param, grad, m, v, 1, 1e-3)
        return dict(param=param, m=m, v=v)

    def run_torch(param, grad, m, v):
        p, m, v = T.adam_step(param, grad, m, v, 1, 1e-3, device=device)
        return dict(param=p, m=m, v=v)

    check_op(backend, run, run_torch, inputs)


@each_backend_and_case((ALL_BACKENDS, {"5": 5, "300": 300}), (CUDA_BACKENDS, {"4099": 4099}))
def test_adam_20_steps(backend, case, rng):
    """Twenty steps from zero state against one torch.optim.Adam stepping 20 times."""
    size, steps, device = case, 20, torch_device(backend)
    inputs = dict(param=rand(rng, size), grads=rand(rng, steps, size))

    def run(be, param, grads):
        m, v = be.zeros(param.shape), be.zeros(param.shape)
        for i in range(steps):
            be.adam_step(param, grads[i], m, v, i + 1, 1e-2)
        return dict(param=param, m=m, v=v)

    def run_torch(param, grads):
        p, m, v = T.adam_steps(param, list(grads), 1e-2, device=device)
        return dict(param=p, m=m, v=v)

    check_op(backend, run, run_torch, inputs, reduce=dict(param=steps, m=steps, v=steps))


# --------------------------------------------------------------------------- window_augment


def _slices(rng, n, h, w):
    hu = rng.integers(-1200, 1500, (n, h, w)).astype(np.int16)  # past both ends of windows
    mask = np.where(rng.random((n, h, w)) < 0.4, 255, 0).astype(np.uint8)  # nonzero -> 1
    return hu, mask


def _augment(be, hu, mask, aug, window=(WINDOW_CENTER, WINDOW_WIDTH)):
    out = be.window_augment(be.asarray(hu), be.asarray(mask),
                            be.asarray(np.asarray(aug, np.float32)), *window)
    return to_host(be, *out)


def _window(hu, center, width):
    """The ops.py formula, in float64."""
    return np.clip((hu.astype(np.float64) - (center - width / 2)) / width, 0, 1)


WindowCase = namedtuple("WindowCase", "n h w")

WINDOW = {
    "n4-16x16": WindowCase(4, 16, 16),
    "n4-13x11": WindowCase(4, 13, 11),
    "n2-7x9": WindowCase(2, 7, 9),
    "n1-2x3": WindowCase(1, 2, 3),
}
WINDOW_CUDA_ONLY = {  # a row wider than one block of 256 threads; several blocks
    "n2-5x300": WindowCase(2, 5, 300),
    "n3-33x29": WindowCase(3, 33, 29),
}


@each_backend_and_case((ALL_BACKENDS, WINDOW), (CUDA_BACKENDS, WINDOW_CUDA_ONLY))
def test_window_augment(backend, case, rng):
    """Random flips and angles in [-20, 20]: against the reference and grid_sample."""
    n, h, w = case
    device = torch_device(backend)
    hu, mask = _slices(rng, n, h, w)
    aug = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.5, rng.uniform(-20, 20, n)], 1)
    inputs = dict(hu=hu, mask=mask, aug=aug.astype(np.float32))

    def run(be, hu, mask, aug):
        image, m = be.window_augment(hu, mask, be.asarray(aug, dtype=np.float32))
        return dict(image=image, mask=m)

    def run_torch(hu, mask, aug):  # grid_sample rounds nearest half-to-even: no ties here
        image, m = T.window_augment(hu, mask, aug.astype(np.float32), dtype=aug.dtype,
                                    device=device)
        return dict(image=image, mask=m)

    # torch's float32 grid moves a sample by ~size * 6e-8 px: GRID32_ATOL is sized for 16 px
    got = check_op(backend, run, run_torch, inputs, reduce=dict(image=4), exact=("mask",),
                   torch32_atol=dict(image=GRID32_ATOL * max(h, w, 16) / 16))
    assert got["image"].shape == (n, h, w, 1) and got["mask"].shape == (n, h, w, 1)
    assert set(np.unique(got["mask"])) <= {0, 1}


WINDOWS = [
    pytest.param(WINDOW_CENTER, WINDOW_WIDTH, id="lung-c-500-w1600"),
    pytest.param(40.0, 400.0, id="soft-c40-w400"),
    pytest.param(0.5, 3.0, id="narrow-c0.5-w3"),
]

# The exact geometry checks below run on the reference and CPU backends; the CUDA backends
# have test_window_augment_identity_and_flips and test_window_augment_matches_the_cpu_backend.


@each_backend(*REFERENCE_AND_CPU)
@pytest.mark.parametrize("center,width", WINDOWS)
def test_window_augment_identity_is_the_window_formula(backend, rng, center, width):
    hu, mask = _slices(rng, 3, 9, 12)
    hu[0, 0, :4] = [-32768, 32767, int(center - width / 2), int(center + width / 2)]
    image, m = _augment(backend, hu, mask, identity_augmentation(3), (center, width))
    # exact in float64; within float32 rounding of the formula otherwise
    tol = 0.0 if backend.dtype == np.float64 else WINDOW32_ATOL
    np.testing.assert_allclose(image[..., 0], _window(hu, center, width), rtol=0, atol=tol)
    np.testing.assert_array_equal(m[..., 0], (mask != 0).astype(np.uint8))


SQUARE_AND_NOT = [pytest.param(8, 8, id="8x8"), pytest.param(9, 9, id="9x9"),
                  pytest.param(7, 10, id="7x10")]
# flip_h, flip_v, and the axes of the (N, H, W, 1) image they flip
FLIPS = {"hflip": (1, 0, (2,)), "vflip": (0, 1, (1,)), "both": (1, 1, (1, 2))}


@each_backend(*REFERENCE_AND_CPU)
@pytest.mark.parametrize("h,w", SQUARE_AND_NOT)
@pytest.mark.parametrize("flip_h,flip_v,axes", FLIPS.values(), ids=FLIPS.keys())
def test_window_augment_flips_are_np_flip(backend, rng, h, w, flip_h, flip_v, axes):
    hu, mask = _slices(rng, 2, h, w)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(2))
    image, m = _augment(backend, hu, mask, [[flip_h, flip_v, 0.0]] * 2)
    np.testing.assert_array_equal(image, np.flip(image0, axis=axes))
    np.testing.assert_array_equal(m, np.flip(mask0, axis=axes))


@each_backend(*REFERENCE_AND_CPU)
@pytest.mark.parametrize("size", [8, 9], ids=["8x8", "9x9"])
@pytest.mark.parametrize("k", [1, 2, 3], ids=["90deg", "180deg", "270deg"])
def test_window_augment_rotation_by_90_is_np_rot90(backend, rng, size, k):
    """Counter-clockwise as np.rot90: exact on the mask, to rounding on the image."""
    hu, mask = _slices(rng, 2, size, size)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(2))
    image, m = _augment(backend, hu, mask, [[0, 0, 90.0 * k]] * 2)
    np.testing.assert_array_equal(m, np.rot90(mask0, k, axes=(1, 2)))
    np.testing.assert_allclose(image, np.rot90(image0, k, axes=(1, 2)), rtol=0, atol=1e-6)


@each_backend(*REFERENCE_AND_CPU)
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


@each_backend(*REFERENCE_AND_CPU)
def test_window_augment_flips_before_rotating(backend, rng):
    hu, mask = _slices(rng, 1, 9, 9)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(1))
    image, m = _augment(backend, hu, mask, [[1, 0, 90.0]])
    np.testing.assert_array_equal(m, np.rot90(np.flip(mask0, 2), 1, axes=(1, 2)))
    np.testing.assert_allclose(image, np.rot90(np.flip(image0, 2), 1, axes=(1, 2)), atol=1e-6)


@each_backend(*REFERENCE_AND_CPU)
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


@each_backend(*CUDA_BACKENDS)
def test_window_augment_identity_and_flips(backend, rng):
    """The lung window's formula (within float32 rounding) and the three flips, exactly."""
    hu, mask = _slices(rng, 2, 9, 12)
    image0, mask0 = _augment(backend, hu, mask, identity_augmentation(2))
    window = np.clip((hu.astype(np.float64) + 1300) / 1600, 0, 1)
    np.testing.assert_allclose(image0[..., 0], window, rtol=0, atol=2.0**-23)
    np.testing.assert_array_equal(mask0[..., 0], (mask != 0).astype(np.uint8))
    for flip_h, flip_v, axes in FLIPS.values():
        image, m = _augment(backend, hu, mask, [[flip_h, flip_v, 0.0]] * 2)
        np.testing.assert_array_equal(image, np.flip(image0, axis=axes))
        np.testing.assert_array_equal(m, np.flip(mask0, axis=axes))


@each_backend_and_case((CUDA_BACKENDS, {"16x16": WindowCase(4, 16, 16),
                                        "33x29": WindowCase(3, 33, 29),
                                        "8x300": WindowCase(2, 8, 300)}))
def test_window_augment_matches_the_cpu_backend(backend, case, rng):
    """The source coordinates and the mask's rounding run in float64 in the CPU's order of
    operations, the bilinear weights and the window in float32: the mask matches the CPU
    backend except where CUDA's cos/sin differ from the host's in the last bit and that
    moves a pixel across an exact .5 tie (rare; the emulator uses the host's libm and must
    match exactly), the image within a few float32 ulps."""
    n, h, w = case
    hu, mask = _slices(rng, n, h, w)
    aug = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.5, rng.uniform(-20, 20, n)],
                   1).astype(np.float32)
    aug[0] = (0, 0, 90.0)  # exact ties for the mask on every pixel of a row or column
    image, m = _augment(backend, hu, mask, aug)
    image_cpu, m_cpu = get_backend("cpu").window_augment(hu, mask, aug)
    np.testing.assert_allclose(image, image_cpu, rtol=0, atol=1e-6)
    assert (m != m_cpu).mean() <= 1e-3
    if not on_gpu(backend):
        np.testing.assert_array_equal(m, m_cpu)


# --------------------------------------------------------------------------- confusion counts


def _count(logits, target):
    """TP, FP, FN per sample by explicit loops."""
    out = np.zeros((logits.shape[0], 3), np.int64)
    for i in range(logits.shape[0]):
        for z, t in zip(logits[i].ravel(), target[i].ravel(), strict=True):
            out[i] += [z > 0 and t != 0, z > 0 and t == 0, z <= 0 and t != 0]
    return out


ConfusionCase = namedtuple("ConfusionCase", "n h w target")

CONFUSION = {
    "n1-7x9": ConfusionCase(1, 7, 9, "random"),
    "n3-13x11-one-empty": ConfusionCase(3, 13, 11, "one-empty"),
    "n2-4x4-all-empty": ConfusionCase(2, 4, 4, "empty"),
}
CONFUSION_CUDA_ONLY = {"n3-70x50": ConfusionCase(3, 70, 50, "random")}  # several blocks


@each_backend_and_case((ALL_BACKENDS, CONFUSION), (CUDA_BACKENDS, CONFUSION_CUDA_ONLY))
def test_confusion_counts(backend, case, rng):
    n, h, w, kind = case
    device = torch_device(backend)
    z = rand(rng, n, h, w, 1)
    z[0, 0, :3, 0] = [0.0, -0.0, 1e-30]  # exactly zero is not positive; a tiny logit is
    inputs = dict(z=z, t=_target(rng, kind, n, h, w))

    def run(be, z, t):
        return dict(counts=be.confusion_counts(z, t))

    def run_torch(z, t):
        return dict(counts=T.confusion_counts(z, t, device=device))

    got = check_op(backend, run, run_torch, inputs, exact=("counts",))
    np.testing.assert_array_equal(got["counts"], _count(z, inputs["t"]))
    assert got["counts"].dtype == np.int64 and got["counts"].shape == (n, 3)


# --------------------------------------------------------------------------- normalisation

NormCase = namedtuple("NormCase", "n h w c relu")  # NHWC; the ReLU fused or not

NORM = {  # odd sizes, C off the CPU's 8-lane vectors and the CUDA float4 path, batch 1
    "n1-7x9-c3": NormCase(1, 7, 9, 3, False),
    "n2-5x6-c3-relu": NormCase(2, 5, 6, 3, True),
    "n3-4x5-c8-relu": NormCase(3, 4, 5, 8, True),
    "n1-6x11-c16": NormCase(1, 6, 11, 16, False),
    "n2-3x1-c5-relu": NormCase(2, 3, 1, 5, True),
    "n2-9x7-c24-relu": NormCase(2, 9, 7, 24, True),
}
NORM_CUDA_ONLY = {  # several splits per sample, several channel blocks, float4 and scalar
    "n2-40x37-c4-relu-splits": NormCase(2, 40, 37, 4, True),
    "n3-21x19-c40-vec4": NormCase(3, 21, 19, 40, False),
    "n1-33x30-c33-relu-scalar": NormCase(1, 33, 30, 33, True),
}


def _norm_inputs(rng, case):
    """x off zero mean (a float32 sum of squares would lose digits here), gamma around 1."""
    n, h, w, c, _ = case
    return dict(x=rand(rng, n, h, w, c, scale=2.0) + rand(rng, c, scale=3.0),
                gamma=1.0 + rand(rng, c, scale=0.3), beta=rand(rng, c, scale=0.5),
                dy=rand(rng, n, h, w, c))


@each_backend_and_case((ALL_BACKENDS, NORM), (CUDA_BACKENDS, NORM_CUDA_ONLY))
def test_instance_norm(backend, case, rng):
    """Forward (the kept statistics too) and backward against the float64 reference and
    torch.nn.functional.instance_norm (autograd); the same in training and evaluation."""
    n, h, w, c, relu = case
    device = torch_device(backend)

    def run(be, x, gamma, beta, dy):
        y, mean, invstd = be.instance_norm_forward(x, gamma, beta, relu=relu)
        dx, dgamma, dbeta = be.instance_norm_backward(dy, x, y, mean, invstd, gamma, relu=relu)
        return dict(y=y, mean=mean, invstd=invstd, dx=dx, dgamma=dgamma, dbeta=dbeta)

    def run_torch(x, gamma, beta, dy):
        y, mean, invstd = T.instance_norm_forward(x, gamma, beta, relu=relu, device=device)
        dx, dgamma, dbeta = T.instance_norm_backward(dy, x, gamma, beta, relu=relu,
                                                     device=device)
        return dict(y=y, mean=mean, invstd=invstd, dx=dx, dgamma=dgamma, dbeta=dbeta)

    p = h * w
    got = check_op(backend, run, run_torch, _norm_inputs(rng, case),
                   reduce=dict(y=p, mean=p, invstd=p, dx=p, dgamma=n * p, dbeta=n * p))
    assert got["mean"].shape == (n, c) and got["invstd"].shape == (n, c)
    if relu:
        assert (got["y"] >= 0).all()


@each_backend_and_case((ALL_BACKENDS, NORM | {"n3-1x1-c6-relu": NormCase(3, 1, 1, 6, True)}),
                       (CUDA_BACKENDS, NORM_CUDA_ONLY))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm(backend, case, rng, training):
    """Forward (with the running statistics' update) and backward against the float64
    reference and torch.nn.functional.batch_norm (autograd): training on the batch's
    statistics, evaluation on the running ones (constants to the backward)."""
    n, h, w, c, relu = case
    device = torch_device(backend)
    inputs = _norm_inputs(rng, case)
    inputs.update(running_mean=rand(rng, c, scale=0.5), running_var=0.5 + rand(rng, c) ** 2)

    def run(be, x, gamma, beta, dy, running_mean, running_var):
        y, mean, invstd = be.batch_norm_forward(x, gamma, beta, running_mean, running_var,
                                                training, relu=relu)
        dx, dgamma, dbeta = be.batch_norm_backward(dy, x, y, mean, invstd, gamma, training,
                                                   relu=relu)
        return dict(y=y, mean=mean, invstd=invstd, dx=dx, dgamma=dgamma, dbeta=dbeta,
                    running_mean=running_mean, running_var=running_var)

    def run_torch(x, gamma, beta, dy, running_mean, running_var):
        y, mean, invstd, rm, rv = T.batch_norm_forward(x, gamma, beta, running_mean,
                                                       running_var, training, relu=relu,
                                                       device=device)
        dx, dgamma, dbeta = T.batch_norm_backward(dy, x, gamma, beta, running_mean,
                                                  running_var, training, relu=relu,
                                                  device=device)
        return dict(y=y, mean=mean, invstd=invstd, dx=dx, dgamma=dgamma, dbeta=dbeta,
                    running_mean=rm, running_var=rv)

    m = n * h * w
    got = check_op(backend, run, run_torch, inputs,
                   reduce=dict(y=m, mean=m, invstd=m, dx=m, dgamma=m, dbeta=m,
                               running_mean=m, running_var=m))
    assert got["mean"].shape == (1, c) and got["invstd"].shape == (1, c)
    if not training:  # the running statistics are read, not written
        np.testing.assert_array_equal(got["running_mean"],
                                      inputs["running_mean"].astype(backend.dtype))


class _RankSums:
    """The cross-rank sum of two ranks run one after the other in this process: a first
    round records each rank's buffer (its local sums), a second gives every rank the sum of
    both, added in rank order, as an all-reduce would."""

    def __init__(self, be):
        self.be, self.recorded = be, {}

    def record(self, rank):
        def sum_across(buf):
            self.recorded[rank] = np.asarray(self.be.to_host(buf)).copy()
        return sum_across

    def total(self, rank):
        def sum_across(buf):
            np.testing.assert_array_equal(np.asarray(self.be.to_host(buf)), self.recorded[rank])
            total = self.recorded[0] + self.recorded[1]
            buf[...] = self.be.asarray(total, dtype=np.float64)
        return sum_across


@each_backend(*ALL_BACKENDS)
def test_batch_norm_statistics_across_ranks(backend, rng):
    """Two ranks with half a batch each, their sums added by ``sum_across``, compute what
    one process computes on the whole batch: y, dx, the running statistics, and dgamma /
    dbeta as each rank's share of the whole (summed by the gradient all-reduce)."""
    be = backend
    inputs = _norm_inputs(rng, NormCase(4, 5, 7, 12, True))
    x, gamma, beta, dy = to_device(be, *(inputs[k] for k in ("x", "gamma", "beta", "dy")))
    c = x.shape[3]

    def running():
        return to_device(be, np.zeros(c)), to_device(be, np.ones(c))

    whole_rm, whole_rv = running()
    y, mean, invstd = be.batch_norm_forward(x, gamma, beta, whole_rm, whole_rv, relu=True)
    dx, dgamma, dbeta = be.batch_norm_backward(dy, x, y, mean, invstd, gamma, relu=True)
    halves = [to_device(be, inputs["x"][2 * r:2 * r + 2]) for r in (0, 1)]
    dys = [to_device(be, inputs["dy"][2 * r:2 * r + 2]) for r in (0, 1)]
    stats = [running() for _ in (0, 1)]
    sums = _RankSums(be)
    for r in (0, 1):
        be.batch_norm_forward(halves[r], gamma, beta, *running(), relu=True,
                              sum_across=sums.record(r))
    fwd = [be.batch_norm_forward(halves[r], gamma, beta, *stats[r], relu=True,
                                 sum_across=sums.total(r)) for r in (0, 1)]
    for r in (0, 1):
        be.batch_norm_backward(dys[r], halves[r], *fwd[r], gamma, relu=True,
                               sum_across=sums.record(r))
    bwd = [be.batch_norm_backward(dys[r], halves[r], *fwd[r], gamma, relu=True,
                                  sum_across=sums.total(r)) for r in (0, 1)]
    prec = be.precision
    assert_close(np.concatenate([to_host(be, f[0]) for f in fwd]), to_host(be, y), prec, 140)
    assert_close(np.concatenate([to_host(be, b[0]) for b in bwd]), to_host(be, dx), prec, 140)
    for r in (0, 1):
        assert_close(to_host(be, fwd[r][1]), to_host(be, mean), prec, 140, "mean")
        assert_close(to_host(be, stats[r][0]), to_host(be, whole_rm), prec, 140, "running")
        assert_close(to_host(be, stats[r][1]), to_host(be, whole_rv), prec, 140, "running")
    assert_close(to_host(be, bwd[0][1]) + to_host(be, bwd[1][1]), to_host(be, dgamma), prec,
                 140, "dgamma")
    assert_close(to_host(be, bwd[0][2]) + to_host(be, bwd[1][2]), to_host(be, dbeta), prec,
                 140, "dbeta")


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
    ("conv-bn-eval-w-torch-layout-KCRS",
     lambda be: be.conv2d_bn_eval_forward(_arr(be, 1, 4, 4, 2), _arr(be, 3, 2, 3, 3),
                                          *(_arr(be, 3) for _ in range(4))),
     lambda be: ["conv2d_bn_eval_forward: w must be [K,3,3,C] or [K,1,1,C]",
                 "got (3, 2, 3, 3)"]),
    ("conv-bn-eval-gamma-wrong-length",
     lambda be: be.conv2d_bn_eval_forward(_arr(be, 1, 4, 4, 2), _arr(be, 3, 3, 3, 2),
                                          _arr(be, 4), *(_arr(be, 3) for _ in range(3))),
     lambda be: ["conv2d_bn_eval_forward: gamma must have shape (3) (K)", "got (4,)",
                 "axis 0: expected 3, got 4"]),
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
    ("instance-norm-one-pixel",
     lambda be: be.instance_norm_forward(_arr(be, 2, 1, 1, 3), _arr(be, 3), _arr(be, 3)),
     lambda be: ["instance_norm_forward: needs at least 2 pixels per sample",
                 "got (2, 1, 1, 3)"]),
    ("batch-norm-one-value",
     lambda be: be.batch_norm_forward(_arr(be, 1, 1, 1, 3), _arr(be, 3), _arr(be, 3),
                                      _arr(be, 3), _arr(be, 3)),
     lambda be: ["batch_norm_forward: training needs at least 2 values per channel"]),
    ("batch-norm-running-wrong-C",
     lambda be: be.batch_norm_forward(_arr(be, 2, 4, 4, 3), _arr(be, 3), _arr(be, 3),
                                      _arr(be, 4), _arr(be, 3)),
     lambda be: ["batch_norm_forward: running_mean must have shape (3) (C)", "got (4,)"]),
    ("norm-backward-stats-per-sample",
     lambda be: be.instance_norm_backward(_arr(be, 2, 4, 4, 3), _arr(be, 2, 4, 4, 3), None,
                                          _arr(be, 1, 3), _arr(be, 1, 3), _arr(be, 3)),
     lambda be: ["instance_norm_backward: mean must have shape (2, 3) ([groups, C])"]),
    ("dice-target-bool",
     lambda be: be.sigmoid_dice_loss(_arr(be, 1, 4, 4, 1), np.zeros((1, 4, 4, 1), bool)),
     lambda be: ["sigmoid_dice_loss: target must be a uint8 NHW1 array", "got bool array"]),
]


@each_backend(*ALL_BACKENDS)
@pytest.mark.parametrize("call,expect", [pytest.param(c, e, id=i) for i, c, e in ERRORS])
def test_bad_arguments_raise_value_error(backend, call, expect):
    with pytest.raises(ValueError) as info:
        call(backend)
    for part in expect(backend):
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_reference_is_float64():
    be = reference()
    assert be.name == "reference" and be.dtype == np.float64 and be.xp is np

"""The CUDA backend on a GPU: every op forward and backward, the U-Net, 50 training steps.

Marked ``gpu`` and skipped, saying why, where no GPU is usable (``cuda_usable()``); run them
with ``pytest -m gpu`` (``bench/gpu_check.sh`` does). Each op is checked with
``tests/opcheck.py``'s ``check_op``: against ``reference.py`` in float64 and against torch
*on the GPU* (cuDNN, TF32 off) in float32, at the shapes of ``test_ops.py`` (odd sizes,
C = 1, K = 1, batch 1) plus shapes that span several tiles and blocks of every kernel
variant (float4 and scalar paths, one and several reduction splits).

``tests/test_cuda_emu.py`` runs these same test functions with ``device = "cuda-emu"``:
the same kernels and the same ``cuda.py`` on the CPU (``tests/cuda_emu.py``), in every CI
run. So everything here but the GPU's own arithmetic is exercised before a GPU session.
"""

from __future__ import annotations

import cuda_emu
import numpy as np
import opcheck
import pytest
from opcheck import GRID32_ATOL, check_op, rand
from test_ops import CONCAT, CONFUSION, CONV, DICE, ERRORS, POOL, UPCONV, WINDOW, _slices, _target

from nodulekit.engine import cuda_usable
from nodulekit.engine import get_backend as real_get_backend
from nodulekit.engine.ops import identity_augmentation
from nodulekit.reference import torch_ops as T

GPU_OK, GPU_WHY = cuda_usable()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not GPU_OK, reason=f"needs a usable CUDA GPU: {GPU_WHY}")]


@pytest.fixture
def device():
    """Which CUDA backend the tests run: "cuda" here, "cuda-emu" in test_cuda_emu.py."""
    return "cuda"


_EMU = {}


def emu_backend():
    """One CudaBackend on the CPU emulator for the whole session (compiled once)."""
    if "backend" not in _EMU:
        from nodulekit.engine.cuda import CudaBackend

        _EMU["runtime"] = cuda_emu.EmuRuntime()
        _EMU["backend"] = CudaBackend(runtime=_EMU["runtime"])
    return _EMU["backend"]


def get_backend(name, precision="fp32"):
    return emu_backend() if name == "cuda-emu" else real_get_backend(name, precision)


@pytest.fixture(autouse=True)
def _backends(monkeypatch):
    """check_op looks backends up by name: teach it "cuda-emu"."""
    monkeypatch.setattr(opcheck, "get_backend", get_backend)


@pytest.fixture
def tdev(device):
    """The device torch runs on next to ours."""
    return "cuda" if device == "cuda" else "cpu"


def dev(device, *arrays):
    be = get_backend(device)
    out = tuple(be.asarray(a, dtype=be.dtype if a.dtype.kind == "f" else None) for a in arrays)
    return out if len(out) > 1 else out[0]


def host(device, *arrays):
    be = get_backend(device)
    out = tuple(None if a is None else np.asarray(be.to_host(a)) for a in arrays)
    return out if len(out) > 1 else out[0]


# --------------------------------------------------------------------------- convolution

CONV_CUDA = CONV + [  # N, H, W, C, K, R, relu, need_dx: several tiles, every variant
    pytest.param(2, 9, 11, 20, 80, 3, True, True, id="n2-9x11-c20-k80-3x3-relu"),
    pytest.param(1, 5, 7, 33, 17, 1, False, True, id="n1-5x7-c33-k17-1x1"),
    pytest.param(2, 16, 17, 5, 40, 3, True, True, id="n2-16x17-c5-k40-3x3-relu"),
    pytest.param(3, 12, 10, 16, 16, 3, True, True, id="n3-12x10-c16-k16-3x3-relu"),
    pytest.param(2, 12, 12, 8, 1, 1, False, True, id="n2-12x12-c8-k1-1x1-head"),
    pytest.param(2, 20, 12, 1, 8, 3, True, False, id="n2-20x12-c1-k8-3x3-first"),
]


@pytest.mark.parametrize("n,h,w,c,k,r,relu,need_dx", CONV_CUDA)
def test_conv2d(device, tdev, rng, n, h, w, c, k, r, relu, need_dx):
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, r, r, c, scale=(2 / (r * r * c)) ** .5),
                  b=rand(rng, k, scale=0.5), dy=rand(rng, n, h, w, k))

    def run(be, x, w, b, dy):
        y = be.conv2d_forward(x, w, b, relu)
        dx, dw, db = be.conv2d_backward(dy, x, w, y, relu, need_dx)
        return dict(y=y, dx=dx, dw=dw, db=db)

    def run_torch(x, w, b, dy):
        dx, dw, db = T.conv2d_backward(dy, x, w, b, relu, need_dx, device=tdev)
        return dict(y=T.conv2d_forward(x, w, b, relu, device=tdev), dx=dx, dw=dw, db=db)

    got = check_op(device, run, run_torch, inputs,
                   reduce=dict(y=r * r * c, dx=k * r * r, dw=n * h * w, db=n * h * w))
    assert (got["dx"] is None) == (not need_dx)


# ------------------------------------------------------------- convolution: every version

# conv.cu / conv_mma.cu hold a progression of versions (cuda.CONV_VARIANTS): each is run on
# its own backend, CudaBackend(precision, conv_variant=...), and compared with the float64
# reference, with the readable v1 direct kernel on the same device, and with torch.
#
# Tolerances per precision. An output passes when |got - want| <= atol * sqrt(L) * max|want|
# elementwise, L its reduction length (terms summed per element), max|want| its scale:
# - fp32: opcheck's row (1e-6 per sqrt(L): fp32 unit roundoff 6e-8, ~16x room).
# - tf32: each operand rounded to a 10-bit mantissa (cvt.rna: unit roundoff u = 2^-11), so
#   each product carries a relative error below 2u = 2^-10; L independent such errors
#   add up like a random walk, ~2^-10 * sqrt(L) * rms|term| <= 2^-10 * sqrt(L) * max|want|.
# - bf16: the same with a 7-bit mantissa (round to nearest even: u = 2^-8): 2^-7 per sqrt(L).
# These are loose by design (rms|term| is well below max|want|); what makes the tensor-core
# test sharp is the second check below: against the reference computed on operands rounded
# exactly as the kernel rounds them, within fp32 accumulation error.
CONV_ATOL = {"fp32": 1e-6, "tf32": 2.0**-10, "bf16": 2.0**-7}
# Against the reference on pre-rounded operands: only the fp32 accumulation differs. On the
# emulator (exact products, one rounding per mma) fp32's own 1e-6 holds; tensor cores align
# their addends before adding (a few fp32 ulps per mma): 4x room.
ROUNDED_ATOL = 4e-6

CONV_VARIANT_SHAPES = [  # N, H, W, C, K, R, relu, need_dx: odd sizes, channels off the tiles
    pytest.param(2, 9, 11, 20, 80, 3, True, True, id="n2-9x11-c20-k80-3x3-relu"),
    pytest.param(2, 16, 17, 5, 40, 3, True, True, id="n2-16x17-c5-k40-3x3-relu-splits"),
    pytest.param(1, 5, 7, 33, 17, 1, False, True, id="n1-5x7-c33-k17-1x1"),
    pytest.param(1, 7, 9, 3, 1, 3, False, True, id="n1-7x9-c3-k1-3x3"),
    pytest.param(2, 6, 5, 1, 4, 3, True, False, id="n2-6x5-c1-k4-3x3-first"),
    pytest.param(1, 7, 9, 8, 12, 3, True, True, id="n1-7x9-c8-k12-3x3-relu-vec4"),
    pytest.param(2, 5, 6, 16, 8, 1, False, True, id="n2-5x6-c16-k8-1x1-vec4"),
]


def _variants():
    from nodulekit.engine.cuda import CONV_VARIANTS

    return list(CONV_VARIANTS)


def variant_backend(device, variant):
    """A CudaBackend running convolution version ``variant`` in its precision."""
    from nodulekit.engine.cuda import CONV_VARIANTS, CudaBackend

    precision = CONV_VARIANTS[variant][0]
    if device != "cuda-emu":
        return CudaBackend(precision=precision, conv_variant=variant)
    emu_backend()
    key = ("variant", variant)
    if key not in _EMU:
        _EMU[key] = CudaBackend(precision=precision, runtime=_EMU["runtime"],
                                conv_variant=variant)
    return _EMU[key]


def _conv_all(be, x, w, b, dy, relu, need_dx, mask=None):
    """forward then backward on backend ``be``: host float64 arrays by name. With ``mask``
    (the tested kernel's y > 0) the backward takes dz = dy * mask and no ReLU: a y within
    rounding of 0 must not flip a gradient between two implementations."""
    xd, wd, bd = (be.asarray(a, dtype=be.dtype) for a in (x, w, b))
    y = be.conv2d_forward(xd, wd, bd, relu)
    if mask is None:
        dx, dw, db = be.conv2d_backward(be.asarray(dy, dtype=be.dtype), xd, wd, y, relu,
                                        need_dx)
    else:
        dz = be.asarray(dy * mask if relu else dy, dtype=be.dtype)
        dx, dw, db = be.conv2d_backward(dz, xd, wd, None, False, need_dx)
    return {k: None if v is None else np.asarray(be.to_host(v), dtype=np.float64)
            for k, v in dict(y=y, dx=dx, dw=dw, db=db).items()}


def _close(got, want, atol, reduce, what):
    for key, wv in want.items():
        g = got[key]
        if wv is None:
            assert g is None, f"{what}: {key} should be None"
            continue
        scale = max(float(np.abs(wv).max()), 1e-30)
        tol = atol * np.sqrt(reduce[key]) * scale
        err = float(np.abs(g - wv).max())
        assert err <= tol, (f"{what}: {key} off by {err:.3g} (max |want| {scale:.3g}), "
                            f"allowed {tol:.3g} = {atol:.3g} * sqrt({reduce[key]}) * max|want|")


def round_operand(a, precision):
    """What the kernels' operand conversion does to a float32 value (tests' model of it):
    tf32 = cvt.rna.tf32.f32 (nearest, ties away from zero, 10-bit mantissa); bf16 =
    cvt.rn.bf16.f32 (nearest, ties to even, 7-bit mantissa); fp32: unchanged."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    if precision == "tf32":
        bits = (bits + 0x1000) & 0xFFFFE000
    elif precision == "bf16":
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("n,h,w,c,k,r,relu,need_dx", CONV_VARIANT_SHAPES)
def test_conv2d_every_version(device, tdev, rng, variant, n, h, w, c, k, r, relu, need_dx):
    """Every convolution version: forward, data and weight gradients, against the float64
    reference, the v1 direct kernel on the same device and torch (float32, TF32 off), with
    the tolerance of the version's precision (CONV_ATOL); the tensor-core versions also
    against the reference on operands rounded as they round them (ROUNDED_ATOL)."""
    x, wt = rand(rng, n, h, w, c), rand(rng, k, r, r, c, scale=(2 / (r * r * c)) ** .5)
    b, dy = rand(rng, k, scale=0.5), rand(rng, n, h, w, k)
    be = variant_backend(device, variant)
    precision = be.precision
    reduce = dict(y=r * r * c, dx=k * r * r, dw=n * h * w, db=n * h * w)
    got = _conv_all(be, x, wt, b, dy, relu, need_dx)
    mask = (got["y"] > 0).astype(np.float64)
    ref = _conv_all(opcheck.reference(), x, wt, b, dy, relu, need_dx, mask)
    atol = CONV_ATOL[precision]
    _close(got, ref, atol, reduce, f"{variant} vs reference")
    direct = _conv_all(variant_backend(device, "v1_direct"), x, wt, b, dy, relu, need_dx, mask)
    _close(direct, ref, CONV_ATOL["fp32"], reduce, "v1_direct vs reference")
    _close(got, direct, atol, reduce, f"{variant} vs v1_direct")
    dz = dy * mask if relu else dy
    dx_t, dw_t, db_t = T.conv2d_backward(dz, x, wt, b, False, need_dx, device=tdev)
    torch_out = {key: None if v is None else np.asarray(v, dtype=np.float64) for key, v in
                 dict(y=T.conv2d_forward(x, wt, b, relu, device=tdev), dx=dx_t, dw=dw_t,
                      db=db_t).items()}
    _close(got, torch_out, atol, reduce, f"{variant} vs torch")
    if precision != "fp32":  # exactly the rounding the kernels do, and nothing else
        ref_r = _conv_all(opcheck.reference(), round_operand(x, precision),
                          round_operand(wt, precision), b, round_operand(dy, precision), relu,
                          need_dx, mask)
        ref_r["db"] = ref["db"]  # the bias gradient sums dz in fp32 (reduce.cu), unrounded
        _close(got, ref_r, ROUNDED_ATOL, reduce, f"{variant} vs reference on {precision} "
                                                 f"operands")
        if c * r * r > 8:  # the rounding is visible: fp32 results fail that check
            with pytest.raises(AssertionError):
                _close({"y": direct["y"]}, {"y": ref_r["y"]}, ROUNDED_ATOL, reduce, "")


# ------------------------------------------- tensor-core building blocks, one warp at a time

PROBE = r"""
// one warp: D = A (16 x KK) * B (KK x 8) through conv_mma.cu's helpers and fragment layouts
extern "C" __global__ void mma_probe(const float* __restrict__ A, const float* __restrict__ B,
                                     float* __restrict__ D, int bf16) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    unsigned a[4], b[2];
    if (!bf16) {  // A [16][8], B [8][8]
        a[0] = __float_as_uint(to_tf32(A[g * 8 + t]));
        a[1] = __float_as_uint(to_tf32(A[(g + 8) * 8 + t]));
        a[2] = __float_as_uint(to_tf32(A[g * 8 + t + 4]));
        a[3] = __float_as_uint(to_tf32(A[(g + 8) * 8 + t + 4]));
        b[0] = __float_as_uint(to_tf32(B[t * 8 + g]));
        b[1] = __float_as_uint(to_tf32(B[(t + 4) * 8 + g]));
        mma_tf32_m16n8k8(d, a, b);
    } else {  // A [16][16], B [16][8]
        for (int r = 0; r < 4; ++r) {
            const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
            a[r] = pack_bf16x2(to_bf16(A[row * 16 + col]), to_bf16(A[row * 16 + col + 1]));
        }
        for (int r = 0; r < 2; ++r) {
            const int k = 2 * t + 8 * r;
            b[r] = pack_bf16x2(to_bf16(B[k * 8 + g]), to_bf16(B[(k + 1) * 8 + g]));
        }
        mma_bf16_m16n8k16(d, a, b);
    }
    for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = d[e];
}

extern "C" __global__ void round_probe(const float* __restrict__ x, float* __restrict__ tf,
                                       float* __restrict__ bf, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        tf[i] = to_tf32(x[i]);
        bf[i] = to_bf16(x[i]);
    }
}

extern "C" __global__ void diverged_mma(float* __restrict__ out) {
    if (threadIdx.x < 16) {  // half a warp: a bug the emulator must report
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
        mma_tf32_m16n8k8(d, a, b);
        out[threadIdx.x] = d[0];
    }
}
"""


def _probe_runner(device, monkeypatch):
    """(launch(kernel, grid, block, *args), alloc(np array), host(a)) for the probe kernels
    appended to conv_mma.cu: through CuPy on a GPU, through the emulator otherwise."""
    from nodulekit.engine import cuda as cuda_mod

    source = cuda_mod.kernel_source("conv_mma.cu") + PROBE
    if device == "cuda-emu":
        monkeypatch.setattr(cuda_emu, "kernel_source", lambda name: source)
        rt = cuda_emu.EmuRuntime()
        return (lambda k, grid, block, *args: rt.launch("probe.cu", k, grid, block, args),
                lambda a: rt.asarray(a), lambda a: np.asarray(a))
    import cupy

    mod = cupy.RawModule(code=source, options=cuda_mod.NVRTC_OPTIONS)
    return (lambda k, grid, block, *args: mod.get_function(k)(grid, block, args),
            lambda a: cupy.asarray(a), lambda a: cupy.asnumpy(a))


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_mma_fragment_layouts_on_one_warp(device, rng, monkeypatch, precision):
    """One mma.sync through conv_mma.cu's helpers and the PTX ISA's fragment layouts (as
    conv_mma.cu's head writes them down) gives A @ B of the rounded operands: on a GPU this
    checks the layouts (and the emulator's model of them) against the tensor cores."""
    launch, alloc, host = _probe_runner(device, monkeypatch)
    kk = 8 if precision == "tf32" else 16
    a = rng.standard_normal((16, kk)).astype(np.float32)
    b = rng.standard_normal((kk, 8)).astype(np.float32)
    d = alloc(np.zeros((16, 8), np.float32))
    launch("mma_probe", (1, 1, 1), (32, 1, 1), alloc(a), alloc(b), d,
           np.int32(precision == "bf16"))
    want = round_operand(a, precision) @ round_operand(b, precision)
    np.testing.assert_allclose(host(d), want, rtol=0, atol=4 * 2.0**-23 * np.abs(want).max())


def test_operand_rounding_matches_the_model(device, monkeypatch):
    """to_tf32 = cvt.rna.tf32.f32 (ties away from zero), to_bf16 = cvt.rn.bf16.f32 (ties to
    even), bit for bit, ties and both signs included; round_operand is the tests' model."""
    launch, alloc, host = _probe_runner(device, monkeypatch)
    one = np.float32(1.0)
    x = np.array([1.0, 1 + 2.0**-11, 1 + 3 * 2.0**-11, -(1 + 2.0**-11), 1 + 2.0**-8,
                  1 + 3 * 2.0**-8, -(1 + 3 * 2.0**-8), 1 + 2.0**-12, 3.14159265, -2.7182818,
                  1e-30, 65504.0, 1e30], np.float64).astype(np.float32)
    x = np.concatenate([x, np.random.default_rng(5).standard_normal(300).astype(np.float32)])
    tf, bf = alloc(np.zeros_like(x)), alloc(np.zeros_like(x))
    launch("round_probe", (2, 1, 1), (256, 1, 1), alloc(x), tf, bf, np.int32(x.size))
    np.testing.assert_array_equal(host(tf), round_operand(x, "tf32").astype(np.float32))
    np.testing.assert_array_equal(host(bf), round_operand(x, "bf16").astype(np.float32))
    assert host(tf)[1] == one + np.float32(2.0**-10)  # the tie went away from zero
    assert host(bf)[4] == one  # the tie went to even


# --------------------------------------------------------------------------- max-pool

POOL_CUDA = POOL + [  # N, H, W, C: float4 path (C % 4 == 0), odd sizes, many blocks
    pytest.param(2, 9, 7, 8, id="n2-9x7-c8-vec4"),
    pytest.param(3, 34, 30, 12, id="n3-34x30-c12-vec4"),
    pytest.param(2, 33, 31, 5, id="n2-33x31-c5"),
]


@pytest.mark.parametrize("n,h,w,c", POOL_CUDA)
def test_maxpool2x2(device, tdev, rng, n, h, w, c):
    inputs = dict(x=rand(rng, n, h, w, c), dy=rand(rng, n, h // 2, w // 2, c))

    def run(be, x, dy):
        y, argmax = be.maxpool2x2_forward(x)
        return dict(y=y, argmax=argmax, dx=be.maxpool2x2_backward(dy, argmax, (h, w)))

    def run_torch(x, dy):
        y, argmax = T.maxpool2x2_forward(x, device=tdev)
        return dict(y=y, argmax=argmax, dx=T.maxpool2x2_backward(dy, x, device=tdev))

    check_op(device, run, run_torch, inputs, exact=("y", "argmax", "dx"))


@pytest.mark.parametrize("c", [3, 4], ids=["scalar", "vec4"])
def test_maxpool2x2_ties_and_odd_sizes(device, rng, c):
    """First maximum in row-major order wins (values in {0, 1}); odd last row/column dropped."""
    be = get_backend(device)
    x = rng.integers(0, 2, (2, 7, 9, c)).astype(np.float64)
    x[0, :2, :2, :] = 1.0
    x[:, 6, :, :] = x[:, :, 8, :] = 100.0  # would win every window it took part in
    y, argmax = be.maxpool2x2_forward(dev(device, x))
    y, argmax = host(device, y, argmax)
    expect = np.zeros((2, 3, 4, c), np.uint8)
    for idx in np.ndindex(*expect.shape):
        nn, i, j, cc = idx
        window = [x[nn, 2 * i + a, 2 * j + b, cc] for a in (0, 1) for b in (0, 1)]
        expect[idx] = window.index(max(window))
    np.testing.assert_array_equal(argmax, expect)
    np.testing.assert_array_equal(y, x[:, :6, :8].reshape(2, 3, 2, 4, 2, c).max(axis=(2, 4)))
    dx = host(device, be.maxpool2x2_backward(dev(device, np.ones((2, 3, 4, c))),
                                             dev(device, expect), (7, 9)))
    assert dx.shape == (2, 7, 9, c) and dx.sum() == 2 * 3 * 4 * c
    assert not dx[:, 6].any() and not dx[:, :, 8].any()


# --------------------------------------------------------------------------- up-convolution

UPCONV_CUDA = UPCONV + [  # N, H, W, C, K: several row / column / reduction tiles
    pytest.param(2, 9, 10, 20, 19, id="n2-9x10-c20-k19"),
    pytest.param(1, 6, 7, 130, 3, id="n1-6x7-c130-k3"),
    pytest.param(3, 11, 9, 4, 40, id="n3-11x9-c4-k40"),
]


@pytest.mark.parametrize("n,h,w,c,k", UPCONV_CUDA)
def test_upconv2x2(device, tdev, rng, n, h, w, c, k):
    inputs = dict(x=rand(rng, n, h, w, c), w=rand(rng, k, 2, 2, c, scale=c ** -.5),
                  b=rand(rng, k, scale=0.5), dy=rand(rng, n, 2 * h, 2 * w, k))

    def run(be, x, w, b, dy):
        dx, dw, db = be.upconv2x2_backward(dy, x, w)
        return dict(y=be.upconv2x2_forward(x, w, b), dx=dx, dw=dw, db=db)

    def run_torch(x, w, b, dy):
        dx, dw, db = T.upconv2x2_backward(dy, x, w, device=tdev)
        return dict(y=T.upconv2x2_forward(x, w, b, device=tdev), dx=dx, dw=dw, db=db)

    check_op(device, run, run_torch, inputs,
             reduce=dict(y=c, dx=4 * k, dw=n * h * w, db=4 * n * h * w))


@pytest.mark.parametrize("n,h,w,cs,c,k", [(2, 3, 5, 3, 4, 5), (1, 4, 4, 8, 12, 8)],
                         ids=["scalar", "vec4"])
def test_upconv_straight_into_the_concat_buffer(device, rng, n, h, w, cs, c, k):
    """The fused decoder entry points give exactly what concat / split around the op give."""
    be = get_backend(device)
    skip, x, wt, b = dev(device, rand(rng, n, 2 * h, 2 * w, cs), rand(rng, n, h, w, c),
                         rand(rng, k, 2, 2, c), rand(rng, k))
    fused = host(device, be.upconv2x2_concat_forward(skip, x, wt, b))
    plain = host(device, be.concat_channels(skip, be.upconv2x2_forward(x, wt, b)))
    np.testing.assert_array_equal(fused, plain)

    dcat = dev(device, rand(rng, n, 2 * h, 2 * w, cs + k))
    fused = host(device, *be.upconv2x2_split_backward(dcat, cs, x, wt))
    dskip, dup = be.split_channels(dcat, cs)
    plain = (host(device, dskip), *host(device, *be.upconv2x2_backward(dup, x, wt)))
    for name, f, p in zip(("dskip", "dx", "dw", "db"), fused, plain, strict=True):
        np.testing.assert_array_equal(f, p, err_msg=name)


def precision_backend(device, precision):
    """A CudaBackend at ``precision`` (its default convolution version)."""
    from nodulekit.engine.cuda import DEFAULT_CONV_VARIANT

    return variant_backend(device, DEFAULT_CONV_VARIANT[precision])


def _upconv_all(be, x, w, b, dy):
    xd, wd, bd, dyd = (be.asarray(a, dtype=be.dtype) for a in (x, w, b, dy))
    dx, dw, db = be.upconv2x2_backward(dyd, xd, wd)
    return {k: np.asarray(be.to_host(v), dtype=np.float64)
            for k, v in dict(y=be.upconv2x2_forward(xd, wd, bd), dx=dx, dw=dw, db=db).items()}


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("n,h,w,c,k", UPCONV_CUDA)
def test_upconv2x2_every_precision(device, tdev, rng, precision, n, h, w, c, k):
    """The up-convolution on tensor cores (CudaBackend(precision=tf32/bf16)): against the
    float64 reference and torch with the precision's tolerance (CONV_ATOL), against the
    reference on operands rounded as the kernels round them (ROUNDED_ATOL), and against
    the fp32 kernels of upconv.cu."""
    x, wt = rand(rng, n, h, w, c), rand(rng, k, 2, 2, c, scale=c ** -.5)
    b, dy = rand(rng, k, scale=0.5), rand(rng, n, 2 * h, 2 * w, k)
    reduce = dict(y=c, dx=4 * k, dw=n * h * w, db=4 * n * h * w)
    got = _upconv_all(precision_backend(device, precision), x, wt, b, dy)
    ref = _upconv_all(opcheck.reference(), x, wt, b, dy)
    atol = CONV_ATOL[precision]
    _close(got, ref, atol, reduce, f"upconv {precision} vs reference")
    _close(got, _upconv_all(precision_backend(device, "fp32"), x, wt, b, dy), atol, reduce,
           f"upconv {precision} vs fp32 kernels")
    dx_t, dw_t, db_t = T.upconv2x2_backward(dy, x, wt, device=tdev)
    torch_out = {key: np.asarray(v, dtype=np.float64) for key, v in
                 dict(y=T.upconv2x2_forward(x, wt, b, device=tdev), dx=dx_t, dw=dw_t,
                      db=db_t).items()}
    _close(got, torch_out, atol, reduce, f"upconv {precision} vs torch")
    ref_r = _upconv_all(opcheck.reference(), round_operand(x, precision),
                        round_operand(wt, precision), b, round_operand(dy, precision))
    ref_r["db"] = ref["db"]  # summed in fp32 from the unrounded dy
    _close(got, ref_r, ROUNDED_ATOL, reduce, f"upconv {precision} vs reference on "
                                             f"{precision} operands")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_upconv_mma_straight_into_the_concat_buffer(device, rng, precision):
    """The tensor-core up-convolution writes and reads its channels of the concat buffer
    exactly as the plain calls plus concat / split do."""
    be = precision_backend(device, precision)
    n, h, w, cs, c, k = 2, 3, 5, 3, 20, 19
    skip, x, wt, b = (be.asarray(a, dtype=be.dtype) for a in (
        rand(rng, n, 2 * h, 2 * w, cs), rand(rng, n, h, w, c), rand(rng, k, 2, 2, c),
        rand(rng, k)))
    fused = host(device, be.upconv2x2_concat_forward(skip, x, wt, b))
    plain = host(device, be.concat_channels(skip, be.upconv2x2_forward(x, wt, b)))
    np.testing.assert_array_equal(fused, plain)
    dcat = be.asarray(rand(rng, n, 2 * h, 2 * w, cs + k), dtype=be.dtype)
    fused = [host(device, a) for a in be.upconv2x2_split_backward(dcat, cs, x, wt)]
    dskip, dup = be.split_channels(dcat, cs)
    plain = [host(device, dskip)] + [host(device, a) for a in be.upconv2x2_backward(dup, x, wt)]
    for name, f, p in zip(("dskip", "dx", "dw", "db"), fused, plain, strict=True):
        np.testing.assert_array_equal(f, p, err_msg=name)


# --------------------------------------------------------------------------- concat / split

CONCAT_CUDA = CONCAT + [  # N, H, W, CA, CB
    pytest.param(2, 5, 7, 8, 4, id="n2-5x7-ca8-cb4-vec4"),
    pytest.param(2, 9, 40, 16, 16, id="n2-9x40-ca16-cb16-vec4"),
    pytest.param(1, 6, 6, 4, 6, id="n1-6x6-ca4-cb6-mixed"),
]


@pytest.mark.parametrize("n,h,w,ca,cb", CONCAT_CUDA)
def test_concat_split_channels(device, tdev, rng, n, h, w, ca, cb):
    inputs = dict(a=rand(rng, n, h, w, ca), b=rand(rng, n, h, w, cb),
                  dy=rand(rng, n, h, w, ca + cb))

    def run(be, a, b, dy):
        da, db = be.split_channels(dy, ca)
        return dict(y=be.concat_channels(a, b), da=da, db=db)

    def run_torch(a, b, dy):
        da, db = T.split_channels(dy, ca, device=tdev)
        return dict(y=T.concat_channels(a, b, device=tdev), da=da, db=db)

    check_op(device, run, run_torch, inputs, exact=("y", "da", "db"))


# --------------------------------------------------------------------------- Dice loss

DICE_CUDA = DICE + [  # N, H, W, target, smooth, logit scale
    pytest.param(3, 40, 36, "random", 1.0, 3.0, id="n3-40x36-random-vec4"),
    pytest.param(2, 37, 41, "one-empty", 1.0, 3.0, id="n2-37x41-one-empty-scalar"),
    pytest.param(2, 16, 16, "random", 1.0, 200.0, id="n2-16x16-extreme-logits"),
]


@pytest.mark.parametrize("n,h,w,kind,smooth,scale", DICE_CUDA)
def test_sigmoid_dice_loss(device, tdev, rng, n, h, w, kind, smooth, scale):
    inputs = dict(z=rand(rng, n, h, w, 1, scale=scale), t=_target(rng, kind, n, h, w))

    def run(be, z, t):
        loss, dice, dz = be.sigmoid_dice_loss(z, t, smooth)
        return dict(loss=loss, dice=dice, dlogits=dz)

    def run_torch(z, t):
        loss, dice, dz = T.sigmoid_dice_loss(z, t, smooth, device=tdev)
        return dict(loss=loss, dice=dice, dlogits=dz)

    got = check_op(device, run, run_torch, inputs,
                   reduce=dict(loss=n * h * w, dice=h * w, dlogits=h * w),
                   free_float=("loss", "dice"))
    assert got["loss"].shape == () and got["dice"].shape == (n,)
    assert got["loss"].dtype == np.float64 and got["dice"].dtype == np.float64
    assert np.isfinite(got["dlogits"]).all()


# --------------------------------------------------------------------------- Adam

ADAM = [  # size, step, lr, beta1, beta2, eps
    pytest.param(1, 1, 1e-3, 0.9, 0.999, 1e-8, id="size1-step1"),
    pytest.param(7, 3, 1e-3, 0.9, 0.999, 1e-8, id="size7-step3"),
    pytest.param(1000, 1, 1e-4, 0.9, 0.999, 1e-8, id="size1000-step1-lr1e-4"),
    pytest.param(257, 10, 0.1, 0.5, 0.9, 1e-6, id="size257-step10-betas.5-.9"),
    pytest.param(100003, 7, 1e-3, 0.9, 0.999, 1e-8, id="size100003-step7"),
]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("size,step,lr,beta1,beta2,eps", ADAM)
def test_adam_step(device, tdev, rng, size, step, lr, beta1, beta2, eps, offset):
    """One step against torch.optim.Adam; 'misaligned' passes views that start one float
    into their buffers (the scalar kernel; the float4 one needs 16-byte alignment)."""
    inputs = dict(param=rand(rng, size), grad=rand(rng, size), m=rand(rng, size, scale=0.1),
                  v=np.abs(rand(rng, size, scale=0.1)))

    def run(be, param, grad, m, v):
        if offset:  # the same values, one float into a longer buffer
            param, grad, m, v = (_shifted(be, a) for a in (param, grad, m, v))
        out = be.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps)
        assert out is None, "adam_step works in place"
        return dict(param=param, m=m, v=v)

    def run_torch(param, grad, m, v):
        p, m, v = T.adam_step(param, grad, m, v, step, lr, beta1, beta2, eps, device=tdev)
        return dict(param=p, m=m, v=v)

    check_op(device, run, run_torch, inputs)


def test_adam_step_where_eps_matters(device, tdev, rng):
    """Gradients of ~1e-9 from zero state: sqrt(v_hat) ~ eps, so eps outside the square
    root (PyTorch) or anywhere else gives a visibly different step."""
    size = 64
    inputs = dict(param=rand(rng, size), grad=rand(rng, size, scale=1e-9),
                  m=np.zeros(size), v=np.zeros(size))

    def run(be, param, grad, m, v):
        be.adam_step(param, grad, m, v, 1, 1e-3)
        return dict(param=param, m=m, v=v)

    def run_torch(param, grad, m, v):
        p, m, v = T.adam_step(param, grad, m, v, 1, 1e-3, device=tdev)
        return dict(param=p, m=m, v=v)

    check_op(device, run, run_torch, inputs)


def _shifted(be, a):
    buf = be.zeros((a.size + 1,), a.dtype)
    buf[1:] = a
    return buf[1:]


@pytest.mark.parametrize("size", [5, 300, 4099])
def test_adam_20_steps(device, tdev, rng, size):
    steps = 20
    inputs = dict(param=rand(rng, size), grads=rand(rng, steps, size))

    def run(be, param, grads):
        m, v = be.zeros(param.shape), be.zeros(param.shape)
        for i in range(steps):
            be.adam_step(param, grads[i], m, v, i + 1, 1e-2)
        return dict(param=param, m=m, v=v)

    def run_torch(param, grads):
        p, m, v = T.adam_steps(param, list(grads), 1e-2, device=tdev)
        return dict(param=p, m=m, v=v)

    check_op(device, run, run_torch, inputs, reduce=dict(param=steps, m=steps, v=steps))


# --------------------------------------------------------------------------- window_augment

WINDOW_CUDA = WINDOW + [  # N, H, W: a row wider than one block of 256 threads
    pytest.param(2, 5, 300, id="n2-5x300"),
    pytest.param(3, 33, 29, id="n3-33x29"),
]


@pytest.mark.parametrize("n,h,w", WINDOW_CUDA)
def test_window_augment(device, tdev, rng, n, h, w):
    hu, mask = _slices(rng, n, h, w)
    aug = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.5, rng.uniform(-20, 20, n)], 1)
    inputs = dict(hu=hu, mask=mask, aug=aug.astype(np.float32))

    def run(be, hu, mask, aug):
        image, m = be.window_augment(hu, mask, be.asarray(aug, dtype=np.float32))
        return dict(image=image, mask=m)

    def run_torch(hu, mask, aug):
        image, m = T.window_augment(hu, mask, aug.astype(np.float32), dtype=aug.dtype,
                                    device=tdev)
        return dict(image=image, mask=m)

    # torch's float32 grid moves a sample by ~size * 6e-8 px: GRID32_ATOL is sized for 16 px
    got = check_op(device, run, run_torch, inputs, reduce=dict(image=4), exact=("mask",),
                   torch32_atol=dict(image=GRID32_ATOL * max(h, w, 16) / 16))
    assert set(np.unique(got["mask"])) <= {0, 1}


@pytest.mark.parametrize("n,h,w", [(4, 16, 16), (3, 33, 29), (2, 8, 300)],
                         ids=["16x16", "33x29", "8x300"])
def test_window_augment_matches_the_cpu_backend(device, rng, n, h, w):
    """The source coordinates and the mask's rounding run in float64 in the CPU's order of
    operations, the bilinear weights and the window in float32: the mask matches the CPU
    backend except where CUDA's cos/sin differ from the host's in the last bit and that
    moves a pixel across an exact .5 tie (rare; the emulator uses the host's libm and must
    match exactly), the image within a few float32 ulps."""
    hu, mask = _slices(rng, n, h, w)
    aug = np.stack([rng.random(n) < 0.5, rng.random(n) < 0.5, rng.uniform(-20, 20, n)],
                   1).astype(np.float32)
    aug[0] = (0, 0, 90.0)  # exact ties for the mask on every pixel of a row or column
    be, cpu = get_backend(device), real_get_backend("cpu")
    image, m = host(device, *be.window_augment(be.asarray(hu), be.asarray(mask),
                                               be.asarray(aug)))
    image_cpu, m_cpu = cpu.window_augment(hu, mask, aug)
    np.testing.assert_allclose(image, image_cpu, rtol=0, atol=1e-6)
    assert (m != m_cpu).mean() <= 1e-3
    if device == "cuda-emu":
        np.testing.assert_array_equal(m, m_cpu)


def test_window_augment_identity_and_flips(device, rng):
    hu, mask = _slices(rng, 2, 9, 12)
    be = get_backend(device)

    def aug(flip_h, flip_v, angle):
        return be.asarray(np.array([[flip_h, flip_v, angle]] * 2, np.float32))

    hud, maskd = be.asarray(hu), be.asarray(mask)
    image0, mask0 = host(device, *be.window_augment(hud, maskd, be.asarray(
        identity_augmentation(2))))
    window = np.clip((hu.astype(np.float64) + 1300) / 1600, 0, 1)
    np.testing.assert_allclose(image0[..., 0], window, rtol=0, atol=2.0**-23)
    np.testing.assert_array_equal(mask0[..., 0], (mask != 0).astype(np.uint8))
    for flip_h, flip_v, axes in ((1, 0, (2,)), (0, 1, (1,)), (1, 1, (1, 2))):
        image, m = host(device, *be.window_augment(hud, maskd, aug(flip_h, flip_v, 0.0)))
        np.testing.assert_array_equal(image, np.flip(image0, axis=axes))
        np.testing.assert_array_equal(m, np.flip(mask0, axis=axes))


# --------------------------------------------------------------------------- confusion counts

CONFUSION_CUDA = CONFUSION + [pytest.param(3, 70, 50, "random", id="n3-70x50")]


@pytest.mark.parametrize("n,h,w,kind", CONFUSION_CUDA)
def test_confusion_counts(device, tdev, rng, n, h, w, kind):
    z = rand(rng, n, h, w, 1)
    z[0, 0, :3, 0] = [0.0, -0.0, 1e-30]
    inputs = dict(z=z, t=_target(rng, kind, n, h, w))

    def run(be, z, t):
        return dict(counts=be.confusion_counts(z, t))

    def run_torch(z, t):
        return dict(counts=T.confusion_counts(z, t, device=tdev))

    got = check_op(device, run, run_torch, inputs, exact=("counts",))
    assert got["counts"].dtype == np.int64 and got["counts"].shape == (n, 3)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("call,expect", [pytest.param(c, e, id=i) for i, c, e in ERRORS])
def test_bad_arguments_raise_value_error(device, call, expect):
    be = get_backend(device)
    with pytest.raises(ValueError) as info:
        call(be)
    for part in expect(be):
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


# --------------------------------------------------------------------------- the U-Net


def _unet_grads_vs_torch(device, depth, width, n, h, w, rel_tol):
    from test_unet import assert_unet_gradients_match_torch

    assert_unet_gradients_match_torch(get_backend(device), depth, width, n, h, w, rel_tol)


@pytest.mark.parametrize("depth,width,n,h,w", [(2, 4, 2, 12, 20), (4, 3, 1, 32, 48),
                                               (3, 20, 2, 24, 16)])
def test_unet_gradients_match_torch(device, depth, width, n, h, w):
    """Every gradient of the whole U-Net against the PyTorch reference U-Net in float64,
    within 2e-4 of each gradient's largest entry (as the CPU backend, tests/test_unet.py)."""
    _unet_grads_vs_torch(device, depth, width, n, h, w, 2e-4)


def _train(backend, steps, depth, width, image, mask, lr):
    from nodulekit.nn import Adam, UNet, training_step

    model = UNet(backend, depth=depth, width=width, seed=7)
    opt = Adam(backend, model.params, model.grads, lr=lr)
    x, t = backend.asarray(image), backend.asarray(mask)
    losses = [float(training_step(model, opt, x, t)) for _ in range(steps)]
    return np.array(losses), model.state_dict()


def test_training_steps_match_the_cpu_backend(device):
    """50 training steps (forward, Dice, backward, Adam) from the same start on both
    backends. Both compute in float32 with different summation orders, so the runs drift
    apart by rounding; what is checked is that they stay together: the loss within 1e-4
    at every step, every weight within lr / 2 (each step moves a weight by about lr at
    most, and a gradient entry near zero can flip its update's sign on rounding). The CPU
    emulator of the kernels stays within 3e-8 (loss) and 3e-4 lr (weights) over 50 steps."""
    from test_unet import _batch

    steps = 50 if device == "cuda" else 12  # the emulator is slow; 12 still compounds
    lr, depth, width = 1e-3, 2, 4
    image, mask = _batch(2, 16, 24, seed=11)
    image = image.astype(np.float32)
    ours, w_ours = _train(get_backend(device), steps, depth, width, image, mask, lr)
    cpu, w_cpu = _train(real_get_backend("cpu"), steps, depth, width, image, mask, lr)
    np.testing.assert_allclose(ours, cpu, rtol=0, atol=1e-4)
    assert ours[-1] < ours[0], f"the loss should fall: {ours[0]:.4f} -> {ours[-1]:.4f}"
    for name, value in w_ours.items():
        np.testing.assert_allclose(value, w_cpu[name], rtol=0, atol=lr / 2, err_msg=name)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_training_steps_every_precision(device, precision):
    """Training steps (forward, Dice, backward, Adam) with the tensor-core convolutions
    stay with the fp32 backend's: the loss within LOSS_ATOL of fp32's at every step, and
    falling. Per-gradient comparisons with the float64 U-Net do not work at these
    precisions: a pre-activation within 1e-3 of zero flips its ReLU between the runs (one
    or two per layer in a tiny U-Net, found in the emulator), and that pixel's gradient then
    differs by its whole size; the per-op tests above check the arithmetic. The emulator
    measured a largest loss difference of 8e-5 (tf32) and 3e-5 (bf16) over 12 steps."""
    from test_unet import _batch

    steps, loss_atol = (50, 5e-3) if device == "cuda" else (6, 1e-3)
    lr, depth, width = 1e-3, 2, 4
    image, mask = _batch(2, 16, 24, seed=11)
    image = image.astype(np.float32)
    ours, _ = _train(precision_backend(device, precision), steps, depth, width, image, mask, lr)
    fp32, _ = _train(precision_backend(device, "fp32"), steps, depth, width, image, mask, lr)
    np.testing.assert_allclose(ours, fp32, rtol=0, atol=loss_atol)
    assert ours[-1] < ours[0], f"the loss should fall: {ours[0]:.4f} -> {ours[-1]:.4f}"

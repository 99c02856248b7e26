"""The engine's ops written with PyTorch: what tests compare against and benchmarks time.

Inputs and outputs use OUR layouts (see ``nodulekit/engine/ops.py``): activations NHWC,
conv weights ``[K, R, S, C]``, up-conv weights ``[K, 2, 2, C]``. Inside, an NHWC tensor is
handed to torch as ``x.permute(0, 3, 1, 2)``: a no-copy NCHW view whose memory is
``channels_last``, which cuDNN runs natively; weights alike (``[K,R,S,C] -> [K,C,R,S]``,
and ``[K,2,2,C] -> [C,K,2,2]`` for ``conv_transpose2d``). Outputs come back as NHWC.

Two ways in:

- ``conv2d_forward(x, w, b, relu, device=..., dtype=...)`` and its siblings, one per op,
  take NumPy arrays and return NumPy arrays (the tests use these);
- ``make_torch_op(name, *args, device=..., dtype=..., **kwargs)`` converts the inputs
  once and returns a zero-argument callable that runs only the torch compute and returns
  torch tensors (the benchmark times this; call ``torch.cuda.synchronize`` around it).

Both accept torch tensors already in place as well as NumPy arrays. ``dtype`` (a torch or
NumPy float dtype, or None = the dtype of the float inputs) applies to float inputs only;
integer inputs (masks, HU) keep theirs. Backward ops use autograd: the callable made for
``*_backward`` runs the forward once when it is made and times only
``torch.autograd.grad`` on the recorded graph. TF32 is off unless ``allow_tf32=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from nodulekit.engine.ops import AIR_HU, BN_MOMENTUM, NORM_EPS, WINDOW_CENTER, WINDOW_WIDTH

__all__ = [
    "OPS", "make_torch_op", "to_numpy", "to_torch",
    "conv2d_forward", "conv2d_backward", "maxpool2x2_forward", "maxpool2x2_backward",
    "upconv2x2_forward", "upconv2x2_backward", "concat_channels", "split_channels",
    "sigmoid_dice_loss", "adam_step", "adam_steps", "window_augment", "confusion_counts",
    "instance_norm_forward", "instance_norm_backward", "batch_norm_forward",
    "batch_norm_backward",
]

Array = np.ndarray | torch.Tensor  # what the ops take: NumPy arrays or tensors in place


# --------------------------------------------------------------------------- conversion


def _torch_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
            np.dtype(np.float16): torch.float16}[np.dtype(dtype)]


def _float_dtype(args, dtype) -> torch.dtype:
    """The float dtype to run in: ``dtype``, else that of the first float input."""
    if dtype is not None:
        return _torch_dtype(dtype)
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
        if isinstance(a, np.ndarray) and a.dtype.kind == "f":
            return _torch_dtype(a.dtype)
    return torch.float32


def to_torch(a, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """NumPy array (or tensor) -> contiguous tensor on ``device``; ``dtype`` for floats only."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device).contiguous()


def to_numpy(out):
    """Tensor, or a tuple of them (None kept) -> contiguous NumPy arrays."""
    if isinstance(out, tuple | list):
        return tuple(to_numpy(o) for o in out)
    if out is None:
        return None
    return out.detach().cpu().numpy().copy(order="C")  # a copy: 0-d stays 0-d


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """NHWC (or KRSC) tensor -> NCHW (KCRS) view, channels_last in memory; no copy."""
    return x.permute(0, 3, 1, 2)


def _nhwc(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 2, 3, 1)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


# --------------------------------------------------------------------------- the ops
# Each builder takes tensors already converted (our layouts) and returns the zero-argument
# callable that runs the op. OPS maps op name -> builder.

OPS: dict[str, Callable[..., Callable[[], object]]] = {}


def _op(fn):
    OPS[fn.__name__.removeprefix("_build_")] = fn
    return fn


def _conv(x, w, b, relu):
    y = F.conv2d(_nchw(x), _nchw(w), b, padding=w.shape[1] // 2)
    return _nhwc(F.relu(y) if relu else y)


@_op
def _build_conv2d_forward(x, w, b, relu=False):
    return lambda: _conv(x, w, b, relu)


@_op
def _build_conv2d_backward(dy, x, w, b, relu=False, need_dx=True):
    """Autograd through ``relu(conv(x, w) + b)``; torch needs ``b`` (not ``y``) to redo it."""
    x, w, b = _leaf(x), _leaf(w), _leaf(b)
    y = _conv(x, w, b, relu)
    wrt = (x, w, b) if need_dx else (w, b)

    def run():
        grads = torch.autograd.grad(y, wrt, dy, retain_graph=True)
        return grads if need_dx else (None, *grads)

    return run


def _pool_code(idx: torch.Tensor, w_in: int) -> torch.Tensor:
    """torch's flat index ``row * W + col`` -> our ``2a + b`` (a = row % 2, b = col % 2)."""
    return (2 * ((idx // w_in) % 2) + (idx % w_in) % 2).to(torch.uint8)


@_op
def _build_maxpool2x2_forward(x):
    def run():
        y, idx = F.max_pool2d(_nchw(x), 2, 2, return_indices=True)
        return _nhwc(y), _nhwc(_pool_code(idx, x.shape[2]))

    return run


@_op
def _build_maxpool2x2_backward(dy, x):
    """Autograd through max-pool: torch needs the forward input ``x`` (not our argmax)."""
    x = _leaf(x)
    y = _nhwc(F.max_pool2d(_nchw(x), 2, 2))
    return lambda: torch.autograd.grad(y, x, dy, retain_graph=True)[0]


def _upconv(x, w, b):
    # ours [K,2,2,C] -> torch's ConvTranspose2d weight [C_in, C_out, 2, 2] = [C,K,2,2]
    return _nhwc(F.conv_transpose2d(_nchw(x), w.permute(3, 0, 1, 2), b, stride=2))


@_op
def _build_upconv2x2_forward(x, w, b):
    return lambda: _upconv(x, w, b)


@_op
def _build_upconv2x2_backward(dy, x, w):
    x, w = _leaf(x), _leaf(w)
    b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device, requires_grad=True)
    y = _upconv(x, w, b)
    return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)


@_op
def _build_concat_channels(a, b):
    return lambda: torch.cat((a, b), dim=3)


@_op
def _build_split_channels(dy, ca):
    """Autograd through ``cat``: the gradients of its two inputs."""
    n, h, w, c = dy.shape
    a = torch.zeros((n, h, w, ca), dtype=dy.dtype, device=dy.device, requires_grad=True)
    b = torch.zeros((n, h, w, c - ca), dtype=dy.dtype, device=dy.device, requires_grad=True)
    y = torch.cat((a, b), dim=3)
    return lambda: tuple(g.contiguous() for g in torch.autograd.grad(y, (a, b), dy,
                                                                     retain_graph=True))


@_op
def _build_sigmoid_dice_loss(logits, target, smooth=1.0):
    """Loss, per-sample Dice and d loss / d logits (autograd), as the fused op returns."""
    t = target.to(logits.dtype)

    def run():
        z = _leaf(logits)
        p = torch.sigmoid(z)
        inter = (p * t).sum(dim=(1, 2, 3))
        total = p.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3))
        dice = (2 * inter + smooth) / (total + smooth)
        loss = (1 - dice).mean()
        (dz,) = torch.autograd.grad(loss, z)
        return loss.detach(), dice.detach(), dz

    return run


def _adam(param, step, lr, beta1, beta2, eps, m=None, v=None):
    """torch.optim.Adam on one flat tensor, its state set as after ``step - 1`` steps."""
    p = param.detach().clone()
    opt = torch.optim.Adam([p], lr=lr, betas=(beta1, beta2), eps=eps)
    if m is not None:
        opt.state[p] = {"step": torch.tensor(float(step - 1)),
                        "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    return p, opt


@_op
def _build_adam_step(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One Adam step from state (m, v, step - 1); returns new (param, m, v), inputs kept.

    The callable made here keeps stepping the same optimizer (fine for timing).
    """
    p, opt = _adam(param, step, lr, beta1, beta2, eps, m, v)
    p.grad = grad.clone()

    def run():
        opt.step()
        state = opt.state[p]
        return p.detach(), state["exp_avg"], state["exp_avg_sq"]

    return run


@_op
def _build_window_augment(hu, mask, aug, center=WINDOW_CENTER, width=WINDOW_WIDTH):
    """The same transform with ``grid_sample`` (align_corners=True: -1..1 = pixel centres).

    Source coordinates follow the ops.py formula in float64; ``grid_sample`` then runs in
    ``aug``'s dtype (the run dtype). The image is sampled bilinearly as ``hu + 1000`` with
    zero padding, so a neighbour off the slice counts as air; the mask with
    ``mode="nearest"``, which rounds half to even where ours takes ``floor(s + 0.5)``: the
    two differ only on exact .5 ties. In float32 the normalised grid moves coordinates by
    about W * 1e-7 pixels. Needs H, W >= 2.
    """
    n, h, w = hu.shape
    dt = aug.dtype
    a = aug.to(torch.float64)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=hu.device),
                            torch.arange(w, dtype=torch.float64, device=hu.device),
                            indexing="ij")
    t = torch.deg2rad(a[:, 2, None, None])
    cy, cx = (h - 1) / 2, (w - 1) / 2
    sy = cy + torch.cos(t) * (yy - cy) + torch.sin(t) * (xx - cx)
    sx = cx + torch.cos(t) * (xx - cx) - torch.sin(t) * (yy - cy)
    sy = torch.where(a[:, 1, None, None] != 0, h - 1 - sy, sy)
    sx = torch.where(a[:, 0, None, None] != 0, w - 1 - sx, sx)
    grid = torch.stack((sx / (w - 1) * 2 - 1, sy / (h - 1) * 2 - 1), dim=-1).to(dt)
    src = (hu.to(dt) - AIR_HU)[:, None]  # NCHW, C = 1
    msk = mask.to(dt)[:, None]

    def run():
        v = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=True)[:, 0] + AIR_HU
        image = torch.clamp((v - (center - width / 2)) / width, 0, 1)[..., None]
        near = F.grid_sample(msk, grid, mode="nearest", padding_mode="zeros",
                             align_corners=True)[:, 0]
        return image, (near != 0).to(torch.uint8)[..., None]

    return run


@_op
def _build_confusion_counts(logits, target):
    def run():
        pred = logits[..., 0] > 0
        t = target[..., 0] != 0
        return torch.stack([(pred & t).sum(dim=(1, 2)), (pred & ~t).sum(dim=(1, 2)),
                            (~pred & t).sum(dim=(1, 2))], dim=1).to(torch.int64)

    return run


def _instance_norm(x, gamma, beta, eps, relu):
    y = F.instance_norm(_nchw(x), weight=gamma, bias=beta, eps=eps)
    return _nhwc(F.relu(y) if relu else y)


def _stats(t: torch.Tensor, dims, eps):
    """(mean, 1 / sqrt(biased var + eps)) of an NCHW tensor over ``dims``."""
    mean = t.mean(dim=dims)
    return mean, torch.rsqrt(t.var(dim=dims, unbiased=False) + eps)


@_op
def _build_instance_norm_forward(x, gamma, beta, eps=NORM_EPS, relu=False):
    """-> (y, mean [N, C], invstd [N, C]); the statistics from torch's own mean and var."""
    def run():
        mean, invstd = _stats(_nchw(x), (2, 3), eps)
        return _instance_norm(x, gamma, beta, eps, relu), mean, invstd

    return run


@_op
def _build_instance_norm_backward(dy, x, gamma, beta, eps=NORM_EPS, relu=False):
    """Autograd through ``relu(instance_norm(x))``: (dx, dgamma, dbeta).

    In NCHW-contiguous memory, not channels_last: torch 2.13's instance-norm backward on
    the CPU returns a wrong dx for a batch of one when the incoming gradient is
    channels_last (off by O(1); found by this suite, batch 2 is right)."""
    x = _nchw(x).contiguous().requires_grad_(True)
    gamma, beta = _leaf(gamma), _leaf(beta)
    y = F.instance_norm(x, weight=gamma, bias=beta, eps=eps)
    y = F.relu(y) if relu else y
    g = _nchw(dy).contiguous()

    def run():
        dx, dgamma, dbeta = torch.autograd.grad(y, (x, gamma, beta), g, retain_graph=True)
        return _nhwc(dx), dgamma, dbeta

    return run


def _batch_norm(x, gamma, beta, running_mean, running_var, training, momentum, eps, relu):
    y = F.batch_norm(_nchw(x), running_mean, running_var, weight=gamma, bias=beta,
                     training=training, momentum=momentum, eps=eps)
    return _nhwc(F.relu(y) if relu else y)


@_op
def _build_batch_norm_forward(x, gamma, beta, running_mean, running_var, training=True,
                              momentum=BN_MOMENTUM, eps=NORM_EPS, relu=False):
    """-> (y, mean [1, C], invstd [1, C], running_mean, running_var after the call). Each
    call starts from the running statistics given (torch updates its tensors in place)."""
    def run():
        rm, rv = running_mean.clone(), running_var.clone()
        y = _batch_norm(x, gamma, beta, rm, rv, training, momentum, eps, relu)
        if training:
            mean, invstd = _stats(_nchw(x), (0, 2, 3), eps)
        else:
            mean, invstd = running_mean, torch.rsqrt(running_var + eps)
        return y, mean[None], invstd[None], rm, rv

    return run


@_op
def _build_batch_norm_backward(dy, x, gamma, beta, running_mean, running_var, training=True,
                               eps=NORM_EPS, relu=False):
    """Autograd through ``relu(batch_norm(x))`` (batch statistics in training, the running
    ones, constants, in evaluation): (dx, dgamma, dbeta)."""
    x, gamma, beta = _leaf(x), _leaf(gamma), _leaf(beta)
    y = _batch_norm(x, gamma, beta, running_mean.clone(), running_var.clone(), training,
                    BN_MOMENTUM, eps, relu)
    return lambda: torch.autograd.grad(y, (x, gamma, beta), dy, retain_graph=True)


# --------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def _precision(allow_tf32: bool):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_torch_op(name: str, *args, device="cpu", dtype=None, allow_tf32: bool = False,
                  **kwargs) -> Callable[[], object]:
    """Convert ``args`` once (arrays -> tensors on ``device``), return ``run()``.

    ``run()`` does only the torch compute of op ``name`` and returns tensors in our
    layouts (a tuple where the op returns several). Non-array arguments (relu, step, ...)
    pass through.
    """
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; choose one of {', '.join(OPS)}")
    dt = _float_dtype(args, dtype)
    conv = [to_torch(a, device, dt) if isinstance(a, np.ndarray | torch.Tensor) else a
            for a in args]
    with _precision(allow_tf32):
        run = OPS[name](*conv, **kwargs)

    def timed():
        with _precision(allow_tf32):
            return run()

    return timed


def _numpy_op(name: str, *args, device="cpu", dtype=None, **kwargs):
    return to_numpy(make_torch_op(name, *args, device=device, dtype=dtype, **kwargs)())


def conv2d_forward(x, w, b, relu=False, *, device="cpu", dtype=None):
    return _numpy_op("conv2d_forward", x, w, b, relu, device=device, dtype=dtype)


def conv2d_backward(dy, x, w, b, relu=False, need_dx=True, *, device="cpu", dtype=None):
    """-> (dx or None, dw, db); unlike the engine op it takes ``b`` instead of ``y``."""
    return _numpy_op("conv2d_backward", dy, x, w, b, relu, need_dx, device=device, dtype=dtype)


def maxpool2x2_forward(x, *, device="cpu", dtype=None):
    """-> (y, argmax as our uint8 ``2a + b`` code)."""
    return _numpy_op("maxpool2x2_forward", x, device=device, dtype=dtype)


def maxpool2x2_backward(dy, x, *, device="cpu", dtype=None):
    """-> dx; unlike the engine op it takes the forward input ``x`` instead of argmax."""
    return _numpy_op("maxpool2x2_backward", dy, x, device=device, dtype=dtype)


def upconv2x2_forward(x, w, b, *, device="cpu", dtype=None):
    return _numpy_op("upconv2x2_forward", x, w, b, device=device, dtype=dtype)


def upconv2x2_backward(dy, x, w, *, device="cpu", dtype=None):
    """-> (dx, dw, db)."""
    return _numpy_op("upconv2x2_backward", dy, x, w, device=device, dtype=dtype)


def concat_channels(a, b, *, device="cpu", dtype=None):
    return _numpy_op("concat_channels", a, b, device=device, dtype=dtype)


def split_channels(dy, ca, *, device="cpu", dtype=None):
    """-> (da, db)."""
    return _numpy_op("split_channels", dy, int(ca), device=device, dtype=dtype)


def sigmoid_dice_loss(logits, target, smooth=1.0, *, device="cpu", dtype=None):
    """-> (loss 0-d, dice [N], dlogits)."""
    return _numpy_op("sigmoid_dice_loss", logits, target, float(smooth),
                     device=device, dtype=dtype)


def adam_step(param: Array, grad: Array, m: Array, v: Array, step: int, lr: float,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              **where) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of torch.optim.Adam from state (m, v, step - 1) -> new (param, m, v).

    The engine op's nine values; ``where``: ``device`` (default "cpu") and ``dtype``
    (default None), keyword-only as for every op here. Unlike the engine op it does not
    write into its inputs.
    """
    unknown = set(where) - {"device", "dtype"}
    if unknown:
        raise TypeError(f"adam_step() got an unexpected keyword argument "
                        f"{sorted(unknown)[0]!r}")
    return _numpy_op("adam_step", param, grad, m, v, int(step), float(lr), float(beta1),
                     float(beta2), float(eps), **where)


def adam_steps(param, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8, *, device="cpu",
               dtype=None):
    """``len(grads)`` steps of one torch.optim.Adam from zero state -> (param, m, v)."""
    dt = _float_dtype((param,), dtype)
    p, opt = _adam(to_torch(param, device, dt), 1, lr, beta1, beta2, eps)
    for g in grads:
        p.grad = to_torch(g, device, dt)
        opt.step()
    state = opt.state[p]
    return to_numpy((p, state["exp_avg"], state["exp_avg_sq"]))


def window_augment(hu, mask, aug, center=WINDOW_CENTER, width=WINDOW_WIDTH, *,
                   device="cpu", dtype=torch.float64):
    """-> (image [N,H,W,1] in ``dtype``, mask uint8 [N,H,W,1]); see the builder's note."""
    return _numpy_op("window_augment", hu, mask, aug, float(center), float(width),
                     device=device, dtype=dtype)


def confusion_counts(logits, target, *, device="cpu", dtype=None):
    """-> int64 [N, 3]: TP, FP, FN of ``logits > 0``."""
    return _numpy_op("confusion_counts", logits, target, device=device, dtype=dtype)


def instance_norm_forward(x, gamma, beta, eps=NORM_EPS, relu=False, *, device="cpu",
                          dtype=None):
    """-> (y, mean [N, C], invstd [N, C])."""
    return _numpy_op("instance_norm_forward", x, gamma, beta, float(eps), bool(relu),
                     device=device, dtype=dtype)


def instance_norm_backward(dy, x, gamma, beta, eps=NORM_EPS, relu=False, *, device="cpu",
                           dtype=None):
    """-> (dx, dgamma, dbeta); unlike the engine op it takes ``beta`` (not y, mean, invstd)
    and recomputes the forward."""
    return _numpy_op("instance_norm_backward", dy, x, gamma, beta, float(eps), bool(relu),
                     device=device, dtype=dtype)


def batch_norm_forward(x, gamma, beta, running_mean, running_var, training=True,  # noqa: PLR0913
                       momentum=BN_MOMENTUM, eps=NORM_EPS, relu=False, *, device="cpu",
                       dtype=None):
    """-> (y, mean [1, C], invstd [1, C], running_mean, running_var updated); the inputs
    are not changed."""
    return _numpy_op("batch_norm_forward", x, gamma, beta, running_mean, running_var,
                     bool(training), float(momentum), float(eps), bool(relu), device=device,
                     dtype=dtype)


def batch_norm_backward(dy, x, gamma, beta, running_mean, running_var,  # noqa: PLR0913
                        training=True, eps=NORM_EPS, relu=False, *, device="cpu", dtype=None):
    """-> (dx, dgamma, dbeta); takes what torch needs to redo the forward."""
    return _numpy_op("batch_norm_backward", dy, x, gamma, beta, running_mean, running_var,
                     bool(training), float(eps), bool(relu), device=device, dtype=dtype)

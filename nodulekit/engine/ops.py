"""The op list: every operation the U-Net needs, its shapes, dtypes and math.

This module is the contract between the network (``nodulekit/nn``) and the backends
(``reference.py`` in float64, ``cpu.py`` with NumPy + Numba, ``cuda.py`` with CuPy
kernels). Each public method of :class:`Backend` checks its arguments, then calls the
backend's ``_name`` implementation. So a wrong dtype, layout or shape raises the same
``ValueError`` on every backend, saying what was expected and what came.

Conventions (see docs/design.md):

- activations are NHWC, contiguous, in the backend's float dtype (float32; the
  reference backend uses float64);
- convolution weights are ``[K, R, S, C]`` (out, kernel rows, kernel cols, in), the
  2x2 up-convolution's ``[K, 2, 2, C]``, biases ``[K]``;
- CT slices enter as int16 Hounsfield units ``[N, H, W]`` with uint8 masks
  ``[N, H, W]`` (nonzero = nodule); masks leave the augmentation as uint8 ``{0, 1}``
  with a channel axis, ``[N, H, W, 1]``.

The ops, with their math (x, y: input, output; K out channels; C in channels):

``conv2d_forward(x, w, b, relu)``
    3x3 or 1x1 convolution, stride 1, zero "same" padding ``P = R // 2``::

        y[n,h,w,k] = b[k] + sum_{r,s,c} x[n, h+r-P, w+s-P, c] * w[k,r,s,c]
        y = max(y, 0) if relu

``conv2d_backward(dy, x, w, y, relu, need_dx, need_db)`` -> ``(dx, dw, db)``
    With ``dz = dy * (y > 0)`` when relu (``y`` is the forward output), else ``dz = dy``::

        db[k]       = sum_{n,h,w} dz[n,h,w,k]
        dw[k,r,s,c] = sum_{n,h,w} dz[n,h,w,k] * x[n, h+r-P, w+s-P, c]
        dx[n,h,w,c] = sum_{k,r,s} dz[n, h-r+P, w-s+P, k] * w[k,r,s,c]

    ``dx`` is None when ``need_dx`` is False (the first layer needs no input gradient),
    ``db`` None when ``need_db`` is False (a convolution without a bias: one a norm follows).

``maxpool2x2_forward(x)`` -> ``(y, argmax)``
    ``y[n,i,j,c] = max_{a,b in {0,1}} x[n, 2i+a, 2j+b, c]``, output ``H // 2, W // 2``
    (an odd last row or column is dropped, as in PyTorch). ``argmax`` (uint8) holds
    ``2a + b`` of the maximum; the first in row-major order wins a tie.

``maxpool2x2_backward(dy, argmax, input_hw)`` -> ``dx``
    ``dx[n, 2i+a, 2j+b, c] = dy[n,i,j,c]`` where ``argmax == 2a + b``, else 0;
    ``dx`` has the forward input's shape ``[N, H, W, C]``.

``upconv2x2_forward(x, w, b)``
    2x2 transposed convolution, stride 2: ``[N,H,W,C] -> [N,2H,2W,K]``::

        y[n, 2i+a, 2j+b, k] = b[k] + sum_c x[n,i,j,c] * w[k,a,b,c]

``upconv2x2_backward(dy, x, w)`` -> ``(dx, dw, db)``::

        dx[n,i,j,c] = sum_{a,b,k} dy[n,2i+a,2j+b,k] * w[k,a,b,c]
        dw[k,a,b,c] = sum_{n,i,j} dy[n,2i+a,2j+b,k] * x[n,i,j,c]
        db[k]       = sum_{n,h,w} dy[n,h,w,k]

``concat_channels(a, b)`` / ``split_channels(dy, ca)``
    ``y = [a | b]`` along channels (the U-Net puts the skip first); the split returns
    the two gradients as contiguous arrays.

``upconv2x2_concat_forward(skip, x, w, b)`` / ``upconv2x2_split_backward(dcat, ca, x, w)``
    The decoder's pair as one op: ``concat_channels(skip, upconv2x2_forward(x, w, b))``,
    and ``split_channels`` then ``upconv2x2_backward`` -> ``(dskip, dx, dw, db)``. Same
    math; a backend may skip the intermediate tensor (the U-Net calls these).

``conv2d_bn_eval_forward(x, w, gamma, beta, running_mean, running_var, relu, eps)`` -> ``y``
    A convolution without bias, then batch norm in evaluation (the running statistics)::

        y = batch_norm_forward(conv2d_forward(x, w, 0), gamma, beta, running_mean,
                               running_var, training=False, relu, eps=eps)[0]

    bit for bit: the same sums, then the same ``(z - mean) scale + beta`` per channel. What
    the U-Net calls at inference; a backend may apply the norm to each block of ``z`` while
    it is still in cache, instead of a second pass over it.

``sigmoid_dice_loss(logits, target, smooth)`` -> ``(loss, dice, dlogits)``
    With ``p = sigmoid(z)``, per sample i (sums over the sample's pixels)::

        I = sum p*t,  S = sum p + sum t
        dice_i = (2 I + s) / (S + s),   loss = mean_i (1 - dice_i)
        dloss/dz = -(1/N) * (2 t (S + s) - (2 I + s)) / (S + s)^2 * p (1 - p)

    ``target`` holds 0 or 1 (``window_augment`` makes it so; a 0/255 mask is not checked
    for here, to spare a pass over the data). ``loss`` is a 0-d array (no device sync),
    ``dice`` is ``[N]``; both float64 on every backend (the sums accumulate in float64).

``adam_step(param, grad, m, v, step, lr, beta1, beta2, eps)`` (in place)
    PyTorch's Adam (no weight decay), ``step`` counted from 1::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        param -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)

``window_augment(hu, mask, aug, center, width)`` -> ``(image, mask_out)``
    Per sample ``aug[n] = (flip_h, flip_v, angle_deg)``. Forward transform: flip left-right
    if flip_h, flip up-down if flip_v, then rotate by angle (counter-clockwise as
    displayed, as ``np.rot90``) about the centre ``(cy, cx) = ((H-1)/2, (W-1)/2)``.
    Computed by inverse mapping each output pixel (y, x)::

        dy, dx = y - cy, x - cx
        sy = cy + cos(t) dy + sin(t) dx          (t = angle in radians)
        sx = cx + cos(t) dx - sin(t) dy
        if flip_v: sy = H - 1 - sy
        if flip_h: sx = W - 1 - sx

    The image samples HU bilinearly at (sy, sx), a neighbour outside the slice being air
    (-1000 HU), then windows it: ``clip((hu - (center - width/2)) / width, 0, 1)``.
    The mask takes its nearest pixel, ``floor(s + 0.5)`` per axis, 0 outside; nonzero
    becomes 1. The reference computes coordinates in float64; the CPU backend too; a
    GPU in float32 may differ on the rare exact tie.

``instance_norm_forward(x, gamma, beta, eps, relu)`` -> ``(y, mean, invstd)``
    Per sample n and channel c over the H x W pixels (M = H W, at least 2), as
    ``torch.nn.functional.instance_norm`` (no running statistics: the same in training and
    evaluation)::

        mean[n,c]   = (1/M) sum_{h,w} x[n,h,w,c]
        var[n,c]    = (1/M) sum_{h,w} x[n,h,w,c]^2 - mean[n,c]^2     (biased)
        invstd[n,c] = 1 / sqrt(var[n,c] + eps)
        y = gamma[c] (x - mean[n,c]) invstd[n,c] + beta[c];   y = max(y, 0) if relu

    ``mean`` and ``invstd`` (``[N, C]``, the backend's float) are kept for the backward.
    The sums are float64 on every backend (a float32 sum of squares would cancel).

``instance_norm_backward(dy, x, y, mean, invstd, gamma, relu)`` -> ``(dx, dgamma, dbeta)``
    With ``g = dy * (y > 0)`` when relu (``y`` the forward output), else ``g = dy``, and
    ``xhat = (x - mean) invstd``, per (n, c) over the M pixels::

        dbeta[c]  = sum_{n,h,w} g;          dgamma[c] = sum_{n,h,w} g xhat
        dx = gamma[c] invstd[n,c] (g - (1/M) sum_{h,w} g - xhat (1/M) sum_{h,w} g xhat)

``batch_norm_forward(x, gamma, beta, running_mean, running_var, training, relu,
sum_across, momentum, eps)`` -> ``(y, mean, invstd)``
    As ``torch.nn.functional.batch_norm``. Training: the statistics of channel c over all
    N x H x W pixels (M of them, at least 2) as above, and the running statistics updated
    in place, PyTorch's way (momentum m; the variance unbiased)::

        running_mean = (1 - m) running_mean + m mean
        running_var  = (1 - m) running_var  + m var M / (M - 1)

    Evaluation (``training`` False): ``mean = running_mean``, ``invstd = 1 / sqrt(
    running_var + eps)``, nothing updated. ``y`` as instance norm's; ``mean``, ``invstd``
    are ``[1, C]``. Data-parallel (the global batch's statistics, as ``SyncBatchNorm``):
    ``sum_across(buf)`` sums a float64 array of the backend in place over the ranks;
    training calls it once, on ``[sum x (C), sum x^2 (C), M]``, and the statistics are
    those of every rank's pixels together.

``batch_norm_backward(dy, x, y, mean, invstd, gamma, training, relu, sum_across)``
    -> ``(dx, dgamma, dbeta)``. Training: instance norm's formula with the sums over all
    N x H x W pixels, and across the ranks: ``sum_across`` is called once, on ``[sum g (C),
    sum g xhat (C), M]``; ``dgamma`` and ``dbeta`` stay this rank's own (the gradient
    all-reduce averages them with the other parameters'). Evaluation: the statistics are
    constants, ``dx = gamma invstd g``.

``confusion_counts(logits, target)`` -> int64 ``[N, 3]``
    Per sample: true positives, false positives, false negatives of the prediction
    ``p > 0.5``, computed as ``logits > 0`` (the same in exact arithmetic, and free of
    sigmoid's rounding to 0.5 near zero).
"""

from __future__ import annotations

import math

import numpy as np

AIR_HU = -1000.0
WINDOW_CENTER = -500.0
WINDOW_WIDTH = 1600.0

OP_NAMES = (
    "conv2d_forward",
    "conv2d_backward",
    "maxpool2x2_forward",
    "maxpool2x2_backward",
    "upconv2x2_forward",
    "upconv2x2_backward",
    "concat_channels",
    "split_channels",
    "sigmoid_dice_loss",
    "adam_step",
    "window_augment",
    "confusion_counts",
    "instance_norm_forward",
    "instance_norm_backward",
    "batch_norm_forward",
    "batch_norm_backward",
)

# PyTorch's defaults for its normalisation layers (InstanceNorm2d, BatchNorm2d)
NORM_EPS = 1e-5
BN_MOMENTUM = 0.1


# --------------------------------------------------------------------------- checks


def _describe(a) -> str:
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        return f"a {type(a).__name__}"
    return f"{a.dtype} array of shape {tuple(a.shape)}"


def check_array(op: str, name: str, a, dtype, ndim: int, layout: str = "", shape=None):
    """Raise ValueError unless ``a`` is a C-contiguous array of ``dtype`` and ``ndim`` dims.

    ``shape`` may fix some dimensions (None = any). ``layout`` names the axes for
    the message, e.g. "NHWC".
    """
    # the usual case first, without building a message (every op call checks 3-6 arrays)
    try:
        if (a.dtype == dtype and a.ndim == ndim and a.flags.c_contiguous
                and (shape is None or (len(shape) == ndim and all(
                    d is None or d == g for d, g in zip(shape, a.shape, strict=True))))):
            return
    except AttributeError:
        pass
    _raise_array_error(op, name, a, dtype, ndim, layout, shape)


def _raise_array_error(op: str, name: str, a, dtype, ndim: int, layout: str, shape) -> None:
    """check_array's message: what is wrong with ``a``, the first thing found."""
    where = f"{op}: {name}"
    want = f"{np.dtype(dtype).name} {layout or f'{ndim}-d'} array"
    if not hasattr(a, "dtype") or not hasattr(a, "shape"):
        raise ValueError(f"{where} must be a {want}, got {_describe(a)}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{where} must be a {want}, got {_describe(a)}")
    if a.ndim != ndim:
        raise ValueError(f"{where} must be a {want} ({ndim} dims), got {_describe(a)}")
    if shape is not None:
        for axis, (want_d, got_d) in enumerate(zip(shape, a.shape, strict=True)):
            if want_d is not None and want_d != got_d:
                exp = "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"
                raise ValueError(
                    f"{where} must have shape {exp} ({layout or 'dims'}), got {tuple(a.shape)}"
                    f" (axis {axis}: expected {want_d}, got {got_d})"
                )
    if not a.flags.c_contiguous:
        raise ValueError(f"{where} must be C-contiguous ({layout}); got a strided view")
    raise ValueError(f"{where} must be a {want}, got {_describe(a)}")  # not reached


def _check_positive(op: str, a, name: str):
    if any(d <= 0 for d in a.shape):
        raise ValueError(f"{op}: {name} has an empty dimension: shape {tuple(a.shape)}")


# --------------------------------------------------------------------------- backend


class Backend:
    """Base of every backend: checks arguments, then calls ``self._<op>``.

    A backend provides ``name``, ``xp`` (its array module), ``dtype`` (its float
    dtype), ``precision`` (a named choice, e.g. "fp32") and the ``_<op>`` methods.
    """

    name = "abstract"
    xp = np
    dtype = np.dtype(np.float32)
    precision = "fp32"

    # ---- memory helpers used by nn/ (keep cupy out of the layers above)
    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=self.dtype if dtype is None else dtype)

    def empty(self, shape, dtype=None):
        return self.xp.empty(shape, dtype=self.dtype if dtype is None else dtype)

    def asarray(self, a, dtype=None):
        """Host or device array -> this backend's contiguous array."""
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self) -> None:
        """Wait for queued work (a no-op on the CPU)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision}>"

    # ---- convolution
    def conv2d_forward(self, x, w, b, relu: bool = False):
        op = "conv2d_forward"
        k = self._check_conv_input(op, x, w)
        check_array(op, "b", b, self.dtype, 1, "K", (k,))
        return self._conv2d_forward(x, w, b, bool(relu))

    def _check_conv_input(self, op: str, x, w) -> int:
        """x NHWC and w [K,3,3,C] or [K,1,1,C] of the backend's float; K."""
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        check_array(op, "w", w, self.dtype, 4, "KRSC")
        _check_positive(op, x, "x")
        k, r, s, _ = w.shape
        if r != s or r not in (1, 3):
            raise ValueError(f"{op}: w must be [K,3,3,C] or [K,1,1,C], got {tuple(w.shape)}")
        check_array(op, "w", w, self.dtype, 4, "KRSC", (None, r, r, x.shape[3]))
        return k

    def conv2d_backward(self, dy, x, w, y=None, relu: bool = False, need_dx: bool = True,
                        need_db: bool = True):
        op = "conv2d_backward"
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        check_array(op, "w", w, self.dtype, 4, "KRSC", (None, None, None, x.shape[3]))
        k, r, s, _ = w.shape
        if r != s or r not in (1, 3):
            raise ValueError(f"{op}: w must be [K,3,3,C] or [K,1,1,C], got {tuple(w.shape)}")
        n, h, wd, _ = x.shape
        check_array(op, "dy", dy, self.dtype, 4, "NHWK", (n, h, wd, k))
        if relu:
            if y is None:
                raise ValueError(f"{op}: relu=True needs y, the forward output")
            check_array(op, "y", y, self.dtype, 4, "NHWK", (n, h, wd, k))
        return self._conv2d_backward(dy, x, w, y if relu else None, bool(relu), bool(need_dx),
                                     bool(need_db))

    # ---- max-pool
    def maxpool2x2_forward(self, x):
        op = "maxpool2x2_forward"
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        _check_positive(op, x, "x")
        if x.shape[1] < 2 or x.shape[2] < 2:
            raise ValueError(f"{op}: x must be at least 2x2 in H and W, got {tuple(x.shape)}")
        return self._maxpool2x2_forward(x)

    def maxpool2x2_backward(self, dy, argmax, input_hw):
        op = "maxpool2x2_backward"
        h, w = (int(v) for v in input_hw)
        check_array(op, "dy", dy, self.dtype, 4, "NHWC", (None, h // 2, w // 2, None))
        check_array(op, "argmax", argmax, np.uint8, 4, "NHWC", tuple(dy.shape))
        return self._maxpool2x2_backward(dy, argmax, (h, w))

    # ---- up-convolution
    def upconv2x2_forward(self, x, w, b):
        op = "upconv2x2_forward"
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        _check_positive(op, x, "x")
        check_array(op, "w", w, self.dtype, 4, "K22C", (None, 2, 2, x.shape[3]))
        check_array(op, "b", b, self.dtype, 1, "K", (w.shape[0],))
        return self._upconv2x2_forward(x, w, b)

    def upconv2x2_backward(self, dy, x, w):
        op = "upconv2x2_backward"
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        check_array(op, "w", w, self.dtype, 4, "K22C", (None, 2, 2, x.shape[3]))
        n, h, wd, _ = x.shape
        check_array(op, "dy", dy, self.dtype, 4, "NHWK", (n, 2 * h, 2 * wd, w.shape[0]))
        return self._upconv2x2_backward(dy, x, w)

    # ---- concat
    def concat_channels(self, a, b):
        op = "concat_channels"
        check_array(op, "a", a, self.dtype, 4, "NHWC")
        check_array(op, "b", b, self.dtype, 4, "NHWC", tuple(a.shape[:3]) + (None,))
        return self._concat_channels(a, b)

    def split_channels(self, dy, ca: int):
        op = "split_channels"
        check_array(op, "dy", dy, self.dtype, 4, "NHWC")
        if not 0 < int(ca) < dy.shape[3]:
            raise ValueError(f"{op}: ca must be in 1..{dy.shape[3] - 1}, got {ca}")
        return self._split_channels(dy, int(ca))

    # ---- the decoder's up-convolution and concat as one op (what the U-Net calls)
    def upconv2x2_concat_forward(self, skip, x, w, b):
        """``concat_channels(skip, upconv2x2_forward(x, w, b))``; a backend may write the
        up-convolution straight into its half of the concat buffer (no concat pass)."""
        op = "upconv2x2_concat_forward"
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        _check_positive(op, x, "x")
        check_array(op, "w", w, self.dtype, 4, "K22C", (None, 2, 2, x.shape[3]))
        check_array(op, "b", b, self.dtype, 1, "K", (w.shape[0],))
        n, h, wd, _ = x.shape
        check_array(op, "skip", skip, self.dtype, 4, "NHWC", (n, 2 * h, 2 * wd, None))
        return self._upconv2x2_concat_forward(skip, x, w, b)

    def upconv2x2_split_backward(self, dcat, ca: int, x, w):
        """``split_channels(dcat, ca)``, then ``upconv2x2_backward`` of the second part:
        returns (dskip, dx, dw, db); a backend may read the second part in place."""
        op = "upconv2x2_split_backward"
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        check_array(op, "w", w, self.dtype, 4, "K22C", (None, 2, 2, x.shape[3]))
        n, h, wd, _ = x.shape
        check_array(op, "dcat", dcat, self.dtype, 4, "NHWC",
                    (n, 2 * h, 2 * wd, int(ca) + w.shape[0]))
        if int(ca) < 1:
            raise ValueError(f"{op}: ca must be >= 1, got {ca}")
        return self._upconv2x2_split_backward(dcat, int(ca), x, w)

    def _upconv2x2_concat_forward(self, skip, x, w, b):
        return self._concat_channels(skip, self._upconv2x2_forward(x, w, b))

    # ---- a convolution and the batch norm of evaluation after it, as one op (inference)
    def conv2d_bn_eval_forward(self, x, w, gamma, beta, running_mean,  # noqa: PLR0913
                               running_var, relu: bool = True, eps: float = NORM_EPS):
        """``batch_norm_forward(conv2d_forward(x, w, 0), ..., training=False)[0]``, bit for
        bit; a backend may normalise each block of the sums while it is in cache."""
        op = "conv2d_bn_eval_forward"
        k = self._check_conv_input(op, x, w)
        for name, a in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                        ("running_var", running_var)):
            check_array(op, name, a, self.dtype, 1, "K", (k,))
        if not eps > 0:
            raise ValueError(f"{op}: eps must be > 0, got {eps}")
        return self._conv2d_bn_eval_forward(x, w, gamma, beta, (running_mean, running_var),
                                            bool(relu), float(eps))

    def _conv2d_bn_eval_forward(self, x, w, gamma, beta, running, relu, eps):
        """The default: the two ops' own passes."""
        z = self._conv2d_forward(x, w, self.zeros((w.shape[0],)), False)
        return self._batch_norm_forward(z, gamma, beta, running, False, relu, None, 0.0, eps)[0]

    def _upconv2x2_split_backward(self, dcat, ca, x, w):
        dskip, dup = self._split_channels(dcat, ca)
        return (dskip, *self._upconv2x2_backward(dup, x, w))

    # ---- loss
    def sigmoid_dice_loss(self, logits, target, smooth: float = 1.0):
        op = "sigmoid_dice_loss"
        check_array(op, "logits", logits, self.dtype, 4, "NHW1", (None, None, None, 1))
        check_array(op, "target", target, np.uint8, 4, "NHW1", tuple(logits.shape))
        if not smooth >= 0:
            raise ValueError(f"{op}: smooth must be >= 0, got {smooth}")
        return self._sigmoid_dice_loss(logits, target, float(smooth))

    # ---- optimiser
    # the op contract: PyTorch's Adam hyper-parameters, one argument each, as in
    # reference/torch_ops.adam_step and every caller; the backends get (beta1, beta2) as one
    def adam_step(self, param, grad, m, v, step: int, lr: float,  # noqa: PLR0913
                  beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        op = "adam_step"
        check_array(op, "param", param, self.dtype, 1, "flat")
        for name, a in (("grad", grad), ("m", m), ("v", v)):
            check_array(op, name, a, self.dtype, 1, "flat", tuple(param.shape))
        if int(step) < 1:
            raise ValueError(f"{op}: step counts from 1, got {step}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and lr >= 0 and eps > 0):
            raise ValueError(f"{op}: need 0<=betas<1, lr>=0, eps>0; got "
                             f"lr={lr}, betas=({beta1}, {beta2}), eps={eps}")
        return self._adam_step(param, grad, m, v, int(step), float(lr),
                               (float(beta1), float(beta2)), float(eps))

    # ---- input pipeline
    def window_augment(self, hu, mask, aug, center: float = WINDOW_CENTER,
                       width: float = WINDOW_WIDTH):
        op = "window_augment"
        check_array(op, "hu", hu, np.int16, 3, "NHW")
        _check_positive(op, hu, "hu")
        check_array(op, "mask", mask, np.uint8, 3, "NHW", tuple(hu.shape))
        check_array(op, "aug", aug, np.float32, 2, "[N, 3] (flip_h, flip_v, angle_deg)",
                    (hu.shape[0], 3))
        if not (width > 0 and math.isfinite(center)):
            raise ValueError(f"{op}: window width must be > 0, got width={width}, center={center}")
        return self._window_augment(hu, mask, aug, float(center), float(width))

    def confusion_counts(self, logits, target):
        op = "confusion_counts"
        check_array(op, "logits", logits, self.dtype, 4, "NHW1", (None, None, None, 1))
        check_array(op, "target", target, np.uint8, 4, "NHW1", tuple(logits.shape))
        return self._confusion_counts(logits, target)

    # ---- normalisation (instance and batch norm, the ReLU optionally fused)
    def instance_norm_forward(self, x, gamma, beta, eps: float = NORM_EPS, relu: bool = False):
        op = "instance_norm_forward"
        self._check_norm_input(op, x, gamma, beta, eps)
        if x.shape[1] * x.shape[2] < 2:
            raise ValueError(f"{op}: needs at least 2 pixels per sample (H x W) to take "
                             f"statistics over, got {tuple(x.shape)} (NHWC)")
        return self._instance_norm_forward(x, gamma, beta, float(eps), bool(relu))

    def instance_norm_backward(self, dy, x, y, mean, invstd, gamma, relu: bool = False):
        op = "instance_norm_backward"
        self._check_norm_backward(op, (dy, x, y, mean, invstd, gamma), relu, x.shape[0])
        return self._instance_norm_backward(dy, x, y if relu else None, mean, invstd, gamma,
                                            bool(relu))

    # the op contract: torch.nn.functional.batch_norm's arguments, one each, plus the ReLU
    # and the cross-rank sum
    def batch_norm_forward(self, x, gamma, beta, running_mean, running_var,  # noqa: PLR0913
                           training: bool = True, relu: bool = False, sum_across=None,
                           momentum: float = BN_MOMENTUM, eps: float = NORM_EPS):
        op = "batch_norm_forward"
        self._check_norm_input(op, x, gamma, beta, eps)
        c = x.shape[3]
        check_array(op, "running_mean", running_mean, self.dtype, 1, "C", (c,))
        check_array(op, "running_var", running_var, self.dtype, 1, "C", (c,))
        if training and x.shape[0] * x.shape[1] * x.shape[2] < 2:
            raise ValueError(f"{op}: training needs at least 2 values per channel (N x H x "
                             f"W) to take statistics over, got {tuple(x.shape)} (NHWC)")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{op}: momentum must be in [0, 1], got {momentum}")
        return self._batch_norm_forward(x, gamma, beta, (running_mean, running_var),
                                        bool(training), bool(relu), sum_across,
                                        float(momentum), float(eps))

    def batch_norm_backward(self, dy, x, y, mean, invstd, gamma, training: bool = True,
                            relu: bool = False, sum_across=None):
        op = "batch_norm_backward"
        self._check_norm_backward(op, (dy, x, y, mean, invstd, gamma), relu, 1)
        return self._batch_norm_backward(dy, x, y if relu else None, mean, invstd, gamma,
                                         bool(training), bool(relu), sum_across)

    def _check_norm_input(self, op, x, gamma, beta, eps) -> None:
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        _check_positive(op, x, "x")
        c = x.shape[3]
        check_array(op, "gamma", gamma, self.dtype, 1, "C", (c,))
        check_array(op, "beta", beta, self.dtype, 1, "C", (c,))
        if not eps > 0:
            raise ValueError(f"{op}: eps must be > 0, got {eps}")

    def _check_norm_backward(self, op, arrays, relu, groups) -> None:
        dy, x, y, mean, invstd, gamma = arrays
        check_array(op, "x", x, self.dtype, 4, "NHWC")
        _check_positive(op, x, "x")
        check_array(op, "dy", dy, self.dtype, 4, "NHWC", tuple(x.shape))
        if relu:
            if y is None:
                raise ValueError(f"{op}: relu=True needs y, the forward output")
            check_array(op, "y", y, self.dtype, 4, "NHWC", tuple(x.shape))
        c = x.shape[3]
        check_array(op, "mean", mean, self.dtype, 2, "[groups, C]", (groups, c))
        check_array(op, "invstd", invstd, self.dtype, 2, "[groups, C]", (groups, c))
        check_array(op, "gamma", gamma, self.dtype, 1, "C", (c,))

    # The four ops above as four passes a backend implements (CPU: Numba, CUDA: norm.cu),
    # with the small per-channel arithmetic between them here, on the backend's arrays.
    # Statistics ``mean``, ``invstd`` etc. are [G, C] with G = N (per sample) or 1 (shared).
    #   _norm_moments(x)                          float64 [N, 2, C]: sum x, sum x^2 over H, W
    #   _norm_apply(x, mean, scale, beta, relu)   y = (x - mean) scale + beta (ReLU'd)
    #   _norm_grad_sums(dy, x, y, mean, invstd, relu)
    #                                             float64 [N, 2, C]: sum g, sum g xhat
    #   _norm_grad_apply(dy, x, y, mean, invstd, coef, relu)
    #                                             dx = k (g - a - xhat b), coef [G, 3, C] =
    #                                             (k, a, b)
    # y is None where relu is False. Each pass sums in a fixed order (see each backend).

    def _instance_norm_forward(self, x, gamma, beta, eps, relu):
        h, w = x.shape[1:3]
        mean, _, invstd = norm_statistics(self.xp, self._norm_moments(x), h * w, eps)
        return self._normalise(x, mean, invstd, gamma, beta, relu)

    def _instance_norm_backward(self, dy, x, y, mean, invstd, gamma, relu):
        h, w = x.shape[1:3]
        sums = self._norm_grad_sums(dy, x, y, mean, invstd, relu)
        total = sums.sum(axis=0)
        dx = self._norm_input_grad(dy, x, y, (mean, invstd), gamma, sums / (h * w), relu)
        return dx, total[1].astype(self.dtype), total[0].astype(self.dtype)

    def _batch_norm_forward(self, x, gamma, beta, running, training, relu, sum_across,
                            momentum, eps):
        xp = self.xp
        c = x.shape[3]
        running_mean, running_var = running
        if not training:
            mean, invstd = self._eval_statistics(running_mean, running_var, eps)
            return self._normalise(x, mean, invstd, gamma, beta, relu)
        buf = _with_count(xp, self._norm_moments(x).sum(axis=0), x)
        if sum_across is not None:
            sum_across(buf)
        count = buf[-1]
        mean, var, invstd = norm_statistics(xp, buf[:-1].reshape(1, 2, c), count, eps)
        # PyTorch's update, in float64 (as its CPU kernels): the variance unbiased
        f64 = np.float64
        running_mean[...] = ((1.0 - momentum) * running_mean.astype(f64)
                             + momentum * mean[0]).astype(self.dtype)
        running_var[...] = ((1.0 - momentum) * running_var.astype(f64)
                            + momentum * var[0] * (count / (count - 1.0))).astype(self.dtype)
        return self._normalise(x, mean, invstd, gamma, beta, relu)

    def _batch_norm_backward(self, dy, x, y, mean, invstd, gamma, training, relu, sum_across):
        xp = self.xp
        c = x.shape[3]
        local = self._norm_grad_sums(dy, x, y, mean, invstd, relu).sum(axis=0)  # [2, C]
        dgamma, dbeta = local[1].astype(self.dtype), local[0].astype(self.dtype)
        if training:
            buf = _with_count(xp, local, x)
            if sum_across is not None:
                sum_across(buf)
            means = buf[:-1].reshape(1, 2, c) / buf[-1]
        else:  # the running statistics are constants: dx = gamma invstd g
            means = xp.zeros((1, 2, c), dtype=np.float64)
        dx = self._norm_input_grad(dy, x, y, (mean, invstd), gamma, means, relu)
        return dx, dgamma, dbeta

    def _eval_statistics(self, running_mean, running_var, eps):
        """(mean, invstd), float64 [1, C], of batch norm in evaluation."""
        c = running_mean.shape[0]
        mean = running_mean.astype(np.float64).reshape(1, c)
        return mean, 1.0 / self.xp.sqrt(running_var.astype(np.float64).reshape(1, c) + eps)

    def _eval_norm_coefficients(self, gamma, running_mean, running_var, eps):
        """(mean, scale) [1, C] in the backend's float, as `_normalise` rounds them."""
        mean, invstd = self._eval_statistics(running_mean, running_var, eps)
        return self._rounded_coefficients(mean, invstd, gamma)[:2]

    def _rounded_coefficients(self, mean, invstd, gamma):
        """(mean, scale, invstd) in the backend's float from float64 statistics [G, C]:
        scale = gamma invstd rounded once."""
        dt = self.dtype  # (asarray: the backend's own memory, as its kernels want)
        scale = self.asarray(invstd * gamma.astype(np.float64), dtype=dt)
        return self.asarray(mean, dtype=dt), scale, self.asarray(invstd, dtype=dt)

    def _normalise(self, x, mean, invstd, gamma, beta, relu):
        """(y, mean, invstd) from float64 statistics [G, C]; the kept ones rounded to the
        backend's float, scale = gamma invstd rounded once."""
        mean, scale, invstd = self._rounded_coefficients(mean, invstd, gamma)
        return self._norm_apply(x, mean, scale, beta, relu), mean, invstd

    def _norm_input_grad(self, dy, x, y, stats, gamma, means, relu):
        """dx from the float64 means [G, 2, C] of g and g xhat (zeros: constants)."""
        mean, invstd = stats
        k = invstd.astype(np.float64) * gamma.astype(np.float64)
        coef = self.asarray(self.xp.stack([k, means[:, 0], means[:, 1]], axis=1),
                            dtype=self.dtype)
        return self._norm_grad_apply(dy, x, y, mean, invstd, coef, relu)


def norm_statistics(xp, sums, count, eps: float):
    """(mean, var, invstd), float64 [G, C], from sums [G, 2, C] (sum x, sum x^2) of
    ``count`` values each: var = sum x^2 / count - mean^2 (biased; float64 sums of float32
    values, so the difference keeps its digits), clamped at 0 against rounding."""
    mean = sums[:, 0] / count
    var = xp.maximum(sums[:, 1] / count - mean * mean, 0.0)
    return mean, var, 1.0 / xp.sqrt(var + eps)


def _with_count(xp, sums, x):
    """[sums (2C values), count]: the buffer the cross-rank sum adds up, float64."""
    count = xp.full((1,), float(x.shape[0] * x.shape[1] * x.shape[2]), dtype=np.float64)
    return xp.concatenate([sums.reshape(-1).astype(np.float64), count])


def identity_augmentation(n: int) -> np.ndarray:
    """The ``aug`` array that leaves every sample as it is (evaluation)."""
    return np.zeros((n, 3), dtype=np.float32)

"""The reference backend: every op of ``ops.py`` in plain float64 NumPy.

This is the spec in executable form: each method mirrors its formula in the ``ops.py``
docstring, obvious over fast (a loop over the kernel taps, ``einsum`` for the sums over
channels). The CPU and CUDA backends are checked against it; it is checked against
PyTorch in float64 (``tests/test_ops.py``). Keep inputs small: nothing here is tuned.
"""

from __future__ import annotations

import math

import numpy as np

from nodulekit.engine.ops import AIR_HU, Backend

f64 = np.float64


class ReferenceBackend(Backend):
    name = "reference"
    xp = np
    dtype = np.dtype(np.float64)
    precision = "fp64"

    # ---- convolution: y[n,h,w,k] = b[k] + sum_{r,s,c} x[n, h+r-P, w+s-P, c] * w[k,r,s,c]
    def _conv2d_forward(self, x, w, b, relu):
        n, h, wd, _ = x.shape
        k, R, S, _ = w.shape
        P = R // 2
        xp = np.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))  # xp[n, h+P, w+P, c] = x[n, h, w, c]
        y = np.zeros((n, h, wd, k), f64) + b
        for r in range(R):
            for s in range(S):
                y += np.einsum("nhwc,kc->nhwk", xp[:, r:r + h, s:s + wd, :], w[:, r, s, :])
        return np.maximum(y, 0.0) if relu else y

    def _conv2d_backward(self, dy, x, w, y, relu, need_dx, need_db=True):
        n, h, wd, _ = x.shape
        _, R, S, _ = w.shape
        P = R // 2
        dz = dy * (y > 0) if relu else dy
        db = dz.sum(axis=(0, 1, 2)) if need_db else None
        # dw[k,r,s,c] = sum_{n,h,w} dz[n,h,w,k] * x[n, h+r-P, w+s-P, c]
        xp = np.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
        dw = np.zeros(w.shape, f64)
        for r in range(R):
            for s in range(S):
                dw[:, r, s, :] = np.einsum("nhwk,nhwc->kc", dz, xp[:, r:r + h, s:s + wd, :])
        if not need_dx:
            return None, dw, db
        # dx[n,h,w,c] = sum_{k,r,s} dz[n, h-r+P, w-s+P, k] * w[k,r,s,c]
        # with dz padded by P on each side, row h-r+P of dz is row h-r+2P of dzp.
        dzp = np.pad(dz, ((0, 0), (P, P), (P, P), (0, 0)))
        dx = np.zeros(x.shape, f64)
        for r in range(R):
            for s in range(S):
                a, c = 2 * P - r, 2 * P - s
                dx += np.einsum("nhwk,kc->nhwc", dzp[:, a:a + h, c:c + wd, :], w[:, r, s, :])
        return dx, dw, db

    # ---- max-pool: y[n,i,j,c] = max_{a,b} x[n, 2i+a, 2j+b, c]; argmax = 2a+b, first wins
    def _maxpool2x2_forward(self, x):
        n, h, w, c = x.shape
        ho, wo = h // 2, w // 2
        # the four taps in row-major order (a, b) = (0,0), (0,1), (1,0), (1,1)
        taps = np.stack([x[:, a:2 * ho:2, b:2 * wo:2, :] for a in (0, 1) for b in (0, 1)])
        argmax = np.argmax(taps, axis=0).astype(np.uint8)  # np.argmax: the first max wins
        y = np.max(taps, axis=0)
        return np.ascontiguousarray(y, dtype=f64), argmax

    def _maxpool2x2_backward(self, dy, argmax, input_hw):
        n, ho, wo, c = dy.shape
        dx = np.zeros((n, input_hw[0], input_hw[1], c), f64)
        for a in (0, 1):
            for b in (0, 1):
                dx[:, a:2 * ho:2, b:2 * wo:2, :] = np.where(argmax == 2 * a + b, dy, 0.0)
        return dx

    # ---- up-convolution: y[n, 2i+a, 2j+b, k] = b[k] + sum_c x[n,i,j,c] * w[k,a,b,c]
    def _upconv2x2_forward(self, x, w, b):
        n, h, wd, _ = x.shape
        y = np.zeros((n, 2 * h, 2 * wd, w.shape[0]), f64)
        for a in (0, 1):
            for bb in (0, 1):
                y[:, a::2, bb::2, :] = b + np.einsum("nijc,kc->nijk", x, w[:, a, bb, :])
        return y

    def _upconv2x2_backward(self, dy, x, w):
        dx = np.zeros(x.shape, f64)
        dw = np.zeros(w.shape, f64)
        for a in (0, 1):
            for b in (0, 1):
                dy_ab = dy[:, a::2, b::2, :]  # dy[n, 2i+a, 2j+b, k]
                dx += np.einsum("nijk,kc->nijc", dy_ab, w[:, a, b, :])
                dw[:, a, b, :] = np.einsum("nijk,nijc->kc", dy_ab, x)
        db = dy.sum(axis=(0, 1, 2))
        return dx, dw, db

    # ---- concat / split along channels
    def _concat_channels(self, a, b):
        return np.concatenate([a, b], axis=3)

    def _split_channels(self, dy, ca):
        return np.ascontiguousarray(dy[..., :ca]), np.ascontiguousarray(dy[..., ca:])

    # ---- sigmoid + Dice loss + its gradient
    def _sigmoid_dice_loss(self, logits, target, smooth):
        z = logits
        t = target.astype(f64)
        n = z.shape[0]
        with np.errstate(over="ignore"):  # exp(-z) = inf for z << 0 gives p = 0, as it should
            p = 1.0 / (1.0 + np.exp(-z))
        I = (p * t).sum(axis=(1, 2, 3))
        S = p.sum(axis=(1, 2, 3)) + t.sum(axis=(1, 2, 3))
        dice = (2 * I + smooth) / (S + smooth)
        loss = np.asarray(np.mean(1.0 - dice), dtype=f64)
        I, S = I[:, None, None, None], S[:, None, None, None]
        dlogits = -(1.0 / n) * (2 * t * (S + smooth) - (2 * I + smooth)) / (S + smooth) ** 2
        dlogits = dlogits * p * (1 - p)
        return loss, dice, dlogits

    # ---- Adam, in place, step counted from 1
    def _adam_step(self, param, grad, m, v, step, lr, betas, eps):
        beta1, beta2 = betas
        m[:] = beta1 * m + (1 - beta1) * grad
        v[:] = beta2 * v + (1 - beta2) * grad * grad
        denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + eps
        param -= lr / (1 - beta1**step) * m / denom

    # ---- window + flip + rotate, by inverse mapping
    def _window_augment(self, hu, mask, aug, center, width):
        n, H, W = hu.shape
        cy, cx = (H - 1) / 2, (W - 1) / 2
        yy, xx = np.meshgrid(np.arange(H, dtype=f64), np.arange(W, dtype=f64), indexing="ij")
        image = np.empty((n, H, W, 1), f64)
        mask_out = np.empty((n, H, W, 1), np.uint8)
        for i in range(n):
            flip_h, flip_v, angle = (float(a) for a in aug[i])
            t = math.radians(angle)
            dy, dx = yy - cy, xx - cx
            sy = cy + math.cos(t) * dy + math.sin(t) * dx
            sx = cx + math.cos(t) * dx - math.sin(t) * dy
            if flip_v:
                sy = H - 1 - sy
            if flip_h:
                sx = W - 1 - sx
            v = _bilinear(hu[i].astype(f64), sy, sx, AIR_HU)
            image[i, ..., 0] = np.clip((v - (center - width / 2)) / width, 0.0, 1.0)
            near = _pixel(mask[i], np.floor(sy + 0.5), np.floor(sx + 0.5), 0)
            mask_out[i, ..., 0] = near != 0
        return image, mask_out

    # ---- metrics: TP, FP, FN of (logits > 0) against target
    def _confusion_counts(self, logits, target):
        pred = logits[..., 0] > 0
        t = target[..., 0] != 0
        tp = (pred & t).sum(axis=(1, 2))
        fp = (pred & ~t).sum(axis=(1, 2))
        fn = (~pred & t).sum(axis=(1, 2))
        return np.stack([tp, fp, fn], axis=1).astype(np.int64)

    # ---- normalisation: statistics over H, W (instance) or N, H, W (batch), in float64
    def _instance_norm_forward(self, x, gamma, beta, eps, relu):
        m = x.shape[1] * x.shape[2]
        s1, s2 = x.sum(axis=(1, 2)), (x * x).sum(axis=(1, 2))  # [N, C]
        mean = s1 / m
        invstd = 1.0 / np.sqrt(np.maximum(s2 / m - mean**2, 0.0) + eps)
        return _norm_out(x, mean, invstd, gamma, beta, relu), mean, invstd

    def _instance_norm_backward(self, dy, x, y, mean, invstd, gamma, relu):
        m = x.shape[1] * x.shape[2]
        g = dy * (y > 0) if relu else dy
        xhat = (x - mean[:, None, None, :]) * invstd[:, None, None, :]
        sg, sgx = g.sum(axis=(1, 2)), (g * xhat).sum(axis=(1, 2))  # [N, C]
        k = (gamma * invstd)[:, None, None, :]
        dx = k * (g - (sg / m)[:, None, None, :] - xhat * (sgx / m)[:, None, None, :])
        return dx, sgx.sum(axis=0), sg.sum(axis=0)

    def _batch_norm_forward(self, x, gamma, beta, running, training, relu, sum_across,
                            momentum, eps):
        running_mean, running_var = running
        if not training:
            mean = running_mean[None]
            invstd = 1.0 / np.sqrt(running_var[None] + eps)
            return _norm_out(x, mean, invstd, gamma, beta, relu), mean, invstd
        c = x.shape[3]
        buf = np.concatenate([x.sum(axis=(0, 1, 2)), (x * x).sum(axis=(0, 1, 2)),
                              [x.size // c]]).astype(f64)
        if sum_across is not None:  # every rank's sums and count
            sum_across(buf)
        m = buf[-1]
        mean = buf[:c] / m
        var = np.maximum(buf[c:2 * c] / m - mean**2, 0.0)
        invstd = 1.0 / np.sqrt(var + eps)
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * m / (m - 1)
        return _norm_out(x, mean[None], invstd[None], gamma, beta, relu), mean[None], invstd[None]

    def _batch_norm_backward(self, dy, x, y, mean, invstd, gamma, training, relu, sum_across):
        c = x.shape[3]
        g = dy * (y > 0) if relu else dy
        xhat = (x - mean[0]) * invstd[0]
        sg, sgx = g.sum(axis=(0, 1, 2)), (g * xhat).sum(axis=(0, 1, 2))  # [C], this rank's
        k = gamma * invstd[0]
        if not training:  # running statistics: constants
            return k * g, sgx, sg
        buf = np.concatenate([sg, sgx, [x.size // c]]).astype(f64)
        if sum_across is not None:
            sum_across(buf)
        m = buf[-1]
        dx = k * (g - buf[:c] / m - xhat * buf[c:2 * c] / m)
        return dx, sgx, sg


def _norm_out(x, mean, invstd, gamma, beta, relu):
    """gamma (x - mean) invstd + beta, ReLU'd; mean, invstd [G, C] with G = N or 1."""
    y = gamma * (x - mean[:, None, None, :]) * invstd[:, None, None, :] + beta
    return np.maximum(y, 0.0) if relu else y


def _pixel(img, yi, xi, outside):
    """img[yi, xi] for integer-valued float index arrays, ``outside`` where off the image."""
    H, W = img.shape
    inside = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
    yc = np.clip(yi, 0, H - 1).astype(np.intp)
    xc = np.clip(xi, 0, W - 1).astype(np.intp)
    return np.where(inside, img[yc, xc], outside)


def _bilinear(img, sy, sx, outside):
    """Bilinear sample of ``img`` at (sy, sx); each neighbour off the image is ``outside``."""
    y0, x0 = np.floor(sy), np.floor(sx)
    fy, fx = sy - y0, sx - x0
    return ((1 - fy) * (1 - fx) * _pixel(img, y0, x0, outside)
            + (1 - fy) * fx * _pixel(img, y0, x0 + 1, outside)
            + fy * (1 - fx) * _pixel(img, y0 + 1, x0, outside)
            + fy * fx * _pixel(img, y0 + 1, x0 + 1, outside))

"""The U-Net, built only from engine ops, with its backward pass written out by hand.

There is no autograd graph: ``forward`` keeps what each layer's backward needs, and
``backward`` walks the same layers in reverse, in plain sight. Parameters and their
gradients are views into two flat buffers (``params``, ``grads``).

Shapes for depth D, width F, an N x H x W x 1 input (widths F * 2**level):

    encoder level l:  conv3x3+ReLU, conv3x3+ReLU  -> skip l;  max-pool 2x2
    bottom:           conv3x3+ReLU, conv3x3+ReLU  (F * 2**D channels, H / 2**D)
    decoder level l:  up-conv 2x2/2 -> F*2**l, written into concat [skip l | up];
                      conv3x3+ReLU x2
    head:             conv1x1 -> 1 logit per pixel

With ``norm`` "instance" or "batch" each "conv3x3+ReLU" is conv3x3 (no bias) -> norm -> ReLU,
as in nnU-Net and the paper's own EDDL U-Net: the convolution runs without its fused ReLU,
and the norm op applies the ReLU in its own pass. Training (``forward`` keeping what the
backward needs) normalises batch norm with the batch's statistics and updates its running
ones (in ``buffers``); evaluation (``training=False``, the default of
``keep_for_backward=False``) uses the running ones. Data-parallel batch norm takes the
statistics of the global batch: ``forward(..., comm=...)`` with anything that has
``allreduce_sum(buffer)`` (a communicator of `nodulekit.distributed`, which this package
does not import) sums each layer's per-channel sums over the ranks, once forward and once
backward.
"""

from __future__ import annotations

import math

import numpy as np

from nodulekit.engine.ops import Backend, check_array
from nodulekit.nn.layout import (
    ParameterLayout,
    check_norm,
    level_widths,
    norm_name,
    unet_buffer_shapes,
    unet_parameter_shapes,
)


class UNet:
    def __init__(self, backend: Backend, depth: int = 4, width: int = 64, in_channels: int = 1,
                 seed: int = 0, norm: str = "none", head_prior: float = 0.5):
        """head_prior: the foreground probability the untrained network outputs about
        everywhere: the head's bias starts at log(prior / (1 - prior)) (0 for 0.5, the
        paper's zero bias). A prior near the true share of nodule pixels (0.01) spares the
        first hundreds of steps spent pushing half-grey outputs down (RetinaNet's prior)."""
        if not 0.0 < head_prior < 1.0:
            raise ValueError(f"head_prior must be in (0, 1), got {head_prior}")
        self.backend = backend
        self.depth, self.width, self.in_channels = int(depth), int(width), int(in_channels)
        self.norm = check_norm(norm)
        self.widths = level_widths(self.depth, self.width)
        self.layout = ParameterLayout(unet_parameter_shapes(self.depth, self.width,
                                                            self.in_channels, self.norm))
        initial = self.layout.he_normal(seed)
        head = self.layout.slots["head.b"]
        initial[head.offset:head.offset + head.size] = math.log(head_prior / (1.0 - head_prior))
        self.params = backend.asarray(initial, dtype=backend.dtype)
        self.grads = backend.zeros(self.layout.total)
        self.p = self.layout.views(self.params)
        self.g = self.layout.views(self.grads)
        # batch norm's running statistics: a second flat buffer, no gradient, no Adam
        self.buffer_layout = ParameterLayout(unet_buffer_shapes(self.depth, self.width,
                                                                self.norm))
        self.buffers = backend.asarray(self.buffer_layout.initial_buffers(),
                                       dtype=backend.dtype)
        self.b = self.buffer_layout.views(self.buffers)
        self._zero_bias: dict[int, object] = {}
        self._saved = None
        self._comm, self._training = None, True

    # ------------------------------------------------------------------ parameters
    @property
    def num_parameters(self) -> int:
        return self.layout.total

    def load_flat(self, flat) -> None:
        """Copy a flat parameter vector (host or device) into the buffer, in place."""
        flat = self.backend.asarray(flat, dtype=self.backend.dtype)
        if flat.shape != self.params.shape:
            raise ValueError(f"parameter vector must have {self.layout.total} values for "
                             f"depth={self.depth}, width={self.width}; got {flat.shape}")
        self.params[...] = flat

    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> host copy in our layout."""
        return {k: self.backend.to_host(v).copy() for k, v in self.p.items()}

    def load_buffers(self, flat) -> None:
        """Copy a flat buffer vector (batch norm's running statistics) in, in place."""
        flat = self.backend.asarray(flat, dtype=self.backend.dtype)
        if flat.shape != self.buffers.shape:
            raise ValueError(f"buffer vector must have {self.buffer_layout.total} values for "
                             f"norm={self.norm!r}; got {flat.shape}")
        self.buffers[...] = flat

    def buffer_dict(self) -> dict[str, np.ndarray]:
        """Buffer name -> host copy (batch norm's running_mean / running_var; else empty)."""
        return {k: self.backend.to_host(v).copy() for k, v in self.b.items()}

    def load_state_dict(self, tensors: dict) -> None:
        for name, view in self.p.items():
            if name not in tensors:
                raise ValueError(f"missing parameter {name!r}")
            value = np.asarray(tensors[name])
            if value.shape != view.shape:
                raise ValueError(f"parameter {name!r}: expected shape {view.shape}, "
                                 f"got {value.shape}")
            view[...] = self.backend.asarray(value, dtype=self.backend.dtype)

    # ------------------------------------------------------------------ checks
    def check_input(self, x) -> None:
        check_array("UNet.forward", "x", x, self.backend.dtype, 4, "NHWC",
                    (None, None, None, self.in_channels))
        n, h, w, _ = x.shape
        f = 2**self.depth
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(
                f"UNet.forward: input H and W must be positive multiples of 2**depth = {f} "
                f"(depth {self.depth}); got {h}x{w}. Crop or pad the slice, e.g. to "
                f"{max(f, h // f * f)}x{max(f, w // f * f)}.")
        if self.norm == "instance" and (h // f) * (w // f) < 2:
            raise ValueError(
                f"UNet.forward: instance norm takes statistics over each sample's pixels, and "
                f"the deepest level of a {h}x{w} input at depth {self.depth} has one; use an "
                f"input of at least {f}x{2 * f} or a smaller depth")

    # ------------------------------------------------------------------ forward
    def forward(self, x, keep_for_backward: bool = True, training: bool | None = None,
                comm=None):
        """x [N,H,W,in_channels] -> logits [N,H,W,1].

        training: batch norm on the batch's statistics (updating the running ones), or on
        the running ones; default: keep_for_backward. comm: None, or an object with
        ``allreduce_sum(buffer)`` that sums a small backend array over the data-parallel
        ranks (batch norm in training only; kept for the backward pass)."""
        self.check_input(x)
        be, p = self.backend, self.p
        training = keep_for_backward if training is None else bool(training)
        self._comm = comm
        saved = {}

        def conv(name, inp, relu=True):
            if self.norm == "none" or not relu:  # the head (no ReLU) keeps its bias
                out = be.conv2d_forward(inp, p[name + ".w"], p[name + ".b"], relu=relu)
                if keep_for_backward:
                    saved[name] = (inp, out)
                return out
            if self.norm == "batch" and not training and not keep_for_backward:
                # inference: the norm applied to each block of sums while in cache (the
                # same bits as the two ops below, one pass over the activation fewer)
                layer = norm_name(name)
                return be.conv2d_bn_eval_forward(
                    inp, p[name + ".w"], p[layer + ".gamma"], p[layer + ".beta"],
                    self.b[layer + ".running_mean"], self.b[layer + ".running_var"],
                    relu=True)
            z = be.conv2d_forward(inp, p[name + ".w"], self._zeros(p[name + ".w"].shape[0]))
            y, mean, invstd = self._norm_forward(norm_name(name), z, training)
            if keep_for_backward:
                saved[name] = (inp, z, y, mean, invstd)
            return y

        h = x
        skips = []
        for level in range(self.depth):
            h = conv(f"enc{level}.conv2", conv(f"enc{level}.conv1", h))
            skips.append(h)
            hw = h.shape[1:3]
            h, argmax = be.maxpool2x2_forward(h)
            if keep_for_backward:
                saved[f"enc{level}.pool"] = (argmax, hw)
        h = conv("bottom.conv2", conv("bottom.conv1", h))
        for level in reversed(range(self.depth)):
            if keep_for_backward:
                saved[f"dec{level}.up"] = (h,)
            # [skip | upconv(h)]: the up-convolution writes straight into its half
            h = be.upconv2x2_concat_forward(skips[level], h, p[f"dec{level}.up.w"],
                                            p[f"dec{level}.up.b"])
            h = conv(f"dec{level}.conv2", conv(f"dec{level}.conv1", h))
        logits = conv("head", h, relu=False)
        self._saved = saved if keep_for_backward else None
        self._training = training
        return logits

    def _zeros(self, k: int):
        """A zero bias for the convolutions a norm follows (the op contract takes one)."""
        if k not in self._zero_bias:
            self._zero_bias[k] = self.backend.zeros((k,))
        return self._zero_bias[k]

    def _sum_across(self):
        return self._comm.allreduce_sum if self._comm is not None else None

    def _norm_forward(self, name: str, z, training: bool):
        """The norm layer `name` (+ ReLU) on a convolution's output: (y, mean, invstd)."""
        be, gamma, beta = self.backend, self.p[name + ".gamma"], self.p[name + ".beta"]
        if self.norm == "instance":
            return be.instance_norm_forward(z, gamma, beta, relu=True)
        return be.batch_norm_forward(z, gamma, beta, self.b[name + ".running_mean"],
                                     self.b[name + ".running_var"], training=training,
                                     relu=True, sum_across=self._sum_across())

    def _norm_backward(self, name: str, dy, kept):
        """dz (the convolution's output gradient); gamma's and beta's into ``grads``."""
        be, z, y, mean, invstd = self.backend, *kept
        gamma = self.p[name + ".gamma"]
        if self.norm == "instance":
            dz, dgamma, dbeta = be.instance_norm_backward(dy, z, y, mean, invstd, gamma,
                                                          relu=True)
        else:
            dz, dgamma, dbeta = be.batch_norm_backward(dy, z, y, mean, invstd, gamma,
                                                       training=self._training, relu=True,
                                                       sum_across=self._sum_across())
        self.g[name + ".gamma"][...] = dgamma
        self.g[name + ".beta"][...] = dbeta
        return dz

    # ------------------------------------------------------------------ backward
    def backward(self, dlogits) -> None:
        """Gradients of the loss w.r.t. every parameter, written into ``self.grads``."""
        if self._saved is None:
            raise RuntimeError("UNet.backward needs a forward(keep_for_backward=True) first")
        be, p, g, saved = self.backend, self.p, self.g, self._saved
        xp = be.xp

        def conv_back(name, dy, relu=True, need_dx=True):
            if self.norm == "none" or not relu:
                inp, out = saved.pop(name)
                dx, dw, db = be.conv2d_backward(dy, inp, p[name + ".w"], out, relu=relu,
                                                need_dx=need_dx)
                g[name + ".w"][...] = dw
                g[name + ".b"][...] = db
                return dx
            inp, *kept = saved.pop(name)
            dz = self._norm_backward(norm_name(name), dy, kept)
            dx, dw, _ = be.conv2d_backward(dz, inp, p[name + ".w"], need_dx=need_dx,
                                           need_db=False)
            g[name + ".w"][...] = dw
            return dx

        dh = conv_back("head", dlogits, relu=False)
        dskips = [None] * self.depth
        for level in range(self.depth):  # decoder, top level first (reverse of forward)
            dh = conv_back(f"dec{level}.conv1", conv_back(f"dec{level}.conv2", dh))
            (below,) = saved.pop(f"dec{level}.up")
            dskips[level], dh, dw, db = be.upconv2x2_split_backward(
                dh, self.widths[level], below, p[f"dec{level}.up.w"])
            g[f"dec{level}.up.w"][...] = dw
            g[f"dec{level}.up.b"][...] = db
        dh = conv_back("bottom.conv1", conv_back("bottom.conv2", dh))
        for level in reversed(range(self.depth)):  # encoder, deepest first
            argmax, hw = saved.pop(f"enc{level}.pool")
            dh = be.maxpool2x2_backward(dh, argmax, hw)
            xp.add(dh, dskips[level], out=dh)  # the skip's gradient joins the pool's
            dh = conv_back(f"enc{level}.conv2", dh)
            dh = conv_back(f"enc{level}.conv1", dh, need_dx=level > 0)
        self._saved = None

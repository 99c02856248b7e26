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
"""

from __future__ import annotations

import numpy as np

from nodulekit.engine.ops import Backend, check_array
from nodulekit.nn.layout import ParameterLayout, level_widths, unet_parameter_shapes


class UNet:
    def __init__(self, backend: Backend, depth: int = 4, width: int = 64, in_channels: int = 1,
                 seed: int = 0):
        self.backend = backend
        self.depth, self.width, self.in_channels = int(depth), int(width), int(in_channels)
        self.widths = level_widths(self.depth, self.width)
        self.layout = ParameterLayout(unet_parameter_shapes(self.depth, self.width,
                                                            self.in_channels))
        self.params = backend.asarray(self.layout.he_normal(seed), dtype=backend.dtype)
        self.grads = backend.zeros(self.layout.total)
        self.p = self.layout.views(self.params)
        self.g = self.layout.views(self.grads)
        self._saved = None

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

    # ------------------------------------------------------------------ forward
    def forward(self, x, keep_for_backward: bool = True):
        """x [N,H,W,in_channels] -> logits [N,H,W,1]."""
        self.check_input(x)
        be, p = self.backend, self.p
        saved = {}

        def conv(name, inp, relu=True):
            out = be.conv2d_forward(inp, p[name + ".w"], p[name + ".b"], relu=relu)
            if keep_for_backward:
                saved[name] = (inp, out)
            return out

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
        return logits

    # ------------------------------------------------------------------ backward
    def backward(self, dlogits) -> None:
        """Gradients of the loss w.r.t. every parameter, written into ``self.grads``."""
        if self._saved is None:
            raise RuntimeError("UNet.backward needs a forward(keep_for_backward=True) first")
        be, p, g, saved = self.backend, self.p, self.g, self._saved
        xp = be.xp

        def conv_back(name, dy, relu=True, need_dx=True):
            inp, out = saved.pop(name)
            dx, dw, db = be.conv2d_backward(dy, inp, p[name + ".w"], out, relu=relu,
                                            need_dx=need_dx)
            g[name + ".w"][...] = dw
            g[name + ".b"][...] = db
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

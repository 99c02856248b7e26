"""Run by tests/test_isa_bits.py in a child process (so that Numba compiles for the CPU that
child's environment names): the packed and Winograd 3x3 convolutions and the up-convolution's
version 3, forward and backward, on seeded inputs; every output saved to the .npz given."""

from __future__ import annotations

import sys

import numpy as np


def outputs() -> dict:
    from nodulekit.engine.cpu import CPUBackend

    rng = np.random.default_rng(7)
    out = {}
    # a 32 -> 32 layer with 128 4x4 tiles (Winograd's) and a 48 -> 64 one of odd size
    for n, h, w, c, k in ((2, 32, 32, 32, 32), (1, 13, 21, 48, 64)):
        x = rng.standard_normal((n, h, w, c)).astype(np.float32)
        wt = (rng.standard_normal((k, 3, 3, c)) / np.sqrt(9 * c)).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        dy = rng.standard_normal((n, h, w, k)).astype(np.float32)
        for variant in ("packed", "winograd"):
            be = CPUBackend(conv_variant=variant)
            y = be.conv2d_forward(x, wt, b, relu=True)
            dx, dw, db = be.conv2d_backward(dy, x, wt, y, relu=True)
            for name, a in (("y", y), ("dx", dx), ("dw", dw), ("db", db)):
                out[f"{variant}-{c}-{k}-{name}"] = np.asarray(a)
    # the up-convolution at 64 -> 32 channels (version 3) into a concat with a 32-channel skip
    be = CPUBackend()
    x = rng.standard_normal((2, 16, 16, 64)).astype(np.float32)
    wt = (rng.standard_normal((32, 2, 2, 64)) / 8).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    skip = rng.standard_normal((2, 32, 32, 32)).astype(np.float32)
    out["up-cat"] = np.asarray(be.upconv2x2_concat_forward(skip, x, wt, b))
    dcat = rng.standard_normal(out["up-cat"].shape).astype(np.float32)
    for name, a in zip(("dskip", "dx", "dw", "db"),
                       be.upconv2x2_split_backward(dcat, 32, x, wt), strict=True):
        out[f"up-{name}"] = np.asarray(a)
    return out


if __name__ == "__main__":
    from nodulekit.engine.cpu_conv_packed import WIDE_BLOCKS

    np.savez(sys.argv[1], wide_blocks=np.array(WIDE_BLOCKS), **outputs())

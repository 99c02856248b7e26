"""Each op's FLOPs and the bytes it must move at least, from the arguments of one call.

Bytes: every array the op reads, once, plus every array it writes, once (the compulsory
traffic: what no kernel can avoid, however it tiles; a kernel that reads an input twice, or
spills a temporary, moves more). Reads follow the op contract (``engine/ops.py``): ``y`` of
a backward pass is read only with ``relu``; in-place ops (Adam, batch norm's running
statistics) write what they read.

FLOPs: the convolutions count as ``nodulekit inspect`` does (``nn/summary.py``), 2 per
multiply-accumulate; the bias add and the ReLU (1/(9C) of that and less) are left out, as
there. Backward: the weight gradient and the data gradient each cost the forward's (the
first layer skips its data gradient). The other ops have no multiply-accumulates, so they
count one per arithmetic operation or comparison a straightforward kernel does per element
(exp, sqrt and division one each), written out at each op below: rough, but enough to place
them on a roofline, where they sit far left (a few FLOPs per 8 bytes) whatever the count.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

from nodulekit.engine.ops import OP_NAMES, Backend

# the ops a training step calls, and every other op of the contract
TIMED_OPS = (*OP_NAMES, "upconv2x2_concat_forward", "upconv2x2_split_backward")

# per element: see each op below
POOL_FORWARD_FLOPS = 3  # max of four: three comparisons per output
POOL_BACKWARD_FLOPS = 1  # per input element: is it the argmax? (a compare and a select)
DICE_FLOPS = 14  # sigmoid 4 (neg, exp, add, div), p t and the two sums 4, gradient 6
ADAM_FLOPS = 13  # m 3, v 4, sqrt, / sqrt(bc2), + eps, divide, x lr', subtract: 6
WINDOW_FLOPS = 30  # source coordinates 8, bilinear weights and 4 taps 14, window 4, mask 4
CONFUSION_FLOPS = 4  # logit > 0 and three counts
NORM_FORWARD_FLOPS = 6  # sum x 1, sum x^2 2; (x - mean) scale + beta 3 (+ 1 with ReLU)
NORM_BACKWARD_FLOPS = 11  # xhat 2, sum g 1, sum g xhat 2; xhat 2, k (g - a - xhat b) 4
# (+ 2 with ReLU: its mask, in each pass)


@dataclass(frozen=True)
class OpCount:
    flops: int
    bytes_read: int
    bytes_written: int

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def nbytes(*arrays) -> int:
    """Bytes of the arrays given (None, a skipped output, counts 0)."""
    return sum(int(a.nbytes) for a in arrays if a is not None)


def _arrays_in(result) -> list:
    if result is None:
        return []
    if isinstance(result, tuple | list):
        return [a for r in result for a in _arrays_in(r)]
    return [result] if hasattr(result, "nbytes") else []


@cache
def _signature(op: str) -> inspect.Signature:
    return inspect.signature(getattr(Backend, op))


def bind(op: str, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (defaults filled in), as the op contract names them."""
    bound = _signature(op).bind(None, *args, **kwargs)  # None: the backend itself
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.pop("self")
    return arguments


def count(op: str, a: dict, result) -> OpCount:
    """FLOPs and bytes of ``op`` called with arguments ``a`` (by name) that returned
    ``result``; see the module docstring."""
    if op not in COUNTERS:
        raise ValueError(f"no FLOP and byte count for op {op!r}; the ops: {', '.join(COUNTERS)}")
    flops, read, written_in_place = COUNTERS[op](a)
    return OpCount(int(flops), nbytes(*read),
                   nbytes(*_arrays_in(result)) + nbytes(*written_in_place))


def kind(op: str, a: dict) -> str:
    """The family an op call belongs to, for grouping and colour: conv3x3, conv1x1,
    upconv2x2, maxpool, concat, norm, loss, adam, input, metrics."""
    if op.startswith("conv2d"):
        r = a["w"].shape[1]
        return f"conv{r}x{r}"
    for prefix, name in (("upconv", "upconv2x2"), ("maxpool", "maxpool"), ("concat", "concat"),
                         ("split", "concat"), ("instance_norm", "norm"), ("batch_norm", "norm"),
                         ("sigmoid_dice", "loss"), ("adam", "adam"), ("window", "input"),
                         ("confusion", "metrics")):
        if op.startswith(prefix):
            return name
    raise ValueError(f"no kind for op {op!r}")


# --------------------------------------------------------------------------- per op
# Each returns (flops, arrays read, arrays written in place); the returned arrays are the
# written ones otherwise.


def _conv_macs(x, w) -> int:
    n, h, wd, c = x.shape
    k, r, s, _ = w.shape
    return n * h * wd * k * r * s * c


def _conv2d_forward(a):
    return 2 * _conv_macs(a["x"], a["w"]), (a["x"], a["w"], a["b"]), ()


def _conv2d_backward(a):
    passes = 2 if a["need_dx"] else 1  # dW, and dX unless the first layer
    y = a["y"] if a["relu"] else None
    return passes * 2 * _conv_macs(a["x"], a["w"]), (a["dy"], a["x"], a["w"], y), ()


def _upconv_macs(x, w) -> int:
    n, h, wd, c = x.shape
    return n * (2 * h) * (2 * wd) * w.shape[0] * c


def _upconv2x2_forward(a):
    return 2 * _upconv_macs(a["x"], a["w"]), (a["x"], a["w"], a["b"]), ()


def _upconv2x2_concat_forward(a):
    return 2 * _upconv_macs(a["x"], a["w"]), (a["skip"], a["x"], a["w"], a["b"]), ()


def _upconv2x2_backward(a):
    return 4 * _upconv_macs(a["x"], a["w"]), (a["dy"], a["x"], a["w"]), ()


def _upconv2x2_split_backward(a):
    return 4 * _upconv_macs(a["x"], a["w"]), (a["dcat"], a["x"], a["w"]), ()


def _maxpool2x2_forward(a):
    n, h, w, c = a["x"].shape
    return POOL_FORWARD_FLOPS * n * (h // 2) * (w // 2) * c, (a["x"],), ()


def _maxpool2x2_backward(a):
    n, _, _, c = a["dy"].shape
    h, w = a["input_hw"]
    # every input element is written; the four under each output are tested
    return POOL_BACKWARD_FLOPS * n * h * w * c, (a["dy"], a["argmax"]), ()


def _concat_channels(a):
    return 0, (a["a"], a["b"]), ()


def _split_channels(a):
    return 0, (a["dy"],), ()


def _sigmoid_dice_loss(a):
    return DICE_FLOPS * a["logits"].size, (a["logits"], a["target"]), ()


def _adam_step(a):
    p, m, v = a["param"], a["m"], a["v"]
    return ADAM_FLOPS * p.size, (p, a["grad"], m, v), (p, m, v)


def _window_augment(a):
    return WINDOW_FLOPS * a["hu"].size, (a["hu"], a["mask"], a["aug"]), ()


def _confusion_counts(a):
    return CONFUSION_FLOPS * a["logits"].size, (a["logits"], a["target"]), ()


def _norm_forward_flops(a) -> int:
    return (NORM_FORWARD_FLOPS + (1 if a["relu"] else 0)) * a["x"].size


def _instance_norm_forward(a):
    return _norm_forward_flops(a), (a["x"], a["gamma"], a["beta"]), ()


def _batch_norm_forward(a):
    running = (a["running_mean"], a["running_var"]) if a["training"] else ()
    return _norm_forward_flops(a), (a["x"], a["gamma"], a["beta"], *running), running


def _norm_backward(a):
    y = a["y"] if a["relu"] else None
    flops = (NORM_BACKWARD_FLOPS + (2 if a["relu"] else 0)) * a["x"].size
    return flops, (a["dy"], a["x"], y, a["mean"], a["invstd"], a["gamma"]), ()


# op -> its count: (flops, arrays read, arrays written in place)
COUNTERS = {
    "conv2d_forward": _conv2d_forward,
    "conv2d_backward": _conv2d_backward,
    "maxpool2x2_forward": _maxpool2x2_forward,
    "maxpool2x2_backward": _maxpool2x2_backward,
    "upconv2x2_forward": _upconv2x2_forward,
    "upconv2x2_backward": _upconv2x2_backward,
    "upconv2x2_concat_forward": _upconv2x2_concat_forward,
    "upconv2x2_split_backward": _upconv2x2_split_backward,
    "concat_channels": _concat_channels,
    "split_channels": _split_channels,
    "sigmoid_dice_loss": _sigmoid_dice_loss,
    "adam_step": _adam_step,
    "window_augment": _window_augment,
    "confusion_counts": _confusion_counts,
    "instance_norm_forward": _instance_norm_forward,
    "instance_norm_backward": _norm_backward,
    "batch_norm_forward": _batch_norm_forward,
    "batch_norm_backward": _norm_backward,
}

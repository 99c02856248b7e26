"""Which U-Net layer each op call of a training step belongs to.

The layer list is `nodulekit inspect`'s (``nn/summary.unet_layers``): in the order
``UNet.forward`` runs the layers, with the parameter layout's names. A training step
(``nn/step.TrainStep``) calls the ops in this order:

    forward   each layer's op, in that order (the decoder's up-convolution and concat are
              one op, upconv2x2_concat_forward)
    loss      sigmoid_dice_loss
    backward  each layer's backward op, in the reverse order (a norm's before its
              convolution's; upconv2x2_split_backward for the up-convolution and concat)
    optimizer adam_step, once, on the flat parameter buffer
"""

from __future__ import annotations

from dataclasses import dataclass

from nodulekit.nn.summary import NORM_OPS, LayerInfo, unet_layers

# inspect's op name -> the engine op of the forward pass and of the backward pass; None: the
# layer has no op of its own (the concat is the up-convolution's op)
_NORM_ENGINE_OPS = {"instance": "instance_norm", "batch": "batch_norm"}
_ENGINE_OPS = {
    "maxpool2x2": ("maxpool2x2_forward", "maxpool2x2_backward"),
    "upconv2x2": ("upconv2x2_concat_forward", "upconv2x2_split_backward"),
    "concat": (None, None),
    **{label: (f"{_NORM_ENGINE_OPS[norm]}_forward", f"{_NORM_ENGINE_OPS[norm]}_backward")
       for norm, label in NORM_OPS.items()},
}


@dataclass(frozen=True)
class StepCall:
    """One op call of a training step: its phase, layer and engine op; ``layer_info`` is
    inspect's row for the layer (None for the loss and Adam)."""

    phase: str  # forward, loss, backward, optimizer
    layer: str
    op: str
    layer_info: LayerInfo | None


def _engine_ops(info: LayerInfo) -> tuple[str | None, str | None]:
    if info.op.startswith("conv"):
        return "conv2d_forward", "conv2d_backward"
    return _ENGINE_OPS[info.op]


def step_calls(depth: int, width: int, size: int, batch: int, norm: str = "none",
               in_channels: int = 1) -> list[StepCall]:
    """The op calls of one training step, in order; see the module docstring."""
    layers = unet_layers(depth=depth, width=width, size=size, batch=batch,
                         in_channels=in_channels, norm=norm)
    calls = [StepCall("forward", x.name, _engine_ops(x)[0], x) for x in layers
             if _engine_ops(x)[0]]
    calls.append(StepCall("loss", "loss", "sigmoid_dice_loss", None))
    calls += [StepCall("backward", x.name, _engine_ops(x)[1], x) for x in reversed(layers)
              if _engine_ops(x)[1]]
    calls.append(StepCall("optimizer", "adam", "adam_step", None))
    return calls


def label_calls(ops: list[str], expected: list[StepCall]) -> list[StepCall]:
    """The expected calls if the ops called are theirs, one for one; else (the network has
    changed under this module) each op labelled by its position, so nothing is misnamed."""
    if [c.op for c in expected] == list(ops):
        return expected
    return [StepCall("step", f"call {i}", op, None) for i, op in enumerate(ops)]

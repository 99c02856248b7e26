"""A training run's configuration: the paper's defaults, the demo's, and resolving them.

Options left unset (None) take the defaults of the data they train on:

- real data (a cache or a data-set folder): the paper's protocol, batch 12, Adam lr 1e-4,
  200 epochs, width 64 and depth 4 (DESIGN.md's U-Net), the HU window 1600 / -500, nodule
  slices only (``empty_fraction`` 0), the model kept on the best validation mean IoU;
- the embedded demo (no DATA): a small synthetic set (`nodulekit.training.demo`) and a small
  model sized to train on a 2-core CPU in about five minutes (`DEMO_DEFAULTS`).

Why the demo departs from the paper's recipe. At 128 x 128 (2.8 mm pixels) most synthetic
nodules cover 1 to 10 pixels, and the U-Net has no normalisation layers. Measured on the
demo set with the paper's recipe scaled to a few hundred steps (Dice loss with s = 1, Adam):

- s = 1 rewards predicting nothing on a slice with a tiny nodule (Dice 1 / (T + 1)), and the
  net settles there: every logit below -1000 after ~150 steps, Dice 0;
- s = 0.01 removes that reward, but per-sample Dice on an empty slice, s / (sum p + s), then
  pushes every logit down without end and the same collapse follows;
- at lr 1e-3 Adam moves every weight by ~lr per step, which changes the wide deep layers'
  outputs ~sqrt(fan-in) times faster than the first layer's, and the logits run away.

So the demo trains with s = 0.01, adds a small BCE term (its gradient on a missed nodule
pixel does not vanish, and on an empty slice it stops pushing once p is small), scales each
layer's Adam step by sqrt(9 / fan-in) (`lr_scale`), and mixes 30% of the empty slices into
every epoch. Each is an option (`smooth`, `bce_weight`, `lr_scaling`, `empty_fraction`);
with real data the defaults stay the paper's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PAPER_DEFAULTS = {"epochs": 200, "batch_size": 12, "lr": 1e-4, "width": 64, "depth": 4,
                  "empty_fraction": 0.0, "smooth": 1.0, "lr_scaling": "none", "bce_weight": 0.0}
# Measured on the 2-core CPU: README, "Training".
DEMO_DEFAULTS = {"epochs": 5, "batch_size": 4, "lr": 2e-3, "width": 8, "depth": 4,
                 "empty_fraction": 0.3, "smooth": 0.01, "lr_scaling": "fan_in",
                 "bce_weight": 0.01}
SELECTION_METRIC = "val_mean_iou"
LR_SCALINGS = ("none", "fan_in")


@dataclass
class TrainConfig:
    """Everything that decides what a run computes (stored in config.json and checkpoints)."""

    data: str  # what the user named: a cache, a data-set folder, or "demo"
    data_kind: str  # "cache" | "folder" | "demo"
    cache: str  # absolute path of the HDF5 cache the run reads
    out: str  # the run folder
    epochs: int
    batch_size: int
    lr: float
    width: int
    depth: int
    image_shape: list[int]  # the network's input H, W (after any centre crop)
    cache_shape: list[int]  # the cache's slice H, W
    device: str = "auto"  # as asked
    backend: str = "cpu"  # what it resolved to
    precision: str = "fp32"
    seed: int = 0
    workers: int = 2
    queue: int | None = None
    empty_fraction: float = 0.0
    finetune_from: str | None = None
    in_channels: int = 1
    window_center: float = -500.0
    window_width: float = 1600.0
    smooth: float = 1.0  # the Dice loss's smoothing s
    lr_scaling: str = "none"  # "none" (the paper's Adam) or "fan_in" (see lr_scale)
    bce_weight: float = 0.0  # > 0: add this x per-sample summed BCE to the Dice loss
    selection_metric: str = SELECTION_METRIC
    eval_batch_size: int = 0  # 0: the training batch size
    test_after: bool = True  # evaluate the best model on the test split at the end
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        return cls(**d)

    @property
    def crop(self) -> bool:
        return list(self.image_shape) != list(self.cache_shape)

    def validate(self) -> None:
        problems = []
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if self.width < 1 or self.depth < 1:
            problems.append(f"width and depth must be >= 1, got width {self.width}, "
                            f"depth {self.depth}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            problems.append(f"empty fraction must be in [0, 1], got {self.empty_fraction}")
        if not self.bce_weight >= 0:
            problems.append(f"BCE weight must be >= 0, got {self.bce_weight}")
        if not self.smooth >= 0:
            problems.append(f"smooth must be >= 0, got {self.smooth}")
        if self.lr_scaling not in LR_SCALINGS:
            problems.append(f"lr scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if problems:
            raise ValueError("; ".join(problems))
        check_input_shape(self.image_shape, self.depth)


def check_input_shape(shape, depth: int) -> None:
    """ValueError unless H and W are positive multiples of 2**depth."""
    f = 2 ** int(depth)
    h, w = (int(v) for v in shape)
    if h <= 0 or w <= 0 or h % f or w % f:
        raise ValueError(
            f"the input size {h}x{w} is not divisible by 2**depth = {f} (depth {depth}); "
            f"pass --size with a multiple of {f} (slices are centre-cropped to it, e.g. "
            f"--size {max(f, min(h, w) // f * f)}) or a smaller --depth")


def resolve_size(cache_shape, size: int | None, depth: int) -> list[int]:
    """The network's input (H, W): the cache's, or a centre crop of it to size x size.

    Resizing is not done: a size larger than the slices is an error.
    """
    h, w = (int(v) for v in cache_shape)
    if size is None:
        shape = [h, w]
    else:
        size = int(size)
        if size > h or size > w:
            raise ValueError(f"--size {size} is larger than the cache's {h}x{w} slices; "
                             "nodulekit crops but does not resize (preprocess at the size "
                             "you want, or use --size <= the slice size)")
        shape = [size, size]
    check_input_shape(shape, depth)
    return shape


def center_crop(hu, mask, shape):
    """Centre crop of [N, H, W] HU and mask arrays to `shape` (H, W), C-contiguous."""
    import numpy as np

    h, w = hu.shape[1:3]
    th, tw = (int(v) for v in shape)
    if (h, w) == (th, tw):
        return hu, mask
    r0, c0 = (h - th) // 2, (w - tw) // 2
    window = np.s_[:, r0:r0 + th, c0:c0 + tw]
    return np.ascontiguousarray(hu[window]), np.ascontiguousarray(mask[window])


def lr_scale(layout, mode: str, reference_fan_in: int = 9):
    """Per-parameter learning-rate factors (float32 [P]) for ``lr_scaling``, or None.

    "fan_in": Adam moves every weight by about lr per step whatever its layer, so a layer
    summing over fan_in inputs changes its output about sqrt(fan_in) times faster, relative
    to its He-initialised scale, than a narrow one. Without normalisation layers the deep,
    wide layers of the U-Net then run away (the logits grow to -1e4 within a few hundred
    steps at lr 1e-3, measured on the demo set). Scaling each tensor's step by
    min(1, sqrt(reference_fan_in / fan_in)) (3x3 on one channel = 9: the first layer keeps
    lr) gives every layer the same relative speed. Biases follow their weights.
    """
    import numpy as np

    if mode == "none":
        return None
    if mode != "fan_in":
        raise ValueError(f"unknown lr scaling {mode!r}; choose one of {LR_SCALINGS}")
    scale = np.ones(layout.total, dtype=np.float32)
    for slot in layout.slots.values():
        name = slot.name
        weight = layout.slots[name[:-2] + ".w"] if name.endswith(".b") else slot
        k, r, s, c = weight.shape
        fan_in = c if ".up." in weight.name else r * s * c
        scale[slot.offset:slot.offset + slot.size] = min(1.0, (reference_fan_in / fan_in) ** 0.5)
    return scale

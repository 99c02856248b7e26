"""A training run's configuration: recipes, the data's sizes, and resolving them.

Options left unset (None) take their values from a recipe and the data:

- the recipe (`RECIPES`, `--recipe`): how the net learns (learning rate and its schedule,
  the Dice loss's form and smoothing, the output prior, the BCE term, learning-rate scaling,
  the share of empty slices, normalisation, patches, context slices). "nodulekit" is every
  data set's default; "paper" is the paper's (Adam 1e-4, per-sample Dice s = 1, nothing
  else, nodule slices only, no normalisation);
- the data's sizes (`SIZE_DEFAULTS`): real data (a cache or a data-set folder) the paper's
  batch 12, 200 epochs, width 64, depth 4; the embedded demo (no DATA,
  `nodulekit.training.demo`) a small model sized to train on a 2-core CPU in minutes.

Why "nodulekit" departs from the paper. Without normalisation the paper's recipe settles on
"no nodule anywhere" (every logit below -1000 within a few hundred steps) on every synthetic
set tried, at 128 x 128 and at 512 x 512; with batch norm it does not. Measured on 512 x 512
synthetic sets (README, "Recipes"): batch norm, Dice with s = 1 plus a BCE term of
nnU-Net's weight (1e-4 x the per-slice sum, about the pixel mean at 128 x 128 patches), plain
Adam at 1e-3, half the nodule-slice crops placed on a nodule and 30% of the empty slices
per epoch learned where the earlier demo recipe (s = 0.01, BCE 0.01, per-layer scaled Adam
at 2e-3, no norm) settled on predicting nothing. One slice of context on each side
(`--context-slices 1`) found more of the nodules in one run and marked more empty slices.
Then three changes against the per-sample Dice's pull to "no nodule anywhere" (`nn.loss`)
and its slow, seed-dependent start: the Dice over the batch (`dice`), an output prior of
0.01 (`head_prior`), and nnU-Net's poly decay of the learning rate (`lr_schedule`);
over four seeds of the demo they raised the test nodule-slice Dice from 0.31 to 0.36 on
average and the clean empty slices from 77% to 92% (README, "Recipes"). Every part is an
option of its own (`smooth`, `dice`, `head_prior`, `lr_schedule`, `bce_weight`,
`nodule_dice_weight`, `lr_scaling`, `empty_fraction`, `norm`, `foreground_fraction`,
`nodule_balance`, `context_slices`). The latest, `nodule_dice_weight`: a Dice per nodule
added to the batch Dice, so that a 4 mm nodule weighs what a 30 mm one does
(`nn.loss.nodule_dice_loss`); on two synthetic sets its runs found more of the 3-10 mm
nodules, on training and test slices, and marked more empty slices (README, "Recipes").
`nodule_balance` (0 in both recipes) draws nodule samples nodule by nodule instead of slice
by slice: on the demo it traded 10-30 mm Dice for 3-10 mm nodules found (README, "Recipes").

Patches (`patch`, `foreground_fraction`): training crops of the cache's native-resolution
slices, a third of them placed on a nodule (nnU-Net's recipe; `nodulekit.data.loader`);
validation, test and predict run on whole slices (the U-Net is fully convolutional). Left
unset, the patch is chosen from the slice size and the device (`resolve_patch`); a patch as
large as the slices is whole-slice training, bit for bit what it was before patches.
Context (`context_slices` K): the K slices below and above as extra input channels (2.5D),
`in_channels` = 2K + 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from nodulekit.nn.layout import NORMS
from nodulekit.nn.loss import DICE_MODES
from nodulekit.nn.optim import LR_SCALINGS, LR_SCHEDULES

FOREGROUND_FRACTION = 1.0 / 3.0  # nnU-Net's: crops placed on a nodule (loader's default)
# A recipe is how the net learns (loss, Adam's settings, sampling, normalisation, input); the
# size of the job (epochs, batch, width, depth) is the data's (`SIZE_DEFAULTS`). Every data
# set trains with "nodulekit" unless `--recipe paper` is asked; README, "Recipes", has what
# each reached.
RECIPES = {
    "nodulekit": {"lr": 1e-3, "smooth": 1.0, "dice": "batch", "bce_weight": 1e-4,
                  "nodule_dice_weight": 1.0, "nodule_bce_weight": 0.0,
                  "head_prior": 0.01, "lr_schedule": "poly", "lr_scaling": "none",
                  "empty_fraction": 0.3, "norm": "batch", "patch": None,
                  "foreground_fraction": 0.5, "nodule_balance": 0.0, "context_slices": 0,
                  "weight_ema": 0.0},
    "paper": {"lr": 1e-4, "smooth": 1.0, "dice": "sample", "bce_weight": 0.0,
              "nodule_dice_weight": 0.0, "nodule_bce_weight": 0.0,
              "head_prior": 0.5, "lr_schedule": "constant", "lr_scaling": "none",
              "empty_fraction": 0.0, "norm": "none", "patch": None,
              "foreground_fraction": FOREGROUND_FRACTION, "nodule_balance": 0.0,
              "context_slices": 0, "weight_ema": 0.0},
}
DEFAULT_RECIPE = "nodulekit"
SIZE_DEFAULTS = {
    "real": {"epochs": 200, "batch_size": 12, "width": 64, "depth": 4,  # the paper's
             "val_interval": 1},
    # README, "The default run": 20 epochs (twice the steps of the 10 before), validated
    # after every fifth: validation of the 128 whole slices costs about an epoch's steps,
    # and since the kept epoch is the last one that finds a validation nodule (not the
    # highest score) the epochs between only draw the curves (every second one before)
    "demo": {"epochs": 20, "batch_size": 8, "width": 8, "depth": 4, "val_interval": 5},
}


def recipe_defaults(recipe: str | None, kind: str) -> dict:
    """The unset options' values: the recipe's (default "nodulekit") over the data's sizes
    (kind "demo" or anything else: real data)."""
    name = DEFAULT_RECIPE if recipe is None else recipe
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; one of {', '.join(RECIPES)}")
    sizes = SIZE_DEFAULTS["demo" if kind == "demo" else "real"]
    return {**sizes, **RECIPES[name], "recipe": name}


SELECTION_METRIC = "val_nodule_found_dice"  # selection.METRIC (before: val_nodule_dice)
# The automatic patch side (`--patch auto`): min(slice side, this). On the CPU 128: a step on
# 8 crops of 128x128 of a width-16 U-Net takes ~240 ms on 2 cores where a whole 512x512
# slice costs 16x the pixels, and 128 pixels at 0.6-0.8 mm (77-102 mm) hold a 3-30 mm nodule
# with its surroundings (the depth-4 U-Net's theoretical receptive field is ~200 pixels, its
# effective one much smaller). On a GPU 256: 4x the context per crop (nnU-Net's 2-D CT
# patches are larger still) at a step time the GPU keeps short. A cache of 128x128 slices
# trains on whole slices either way.
PATCH_SIDE = {"cpu": 128, "cuda": 256}


# What `TrainOptions` fields mean for a resumed run: FIXED ones define what the run computes
# and must equal the checkpoint's (or be left unset); SESSION ones may change every session.
FIXED, SESSION = "fixed", "session"


def _option(default=None, *, on_resume: str = FIXED):
    return field(default=default, metadata={"on_resume": on_resume})


@dataclass
class TrainOptions:
    """What a user asks of `nodulekit train`: the CLI builds one, the API takes one.

    None means "the default": the recipe's, over the data's sizes (`recipe_defaults`);
    `training.setup.resolve` turns it into a `TrainConfig`. On
    ``resume`` the FIXED fields must be unset or equal the run's, field by field
    (`conflicts_on_resume`); the SESSION ones apply to the new session.
    """

    # a cache (.h5), a data-set folder, or None: the demo set. On resume: the run's own data,
    # or its cache at a new place (checked by `setup.resumed_config`, not field by field)
    data: str | None = _option(on_resume=SESSION)
    out: str | None = _option(on_resume=SESSION)  # the run folder (default runs/<data>-<time>)
    resume: str | None = _option(on_resume=SESSION)  # a run folder to continue
    finetune_from: str | None = _option()  # a checkpoint or run folder to start from
    epochs: int | None = _option(on_resume=SESSION)
    val_interval: int | None = _option()  # validate every N epochs (and the last)
    batch_size: int | None = _option()
    lr: float | None = _option()
    width: int | None = _option()
    depth: int | None = _option()
    size: int | None = _option()  # centre crop to size x size
    precision: str | None = _option()
    seed: int | None = _option()
    empty_fraction: float | None = _option()
    smooth: float | None = _option()
    dice: str | None = _option()  # "sample" | "batch": per-sample Dice or one over the batch
    head_prior: float | None = _option()  # the untrained net's foreground probability
    lr_schedule: str | None = _option()  # "constant" | "poly" (over the run's steps)
    lr_scaling: str | None = _option()
    bce_weight: float | None = _option()
    nodule_dice_weight: float | None = _option()  # the per-nodule Dice term's weight
    nodule_bce_weight: float | None = _option()  # the per-nodule BCE term's weight
    norm: str | None = _option()  # "none" | "instance" | "batch" after every 3x3 convolution
    recipe: str | None = _option()  # RECIPES' name: the defaults of the options above
    patch: int | str | None = _option()  # training crop side; None or "auto": `resolve_patch`
    foreground_fraction: float | None = _option()  # crops placed on a nodule (default 1/3)
    nodule_balance: float | None = _option()  # nodule samples drawn nodule by nodule
    context_slices: int | None = _option()  # K slices below and above as input channels
    weight_ema: float | None = _option()  # decay of the weight average (nn.ema); 0: none
    # a data-set folder's pixels resampled in-plane to this (mm) when preprocessed
    spacing: float | str | None = _option()  # mm, or "median"
    device: str = _option("auto", on_resume=SESSION)
    workers: int = _option(2, on_resume=SESSION)
    queue: int | None = _option(on_resume=SESSION)
    test: bool = _option(True, on_resume=SESSION)  # evaluate the best model on the test split
    progress: bool = _option(True, on_resume=SESSION)

    def __post_init__(self):
        if isinstance(self.patch, str):
            self.patch = None if self.patch.strip().lower() == "auto" else int(self.patch)

    def defaults_from(self, defaults: dict) -> dict:
        """The FIXED options (and epochs) with unset ones taken from `defaults`."""
        names = [f.name for f in dataclasses.fields(self)
                 if f.metadata["on_resume"] == FIXED or f.name == "epochs"]
        return {n: defaults.get(n) if getattr(self, n) is None else getattr(self, n)
                for n in names}

    def conflicts_on_resume(self, config: TrainConfig) -> list[str]:
        """Each FIXED option given here that differs from the resumed run's configuration,
        as "name: run's value -> asked value"."""
        out = []
        for f in dataclasses.fields(self):
            asked = getattr(self, f.name)
            if f.metadata["on_resume"] != FIXED or asked is None:
                continue
            stored = _stored_value(config, f.name)
            if _comparable(f.name, asked, stored) != stored:
                out.append(f"{f.name} is {stored}, cannot change it to {asked}")
        return out


def _stored_value(config: TrainConfig, name: str):
    if name == "spacing":
        return config.spacing_mm
    if name == "size":
        return list(config.image_shape)
    if name == "patch":
        return list(config.train_shape)
    return getattr(config, name)


def _comparable(name: str, asked, stored):
    """`asked` in the form the configuration stores it."""
    if name in ("size", "patch"):
        return [int(asked)] * 2
    if name == "spacing":  # "median": what it gave when the run began, if it was asked
        return (stored if stored is not None else asked) if asked == "median" else float(asked)
    if name in ("data", "finetune_from"):
        text = str(asked)
        return stored if stored in (text, str(Path(text).absolute())) else text
    return None if stored is None else type(stored)(asked)


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
    in_channels: int = 1  # 2 * context_slices + 1
    # training crops (H, W); None: whole slices (image_shape), as every run before patches
    patch: list[int] | None = None
    foreground_fraction: float = FOREGROUND_FRACTION  # of the crops, placed on a nodule
    # of the nodule samples, the share drawn nodule by nodule (data.loader; 0: each nodule
    # slice once an epoch, every run before the option)
    nodule_balance: float = 0.0
    context_slices: int = 0  # K slices below and above as extra input channels
    # the cache's in-plane pixel size when `preprocess --spacing` resampled it (mm); None:
    # native pixels. `predict` resamples its inputs to it and maps the masks back.
    spacing_mm: float | None = None
    window_center: float = -500.0
    window_width: float = 1600.0
    smooth: float = 1.0  # the Dice loss's smoothing s
    dice: str = "sample"  # "sample" (the paper's) or "batch" (nn.loss; a run before it: sample)
    head_prior: float = 0.5  # the head's initial bias is its logit (0.5: zero, the paper's)
    lr_schedule: str = "constant"  # or "poly": lr (1 - step / all steps)^0.9 (nn.optim)
    lr_scaling: str = "none"  # "none" (the paper's Adam) or "fan_in" (see lr_scale)
    bce_weight: float = 0.0  # > 0: add this x per-sample summed BCE to the Dice loss
    nodule_dice_weight: float = 0.0  # > 0: add this x the per-nodule Dice loss (nn.loss)
    nodule_bce_weight: float = 0.0  # > 0: add this x the per-nodule BCE (nn.loss)
    norm: str = "none"  # the U-Net's normalisation layers (a run from before them: none)
    recipe: str = ""  # the RECIPES entry the unset options came from ("": a run before them)
    selection_metric: str = SELECTION_METRIC
    cache_identity: str = ""  # `nodulekit.data.fingerprint.cache_identity` of the cache
    eval_batch_size: int = 0  # 0: the training batch size
    test_after: bool = True  # evaluate the best model on the test split at the end
    # validate after every N-th epoch and the last (MONAI's val_interval); the best is kept
    # among the validated epochs. 1: every epoch (every run before the option)
    val_interval: int = 1
    # > 0: validate, keep and load an exponential moving average of the weights with this
    # decay per step (`nn.ema`); 0: the weights themselves (every run before it)
    weight_ema: float = 0.0
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

    def validates(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) ends with validation: every `val_interval`-th
        epoch and the run's last."""
        return (epoch + 1) % self.val_interval == 0 or epoch + 1 == self.epochs

    @property
    def crop(self) -> bool:
        return list(self.image_shape) != list(self.cache_shape)

    @property
    def train_shape(self) -> list[int]:
        """The training input's H, W: the patch, or the whole (centre-cropped) slice."""
        return list(self.image_shape if self.patch is None else self.patch)

    def validate(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if self.val_interval < 1:
            problems.append(f"validation interval must be >= 1 epoch, got {self.val_interval}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if self.width < 1 or self.depth < 1:
            problems.append(f"width and depth must be >= 1, got width {self.width}, "
                            f"depth {self.depth}")
        problems += (self._learning_problems() + self._input_problems() + self._norm_problems()
                     + self._session_problems())
        if problems:
            raise ValueError("; ".join(problems))
        # the whole slices may be of any size (validation and inference pad them to a
        # multiple of 2**depth, `inference.tiling`); the training input may not
        check_patch(self.train_shape, self.image_shape, self.depth)

    def validate_session(self) -> None:
        """The options a resumed session may change (workers, queue)."""
        problems = self._session_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _learning_problems(self) -> list[str]:
        """The loss's, the optimiser's and the sampling's options."""
        problems = []
        if not 0.0 <= self.empty_fraction <= 1.0:
            problems.append(f"empty fraction must be in [0, 1], got {self.empty_fraction}")
        if not self.bce_weight >= 0:
            problems.append(f"BCE weight must be >= 0, got {self.bce_weight}")
        if not self.nodule_dice_weight >= 0:
            problems.append(f"nodule Dice weight must be >= 0, got {self.nodule_dice_weight}")
        if not self.nodule_bce_weight >= 0:
            problems.append(f"nodule BCE weight must be >= 0, got {self.nodule_bce_weight}")
        if not 0.0 <= self.nodule_balance <= 1.0:
            problems.append(f"nodule balance must be in [0, 1], got {self.nodule_balance}")
        if not 0.0 <= self.weight_ema < 1.0:
            problems.append(f"weight EMA decay must be in [0, 1), got {self.weight_ema}")
        if not self.smooth >= 0:
            problems.append(f"smooth must be >= 0, got {self.smooth}")
        if not 0.0 < self.head_prior < 1.0:
            problems.append(f"head prior must be in (0, 1), got {self.head_prior}")
        if self.dice not in DICE_MODES:
            problems.append(f"dice must be one of {DICE_MODES}, got {self.dice!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr schedule must be one of {LR_SCHEDULES}, got "
                            f"{self.lr_schedule!r}")
        if self.lr_scaling not in LR_SCALINGS:
            problems.append(f"lr scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        return problems

    def _input_problems(self) -> list[str]:
        problems = []
        if not 0.0 <= self.foreground_fraction <= 1.0:
            problems.append("foreground fraction must be in [0, 1], got "
                            f"{self.foreground_fraction}")
        if self.context_slices < 0:
            problems.append(f"context slices must be >= 0, got {self.context_slices}")
        elif self.in_channels != 2 * self.context_slices + 1:
            problems.append(f"{self.context_slices} context slice(s) make "
                            f"{2 * self.context_slices + 1} input channels, not "
                            f"{self.in_channels}")
        if self.patch is not None and len(self.patch) != 2:
            problems.append(f"patch must be [H, W], got {self.patch}")
        return problems

    def _norm_problems(self) -> list[str]:
        if self.norm not in NORMS:
            return [f"norm must be one of {NORMS}, got {self.norm!r}"]
        shape = self.train_shape if len(self.train_shape) == 2 else self.image_shape
        h, w = (int(v) >> int(self.depth) for v in shape)
        if self.norm == "instance" and h * w < 2:
            return [f"instance norm takes statistics over each slice's pixels, and at depth "
                    f"{self.depth} the deepest level of a {shape[0]}x{shape[1]} input has "
                    "one; use a larger --size (or --patch) or a smaller --depth"]
        return []

    def _session_problems(self) -> list[str]:
        problems = []
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if self.queue is not None and self.queue < 1:
            problems.append(f"queue must be >= 1 batch, got {self.queue}")
        return problems


def check_patch(patch, image_shape, depth: int) -> None:
    """ValueError unless the patch's sides are multiples of 2**depth within the slices."""
    f = 2 ** int(depth)
    (ph, pw), (h, w) = (int(v) for v in patch), (int(v) for v in image_shape)
    if ph <= 0 or pw <= 0 or ph % f or pw % f:
        side = ph if ph <= 0 or ph % f else pw
        raise ValueError(f"--patch {side} is not a multiple of 2**depth = {f} (depth {depth}); "
                         f"use a multiple of {f}, e.g. --patch {max(f, side // f * f)}")
    if ph > h or pw > w:
        raise ValueError(f"--patch {max(ph, pw)} is larger than the {h}x{w} slices it crops "
                         f"(after any --size); use --patch <= {min(h, w)}")


def resolve_patch(patch, image_shape, depth: int, backend: str) -> list[int]:
    """The training crop (H, W): `patch` x `patch` (checked), or for None / "auto" each side
    min(the slice's rounded down to a multiple of 2**depth, `PATCH_SIDE` of the backend)
    (whole slices where they are that small and such a multiple)."""
    h, w = (int(v) for v in image_shape)
    if patch is None or (isinstance(patch, str) and patch.strip().lower() == "auto"):
        f = 2 ** int(depth)
        if min(h, w) < f:
            raise ValueError(f"the {h}x{w} slices are smaller than the {f}x{f} a depth-{depth} "
                             f"U-Net needs at least (2**depth); use a smaller --depth")
        side = max(f, PATCH_SIDE.get(backend, PATCH_SIDE["cpu"]) // f * f)
        # a side that is no multiple of 2**depth: the largest crop that is
        shape = [min(h // f * f, side), min(w // f * f, side)]
    else:
        shape = [int(patch)] * 2
    check_patch(shape, image_shape, depth)
    return shape


def resolve_size(cache_shape, size: int | None, depth: int) -> list[int]:
    """The whole slices' (H, W) that validation and test see: the cache's, or a centre crop
    of it to size x size. Any size: they are padded with air to a multiple of 2**depth for
    the network (`inference.tiling.pad_to_multiple`) and the logits cropped back; training
    crops (`resolve_patch`) are multiples of it.

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
    if min(shape) < 1:
        raise ValueError(f"--size must be >= 1 pixel, got {min(shape)}")
    return shape

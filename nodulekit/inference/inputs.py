"""`nodulekit predict`'s inputs: which DICOM slices, their output names, their truth masks.

`find_inputs` gathers the slices: DICOM files, and folders searched recursively for .dcm /
.dicom / .ima. Each slice's output name mirrors its path below its input folder (a lone file
keeps its stem), without the suffix and without a leading ``images/`` (so a UniToChest split
folder gives UniToChest's own mask names); two slices with one name are refused.

Truth masks (`truth`): "auto" looks for UniToChest's mirror, ``<root>/masks/<rel>.png`` for a
slice at ``<root>/images/<rel>.dcm`` (a slice without its PNG has no nodule); a folder name
looks for ``<folder>/<rel>.png``; "none" (or None) looks for none. `read_truth` loads a
slice's mask once the slice's size is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass
class SliceInput:
    path: Path
    rel: Path  # output path without suffix, relative to OUT/masks etc.
    truth: Path | None  # the truth mask file, if any
    truth_known: bool  # whether a missing truth file means "no nodule"


def find_inputs(inputs: Iterable[str | os.PathLike],
                truth: str | os.PathLike | None = "auto") -> list[SliceInput]:
    """The DICOM files under `inputs`, with output names and truth masks (see module doc)."""
    truth_dir = _truth_folder(truth)
    found: list[SliceInput] = []
    seen: dict[Path, Path] = {}
    for item in inputs:
        for path, rel in _dicom_files(Path(item)):
            rel = _output_name(rel)
            if rel in seen:
                raise ValueError(f"{path} and {seen[rel]} would both be written as {rel}.png; "
                                 "predict them into separate --out folders")
            seen[rel] = path
            found.append(SliceInput(path, rel, *_truth_path(path, rel, truth, truth_dir)))
    return found


def read_truth(item: SliceInput, shape: tuple[int, ...],
               report: Callable[[str], Any] = print) -> np.ndarray | None:
    """`item`'s truth mask at the slice's `shape`: its PNG, zeros where a missing PNG means
    "no nodule", else None (also for a PNG that cannot be used, which is reported)."""
    from nodulekit.data.masks import MaskError, read_mask

    if item.truth is None:
        return None
    try:
        if item.truth.is_file():
            return read_mask(item.truth, shape=shape)
        if item.truth_known:
            return np.zeros(shape, np.uint8)
    except MaskError as e:
        report(f"truth mask not used for {item.path}: {e}")
    return None


def _truth_folder(truth: str | os.PathLike | None) -> Path | None:
    """The folder named by `truth`, or None for "auto" / "none" / None."""
    if truth in (None, "auto", "none"):
        return None
    truth_dir = Path(truth)
    if not truth_dir.is_dir():
        raise ValueError(f"--truth {truth_dir}: no such folder")
    return truth_dir


def _dicom_files(item: Path) -> list[tuple[Path, Path]]:
    """(file, its path below `item`) for each DICOM file of an input file or folder."""
    if item.is_dir():
        files = sorted(p for p in item.rglob("*")
                       if p.is_file() and p.suffix.lower() in DICOM_SUFFIXES)
        if not files:
            raise ValueError(f"{item}: no DICOM files (*.dcm, *.dicom, *.ima) in it")
        return [(p, p.relative_to(item)) for p in files]
    if item.is_file():
        return [(item, Path(item.name))]
    raise ValueError(f"{item}: no such file or folder")


def _output_name(rel: Path) -> Path:
    """`rel` without its suffix and without a leading ``images/``."""
    rel = rel.with_suffix("")
    if rel.parts and rel.parts[0] == "images" and len(rel.parts) > 1:
        rel = Path(*rel.parts[1:])
    return rel


def _truth_path(path: Path, rel: Path, truth: str | os.PathLike | None,
                truth_dir: Path | None) -> tuple[Path | None, bool]:
    """(truth mask file or None, whether a missing file means "no nodule") for one slice."""
    if truth_dir is not None:
        return truth_dir / f"{rel}.png", True
    if truth == "auto":
        return _unitochest_truth(path)
    return None, False


def _unitochest_truth(path: Path) -> tuple[Path | None, bool]:
    """UniToChest's mask for a slice below an ``images/`` folder with a ``masks/`` beside it."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            root = Path(*parts[:i])
            masks = root / "masks"
            if masks.is_dir():
                return masks / Path(*parts[i + 1:]).with_suffix(".png"), True
            return None, False
    return None, False

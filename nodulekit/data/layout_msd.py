"""The Medical Segmentation Decathlon's layout (Task06_Lung and its kin) as scan records.

::

    dataset.json             the task's description (read for its presence and its JSON)
    imagesTr/NAME.nii.gz     training scans (NIfTI; ``.nii`` too)
    labelsTr/NAME.nii.gz     their labels, same name: nonzero voxels are nodule
    imagesTs/                test scans without labels: not read (nothing to train or
                             score on), said in one note

A training scan is a patient (its name without the suffix, ``lung_001``) with one exam; the
patients get the seeded 80/10/10 split of `layout.split_patients`. A scan without its label
is skipped, named; so is a label whose grid (shape, spacing, origin, direction) is not its
scan's, found when the two are read (`scans.load_scan`), with both files and the values in
the reason. A label without a scan and any other file in ``imagesTr/`` or ``labelsTr/`` are
reported too. Files starting with a dot (the ``._lung_001.nii.gz`` that macOS leaves in the
published archive) are not read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from nodulekit.data.layout import DEFAULT_FRACTIONS, DataIndex, LayoutError, Problem
from nodulekit.data.scans import file_scan_spec, scan_index

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def read_msd(root: str | os.PathLike, *, seed: int = 0,
             fractions: Sequence[float] = DEFAULT_FRACTIONS) -> DataIndex:
    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise LayoutError(f"{root}: no imagesTr/ folder: not a Medical Segmentation "
                          "Decathlon layout")
    problems: list[Problem] = []
    _check_description(root / "dataset.json", problems)
    images = _listed(images_dir, problems)
    labels = _listed(labels_dir, problems) if labels_dir.is_dir() else {}
    scans = []
    for name, image in sorted(images.items()):
        label = labels.get(name)
        if label is None:
            problems.append(Problem(str(image), f"no label {labels_dir / name}: skipped (a "
                                                "training scan needs its label)"))
            continue
        spec = file_scan_spec(image, root, problems, label=str(label))
        if spec is not None:
            scans.append((_stem(name), "1", spec))
    for name in sorted(set(labels) - set(images)):
        problems.append(Problem(str(labels[name]), "label without a scan in imagesTr/; "
                                                   "ignored"))
    tests = root / "imagesTs"
    if tests.is_dir():
        n = sum(1 for p in tests.iterdir() if _is_nifti(p.name) and not p.name.startswith("."))
        if n:
            problems.append(Problem(str(tests), f"{n} test scan(s) without labels: not read "
                                                "(nothing to train or score on)",
                                    skipped=False))
    return scan_index(root, "msd", scans, problems, seed=seed, fractions=fractions)


def _check_description(path: Path, problems: list[Problem]) -> None:
    if not path.is_file():
        problems.append(Problem(str(path), "missing; scans read from imagesTr/ and labelsTr/",
                                skipped=False))
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problems.append(Problem(str(path), f"not readable JSON ({e}); scans read from "
                                           "imagesTr/ and labelsTr/ all the same",
                                skipped=False))


def _listed(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    """The NIfTI files in `folder` by name; every other file reported."""
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and _is_nifti(path.name):
            found[path.name] = path
        else:
            problems.append(Problem(str(path), "not a NIfTI file (.nii.gz, .nii); ignored"))
    return found


def _is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _stem(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name

"""A tree of DICOM series folders as scan records, with their labels beside them.

Every folder under the data folder that holds DICOM files (`volumes.dicom_files`: the
``.dcm`` family, or "DICM" at byte 128) is one series, one scan: read whole by
`volumes.read_dicom_series`, which checks its geometry (one series, one orientation, one
size and spacing, no missing or doubled slice). A folder that fails is skipped with the
reason, naming the files; the others go on.

**Label rule**: a series folder ``X/``'s label is the file ``X.nii.gz`` (or ``X.nii``, or
``X.seg.dcm``: a DICOM SEG that references the series' slices, `seg.read_seg`) beside it, in
the same parent folder; the first of those that exists is read. A NIfTI label must lie on
the series' grid (`volumes.check_same_grid`; otherwise the series is skipped, both files
and the values named); nonzero voxels are nodule. A series without a label has no nodule.
For example::

    scans/patient_0001/ct/0001.dcm ...      a series
    scans/patient_0001/ct.nii.gz            its label

A label file that names no folder beside it is reported and not read. (Another label
format adds its file name to `layout.SERIES_LABEL_SUFFIXES` and its reader to
`scans.read_label`.)

The patient is the series' PatientID (else the folder's first part under the data folder),
the exam the folder's path under the data folder; patients get the seeded 80/10/10 split
of `layout.split_patients`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nodulekit.data.layout import (
    DEFAULT_FRACTIONS,
    SERIES_LABEL_SUFFIXES,
    DataIndex,
    LayoutError,
    Problem,
)
from nodulekit.data.scans import ScanError, ScanSpec, canonical_grid, scan_index, series_grid
from nodulekit.data.volumes import dicom_files


def read_series_tree(root: str | os.PathLike, *, seed: int = 0,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS) -> DataIndex:
    root = Path(root)
    problems: list[Problem] = []
    scans = []
    labels_used: set[Path] = set()
    folders, labels = _walk(root)
    if not folders:
        raise LayoutError(f"{root}: no folder of DICOM files found (looked for *.dcm, "
                          "*.dicom, *.ima and files with a DICM marker)")
    for folder, files in folders:
        found = _labels_of(folder, problems)
        labels_used.update(found)
        label = found[0] if found else None
        try:
            shape, affine, ids = series_grid(folder, files)
        except ScanError as e:
            problems.append(Problem(str(folder), str(e)))
            continue
        slices, slice_shape, spacing = canonical_grid(shape, affine)
        rel = folder.relative_to(root).as_posix() if folder != root else "."
        spec = ScanSpec(str(folder), rel, slices, slice_shape, spacing,
                        label=None if label is None else str(label),
                        files=tuple(str(f) for f in files))
        patient = ids["PatientID"] or (rel.split("/")[0] if rel != "." else root.name)
        scans.append((patient, rel, spec))
    problems += [Problem(str(p), "label file beside no series folder (a series X/'s label "
                                 "is X.nii.gz, X.nii or X.seg.dcm next to it); ignored")
                 for p in labels if p not in labels_used]
    return scan_index(root, "series", scans, problems, seed=seed, fractions=fractions)


def _walk(root: Path) -> tuple[list[tuple[Path, list[Path]]], list[Path]]:
    """(folder, its DICOM files) for every folder under `root` (itself included) that holds
    some slices, and the files named as labels are (NIfTI anywhere, DICOM SEG beside a
    folder), in path order; hidden files and folders are not read. A folder's DICOM SEG
    label is not a slice of the folder it lies in."""
    folders, labels = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        here = Path(dirpath)
        segs = {here / (n + ".seg.dcm") for n in dirnames}
        files = [f for f in dicom_files(here) if f not in segs]
        if files:
            folders.append((here, files))
        labels += [here / n for n in sorted(filenames) if not n.startswith(".")
                   and (n.lower().endswith(SERIES_LABEL_SUFFIXES[:2]) or here / n in segs)]
    return (sorted(folders, key=lambda item: item[0].as_posix()),
            sorted(labels, key=lambda p: p.as_posix()))


def _labels_of(folder: Path, problems: list[Problem]) -> list[Path]:
    """The label files of series `folder`, the one read first (the others reported)."""
    found = [folder.with_name(folder.name + s) for s in SERIES_LABEL_SUFFIXES]
    found = [p for p in found if p.is_file()]
    for other in found[1:]:
        problems.append(Problem(str(other), f"a second label for {folder} (the first, "
                                            f"{found[0].name}, is read); ignored"))
    return found

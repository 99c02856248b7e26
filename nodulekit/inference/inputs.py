"""`nodulekit predict`'s inputs: which DICOM slices, their output names, their truth masks.

`find_inputs` gathers the slices: DICOM files, and folders searched recursively for .dcm /
.dicom / .ima. Each slice's output name mirrors its path below its input folder (a lone file
keeps its stem), without the suffix and without a leading ``images/`` (so a UniToChest split
folder gives UniToChest's own mask names); two slices with one name are refused.

Truth masks (`truth`): "auto" looks for UniToChest's mirror, ``<root>/masks/<rel>.png`` for a
slice at ``<root>/images/<rel>.dcm`` (a slice without its PNG has no nodule); a folder name
looks for ``<folder>/<rel>.png``; "none" (or None) looks for none. `read_truth` loads a
slice's mask once the slice's size is known.

Series (for a model trained with context slices, `plan_series`): each slice's header
(`read_header`, without its pixels) puts it in a series, (PatientID, StudyInstanceUID,
SeriesInstanceUID), where slices without a SeriesInstanceUID are one series per folder (and
a slice whose header cannot be read is alone); a series is ordered along the patient axis by
ImagePositionPatient projected on the slice normal (from ImageOrientationPatient, its sign
taken so that the order is z ascending wherever z changes), else the z of
ImagePositionPatient, else SliceLocation, else InstanceNumber (each when every slice of the
series has one and no two are equal, as `nodulekit.data.loader.context_table` orders a
cache's scans), else the input order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.data.dicom import header_floats, header_text

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# normals this close (|cos| of their angle) are one orientation: a series projects on one
_SAME_NORMAL = 0.999


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


@dataclass(frozen=True)
class SliceHeader:
    """What placing a slice in its series takes, from its header alone (None: absent)."""

    patient: str
    study: str
    series: str
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row, column cosines
    location: float | None  # SliceLocation, mm
    instance: int | None  # InstanceNumber


@dataclass
class SeriesPlan:
    """The inputs as series: item indices, each series in order along the patient axis."""

    series: list[list[int]]
    notes: list[str]  # what a user should know about the grouping and order, one line each


def read_header(path: str | os.PathLike) -> SliceHeader | None:
    """`path`'s `SliceHeader`; None for a file whose header cannot be read (reading the
    slice then fails too, and says why)."""
    from nodulekit.data.dicom import DicomError
    from nodulekit.data.dicom import read_header as dicom_header

    try:
        ds = dicom_header(path)
    except DicomError:
        return None
    return SliceHeader(header_text(ds, "PatientID"), header_text(ds, "StudyInstanceUID"),
                       header_text(ds, "SeriesInstanceUID"),
                       header_floats(ds, "ImagePositionPatient", 3),
                       header_floats(ds, "ImageOrientationPatient", 6),
                       (header_floats(ds, "SliceLocation", 1) or (None,))[0],
                       _integer(ds, "InstanceNumber"))


def plan_series(items: list[SliceInput], headers: list[SliceHeader | None]) -> SeriesPlan:
    """`items` (with their `headers`) as series, in the order each first appears, each in
    order along the patient axis (module doc); notes say where a fallback was taken."""
    groups: dict[tuple, list[int]] = {}
    by_folder = 0
    for i, (item, h) in enumerate(zip(items, headers, strict=True)):
        if h is None:
            key: tuple = ("unreadable", i)
        elif h.series:
            key = ("uid", h.patient, h.study, h.series)
        else:
            key = ("folder", h.patient, h.study, str(item.path.parent))
            by_folder += 1
        groups.setdefault(key, []).append(i)
    notes = []
    if by_folder:
        notes.append(f"note: {by_folder} slice(s) have no SeriesInstanceUID: those in one "
                     "folder (and of one patient and study) are taken as one series")
    fallback: dict[str, list[str]] = {}
    series = []
    for key, members in groups.items():
        order, how = series_order([headers[i] for i in members])
        series.append([members[j] for j in order])
        if how not in ("position", "") and len(members) > 1:
            fallback.setdefault(how, []).append(key[-1])
    for how, which in fallback.items():
        notes.append(f"note: {len(which)} series ordered by {how} (no distinct "
                     f"{_MISSING[how]} in every slice), e.g. {which[0]}")
    return SeriesPlan(series, notes)


_MISSING = {"the z of ImagePositionPatient": "ImageOrientationPatient",
            "SliceLocation": "ImagePositionPatient",
            "InstanceNumber": "ImagePositionPatient or SliceLocation",
            "the input order": "ImagePositionPatient, SliceLocation or InstanceNumber"}


def series_order(headers: list[SliceHeader | None]) -> tuple[np.ndarray, str]:
    """(order, how): the indices of one series' slices along the patient axis, by the first
    key that every slice has and no two share (module doc); how: "position" (along the
    normal), a fallback's name, or "" for a series of one slice."""
    n = len(headers)
    if n < 2:
        return np.arange(n), ""
    for how, values in (("position", _along_normal(headers)),
                        ("the z of ImagePositionPatient",
                         _values(headers, lambda h: h.position and h.position[2])),
                        ("SliceLocation", _values(headers, lambda h: h.location)),
                        ("InstanceNumber", _values(headers, lambda h: h.instance))):
        if values is not None and len(np.unique(values)) == n:
            return np.argsort(values, kind="stable"), how
    return np.arange(n), "the input order"


def _along_normal(headers: list[SliceHeader | None]) -> np.ndarray | None:
    """Each slice's ImagePositionPatient projected on the series' slice normal (the first
    slice's, signed so that z grows along it; else x, else y), when every slice has both
    tags and one orientation; else None."""
    if any(h is None or h.position is None or h.orientation is None for h in headers):
        return None
    normals = np.array([np.cross(h.orientation[:3], h.orientation[3:]) for h in headers])
    lengths = np.linalg.norm(normals, axis=1)
    if not (lengths > 1e-6).all():
        return None
    normals /= lengths[:, None]
    normal = normals[0]
    if (np.abs(normals @ normal) < _SAME_NORMAL).any():
        return None
    lead = next(c for c in (normal[2], normal[0], normal[1]) if abs(c) > 1e-6)
    normal = normal if lead > 0 else -normal
    return np.array([h.position for h in headers]) @ normal


def _values(headers: list[SliceHeader | None], get) -> np.ndarray | None:
    """get(header) of every slice as float64; None where one is absent."""
    values = [None if h is None else get(h) for h in headers]
    if any(v is None for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def _integer(ds, name: str) -> int | None:
    value = header_floats(ds, name, 1)
    return None if value is None or value[0] != int(value[0]) else int(value[0])

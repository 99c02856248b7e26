"""Which slices a data folder holds, with their masks and split.

Five layouts are read. Two of DICOM slices, here:

- **UniToChest** (docs/design.md): split folders ``train/ val/ test/``, each with
  ``images/patient_XXXX/exam_N/*.dcm``, PNG masks mirrored under ``masks/``, and
  ``<split>_dataset.csv`` with columns ``patientID, exam, slice, image, mask`` (``image`` and
  ``mask`` relative to ``images/`` and ``masks/``; ``mask`` empty for a slice without a
  nodule). Column names are matched leniently (case, spaces, underscores); paths are also
  tried relative to the split folder and the data folder. A listed path must stay inside
  the data folder (no ``..`` out of it, no absolute path elsewhere): a CSV is data, and
  should not make the reader open files anywhere on the machine. Such a row is skipped and
  reported, unless ``allow_outside_paths=True`` (``nodulekit preprocess
  --allow-outside-paths``). The check is on the path as written (normalised, links not
  followed), so a data folder may hold links to where the files really are.
- **A plain folder tree** of DICOM files with masks either beside them (``X.dcm`` with
  ``X.png`` or ``X_mask.png``) or in a mirrored tree (``images/...`` and ``masks/...``, or
  the tree itself and ``masks/...``; ``masks/<same path>.png`` or ``..._mask.png``). A slice
  without a mask has no nodule. Patients (the PatientID tag, else the top folder) get a
  seeded patient-level 80/10/10 split.

Three of whole scans, each in a module of its own, whose records name a scan and a slice
of it (`SliceRecord.volume_slice`; the scans themselves in `DataIndex.scans`):

- **series** (`layout_series`): a tree of DICOM series folders, labels beside them as NIfTI;
- **msd** (`layout_msd`): the Medical Segmentation Decathlon's ``imagesTr/``, ``labelsTr/``;
- **luna16** (`layout_luna16`): MetaImage scans and ``annotations.csv``, nodules as spheres.

`detect_layout` tells them apart (`read_layout(..., "auto")`) where the folder says which.

Nothing that does not fit is guessed: a mask without a slice, an image file (PNG, JPEG,
TIFF, ...) whose name fits no mask pattern, a listed file that is missing or outside the
data folder, a DICOM the CSV does not list, a slice with two candidate masks, all become
`Problem` entries in the returned `DataIndex` (size mismatches and non-binary masks are found
when the pixels are read, see `masks.read_mask`).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
LAYOUTS = ("auto", "unitochest", "folder", "series", "msd", "luna16")
# Layouts of whole scans: their slices are read a scan at a time (`nodulekit.data.scans`).
SCAN_LAYOUTS = ("series", "msd", "luna16")
# A DICOM series folder X's label is X + one of these, beside X (`layout_series`).
SERIES_LABEL_SUFFIXES = (".nii.gz", ".nii", ".seg.dcm")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Files that look like a mask (or an image meant as one): reported when no slice uses them.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")
_MASK_PATTERNS = "X.png or X_mask.png beside X.dcm, or masks/<same path>.png"


class LayoutError(ValueError):
    """A data folder that cannot be read at all."""


@dataclass(frozen=True)
class SliceRecord:
    split: str
    patient: str
    exam: str
    slice: int | None  # slice number within the exam (CSV `slice` or InstanceNumber)
    image: str  # absolute path of the DICOM file (of a scan layout: of the scan)
    # absolute path of the PNG mask (of a scan layout: of the label volume or annotations
    # file); None: no nodule in this slice
    mask: str | None
    source: str  # image path relative to the data root, for reports and the cache
    # a scan layout's slice: its index in the scan, reoriented (`scans.canonical`);
    # None for a DICOM slice of its own
    volume_slice: int | None = None


@dataclass(frozen=True)
class Problem:
    """Something in the data that does not fit. `skipped`: a file left out of the data set;
    otherwise a note (the data set is read as described in `reason`)."""

    path: str
    reason: str
    skipped: bool = True

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class DataIndex:
    root: Path
    layout: str
    records: list[SliceRecord]
    problems: list[Problem] = field(default_factory=list)
    # scan layouts: each scan (`scans.ScanSpec`) by its path, the records' `image`
    scans: dict = field(default_factory=dict)

    def split(self, name: str) -> list[SliceRecord]:
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.split == s for r in self.records) for s in SPLITS}


def split_patients(patients: Iterable[str], seed: int = 0,
                   fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Seeded patient-level split: patient -> "train" / "val" / "test".

    The patients are sorted first, so the split depends only on the set and the seed.
    With three or more patients every split gets at least one.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not sum(fractions) > 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    unique = sorted(set(patients))
    n = len(unique)
    total = float(sum(fractions))
    n_val = math.floor(n * fractions[1] / total + 0.5)
    n_test = math.floor(n * fractions[2] / total + 0.5)
    if n >= 3:
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
    while n - n_val - n_test < 1 and fractions[0] > 0 and (n_val or n_test):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, i in enumerate(order.tolist()):
        out[unique[i]] = ("train" if rank < n - n_val - n_test
                          else "val" if rank < n - n_test else "test")
    return out


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the data folder `root`, from what it holds:

    - "unitochest": a split folder (``train/``, ...) with ``images/`` or ``<split>_dataset.csv``;
    - "msd": ``dataset.json`` and ``imagesTr/``;
    - "luna16": ``annotations.csv`` and MetaImage scans (``subset*/*.mhd`` or ``*.mhd``);
    - "series": a label beside a folder (``X/`` and ``X.nii.gz``, ``X.nii`` or ``X.seg.dcm``),
      and no PNG masks;
    - "folder" otherwise: DICOM files, PNG masks beside or mirrored, or none.

    Two of the first three, or labels beside folders and PNG masks, is a `LayoutError`
    asking for ``--layout``: the folder does not say which it is.
    """
    root = Path(root)
    found = []
    for split in SPLITS:
        d = root / split
        if d.is_dir() and ((d / f"{split}_dataset.csv").is_file() or (d / "images").is_dir()):
            found.append("unitochest")
            break
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        found.append("msd")
    if (root / "annotations.csv").is_file() and _has_metaimages(root):
        found.append("luna16")
    if len(found) > 1:
        raise LayoutError(f"{root}: looks like more than one layout ({', '.join(found)}); "
                          "name it with --layout")
    if found:
        return found[0]
    labels, pngs = _labels_and_pngs(root)
    if labels and pngs:
        raise LayoutError(f"{root}: holds both labels beside DICOM folders (series "
                          f"layout, such as {labels[0]}) and PNG files (folder layout, such "
                          f"as {pngs[0]}); name the layout with --layout")
    return "series" if labels else "folder"


def _has_metaimages(root: Path) -> bool:
    subsets = [d for d in root.glob("subset*") if d.is_dir()]
    return any(any(d.glob("*.mhd")) for d in subsets) or any(root.glob("*.mhd"))


def _labels_and_pngs(root: Path, most: int = 1) -> tuple[list[Path], list[Path]]:
    """Files named after a folder beside them as a series' label is, and PNG files, under
    `root` (at most `most` of each: enough to decide)."""
    labels: list[Path] = []
    pngs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        folders = set(dirnames)
        for name in sorted(n for n in filenames if not n.startswith(".")):
            lower = name.lower()
            if lower.endswith(".png") and len(pngs) < most:
                pngs.append(Path(dirpath) / name)
            for suffix in SERIES_LABEL_SUFFIXES:
                if lower.endswith(suffix) and name[:-len(suffix)] in folders:
                    if len(labels) < most:
                        labels.append(Path(dirpath) / name)
                    break
        if len(labels) >= most and len(pngs) >= most:
            break
    return labels, pngs


def resolve_layout(root: str | os.PathLike, layout: str = "auto") -> str:
    """`layout` checked, or for "auto" the one `detect_layout` finds."""
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if not Path(root).is_dir():
        raise LayoutError(f"{root}: not a directory")
    return detect_layout(root) if layout == "auto" else layout


def read_layout(root: str | os.PathLike, layout: str = "auto", *, seed: int = 0,
                fractions: Sequence[float] = DEFAULT_FRACTIONS,
                allow_outside_paths: bool = False) -> DataIndex:
    """The slices under `root`; `seed` and `fractions` split the layouts without splits of
    their own (all but UniToChest) by patient; `allow_outside_paths` reads what a
    UniToChest CSV lists outside `root` too."""
    root = Path(root)
    layout = resolve_layout(root, layout)
    if layout == "unitochest":
        return read_unitochest(root, allow_outside_paths=allow_outside_paths)
    if layout == "folder":
        return read_folder_tree(root, seed=seed, fractions=fractions)
    # imported here: they import this module
    if layout == "series":
        from nodulekit.data.layout_series import read_series_tree

        return read_series_tree(root, seed=seed, fractions=fractions)
    if layout == "msd":
        from nodulekit.data.layout_msd import read_msd

        return read_msd(root, seed=seed, fractions=fractions)
    from nodulekit.data.layout_luna16 import read_luna16

    return read_luna16(root, seed=seed, fractions=fractions)


# ----------------------------------------------------------------------------- UniToChest


def read_unitochest(root: str | os.PathLike, *, allow_outside_paths: bool = False) -> DataIndex:
    root = Path(root)
    records: list[SliceRecord] = []
    problems: list[Problem] = []
    found_any = False
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            problems.append(Problem(str(d), "split folder missing: this split will be empty",
                                    skipped=False))
            continue
        found_any = True
        csv_path = d / f"{split}_dataset.csv"
        if not csv_path.is_file():
            others = sorted(d.glob("*.csv"))
            if len(others) == 1:
                csv_path = others[0]
        if csv_path.is_file():
            recs, probs = _read_split_csv(root, split, csv_path, allow_outside_paths)
        else:
            problems.append(Problem(str(d), f"no {split}_dataset.csv: slices found by "
                                            "scanning images/ with masks/ mirrored",
                                    skipped=False))
            recs, probs = _scan_split(root, split)
        records.extend(recs)
        problems.extend(probs)
    if not found_any:
        raise LayoutError(f"{root}: no train/, val/ or test/ folder: not a UniToChest layout")
    return DataIndex(root, "unitochest", _sorted(records), problems)


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "").replace("-", "")


def _read_split_csv(root: Path, split: str, csv_path: Path,
                    allow_outside_paths: bool = False) -> tuple[list[SliceRecord], list[Problem]]:
    reader = _SplitCsv(root, split, csv_path, allow_outside_paths)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        reader.read_columns(rows.fieldnames)
        for line, row in enumerate(rows, start=2):
            reader.read_row(f"{csv_path}:{line}", row)
    reader.report_unlisted()
    return reader.records, reader.problems


class _SplitCsv:
    """One split's CSV read against its folder: the slices it lists, and what does not fit.

    Plain strings and one directory walk instead of a stat per listed file: a real split
    lists a quarter of a million slices.
    """

    def __init__(self, root: Path, split: str, csv_path: Path,
                 allow_outside_paths: bool = False):
        self.split, self.csv_path = split, csv_path
        self.allow_outside_paths = allow_outside_paths
        self.d = os.path.abspath(root / split)
        self.images_dir = os.path.join(self.d, "images")
        self.masks_dir = os.path.join(self.d, "masks")
        self.root_s = os.path.abspath(root)
        self.image_files = set(_walk_paths(self.images_dir))
        self.mask_files = set(_walk_paths(self.masks_dir))
        self.columns: dict[str, str] = {}
        self.records: list[SliceRecord] = []
        self.problems: list[Problem] = []
        self.listed: set[str] = set()
        self.listed_masks: set[str] = set()

    def read_columns(self, fieldnames: Sequence[str] | None) -> None:
        self.columns = {_norm(c): c for c in (fieldnames or [])}
        if "image" not in self.columns:
            raise LayoutError(f"{self.csv_path}: no 'image' column (columns: "
                              f"{', '.join(fieldnames or [])})")
        for missing in ("patientid", "exam", "slice", "mask"):
            if missing not in self.columns:
                self.problems.append(Problem(str(self.csv_path), f"no '{missing}' column; "
                                             "derived from the image path instead",
                                             skipped=False))

    def field(self, row: dict, name: str) -> str:
        return (row.get(self.columns[name]) or "").strip() if name in self.columns else ""

    def read_row(self, where: str, row: dict) -> None:
        image = self._image(where, row)
        if image is None:
            return
        rel = _under(image, self.images_dir) or os.path.basename(image)
        found, mask = self._mask(where, row, rel)
        if not found:
            return
        parts = rel.split(os.sep)
        patient = self.field(row, "patientid") or _patient_from_path(Path(rel))
        exam = self.field(row, "exam") or (parts[-2] if len(parts) > 1 else "1")
        slice_text = self.field(row, "slice")
        slice_no = _int_or_none(slice_text)
        if slice_text and slice_no is None:
            self.problems.append(Problem(where, f"slice {slice_text!r} is not an integer; "
                                                "ordered by file name instead",
                                         skipped=False))
        source = _under(image, self.root_s) or image
        self.records.append(SliceRecord(self.split, patient, exam, slice_no, image, mask,
                                        source.replace(os.sep, "/")))

    def _image(self, where: str, row: dict) -> str | None:
        """The row's image (now listed), or None when the row is ignored."""
        image_text = self.field(row, "image")
        if not image_text:
            self.problems.append(Problem(where, "empty 'image' field; row ignored"))
            return None
        image = self._find(where, "image", image_text, self.images_dir, self.image_files)
        if image is None:
            return None
        if image in self.listed:
            self.problems.append(Problem(where, f"image {image_text!r} listed twice; this "
                                                "row ignored"))
            return None
        self.listed.add(image)
        return image

    def _mask(self, where: str, row: dict, rel: str) -> tuple[bool, str | None]:
        """(False, None) when the listed mask is missing (the slice is skipped), else
        (True, the mask or None for a slice without nodule)."""
        mask_text = self.field(row, "mask")
        if mask_text:
            mask = self._find(where, "mask", mask_text, self.masks_dir, self.mask_files)
            if mask is None:
                return False, None
            self.listed_masks.add(mask)
            return True, mask
        mirror = os.path.join(self.masks_dir, os.path.splitext(rel)[0] + ".png")
        if mirror in self.mask_files:
            self.listed_masks.add(mirror)
            self.problems.append(Problem(mirror, "mask file exists but the CSV lists no "
                                                 "mask for its slice; kept as a slice "
                                                 "without nodule, as the CSV says",
                                         skipped=False))
        return True, None

    def _find(self, where: str, kind: str, text: str, folder: str,
              known: set[str]) -> str | None:
        """The file a CSV field names (tried under `folder`, the split folder, the data
        folder), absolute and normalised; None, reported, when it is missing or outside
        the data folder (unless allowed)."""
        found = _find(text, (folder, self.d, self.root_s), known,
                      inside=None if self.allow_outside_paths else self.root_s)
        if isinstance(found, str):
            return found
        what = "image" if kind == "image" else "mask"
        then = "row skipped" if kind == "image" else "slice skipped (its truth is unknown)"
        if found is not None:
            how = "an absolute path" if os.path.isabs(text) else "a path that leaves it"
            self.problems.append(Problem(where, f"{what} {text!r} is outside the data folder "
                                                f"{self.root_s} ({how}: {found.outside}), "
                                                f"not read; {then} (--allow-outside-paths "
                                                "reads it)"))
        elif kind == "image":
            self.problems.append(Problem(where, f"image {text!r} listed but not found "
                                                f"under {folder}"))
        else:
            self.problems.append(Problem(where, f"mask {text!r} listed but not found; {then}"))
        return None

    def report_unlisted(self) -> None:
        """DICOMs and masks in the folder that the CSV does not list."""
        for path in sorted(self.image_files - self.listed):
            if _looks_like_dicom(Path(path)):
                self.problems.append(Problem(path, f"DICOM not listed in {self.csv_path.name}; "
                                                   "skipped"))
        for path in sorted(self.mask_files - self.listed_masks):
            if path.lower().endswith(".png"):
                self.problems.append(Problem(path, "mask without a slice in the CSV; ignored"))


@dataclass(frozen=True)
class _Outside:
    outside: str  # where a CSV path leads, outside the data folder (never looked at)


def _find(text: str, bases: tuple[str, ...], known: set[str],
          inside: str | None = None) -> str | _Outside | None:
    """The first of base/text that exists, as an absolute normalised path; with `inside`,
    only one under that folder: the others are never looked at, and when none under it
    exists, the first of them comes back as `_Outside` (else None)."""
    outside = None
    for base in bases:
        candidate = os.path.normpath(os.path.join(base, text))
        if inside is not None and _under(candidate, inside) is None:
            outside = outside or _Outside(candidate)
            continue
        if candidate in known or os.path.isfile(candidate):
            return candidate
    return outside


def _under(path: str, base: str) -> str | None:
    """`path` relative to `base` when it lies under it (both absolute), else None."""
    prefix = base.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else None


def _scan_split(root: Path, split: str):
    d = root / split
    images_dir = d / "images" if (d / "images").is_dir() else d
    masks_dir = d / "masks"
    records, problems, _ = _pair_tree(root, images_dir, masks_dir, exclude=masks_dir)
    out = []
    for r in records:
        rel = _rel_image(images_dir, Path(r.image))
        out.append(SliceRecord(split, _patient_from_path(rel),
                               rel.parent.name if len(rel.parts) > 1 else "1",
                               _number_from_name(rel), r.image, r.mask, r.source))
    return out, problems


# ----------------------------------------------------------------------------- folder tree


def read_folder_tree(root: str | os.PathLike, *, seed: int = 0,
                     fractions: Sequence[float] = DEFAULT_FRACTIONS) -> DataIndex:
    """DICOMs anywhere under `root`, masks beside them or mirrored; split by patient."""
    from nodulekit.data.dicom import DicomError, read_header

    root = Path(root)
    images_dir = root / "images" if (root / "images").is_dir() else root
    masks_dir = root / "masks"
    pairs, problems, _ = _pair_tree(root, images_dir, masks_dir, exclude=masks_dir)
    if not pairs:
        raise LayoutError(f"{root}: no DICOM files found (looked for *.dcm, *.dicom, *.ima "
                          "and files with a DICM marker)")
    keyed = []
    for r in pairs:
        rel = _rel_image(images_dir, Path(r.image))
        patient = exam = None
        slice_no = None
        try:
            ds = read_header(r.image)
            patient = str(ds.get("PatientID", "") or "").strip() or None
            exam = str(ds.get("SeriesInstanceUID", "") or ds.get("StudyInstanceUID", "")
                       or "").strip() or None
            slice_no = _int_or_none(ds.get("InstanceNumber"))
        except (DicomError, ValueError, TypeError, NotImplementedError, KeyError):
            pass  # decoding reports it, with the reason, when the cache is built
        patient = patient or (rel.parts[0] if len(rel.parts) > 1 else "unknown")
        exam = exam or (rel.parent.as_posix() if len(rel.parts) > 1 else "1")
        keyed.append((patient, exam, slice_no, r))
    split_of = split_patients((k[0] for k in keyed), seed=seed, fractions=fractions)
    records = [SliceRecord(split_of[p], p, e, s, r.image, r.mask, r.source)
               for p, e, s, r in keyed]
    return DataIndex(root, "folder", _sorted(records), problems)


def _pair_tree(root: Path, images_dir: Path, masks_dir: Path, exclude: Path):
    """(records without split/patient, problems, used masks) for DICOMs under images_dir.

    A slice X.dcm's mask is X.png or X_mask.png beside it, or masks/<same path>.png or
    masks/<same folder>/X_mask.png; every other image file (PNG, JPEG, ...) in either tree
    is reported, not silently ignored.
    """
    records: list[SliceRecord] = []
    problems: list[Problem] = []
    used: set[Path] = set()
    pictures: list[Path] = []  # image files in both trees: masks, or reported
    images: list[Path] = []
    for path in _walk(images_dir, exclude=exclude):
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            pictures.append(path)
        elif _looks_like_dicom(path):
            images.append(path)
    if masks_dir.is_dir():
        pictures += [p for p in _walk(masks_dir) if p.suffix.lower() in _IMAGE_SUFFIXES]
    known = {_abs(p) for p in pictures}  # set look-ups, not a stat per candidate
    for image in images:
        found = [c for c in _mask_candidates(images_dir, masks_dir, image) if _abs(c) in known]
        if len(found) > 1:
            problems.append(Problem(str(image), "two masks for this slice ("
                                                + ", ".join(map(str, found))
                                                + "); skipped, not guessed"))
            used.update(_abs(f) for f in found)
            continue
        mask = _abs(found[0]) if found else None
        if mask is not None:
            used.add(mask)
        records.append(SliceRecord("", "", "", None, str(_abs(image)),
                                   None if mask is None else str(mask),
                                   _relative(root, image)))
    problems.extend(_unused_pictures(pictures, used))
    return records, problems, used


def _mask_candidates(images_dir: Path, masks_dir: Path, image: Path) -> list[Path]:
    """Where slice `image`'s mask may be, in the patterns `_pair_tree` reads."""
    rel = _rel_image(images_dir, image)
    stem = image.name[:-len(image.suffix)] if image.suffix else image.name
    candidates = [image.with_name(stem + ".png"), image.with_name(stem + "_mask.png")]
    if masks_dir.is_dir():
        mirrored = masks_dir / rel.parent
        candidates += [mirrored / (stem + ".png"), mirrored / (stem + "_mask.png")]
    return candidates


def _unused_pictures(pictures: list[Path], used: set[Path]) -> list[Problem]:
    """A problem for each image file that is no slice's mask, saying why."""
    problems = []
    for path in pictures:
        if _abs(path) in used:
            continue
        if path.suffix.lower() != ".png":
            reason = (f"{path.suffix} file ignored: masks are read from PNG files "
                      f"({_MASK_PATTERNS})")
        elif path.stem.lower().endswith("_mask") or _is_under(path, "masks"):
            reason = "mask without a slice; ignored"
        else:
            reason = (f"PNG whose name fits no slice's mask ({_MASK_PATTERNS}); ignored")
        problems.append(Problem(str(path), reason))
    return problems


def _is_under(path: Path, folder_name: str) -> bool:
    return folder_name in (p.lower() for p in path.parts[:-1])


# ----------------------------------------------------------------------------- helpers


def _walk(top: Path, exclude: Path | None = None) -> list[Path]:
    if not top.is_dir():
        return []
    out = []
    skip = _abs(exclude) if exclude is not None and exclude.is_dir() else None
    for dirpath, dirnames, filenames in os.walk(top):
        base = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                             and (skip is None or _abs(base / n) != skip))
        out.extend(base / n for n in sorted(filenames) if not n.startswith("."))
    return out


def _walk_paths(top: str) -> list[str]:
    """`_walk` for an absolute, normalised `top`, as plain strings (which are then
    absolute and normalised too): a split lists a lot of files."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        out.extend(os.path.join(dirpath, n) for n in sorted(filenames) if not n.startswith("."))
    return out


def _looks_like_dicom(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in _DICOM_SUFFIXES:
        return True
    if suffix:  # .png, .csv, .txt, ...: not a slice
        return False
    try:  # no suffix, as many scanners write: the DICM marker decides
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _rel_image(images_dir: Path, image: Path) -> Path:
    try:
        return _abs(image).relative_to(_abs(images_dir))
    except ValueError:
        return Path(image.name)


def _relative(root: Path, path: Path) -> str:
    try:
        return _abs(path).relative_to(_abs(root)).as_posix()
    except ValueError:
        return str(path)


def _abs(path: str | os.PathLike) -> Path:
    """Absolute and normalised, without following links (resolve() costs a stat per part)."""
    return Path(os.path.abspath(path))


def _patient_from_path(rel: Path) -> str:
    first = rel.parts[0] if len(rel.parts) > 1 else "unknown"
    return first[len("patient_"):] if first.startswith("patient_") else first


def _number_from_name(rel: Path) -> int | None:
    digits = "".join(ch for ch in rel.stem if ch.isdigit())
    return int(digits) if digits else None


def _int_or_none(v) -> int | None:
    try:
        return None if v is None or v == "" else int(str(v).strip())
    except (TypeError, ValueError):
        return None


def _sorted(records: list[SliceRecord]) -> list[SliceRecord]:
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(records, key=lambda r: (order.get(r.split, len(SPLITS)), r.patient, r.exam,
                                          r.slice is None, r.slice or 0, r.source))

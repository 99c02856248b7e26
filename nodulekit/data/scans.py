"""Whole scans as slices for the cache: which scan, read with its label, turned to one
orientation.

The scan layouts (`layout_series`, `layout_msd`, `layout_luna16`) list each scan as a
`ScanSpec` (from its header alone: how many slices, their size and spacing) and one
`SliceRecord` per slice; `load_scan` then reads a scan with its truth, once for all its
slices (`nodulekit.data.scan_decode`):

- the image through `nodulekit.data.volumes` (NIfTI, MetaImage, a DICOM series, geometry
  checked there), its values as HU int16;
- the truth: a label volume (nonzero voxels are nodule), which must lie on the image's grid
  (`volumes.check_same_grid`: an error naming both files and the values), or a DICOM SEG
  on a series' slices, or spheres
  (LUNA16's annotations: the voxels whose centre lies within diameter / 2 of the centre,
  in mm), or nothing (no nodule);
- both turned to one orientation (`canonical`): array axes permuted and reversed, never
  resampled, so that the slices run along the patient's z (feet to head), rows along y
  (front to back) and columns along x (the patient's right to left): DICOM's usual axial
  view, whatever order the file stored them in. An oblique scan stays oblique (the axes
  closest to those); every slice keeps where it lies (`Volume.affine`).

Labels are read by `read_label`: NIfTI or MetaImage volumes, and DICOM SEG for a DICOM
series; another format plugs in there.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from nodulekit.data.layout import (
    DEFAULT_FRACTIONS,
    SPLITS,
    DataIndex,
    Problem,
    SliceRecord,
    split_patients,
)
from nodulekit.data.volumes import (
    GeometryError,
    Volume,
    check_same_grid,
    read_dicom_series,
    read_volume,
)

INT16_MIN, INT16_MAX = -32768, 32767


class ScanError(ValueError):
    """A scan (or its truth) that cannot be used; the message says why, naming the files."""


@dataclass(frozen=True)
class Sphere:
    """A nodule given by its centre (LPS mm) and diameter (mm), and where it was read."""

    center: tuple[float, float, float]
    diameter_mm: float
    where: str = ""  # "annotations.csv:12"


@dataclass(frozen=True)
class ScanSpec:
    """A scan of a scan layout, from its header (reoriented as `canonical` will)."""

    path: str  # absolute: the NIfTI or MetaImage file, or the DICOM series folder
    source: str  # relative to the data root
    slices: int
    slice_shape: tuple[int, int]  # (rows, columns)
    pixel_spacing: tuple[float, float]  # (row, column) mm
    label: str | None = None  # absolute path of the label volume; None: none
    spheres: tuple[Sphere, ...] = ()  # nodules as spheres (LUNA16)
    annotations: str | None = None  # absolute path of the file the spheres come from
    files: tuple[str, ...] | None = None  # a DICOM series: its slices' files


@dataclass
class LoadedScan:
    volume: Volume  # HU int16, reoriented (`canonical`)
    mask: np.ndarray | None  # uint8 {0, 1} on the same grid; None: no nodule
    notes: list[str] = field(default_factory=list)  # kept with these (rounded HU, ...)


# ----------------------------------------------------------------------------- orientation


def canonical_axes(affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, ...]]:
    """How to turn an array [k, r, c] with `affine` to the canonical orientation: for each
    new axis (k, r, c: along the patient's z, y, x), the old axis it is, and whether it is
    reversed. The permutation is the one whose axes lie closest to z, y, x."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = a / np.linalg.norm(a, axis=0)
    along = {0: unit[:, 2], 1: unit[:, 1], 2: unit[:, 0]}  # old array axis -> LPS direction
    # new axis i lies along patient axis 2 - i (k: z, r: y, c: x); ties keep the old order
    best = max(itertools.permutations((0, 1, 2)),
               key=lambda p: (round(sum(abs(along[p[i]][2 - i]) for i in range(3)), 9),
                              p == (0, 1, 2)))
    flips = tuple(bool(along[best[i]][2 - i] < 0) for i in range(3))
    return best, flips  # type: ignore[return-value]


def canonical_array(array: np.ndarray, axes: tuple[int, int, int],
                    flips: tuple[bool, ...]) -> np.ndarray:
    """`array` [k, r, c] permuted and reversed as `canonical_axes` says."""
    if axes == (0, 1, 2) and not any(flips):
        return array
    turned = array.transpose(axes)[tuple(slice(None, None, -1) if f else slice(None)
                                         for f in flips)]
    return np.ascontiguousarray(turned)


def canonical(volume: Volume) -> Volume:
    """`volume` in the canonical orientation (module doc), the same voxels in the same
    places: only the array's axes and the affine change."""
    axes, flips = canonical_axes(volume.affine)
    if axes == (0, 1, 2) and not any(flips):
        return volume
    a = volume.affine
    step = {0: a[:3, 2], 1: a[:3, 1], 2: a[:3, 0]}  # old array axis -> its step, mm
    new_step = [-step[axes[i]] if flips[i] else step[axes[i]] for i in range(3)]
    first = [0, 0, 0]  # the old index of the new voxel (0, 0, 0)
    for i in range(3):
        if flips[i]:
            first[axes[i]] = volume.shape[axes[i]] - 1
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = new_step[2], new_step[1], new_step[0]
    affine[:3, 3] = volume.to_patient(first)
    files = volume.files
    if files is not None:  # a DICOM series: one file per slice while slices stay slices
        files = (files[::-1] if flips[0] else files) if axes[0] == 0 else None
    return Volume(canonical_array(volume.array, axes, flips), affine, source=volume.source,
                  files=files, ids=volume.ids, notes=volume.notes)


def canonical_grid(shape: tuple[int, int, int], affine: np.ndarray
                   ) -> tuple[int, tuple[int, int], tuple[float, float]]:
    """(slices, (rows, columns), (row, column) spacing mm) of a scan of `shape` [k, r, c]
    and `affine` once turned canonical."""
    axes, _ = canonical_axes(affine)
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    by_axis = {0: spacing[2], 1: spacing[1], 2: spacing[0]}
    return (int(shape[axes[0]]), (int(shape[axes[1]]), int(shape[axes[2]])),
            (float(by_axis[axes[1]]), float(by_axis[axes[2]])))


def slice_geometry(volume: Volume, k: int) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """Slice k's (LPS mm of pixel (0, 0), (row direction, column direction), position along
    the slice normal row x column in mm: z for an axial slice)."""
    position = volume.to_patient((k, 0, 0))
    d = volume.direction
    orientation = np.concatenate([d[:, 0], d[:, 1]]) + 0.0  # + 0.0: no -0.0 from a flip
    normal = np.cross(d[:, 0], d[:, 1])
    return (tuple(float(v) for v in position), tuple(float(v) for v in orientation),
            float(position @ normal))


# ----------------------------------------------------------------------------- headers


def scan_grid(path: str | os.PathLike) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape [k, r, c], affine) of a NIfTI or MetaImage file from its header alone."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        return _nifti_grid(path)
    if name.endswith((".mhd", ".mha")):
        return _metaimage_grid(path)
    raise ScanError(f"{path}: not a NIfTI or MetaImage file")


def file_scan_spec(path: Path, root: Path, problems: list[Problem], **extra) -> ScanSpec | None:
    """The `ScanSpec` of a NIfTI or MetaImage file, from its header (`extra`: its label or
    spheres); None, with the reason in `problems`, where the header cannot be read."""
    try:
        shape, affine = scan_grid(path)
    except ScanError as e:
        problems.append(Problem(str(path), str(e).removeprefix(f"{path}: ")))
        return None
    slices, slice_shape, spacing = canonical_grid(shape, affine)
    return ScanSpec(str(path), path.relative_to(root).as_posix(), slices, slice_shape, spacing,
                    **extra)


def _nifti_grid(path) -> tuple[tuple[int, int, int], np.ndarray]:
    import nibabel as nib

    from nodulekit.data.volumes import RAS_FROM_LPS

    try:
        img = nib.load(os.fspath(path))
        shape = tuple(int(n) for n in img.shape)
        affine = RAS_FROM_LPS @ np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many kinds for a bad file
        raise ScanError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})"
                        ) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ScanError(f"{path}: a scan is 3-D, this NIfTI holds shape {shape}")
    _check_grid(path, affine)
    return (shape[2], shape[1], shape[0]), affine


def _metaimage_grid(path) -> tuple[tuple[int, int, int], np.ndarray]:
    import SimpleITK as sitk

    from nodulekit.data.volumes import affine_from

    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        reason = next((line for line in lines if "rror" in line), lines[0] if lines else "")
        raise ScanError(f"{path}: not a readable MetaImage file ({reason.strip()})") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise ScanError(f"{path}: a scan is 3-D, this one has {len(size)} dimensions")
    sx, sy, sz = reader.GetSpacing()
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = affine_from(reader.GetOrigin(), direction, (sz, sy, sx))
    _check_grid(path, affine)
    return (int(size[2]), int(size[1]), int(size[0])), affine


def series_grid(folder: str | os.PathLike, files: list[Path]
                ) -> tuple[tuple[int, int, int], np.ndarray, dict[str, str]]:
    """(shape, affine, identifiers) of a DICOM series folder from its first file's header:
    enough to count and size its slices; `volumes.read_dicom_series` checks the rest."""
    from nodulekit.data.dicom import DicomError, header_floats, header_text, read_header
    from nodulekit.data.volumes import affine_from

    try:
        ds = read_header(files[0])
    except DicomError as e:
        raise ScanError(str(e)) from None
    size = header_floats(ds, "Rows", 1), header_floats(ds, "Columns", 1)
    rows, cols = (int(v[0]) if v else 0 for v in size)
    orientation = header_floats(ds, "ImageOrientationPatient", 6)
    spacing = header_floats(ds, "PixelSpacing", 2)
    thickness = (header_floats(ds, "SliceThickness", 1) or (1.0,))[0]
    ids = {"PatientID": header_text(ds, "PatientID"),
           "SeriesInstanceUID": header_text(ds, "SeriesInstanceUID")}
    if orientation is None or spacing is None or not rows or not cols:
        raise ScanError(f"{files[0]}: no usable ImageOrientationPatient, PixelSpacing, Rows "
                        f"and Columns, so the series in {folder} cannot be placed")
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    direction = np.stack([row, col, np.cross(row, col)], axis=1)
    affine = affine_from((0.0, 0.0, 0.0), direction, (thickness or 1.0, *spacing))
    _check_grid(files[0], affine)
    return (len(files), rows, cols), affine, ids


def _check_grid(path, affine: np.ndarray) -> None:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(f"{path}: its voxel-to-patient transform is singular or not finite")


# ----------------------------------------------------------------------------- the index


def scan_index(root: Path, layout: str, scans: list[tuple[str, str, ScanSpec]],
               problems: list[Problem], *, seed: int = 0,
               fractions: Sequence[float] = DEFAULT_FRACTIONS) -> DataIndex:
    """The `DataIndex` of a scan layout: `scans` as (patient, exam, spec), split by patient
    (`layout.split_patients`, seeded), one record per slice, in the cache's order (split,
    patient, exam, slice). Slice numbers count from 1 in the canonical order (feet to
    head)."""
    split_of = split_patients((p for p, _, _ in scans), seed=seed, fractions=fractions)
    order = {s: i for i, s in enumerate(SPLITS)}
    records = []
    for patient, exam, spec in sorted(scans, key=lambda t: (order[split_of[t[0]]], t[0], t[1],
                                                            t[2].source)):
        mask = spec.label or (spec.annotations if spec.spheres else None)
        records += [SliceRecord(split_of[patient], patient, exam, k + 1, spec.path, mask,
                                f"{spec.source}#{k}", volume_slice=k)
                    for k in range(spec.slices)]
    return DataIndex(root, layout, records, problems,
                     scans={spec.path: spec for _, _, spec in scans})


# ----------------------------------------------------------------------------- reading


def load_scan(spec: ScanSpec, *, allow_non_ct: bool = False) -> LoadedScan:
    """A scan and its truth, checked and reoriented (module doc); `ScanError` otherwise."""
    from nodulekit.data.dicom import DicomError, DicomWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            # a DICOM slice's fix-ups (default rescale, clipped HU): notes, not console noise
            warnings.simplefilter("always", DicomWarning)
            check_metaimage_data(spec.path)
            if spec.files:
                image = read_dicom_series(list(spec.files), strict=True,
                                          allow_non_ct=allow_non_ct)
            else:
                image = read_volume(spec.path)
        for w in caught:  # the others, as they would have been shown
            if w.category is not DicomWarning:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        notes = _fixups([str(w.message) for w in caught if w.category is DicomWarning])
        hu, hu_notes = hu_int16(image.array, spec.path)
        notes += hu_notes
        image = replace(image, array=hu, notes=[])
        mask = None
        if spec.label is not None:
            mask = read_label(spec.label, image, image_path=spec.path)
        elif spec.spheres:
            mask, sphere_notes = sphere_mask(image, spec.spheres)
            notes += sphere_notes
    except (GeometryError, DicomError, ScanError) as e:
        raise ScanError(_without_prefix(str(e), spec.path)) from None
    except MemoryError:
        raise ScanError(f"not enough memory to read it ({image_size(spec)})") from None
    axes, flips = canonical_axes(image.affine)
    turned = canonical(image)
    if mask is not None:
        mask = canonical_array(mask, axes, flips) if mask.any() else None
    return LoadedScan(turned, mask, notes)


# Bytes per value of MetaImage's element types (those of a fixed size).
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def check_metaimage_data(path: str | os.PathLike) -> None:
    """For a ``.mhd`` file: its data file (``.raw``) is there and, uncompressed, holds the
    bytes its header asks for; a `ScanError` saying which otherwise (ITK's own message for
    both is "cannot be read ... No such file or directory")."""
    path = Path(path)
    if path.suffix.lower() != ".mhd":
        return
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as e:
        raise ScanError(f"{path}: cannot be read ({e.strerror})") from None
    header = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    name = header.get("ElementDataFile", "")
    if not name or name == "LOCAL" or name.startswith("LIST") or "%" in name:
        return  # in the header file, or a list of files: ITK checks those itself
    data = path.parent / name
    if not data.is_file():
        raise ScanError(f"{path}: its data file {data} is missing")
    size = _MET_BYTES.get(header.get("ElementType", ""))
    if header.get("CompressedData", "False").lower() == "true" or size is None:
        return
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        count = int(header.get("ElementNumberOfChannels", "1"))
        skip = int(header.get("HeaderSize", "0"))
    except ValueError:
        return
    if skip < 0:  # -1: the data is at the file's end, whatever comes before
        skip = 0
    expected = skip + size * count * int(np.prod(dims, dtype=np.int64))
    found = data.stat().st_size
    if found < expected:
        raise ScanError(f"{path}: its data file {data} holds {found} bytes where its header "
                        f"(DimSize {' '.join(map(str, dims))}, {header.get('ElementType')}) "
                        f"needs {expected}: truncated?")


def read_label(path: str | os.PathLike, image: Volume, *, image_path=None) -> np.ndarray:
    """The nodule mask (uint8 {0, 1}) that the label file `path` puts on `image`'s grid:
    a NIfTI or MetaImage volume on the same grid (`volumes.check_same_grid`), nonzero
    voxels; or a DICOM SEG onto a DICOM series' slices, matched by the SOPInstanceUIDs it
    references (`seg.read_seg`). Another format plugs in here (and its file name in
    `layout.SERIES_LABEL_SUFFIXES`)."""
    if str(path).lower().endswith(".dcm"):
        from nodulekit.data.seg import SegError, read_seg

        if not image.sop_uids:
            raise ScanError(f"{path}: a DICOM SEG labels a DICOM series, not "
                            f"{image_path or image.source}")
        try:
            return read_seg(path, image.sop_uids, shape=image.shape[1:])
        except SegError as e:
            raise ScanError(str(e)) from None
    label = read_volume(path)
    check_same_grid(image, label, image_path=image_path, label_path=path)
    return (label.array != 0).view(np.uint8)


def hu_int16(values: np.ndarray, path) -> tuple[np.ndarray, list[str]]:
    """A scan's voxel values as HU int16 (integers kept; others rounded), and notes for
    what was changed. NaN or infinite voxels are a `ScanError`."""
    notes = []
    if values.dtype == np.int16:
        return values, notes
    if values.dtype.kind == "b" or values.dtype.kind not in "iuf":
        raise ScanError(f"{path}: {values.dtype} voxels; a CT scan holds numbers (HU)")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise ScanError(f"{path}: {np.count_nonzero(~np.isfinite(values))} voxel(s) are "
                            "NaN or infinite")
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            notes.append("HU not whole numbers: rounded to the nearest integer")
        values = rounded
    lo, hi = values.min(), values.max()
    if lo < INT16_MIN or hi > INT16_MAX:
        outside = int(np.count_nonzero((values < INT16_MIN) | (values > INT16_MAX)))
        notes.append(f"{outside} voxel(s) outside int16 HU [{INT16_MIN}, {INT16_MAX}]: clipped")
        values = np.clip(values, INT16_MIN, INT16_MAX)
    return np.ascontiguousarray(values, dtype=np.int16), notes


def sphere_mask(volume: Volume, spheres: tuple[Sphere, ...]) -> tuple[np.ndarray, list[str]]:
    """uint8 mask on `volume`'s grid: the voxels whose centre lies within diameter / 2 of a
    sphere's centre (mm); and a note for each sphere that marks no voxel."""
    mask = np.zeros(volume.shape, dtype=np.uint8)
    notes = []
    # index units per mm along each array axis (k, r, c): a sphere of radius r spans at most
    # r times these around its centre's index, whatever the affine
    inverse = np.linalg.inv(volume.affine[:3, :3])  # rows: c, r, k
    reach = np.linalg.norm(inverse, axis=1)[::-1]
    for s in spheres:
        radius = s.diameter_mm / 2
        centre = volume.to_index(s.center)
        lo = np.maximum(np.floor(centre - radius * reach), 0).astype(int)
        hi = np.minimum(np.ceil(centre + radius * reach), np.array(volume.shape) - 1).astype(int)
        marked = 0
        if (lo <= hi).all():
            k, r, c = np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi, strict=True)),
                                  indexing="ij")
            points = volume.to_patient(np.stack([k, r, c], axis=-1))
            inside = np.linalg.norm(points - np.asarray(s.center), axis=-1) <= radius
            mask[k[inside], r[inside], c[inside]] = 1
            marked = int(inside.sum())
        if not marked:
            where = "outside the scan" if not (lo <= hi).all() else "between voxel centres"
            notes.append(f"{s.where or 'a nodule'}: nodule at {_mm(s.center)} mm, "
                         f"{s.diameter_mm:.3g} mm, marks no voxel ({where})")
    return mask, notes


def _fixups(messages: list[str], most: int = 3) -> list[str]:
    """The first `most` distinct messages, and how many more there were."""
    distinct = list(dict.fromkeys(messages))
    more = len(distinct) - most
    return distinct[:most] + ([f"... and {more} more such note(s)"] if more > 0 else [])


def image_size(spec: ScanSpec) -> str:
    return f"{spec.slices} x {spec.slice_shape[0]} x {spec.slice_shape[1]} voxels"


def _mm(point) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in point) + ")"


def _without_prefix(message: str, path: str) -> str:
    """The reason alone where a message starts with the scan's own path (the report names
    it already)."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


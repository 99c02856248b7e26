"""Scans on a regular grid, placed in the patient: NIfTI, MetaImage and DICOM series, in and out.

A `Volume` is an array indexed ``[k, r, c]`` (slice, row, column: the cache's and the
network's (Z, H, W)) and an affine that places every voxel in DICOM's patient coordinates,
LPS in mm (x towards the patient's left, y towards the back, z towards the head)::

    position(k, r, c) = affine @ (c, r, k, 1)

so the affine's columns are, in order, the step from one column to the next (DICOM's row
direction, ImageOrientationPatient[:3], times the column spacing), from one row to the next
(ImageOrientationPatient[3:] times the row spacing), from one slice to the next (the slice
normal times the slice spacing), and the centre of voxel (0, 0, 0). `spacing` is (slice,
row, column) in mm, the array's axis order; DICOM's PixelSpacing is its last two.

The formats, and what each reader does to get there (the libraries do the reading):

- **NIfTI** (nibabel): its data index (i, j, k) is our (c, r, k), and its affine maps to RAS,
  so ours is ``diag(-1, -1, 1, 1) @ nifti_affine``. Writing does the reverse, so a mask
  written for a NIfTI input carries the input's affine bit for bit.
- **MetaImage** ``.mhd``/``.raw`` (SimpleITK, which is LPS already): ITK's array is (z, y, x)
  = (k, r, c); the direction matrix's columns are the index axes.
- **DICOM series** (pydicom, through `nodulekit.data.dicom` for the HU): one folder's CT
  slices of one series, ordered along the slice normal (``cross(row, column)`` direction) by
  ImagePositionPatient, and checked: one series (else the series and their counts are
  named), one orientation, one size and pixel spacing, no two slices at one position, and
  uniform spacing (a gap, as from a missing slice, is named with the positions around it).
  `read_dicom_series(..., strict=False)` keeps a series with duplicates (the first of each
  position) or gaps, with notes, for callers that only need the slices.

Label volumes go through the same readers (``dtype`` as stored); `check_same_grid` is the
integrity check between an image and its label (shape, spacing, origin, direction), whose
error names both files and the values that differ (as nnU-Net's dataset check does).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

# NIfTI's RAS and DICOM's LPS differ in the signs of x and y.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
METAIMAGE_SUFFIXES = (".mhd", ".mha")
# Geometry tolerances: positions and spacings in mm, directions as cosines. Scanners write
# positions to ~6 significant digits, so a slice spacing that differs by less than 1% (or
# 0.01 mm) is the same spacing; more is a gap (or a series of varying thickness).
SPACING_TOLERANCE = 0.01
SPACING_RELATIVE_TOLERANCE = 0.01
DIRECTION_TOLERANCE = 1e-4
DUPLICATE_TOLERANCE_MM = 1e-3


class GeometryError(ValueError):
    """A scan (or an image/label pair) whose geometry cannot be used; the message names the
    file(s) and the values."""


@dataclass
class Volume:
    """An array [k, r, c] and where it lies in the patient (module doc)."""

    array: np.ndarray  # (Z, H, W): int16 HU for images, uint8 for labels
    affine: np.ndarray  # (4, 4) float64: (c, r, k, 1) -> LPS mm
    source: str = ""  # the file or folder it was read from
    # DICOM series only: each slice's file and SOPInstanceUID (k order), and the series'
    # identifiers (PatientID, StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID)
    files: list[str] | None = None
    sop_uids: list[str] | None = None
    ids: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a non-strict reader let pass

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"a volume is 3-D [slice, row, column], got {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """mm between neighbours along (slice, row, column)."""
        c, r, k = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(k), float(r), float(c)

    @property
    def direction(self) -> np.ndarray:
        """(3, 3): unit LPS vectors of +column, +row, +slice (as columns)."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """LPS mm of voxel (0, 0, 0)'s centre."""
        return self.affine[:3, 3].copy()

    def to_patient(self, index_krc) -> np.ndarray:
        """LPS mm of voxel indices (..., 3) given as (k, r, c), fractional allowed."""
        krc = np.asarray(index_krc, dtype=np.float64)
        crk = krc[..., ::-1]
        return crk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_index(self, points_lps) -> np.ndarray:
        """Fractional (k, r, c) of LPS points (..., 3): the inverse of `to_patient`."""
        p = np.asarray(points_lps, dtype=np.float64) - self.affine[:3, 3]
        crk = np.linalg.solve(self.affine[:3, :3], p.reshape(-1, 3).T).T
        return crk[:, ::-1].reshape(p.shape)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same grid holding another array (a mask, probabilities)."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array {array.shape} does not fit the volume's grid {self.shape}")
        return replace(self, array=array, notes=[])


def affine_from(origin, direction, spacing_krc) -> np.ndarray:
    """The affine of a grid: `origin` (3,) LPS mm, `direction` (3, 3) with the unit vectors
    of +column, +row, +slice as columns, `spacing_krc` (slice, row, column) mm."""
    a = np.eye(4)
    sk, sr, sc = (float(s) for s in spacing_krc)
    a[:3, :3] = np.asarray(direction, dtype=np.float64) * np.array([sc, sr, sk])
    a[:3, 3] = np.asarray(origin, dtype=np.float64)
    return a


def volume_format(path: str | os.PathLike) -> str | None:
    """"nifti", "metaimage", "dicom" (a folder) or None, from the path alone."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(METAIMAGE_SUFFIXES):
        return "metaimage"
    if p.is_dir():
        return "dicom"
    return None


def read_volume(path: str | os.PathLike, **dicom_options) -> Volume:
    """A NIfTI file, a MetaImage file or a DICOM series folder, by its name."""
    kind = volume_format(path)
    if kind == "nifti":
        return read_nifti(path)
    if kind == "metaimage":
        return read_metaimage(path)
    if kind == "dicom":
        return read_dicom_series(path, **dicom_options)
    raise GeometryError(f"{path}: not a scan nodulekit reads (.nii, .nii.gz, .mhd, .mha or a "
                        "DICOM series folder)")


# ----------------------------------------------------------------------------- NIfTI


def read_nifti(path: str | os.PathLike) -> Volume:
    """A NIfTI-1/2 file (nibabel): 3-D, or 4-D with one volume."""
    import nibabel as nib

    try:
        img = nib.load(os.fspath(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many kinds for a bad file
        raise GeometryError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})"
                            ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise GeometryError(f"{path}: a scan is 3-D, this NIfTI holds shape {data.shape}")
    affine = RAS_FROM_LPS @ np.asarray(img.affine, dtype=np.float64)  # its own inverse
    _check_affine(affine, path)
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), affine, source=str(path))


def write_nifti(volume: Volume, path: str | os.PathLike) -> Path:
    """`volume` as NIfTI-1 (gzip for ``.nii.gz``), its affine in both sform and qform
    (code 1, scanner)."""
    import nibabel as nib

    affine = RAS_FROM_LPS @ volume.affine
    img = nib.Nifti1Image(np.ascontiguousarray(volume.array.transpose(2, 1, 0)), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path = Path(path)
    nib.save(img, os.fspath(path))
    return path


# ----------------------------------------------------------------------------- MetaImage


def read_metaimage(path: str | os.PathLike) -> Volume:
    """A MetaImage ``.mhd`` (with its ``.raw``) or ``.mha`` file (SimpleITK)."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(os.fspath(path))
    except RuntimeError as e:
        raise GeometryError(f"{path}: not a readable MetaImage file ({_itk_reason(e)})"
                            ) from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError(f"{path}: a scan is 3-D with one value per voxel, this one has "
                            f"{img.GetDimension()} dimensions and "
                            f"{img.GetNumberOfComponentsPerPixel()} component(s)")
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    affine = affine_from(img.GetOrigin(), direction, (sz, sy, sx))
    _check_affine(affine, path)
    return Volume(sitk.GetArrayFromImage(img), affine, source=str(path))


def _itk_reason(error: RuntimeError) -> str:
    """ITK's reason in an exception's text, without its source file and object address:
    "ITK ERROR: MetaImageIO(0x..): File cannot be read: X ... Reason: Y" -> "File cannot
    be read: X ...; Y"."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    found = next((i for i, line in enumerate(lines) if "error" in line.lower()
                  and not line.startswith("Exception thrown")), None)
    if found is None:
        return lines[-1] if lines else type(error).__name__
    text = re.sub(r"^ITK ERROR:\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", lines[found])
    return "; ".join([text, *(line.removeprefix("Reason: ") for line in lines[found + 1:])])


def write_metaimage(volume: Volume, path: str | os.PathLike) -> Path:
    """`volume` as MetaImage: ``X.mhd`` with ``X.raw`` beside it (or one ``.mha``)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    sk, sr, sc = volume.spacing
    img.SetSpacing((sc, sr, sk))
    img.SetOrigin(tuple(volume.origin))
    img.SetDirection(tuple(volume.direction.reshape(-1)))
    path = Path(path)
    sitk.WriteImage(img, os.fspath(path), useCompression=False)
    return path


def _check_affine(affine: np.ndarray, path) -> None:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise GeometryError(f"{path}: its voxel-to-patient transform is singular or not "
                            f"finite ({np.round(affine[:3], 4).tolist()})")


# ----------------------------------------------------------------------------- DICOM series


@dataclass(frozen=True)
class _Header:
    path: str
    series: str
    position: np.ndarray | None
    orientation: np.ndarray | None
    shape: tuple[int, int]
    spacing: tuple[float, float] | None
    sop_uid: str
    frame_uid: str  # FrameOfReferenceUID
    thickness: float | None  # SliceThickness, mm


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files in `folder` (not below it), by name: the ``.dcm`` family, and any
    other file that starts like DICOM ("DICM" at byte 128: files without a suffix, files
    named by their UID). Hidden files (macOS's ``._0001.dcm``) are not slices."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GeometryError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir()
                  if not p.name.startswith(".") and p.is_file() and _looks_like_dicom(p))


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_dicom_series(folder_or_files, *, strict: bool = True,
                      allow_non_ct: bool = False) -> Volume:
    """One DICOM series as a `Volume` (module doc: order and checks).

    folder_or_files: a folder (its DICOM files, not those below it) or a list of files.
    strict: False keeps a series with duplicate positions (the first file of each) or gaps
    (the affine then has the median spacing), listing them in `Volume.notes`.
    """
    from nodulekit.data.dicom import read_slice

    files, where = _series_files(folder_or_files)
    headers = [_series_header(p) for p in files]
    _check_one_series(headers, where)
    _check_same(headers, where)
    order, distance = _order_along_normal(headers, where)
    headers = [headers[i] for i in order]
    keep, notes = _check_positions(headers, distance, where, strict)
    headers = [headers[i] for i in keep]
    distance = distance[keep]
    steps = np.diff(distance)
    # with gaps (not strict) the median step: the affine of the slices that are evenly spaced
    slice_spacing = float(np.median(steps)) if len(steps) else (headers[0].thickness or 1.0)
    hu = np.empty((len(headers), *headers[0].shape), dtype=np.int16)
    ids = {}
    for k, h in enumerate(headers):
        s = read_slice(h.path, allow_non_ct=allow_non_ct, out=hu[k])
        if k == 0:
            ids = {"PatientID": s.meta.patient_id, "StudyInstanceUID": s.meta.study_uid,
                   "SeriesInstanceUID": s.meta.series_uid}
    first = headers[0]
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    direction = np.stack([row_cos, col_cos, normal], axis=1)
    sr, sc = first.spacing
    affine = affine_from(first.position, direction, (slice_spacing or 1.0, sr, sc))
    sop = [h.sop_uid for h in headers]
    ids["FrameOfReferenceUID"] = first.frame_uid
    return Volume(hu, affine, source=where, files=[h.path for h in headers], sop_uids=sop,
                  ids=ids, notes=notes)


def _series_files(folder_or_files) -> tuple[list[Path], str]:
    if isinstance(folder_or_files, (str, os.PathLike)):
        files = dicom_files(folder_or_files)
        where = str(folder_or_files)
    else:
        files = [Path(p) for p in folder_or_files]
        where = str(files[0].parent) if files else "(no files)"
    if not files:
        raise GeometryError(f"{where}: no DICOM files")
    return files, where


def _series_header(path: Path) -> _Header:
    from nodulekit.data.dicom import header_floats, header_text, read_header

    ds = read_header(path)  # raises DicomError naming the file

    def vector(name: str, n: int) -> np.ndarray | None:
        values = header_floats(ds, name, n)
        return None if values is None else np.asarray(values, dtype=np.float64)

    spacing = header_floats(ds, "PixelSpacing", 2)
    thickness = header_floats(ds, "SliceThickness", 1)
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    return _Header(str(path), header_text(ds, "SeriesInstanceUID"),
                   vector("ImagePositionPatient", 3), vector("ImageOrientationPatient", 6),
                   (rows, cols), spacing, header_text(ds, "SOPInstanceUID"),
                   header_text(ds, "FrameOfReferenceUID"),
                   thickness[0] if thickness and thickness[0] > 0 else None)


def _check_one_series(headers: list[_Header], where: str) -> None:
    counts: dict[str, int] = {}
    for h in headers:
        counts[h.series] = counts.get(h.series, 0) + 1
    if len(counts) > 1:
        listed = ", ".join(f"{uid or '(no SeriesInstanceUID)'}: {n} file(s)"
                           for uid, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise GeometryError(f"{where}: mixed series ({listed}); put each series in a folder "
                            "of its own")


def _check_same(headers: list[_Header], where: str) -> None:
    """Every slice has position, orientation and spacing; one orientation, size, spacing."""
    first = headers[0]
    for h in headers:
        for name, value in (("ImagePositionPatient", h.position),
                            ("ImageOrientationPatient", h.orientation),
                            ("PixelSpacing", h.spacing)):
            if value is None:
                raise GeometryError(f"{h.path}: no usable {name}, so the slice cannot be "
                                    f"placed in the series of {where}")
        if np.abs(h.orientation - first.orientation).max() > DIRECTION_TOLERANCE:
            raise GeometryError(f"{where}: two orientations: {first.path} has "
                                f"{_fmt(first.orientation)}, {h.path} has "
                                f"{_fmt(h.orientation)}")
        if h.shape != first.shape:
            raise GeometryError(f"{where}: two slice sizes: {first.path} is "
                                f"{first.shape[0]}x{first.shape[1]}, {h.path} is "
                                f"{h.shape[0]}x{h.shape[1]}")
        if not np.allclose(h.spacing, first.spacing, rtol=SPACING_RELATIVE_TOLERANCE,
                           atol=SPACING_TOLERANCE):
            raise GeometryError(f"{where}: two pixel spacings: {first.path} has "
                                f"{_fmt(first.spacing)} mm, {h.path} has {_fmt(h.spacing)} mm")
    row, col = first.orientation[:3], first.orientation[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3):
        raise GeometryError(f"{first.path}: ImageOrientationPatient {_fmt(first.orientation)} "
                            "is not two orthogonal unit vectors")


def _order_along_normal(headers: list[_Header], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices sorting the slices along the normal, and each slice's distance along it."""
    o = headers[0].orientation
    normal = np.cross(o[:3], o[3:])
    distance = np.array([h.position @ normal for h in headers])
    order = np.argsort(distance, kind="stable")
    return order, distance[order]


def _check_positions(headers: list[_Header], distance: np.ndarray, where: str,
                     strict: bool) -> tuple[np.ndarray, list[str]]:
    """Slices to keep (duplicates dropped when not strict) and the notes; raises on a
    duplicate or a gap when strict."""
    notes: list[str] = []
    keep = [0]
    for i in range(1, len(headers)):
        if distance[i] - distance[keep[-1]] <= DUPLICATE_TOLERANCE_MM:
            message = (f"{where}: two slices at one position ({distance[i]:.4g} mm along the "
                       f"normal): {headers[keep[-1]].path} and {headers[i].path}")
            if strict:
                raise GeometryError(message + " (duplicates: keep one)")
            notes.append(message + "; the first is kept")
            continue
        keep.append(i)
    kept = distance[keep]
    steps = np.diff(kept)
    if len(steps):
        typical = float(np.median(steps))
        uneven = np.flatnonzero(~np.isclose(steps, typical, rtol=SPACING_RELATIVE_TOLERANCE,
                                            atol=SPACING_TOLERANCE))
        for j in uneven[:3]:
            a, b = headers[keep[j]], headers[keep[j + 1]]
            message = (f"{where}: slice spacing {steps[j]:.4g} mm between {Path(a.path).name} "
                       f"({kept[j]:.4g} mm) and {Path(b.path).name} ({kept[j + 1]:.4g} mm), "
                       f"elsewhere {typical:.4g} mm"
                       + (" (a missing slice?)" if steps[j] > typical else ""))
            if strict:
                raise GeometryError(message)
            notes.append(message)
        if len(uneven) > 3:
            notes.append(f"{where}: {len(uneven) - 3} more uneven step(s)")
    return np.asarray(keep), notes


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def write_dicom_series(volume: Volume, folder: str | os.PathLike, *, patient_id: str,
                       study_uid: str, series_uid: str, sop_uids: list[str] | None = None,
                       frame_of_reference_uid: str | None = None,
                       intercept: int = -1024) -> list[Path]:
    """`volume` (int16 HU) as CT slices ``folder/0001.dcm`` ... (one file per slice, in k
    order), each with the position and orientation the affine gives. `sop_uids`: one per
    slice (default: derived from `series_uid`)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = volume.shape[0]
    sop_uids = sop_uids or [f"{series_uid}.{k + 1}" for k in range(n)]
    frame_uid = frame_of_reference_uid or f"{study_uid}.0"
    d = volume.direction
    sk, sr, sc = volume.spacing
    orientation = [decimal_string(v) for v in (*d[:, 0], *d[:, 1])]
    written = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uids[k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{k + 1:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[k]
        ds.Modality = "CT"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientID = patient_id
        ds.PatientName = f"{patient_id}^"  # one name component: the family name
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        position = volume.to_patient((k, 0, 0))
        ds.ImagePositionPatient = [decimal_string(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.SliceThickness = decimal_string(sk)
        ds.PixelSpacing = [decimal_string(sr), decimal_string(sc)]
        set_ct_pixels(ds, volume.array[k], intercept)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def set_ct_pixels(ds, hu: np.ndarray, intercept: int) -> None:
    """A CT slice's image pixel module on `ds`: HU [H, W] stored as signed 16-bit values
    hu - intercept (clipped to int16), with RescaleSlope 1 and RescaleIntercept."""
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = (np.asarray(hu).astype(np.int32) - intercept).clip(-32768, 32767)
    ds.PixelData = stored.astype("<i2").tobytes()
    ds["PixelData"].VR = "OW"


def decimal_string(v: float) -> str:
    """A decimal string DICOM accepts (at most 16 characters)."""
    text = f"{float(v):.10g}"
    return "0" if text in ("-0", "0") else text


# ----------------------------------------------------------------------------- checks


def check_same_grid(image: Volume, label: Volume, *, image_path=None, label_path=None,
                    tolerance_mm: float = 1e-3) -> None:
    """Raise `GeometryError` naming both files and the values where `label` is not on
    `image`'s grid: shape, spacing, origin or direction."""
    a, b = image_path or image.source, label_path or label.source
    problems = []
    if image.shape != label.shape:
        problems.append(f"shape {image.shape} vs {label.shape}")
    if not np.allclose(image.spacing, label.spacing, atol=tolerance_mm, rtol=1e-5):
        problems.append(f"spacing {_fmt(image.spacing)} vs {_fmt(label.spacing)} mm")
    if not np.allclose(image.origin, label.origin, atol=tolerance_mm, rtol=1e-6):
        problems.append(f"origin {_fmt(image.origin)} vs {_fmt(label.origin)} mm")
    if not np.allclose(image.direction, label.direction, atol=DIRECTION_TOLERANCE):
        problems.append(f"direction {_fmt(image.direction.T.reshape(-1))} vs "
                        f"{_fmt(label.direction.T.reshape(-1))}")
    if problems:
        raise GeometryError(f"{b} does not match its image {a}: " + "; ".join(problems)
                            + " (slice, row, column order; LPS mm)")

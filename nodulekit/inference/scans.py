"""`nodulekit predict` on whole scans: a 2-D model over a volume, slice by slice, with the
mask written back in the scan's own geometry and its nodules counted in 3-D.

A scan is a NIfTI file (``.nii``, ``.nii.gz``), a MetaImage file (``.mhd``, ``.mha``), or,
with ``--scans``, each DICOM series in a folder or below it (`find_scans`);
`nodulekit.data.volumes` reads each into one `Volume`: array [k, r, c] and its LPS affine.
For each scan:

1. the scan is turned to the axial view the training cache holds (flips and axis swaps
   only, as `preprocess` turns scan layouts: `nodulekit.data.scans.canonical`), and its
   slices go through the network in batches, each whole at the scan's size (padded and
   tiled as `nodulekit.inference.tiling` does), with its neighbours as context channels for
   a model trained with ``--context-slices K`` (the K slices below and above along the slice
   normal, the edge slice repeated, as in training); for a model trained on a cache
   resampled to MM mm pixels, the slices are resampled to them and the logits mapped back
   (`nodulekit.inference.resampling`);
2. the mask (p > 0.5) is written as NIfTI with the input's grid: for a NIfTI input the same
   affine, shape and axis order as the input file; for a DICOM series, also as a DICOM SEG
   that references the series' slices (`nodulekit.data.seg`); with ``--probabilities`` the
   probabilities too (float32 NIfTI);
3. its nodules: the 26-connected components of the mask (`nodulekit.data.nodules
   .components_3d`), one row each in ``nodules.csv``: the centroid in patient coordinates
   (LPS mm, DICOM's and ITK's; NIfTI viewers show RAS, x and y negated), the equivalent-sphere
   diameter and volume, the largest in-plane section's equal-area diameter, the slice range
   and the mean and max probability; the most probable first.

Files under OUT::

    masks/<name>.nii.gz           the mask, uint8 0/1
    probabilities/<name>.nii.gz   with --probabilities: sigmoid(logit), float32
    seg/<name>.dcm                DICOM inputs: the mask as DICOM SEG
    nodules.csv                   one row per nodule (3-D component) of every scan
    scans.csv                     one row per scan: input, outputs, shape, spacing, nodules
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nodulekit.data.volumes import Volume, volume_format
from nodulekit.inference.writers import probability

Report = Callable[[str], Any]
SCAN_COLUMNS = ["input", "format", "mask", "probabilities", "seg", "slices", "rows", "columns",
                "spacing_mm", "predicted_voxels", "nodules", "notes"]
NODULE_COLUMNS = ["scan", "nodule", "x_mm", "y_mm", "z_mm", "diameter_mm",
                  "section_diameter_mm", "volume_mm3", "voxels", "first_slice", "last_slice",
                  "mean_probability", "max_probability"]


@dataclass
class ScanInput:
    path: Path
    name: str  # output name (no suffix)
    format: str  # "nifti", "metaimage" or "dicom"
    files: tuple[Path, ...] | None = None  # a DICOM series: its files (`find_scans`)


@dataclass
class ScanPrediction:
    scan: ScanInput
    volume: Volume
    logits: np.ndarray  # float32 [Z, H, W]
    mask: np.ndarray  # bool [Z, H, W]: logit > 0, the peak filter applied per axial slice
    nodules: list = field(default_factory=list)  # nodules.Component, most probable first


def is_scan_path(path: str | os.PathLike, dicom_folders: bool) -> bool:
    """Whether `path` is a scan: a NIfTI or MetaImage file; with `dicom_folders`, a folder."""
    kind = volume_format(path)
    return kind in ("nifti", "metaimage") or (kind == "dicom" and dicom_folders)


def scan_files_in_folders(paths: list[Path]) -> list[Path]:
    """`paths` with each folder that holds NIfTI or MetaImage files (at any depth) replaced
    by those files, sorted, each a scan; the folder stays as well where it also holds
    DICOM files (a hidden file is neither). A folder of NIfTI scans is then predicted as
    the scans it holds, as they would be given one by one."""
    from nodulekit.data.volumes import dicom_files

    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        files = sorted(f for f in path.rglob("*")
                       if f.is_file() and not f.name.startswith(".")
                       and volume_format(f) in ("nifti", "metaimage"))
        out += files
        if not files or any(dicom_files(d) for d in (path, *path.rglob("*")) if d.is_dir()):
            out.append(path)
    return out


# DICOM objects that are not images of a series (a SEG or RT structure set beside the CT)
_NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}


def find_scans(paths: list[Path]) -> tuple[list[ScanInput], list[str], list[str]]:
    """The scans among `paths` (each a scan by `is_scan_path`), with unique output names;
    notes; and the folders that hold no DICOM series. A NIfTI or MetaImage file is one
    scan, named by its file without the suffix. A folder holds one scan per DICOM series
    found in it and in every folder below it (grouped by SeriesInstanceUID; other DICOM
    objects, such as a SEG beside the CT, are left out with a note), named by the folder's
    path from the given one (``a_b``), and ``_s<SeriesNumber>`` where a folder holds
    several. Names that would collide are numbered."""
    found, notes, empty = [], [], []
    for path in paths:
        kind = volume_format(path)
        if kind == "dicom":
            series, series_notes = _series_under(Path(path))
            found += series
            notes += series_notes
            if not series:
                empty.append(str(path))
        else:
            found.append(ScanInput(Path(path), _stem(Path(path)), kind))
    used: set[str] = set()
    for scan in found:
        unique, n = scan.name, 2
        while unique in used:
            unique, n = f"{scan.name}-{n}", n + 1
        used.add(unique)
        scan.name = unique
    return found, notes, empty


def _series_under(root: Path) -> tuple[list[ScanInput], list[str]]:
    from nodulekit.data.volumes import dicom_files

    scans, notes = [], []
    top = _stem(root)
    for folder, dirs, _ in os.walk(root):
        dirs.sort()
        folder = Path(folder)
        files = dicom_files(folder)
        if not files:
            continue
        groups, left_out = _by_series(files)
        if left_out:
            notes.append(f"{folder}: {len(left_out)} DICOM file(s) that are not CT images "
                         f"left out ({', '.join(left_out[:3])})")
        rel = folder.relative_to(root)
        name = "_".join((top, *rel.parts))
        for number, members in groups:
            suffix = f"_s{number}" if len(groups) > 1 else ""
            scans.append(ScanInput(folder, name + suffix, "dicom", tuple(members)))
    return scans, notes


def _by_series(files: list[Path]) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """The files grouped by SeriesInstanceUID, as (SeriesNumber or a count, files), in the
    order their series first appears; and the names of those that are no image (by
    Modality). A file whose header cannot be read stays with the others, so that reading
    the series names it."""
    from nodulekit.data.dicom import DicomError, read_header

    groups: dict[str, list[Path]] = {}
    numbers: dict[str, str] = {}
    left_out = []
    for f in files:
        try:
            ds = read_header(f)
        except DicomError:
            groups.setdefault("", []).append(f)
            continue
        if str(ds.get("Modality") or "").upper() in _NOT_IMAGES:
            left_out.append(f.name)
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        groups.setdefault(uid, []).append(f)
        numbers.setdefault(uid, str(ds.get("SeriesNumber") or "").strip())
    out = []
    for i, (uid, members) in enumerate(groups.items(), start=1):
        out.append((numbers.get(uid) or str(i), members))
    return out, left_out


def _stem(path: Path) -> str:
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    for suffix in (".nii.gz", ".nii", ".mhd", ".mha"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_scan(scan: ScanInput) -> Volume:
    """The scan's volume as int16 HU, as `preprocess` reads a scan (`nodulekit.data.scans
    .hu_int16`: floats rounded, values past int16 clipped, each said in the notes; NaN is an
    error); a DICOM series leniently (gaps and duplicates become notes)."""
    from nodulekit.data.scans import hu_int16
    from nodulekit.data.volumes import read_dicom_series, read_volume

    if scan.files is not None:
        volume = read_dicom_series(list(scan.files), strict=False)
    else:
        volume = read_volume(scan.path, **({"strict": False} if scan.format == "dicom" else {}))
    hu, notes = hu_int16(volume.array, scan.path)
    return replace(volume, array=hu, notes=volume.notes + [f"{scan.path}: {n}" for n in notes])


def context_order(volume: Volume) -> int:
    """+1 when the array's k grows along the slice normal (row x column direction), -1 when
    against it: training's context takes "below" along the normal (series order)."""
    d = volume.direction
    return 1 if np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2]) >= 0 else -1


def slice_stack(hu: np.ndarray, k: int, context: int, order: int) -> np.ndarray:
    """Slice k alone [H, W] (context 0) or with its neighbours [2K+1, H, W]: K below it
    along the normal, itself, K above; the edge slice repeats past the scan's ends."""
    if context == 0:
        return hu[k]
    z = hu.shape[0]
    steps = np.arange(-context, context + 1) * order
    return hu[np.clip(k + steps, 0, z - 1)]


def run_scan(net, volume: Volume, batch_size: int, tick: Callable[[int], Any] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """The network's logits (float32) for every voxel of `volume`, on its own grid [k, r, c],
    and the predicted mask: logit > 0 with the network's peak filter
    (`nodulekit.inference.peak_filter`) applied to each axial slice, as in training.

    The slices the network sees are the training cache's: the scan turned to the axial view
    by flips and axis swaps (`nodulekit.data.scans.canonical`, as `preprocess` turns scan
    layouts), so a NIfTI stored sagittally or mirrored is read the way the model learnt;
    the logits are turned back."""
    from nodulekit.data.scans import canonical, canonical_axes
    from nodulekit.inference.peak_filter import keep_masks

    axes, flips = canonical_axes(volume.affine)
    logits = _run_axial(net, canonical(volume), batch_size, tick)
    mask = keep_masks(logits, getattr(net, "min_peak_logit", None))
    back = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    return tuple(np.ascontiguousarray(a[back].transpose(np.argsort(axes)))
                 for a in (logits, mask))


def _run_axial(net, volume: Volume, batch_size: int, tick: Callable[[int], Any] | None
               ) -> np.ndarray:
    """`run_scan` on a volume in the canonical orientation."""
    from nodulekit.inference.resampling import model_grid, to_model, to_source
    from nodulekit.inference.tiling import run_hu

    be = net.backend
    hu = np.ascontiguousarray(volume.array, dtype=np.int16)  # `read_scan`: int16 already
    context = (net.model.in_channels - 1) // 2
    order = context_order(volume)
    z = hu.shape[0]
    grid = None
    if net.spacing_mm is not None:  # the model's pixel size (`nodulekit.inference.resampling`)
        grid = model_grid(hu.shape[1:], volume.spacing[1:], net.spacing_mm)
        hu = to_model(hu, grid)
    logits = np.empty((z, *grid.source_shape) if grid else hu.shape, dtype=np.float32)
    empty = np.zeros((min(batch_size, z), *hu.shape[1:]), dtype=np.uint8)
    for start in range(0, z, batch_size):
        ks = range(start, min(z, start + batch_size))
        batch = np.stack([slice_stack(hu, k, context, order) for k in ks])
        out, _, _ = run_hu(net.model, batch, empty[:len(ks)], (net.center, net.width),
                           net.tile, net.memory_budget)
        values = be.to_host(out)[..., 0]
        logits[start:start + len(ks)] = to_source(values, grid) if grid else values
        if tick is not None:
            tick(len(ks))
    return logits


def predict_scan(net, scan: ScanInput, batch_size: int,
                 tick: Callable[[int], Any] | None = None) -> ScanPrediction:
    from nodulekit.data.nodules import components_3d

    volume = read_scan(scan)
    logits, mask = run_scan(net, volume, batch_size, tick)
    # float32: a whole scan's worth (the ranking below breaks ties at p = 1 by size)
    voxel_p = probability(logits).astype(np.float32)
    # the most probable first, as a reader goes through a detector's findings
    nodules = sorted(components_3d(mask, volume.spacing, voxel_p),
                     key=lambda c: (-c.max_probability, -c.voxels, c.label))
    return ScanPrediction(scan, volume, logits, mask, nodules)


def write_scan(out: Path, p: ScanPrediction, probabilities: bool) -> tuple[dict, list[dict]]:
    """Write `p`'s outputs under `out` (module doc); its scans.csv row and nodules.csv rows."""
    from nodulekit.data.volumes import write_nifti

    v, name = p.volume, p.scan.name
    mask = p.mask.astype(np.uint8)
    mask_path = _output(out, "masks", f"{name}.nii.gz")
    write_nifti(v.with_array(mask), mask_path)
    row = {"input": str(p.scan.path), "format": p.scan.format,
           "mask": mask_path.relative_to(out).as_posix(), "slices": v.shape[0],
           "rows": v.shape[1], "columns": v.shape[2],
           "spacing_mm": " ".join(f"{s:.6g}" for s in v.spacing),
           "predicted_voxels": int(mask.sum()), "nodules": len(p.nodules),
           "notes": " | ".join(v.notes)}
    if probabilities:
        prob_path = _output(out, "probabilities", f"{name}.nii.gz")
        write_nifti(v.with_array(probability(p.logits).astype(np.float32)), prob_path)
        row["probabilities"] = prob_path.relative_to(out).as_posix()
    if p.scan.format == "dicom" and v.files:
        from nodulekit.data.seg import write_seg

        seg_path = _output(out, "seg", f"{name}.dcm")
        write_seg(mask, v.files, seg_path)
        row["seg"] = seg_path.relative_to(out).as_posix()
    return row, nodule_rows(p)


def nodule_rows(p: ScanPrediction) -> list[dict]:
    """nodules.csv's rows for one scan: centroids in LPS mm."""
    rows = []
    for i, c in enumerate(p.nodules, start=1):
        x, y, z = p.volume.to_patient(np.asarray(c.centroid, dtype=np.float64))
        rows.append({"scan": p.scan.name, "nodule": i, "x_mm": round(float(x), 3),
                     "y_mm": round(float(y), 3), "z_mm": round(float(z), 3),
                     "diameter_mm": round(float(c.diameter_mm), 3),
                     "section_diameter_mm": round(float(c.section_diameter_mm), 3),
                     "volume_mm3": round(float(c.volume_mm3), 3), "voxels": int(c.voxels),
                     "first_slice": int(c.slices[0]), "last_slice": int(c.slices[1]),
                     "mean_probability": round(float(c.mean_probability), 6),
                     "max_probability": round(float(c.max_probability), 6)})
    return rows


def _output(out: Path, folder: str, name: str) -> Path:
    path = out / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_tables(out: Path, scan_rows: list[dict], nodule_rows_: list[dict]) -> None:
    """scans.csv and nodules.csv (both written even when empty: their headers say what a row
    holds)."""
    import csv

    for name, columns, rows in (("scans.csv", SCAN_COLUMNS, scan_rows),
                                ("nodules.csv", NODULE_COLUMNS, nodule_rows_)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for row in rows:
                w.writerow({c: row.get(c, "") for c in columns})

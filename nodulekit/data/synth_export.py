"""The synthetic patients of `nodulekit.data.synth` written as whole scans (`nodulekit synth
--format msd|luna16|series`): the same patients, slices and nodules as the UniToChest
layout, in the formats the scan layouts read (`layout_msd`, `layout_luna16`,
`layout_series`).

- **msd**: ``imagesTr/lung_XXX.nii.gz`` (HU int16), ``labelsTr/lung_XXX.nii.gz`` (the nodule
  masks, uint8) and ``dataset.json``, as the Decathlon's Task06_Lung;
- **luna16**: ``subset0/SERIESUID.mhd`` + ``.raw`` and ``annotations.csv`` (seriesuid,
  coordX, coordY, coordZ, diameter_mm: each nodule's centre in world mm, LPS as ITK's, and
  its nominal diameter; the masks are the spheres a reader makes of them);
- **series**: ``patient_XXXX/series_1/NNNN.dcm`` (CT slices, one series) and, where the
  patient has nodule voxels, its label ``patient_XXXX/series_1.nii.gz`` beside the folder.

The generator's coordinates are LPS mm (x along the columns, y along the rows, z along the
body), so a patient's scan is its slices with their positions. `orientation` places that
scan in the file three ways, so that readers meet more than the identity:

- "axial": slices from feet to head, rows along y, columns along x (the identity);
- "flipped": slices from head to feet and columns from the patient's left to right (the
  array reversed along those axes; every voxel at the same place);
- "oblique": the axial scan turned in the patient by `OBLIQUE_DEGREES` (about x, then z):
  the same voxels at rotated places, the nodules' world centres turned alike.

The same seed gives the same files; `synth.json` records the format and orientation.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nodulekit.data.layout import SPLITS, split_patients
from nodulekit.data.synth import (
    GENERATOR,
    SynthConfig,
    SynthResult,
    SynthSlice,
    _render,
    _uid,
    anatomy,
    map_patients,
    patient_id,
    prepare_root,
)
from nodulekit.data.volumes import (
    Volume,
    affine_from,
    write_dicom_series,
    write_metaimage,
    write_nifti,
)

FORMATS = ("unitochest", "msd", "luna16", "series")
ORIENTATIONS = ("axial", "flipped", "oblique")
OBLIQUE_DEGREES = (12.0, 7.0)  # about x (as a gantry tilt), then about z
LUNA_SUBSET = "subset0"
SERIES_FOLDER = "series_1"


def export(out: str | os.PathLike, config: SynthConfig | None = None, *, format: str,
           orientation: str = "axial", overwrite: bool = False, progress: bool = False,
           workers: int | None = 0) -> SynthResult:
    """Write the synthetic set as `format` ("msd", "luna16" or "series") under `out`
    (module doc). workers: processes writing patients (None: one per CPU; 0: none)."""
    if format not in FORMATS[1:]:
        raise ValueError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; one of "
                         f"{', '.join(ORIENTATIONS)}")
    cfg = config or SynthConfig()
    root = prepare_root(out, overwrite)
    names = [reader_patient(cfg, format, p) for p in range(cfg.patients)]
    # the split `nodulekit preprocess --split-seed SEED` gives these patients
    split_of = split_patients(names, seed=cfg.seed)
    jobs = [(cfg, str(root), p, format, orientation, split_of[names[p]])
            for p in range(cfg.patients)]
    written = map_patients(_write_patient, jobs, workers, progress)
    slices = [s for patient_slices, _, _ in written for s in patient_slices]
    nodules = [n for _, patient_nodules, _ in written for n in patient_nodules]
    extra = [row for _, _, rows in written for row in rows]
    if format == "msd":
        _write_description(root, names)
    elif format == "luna16":
        with open(root / "annotations.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
            writer.writerows(extra)
    splits = {s: [n for n in names if split_of[n] == s] for s in SPLITS}
    with open(root / "synth.json", "w") as f:
        json.dump({"generator": GENERATOR, "config": asdict(cfg), "format": format,
                   "orientation": orientation, "split_seed": cfg.seed, "splits": splits,
                   "nodules": [asdict(n) for n in nodules]}, f, indent=1)
    return SynthResult(root, cfg, slices, nodules, splits)


def reader_patient(cfg: SynthConfig, fmt: str, p: int) -> str:
    """Patient p's name as the format's reader gives it (the cache's `patient`)."""
    if fmt == "msd":
        return f"lung_{p + 1:03d}"
    if fmt == "luna16":
        return _uid(cfg, "series", p)
    return patient_id(p)


def world_rotation(orientation: str) -> np.ndarray:
    """(3, 3): the generator's LPS coordinates to the file's world coordinates."""
    if orientation != "oblique":
        return np.eye(3)
    ax, az = np.radians(OBLIQUE_DEGREES)
    about_x = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    about_z = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return about_z @ about_x


def patient_volumes(cfg: SynthConfig, p: int, orientation: str) -> tuple[Volume, np.ndarray]:
    """Patient p's scan (HU int16) placed as `orientation` says, and its nodule mask (uint8)
    on the same grid."""
    rendered = [_render(cfg, p, k) for k in range(cfg.slices_per_patient)]
    return _placed(cfg, p, np.stack([h for h, _ in rendered]),
                   np.stack([m for _, m in rendered]), orientation)


def _placed(cfg: SynthConfig, p: int, hu: np.ndarray, mask: np.ndarray,
            orientation: str) -> tuple[Volume, np.ndarray]:
    """The generator's slices of patient p (in its order) as a scan placed as `orientation`
    says, and the mask on the same grid."""
    body = anatomy(cfg, p)
    ps, origin = body.grid.spacing, body.grid.origin
    # the generator's slices run from head to feet: z[k] = z[0] - k * thickness
    affine = affine_from((origin, origin, float(body.z[0])), np.diag([1.0, 1.0, -1.0]),
                         (body.thickness, ps, ps))
    volume = Volume(hu, affine)
    if orientation == "flipped":
        volume, mask = _reversed(volume, mask, axes=(2,))
    else:
        volume, mask = _reversed(volume, mask, axes=(0,))
        if orientation == "oblique":
            turn = np.eye(4)
            turn[:3, :3] = world_rotation(orientation)
            volume = Volume(volume.array, turn @ volume.affine)
    return volume, mask


def _reversed(volume: Volume, mask: np.ndarray, axes: tuple[int, ...]):
    """`volume` and `mask` with the array reversed along `axes` (k, r, c numbering), every
    voxel kept at its place."""
    index = [slice(None)] * 3
    first = [0, 0, 0]
    affine = volume.affine.copy()
    for a in axes:
        index[a] = slice(None, None, -1)
        first[a] = volume.shape[a] - 1
        affine[:3, 2 - a] = -affine[:3, 2 - a]  # affine columns are c, r, k
    affine[:3, 3] = volume.to_patient(first)
    turned = Volume(np.ascontiguousarray(volume.array[tuple(index)]), affine)
    return turned, np.ascontiguousarray(mask[tuple(index)])


def _write_patient(cfg: SynthConfig, root: str, p: int, fmt: str, orientation: str,
                   split: str):
    """Write patient p's scan and truth; (its slices, its nodules, annotation rows)."""
    rendered = [_render(cfg, p, k) for k in range(cfg.slices_per_patient)]
    truth = np.stack([m for _, m in rendered])
    volume, mask = _placed(cfg, p, np.stack([h for h, _ in rendered]), truth, orientation)
    name = reader_patient(cfg, fmt, p)
    base = Path(root)
    rows = []
    label = None
    if fmt == "msd":
        image = Path("imagesTr") / f"{name}.nii.gz"
        label = Path("labelsTr") / f"{name}.nii.gz"
        for folder in ("imagesTr", "labelsTr"):
            (base / folder).mkdir(exist_ok=True)
        write_nifti(volume, base / image)
        write_nifti(volume.with_array(mask), base / label)
        exam = "1"
    elif fmt == "luna16":
        image = Path(LUNA_SUBSET) / f"{name}.mhd"
        (base / LUNA_SUBSET).mkdir(exist_ok=True)
        write_metaimage(volume, base / image)
        turn = world_rotation(orientation)
        for shape in anatomy(cfg, p).nodules:
            n = shape.nodule
            rows.append([name, *(repr(float(v)) for v in turn @ np.asarray(n.center_mm)),
                         repr(float(n.diameter_mm))])
        label = Path("annotations.csv") if rows else None
        exam = "1"
    else:
        image = Path(f"patient_{name}") / SERIES_FOLDER
        write_dicom_series(volume, base / image, patient_id=name,
                           study_uid=_uid(cfg, "study", p), series_uid=_uid(cfg, "series", p))
        if mask.any():
            label = Path(f"patient_{name}") / f"{SERIES_FOLDER}.nii.gz"
            write_nifti(volume.with_array(mask), base / label)
        exam = image.as_posix()
    body = anatomy(cfg, p)
    slices = []
    for k in range(cfg.slices_per_patient):
        slices.append(SynthSlice(
            split=split, patient=p, patient_id=name, exam=exam, slice_index=k,
            instance_number=k + 1, z_mm=float(body.z[k]), image=image.as_posix(),
            mask=label.as_posix() if label is not None and truth[k].any() else None,
            nodule_pixels=int(truth[k].sum()), pixel_spacing_mm=body.grid.spacing))
    return slices, tuple(shape.nodule for shape in body.nodules), rows


def _write_description(root: Path, names: list[str]) -> None:
    training = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                for n in names]
    description = {
        "name": "Lung (nodulekit synth)",
        "description": "Synthetic chest CT with nodule masks, written by nodulekit synth",
        "reference": "nodulekit", "licence": "n/a", "release": GENERATOR,
        "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "nodule"},
        "numTraining": len(names), "numTest": 0, "training": training, "test": [],
    }
    with open(root / "dataset.json", "w") as f:
        json.dump(description, f, indent=1)


def written_by_export(folder: tuple[str, ...], name: str) -> bool:
    """Whether `export` writes a file `name` in `folder` (parts relative to the root), in
    any format: what `synthesize(..., overwrite=True)` may delete."""
    if not folder:
        return name in ("dataset.json", "annotations.csv")
    if len(folder) == 1 and folder[0] in ("imagesTr", "labelsTr"):
        return name.startswith("lung_") and name.endswith(".nii.gz")
    if folder == (LUNA_SUBSET,):
        return name.endswith((".mhd", ".raw"))
    if folder[0].startswith("patient_"):
        if len(folder) == 1:
            return name == f"{SERIES_FOLDER}.nii.gz"
        return len(folder) == 2 and folder[1] == SERIES_FOLDER and name.endswith(".dcm")
    return False

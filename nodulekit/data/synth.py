"""A synthetic chest CT data set in the exact UniToChest layout (`nodulekit synth OUT`), or
the same patients as whole scans (`--format msd|luna16|series`: `synth_export`).

Every patient is an analytic phantom defined in millimetres, so consecutive slices agree,
at a real CT's geometry: 512 x 512 pixels of 0.6 to 0.85 mm (drawn per patient; the field
of view follows, and another `size` keeps that field of view), slices 1 to 2 mm thick over
a stretch of the lungs. Its parts (`synth_anatomy.py` and the modules it names): the body
with skin, subcutaneous fat and muscle; ribs (cortex and marrow, descending towards the
front, so each slice cuts them obliquely), costal cartilages, sternum, scapulae and
vertebrae; the mediastinum's fat with the aorta, the pulmonary trunk, the vena cava and the
heart's chambers lower down; the trachea and bronchi (air in a thin wall); lungs with a
front-to-back density gradient and texture, fissures, a few scar bands, and pulmonary
arteries and veins branching in 3-D from the hila, tapering to the periphery (a vessel
crossing the slice is a bright disc: the nodule's main look-alike); the liver and spleen
under the diaphragm; half the patients with contrast in the blood; the scanner's blur and
noise. Nodule diameters follow the paper's Table 3 (most 3-10 mm); nodules are solid,
part-solid or ground-glass, slightly ellipsoidal or lobulated, some touching the chest
wall, some on a vessel; each is centred on a slice and a pixel, so it always shows. Only
nodules are in the masks. Patients are split 80/10/10 by the seeded patient-level split of
`layout.split_patients`.

Written (as docs/design.md describes UniToChest), for each split folder train/ val/ test/:

    images/patient_XXXX/exam_1/NNNN.dcm   CT slices, stored int16 with RescaleIntercept -1024
    masks/patient_XXXX/exam_1/NNNN.png    0/255 masks, only for slices with a nodule
    <split>_dataset.csv                   patientID, exam, slice, image, mask

plus ``synth.json`` at the top: the generator's version, the configuration and every
nodule (centre, diameter, HU, kind, attachment), and ``.nodulekit-synth``, the marker that
says `synthesize` wrote the folder: only a folder with it (or an empty one) is replaced
with ``overwrite=True``, and then only when it holds nothing but files `synthesize` writes.

Everything is a function of the seed: patient p's anatomy comes from random generators
seeded with ``(seed, p, ...)`` and slice k's noise from ``(seed, p, k, 1)``, so
`render_slice` regenerates any slice's ground truth (HU int16 and mask) without reading a
file.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.data.layout import SPLITS, split_patients
from nodulekit.data.masks import write_mask
from nodulekit.data.synth_anatomy import (
    SLICE_THICKNESSES_MM,
    SPACING_AT_512_MM,
    Patient,
    build_patient,
)
from nodulekit.data.synth_nodules import TABLE3_COUNTS, TABLE3_RANGES, SynthNodule
from nodulekit.data.synth_render import HU_MAX, HU_MIN, Frame, frame, render
from nodulekit.data.volumes import decimal_string, set_ct_pixels

__all__ = ["GENERATOR", "HU_MAX", "HU_MIN", "MARKER", "RESCALE_INTERCEPT",
           "SLICE_THICKNESSES_MM", "TABLE3_COUNTS", "TABLE3_RANGES", "SynthConfig",
           "SynthNodule", "SynthResult", "SynthSlice", "anatomy", "patient_id", "render_slice",
           "synthesize"]

# Names what the generator draws: a data set written by another version differs.
GENERATOR = "nodulekit-synth 2"
RESCALE_INTERCEPT = -1024
# Written first into a folder `synthesize` creates: what `overwrite=True` may replace.
MARKER = ".nodulekit-synth"


@dataclass(frozen=True)
class SynthConfig:
    size: int = 512  # H = W in pixels
    patients: int = 10
    slices_per_patient: int = 16
    seed: int = 0
    max_nodules_per_patient: int = 4

    def __post_init__(self):
        if self.size < 32:
            raise ValueError(f"size must be at least 32 pixels, got {self.size}")
        if self.patients < 1 or self.slices_per_patient < 1:
            raise ValueError("patients and slices_per_patient must be at least 1")
        if self.max_nodules_per_patient < 1:
            raise ValueError("max_nodules_per_patient must be at least 1")

    def spacing_mm(self, patient: int) -> float:
        """Patient `patient`'s pixel spacing: 0.6 to 0.85 mm at 512 pixels, scaled by
        512 / size at another size (the same field of view)."""
        draw = np.random.default_rng([self.seed, patient]).uniform(*SPACING_AT_512_MM)
        return float(512 * draw / self.size)  # build_patient's first draw


@dataclass(frozen=True)
class SynthSlice:
    split: str
    patient: int
    patient_id: str
    exam: str
    slice_index: int  # 0-based within the patient
    instance_number: int
    z_mm: float
    image: str  # path relative to the data set root
    mask: str | None  # idem, None for a slice without a nodule
    nodule_pixels: int
    pixel_spacing_mm: float


@dataclass
class SynthResult:
    root: Path
    config: SynthConfig
    slices: list[SynthSlice]
    nodules: list[SynthNodule]
    splits: dict[str, list[str]] = field(default_factory=dict)  # split -> patient IDs

    def truth(self, s: SynthSlice) -> tuple[np.ndarray, np.ndarray]:
        """Ground truth HU int16 and mask uint8 {0,1} of a slice, regenerated."""
        return render_slice(self.config, s.patient, s.slice_index)

    def summary(self) -> str:
        c = self.config
        with_nodule = sum(s.mask is not None for s in self.slices)
        diameters = sorted(n.diameter_mm for n in self.nodules)
        spacing = sorted({s.pixel_spacing_mm for s in self.slices})
        lines = [f"wrote {self.root}: {c.patients} patients x {c.slices_per_patient} slices, "
                 f"{c.size}x{c.size} ({spacing[0]:.3f} to {spacing[-1]:.3f} mm pixels), "
                 f"seed {c.seed}",
                 f"  {len(self.slices)} slices, {with_nodule} with a nodule; "
                 f"{len(self.nodules)} nodules, {diameters[0]:.1f} to {diameters[-1]:.1f} mm"
                 if diameters else f"  {len(self.slices)} slices, no nodules"]
        for split in SPLITS:
            lines.append(f"  {split:5s} {len(self.splits.get(split, [])):3d} patients")
        return "\n".join(lines)


def patient_id(p: int) -> str:
    return f"{p + 1:04d}"


@functools.lru_cache(maxsize=2)
def anatomy(cfg: SynthConfig, p: int) -> Patient:
    """Patient p's anatomy: geometry, tissues, trees, bones, nodules (the last two asked
    for are kept)."""
    return build_patient(cfg.seed, p, cfg.size, cfg.slices_per_patient,
                         cfg.max_nodules_per_patient)


@functools.lru_cache(maxsize=2)
def _frame(cfg: SynthConfig, p: int) -> Frame:
    return frame(anatomy(cfg, p), cfg.seed)


def render_slice(cfg: SynthConfig, patient: int, slice_index: int, *,
                 labels: bool = False) -> tuple[np.ndarray, ...]:
    """HU int16 (H, W) and nodule mask uint8 {0,1} of one slice: the ground truth; with
    `labels`, also each pixel's tissue (uint8, `synth_anatomy.Tissue`)."""
    return _render(cfg, patient, slice_index, labels)


def _render(cfg: SynthConfig, p: int, k: int, want_labels: bool = False):
    if not 0 <= k < cfg.slices_per_patient:
        raise IndexError(f"slice {k} out of range: {cfg.slices_per_patient} per patient")
    rng = np.random.default_rng([cfg.seed, p, k, 1])
    return render(anatomy(cfg, p), _frame(cfg, p), k, rng, want_labels)


# ----------------------------------------------------------------------------- writing


def synthesize(out: str | os.PathLike, config: SynthConfig | None = None, *,
               overwrite: bool = False, progress: bool = False,
               workers: int | None = 0, format: str = "unitochest",
               orientation: str = "axial") -> SynthResult:
    """Write a synthetic UniToChest-layout data set under `out` and return what it holds.

    workers: processes writing patients in parallel (None: one per CPU; 0: none). The
    files are the same whatever the number.
    format: "unitochest", or the same patients as whole scans: "msd", "luna16", "series",
    placed in the files as `orientation` says ("axial", "flipped", "oblique";
    `nodulekit.data.synth_export`).
    """
    if format != "unitochest":
        from nodulekit.data.synth_export import export

        return export(out, config, format=format, orientation=orientation,
                      overwrite=overwrite, progress=progress, workers=workers)
    if orientation != "axial":
        raise ValueError(f"orientation {orientation!r} is for whole scans (--format msd, "
                         "luna16 or series); UniToChest slices are axial")
    cfg = config or SynthConfig()
    root = prepare_root(out, overwrite)

    ids = [patient_id(p) for p in range(cfg.patients)]
    split_of = split_patients(ids, seed=cfg.seed)
    jobs = [(cfg, str(root), p, split_of[pid]) for p, pid in enumerate(ids)]
    written: list[tuple[list[SynthSlice], tuple[SynthNodule, ...], list[list[str]]]] = \
        map_patients(_write_patient, jobs, workers, progress)

    slices = [s for patient_slices, _, _ in written for s in patient_slices]
    nodules = [n for _, patient_nodules, _ in written for n in patient_nodules]
    for split in SPLITS:
        (root / split).mkdir(exist_ok=True)
        with open(root / split / f"{split}_dataset.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["patientID", "exam", "slice", "image", "mask"])
            for (_, _, rows), job in zip(written, jobs, strict=True):
                if job[3] == split:
                    writer.writerows(rows)
    splits = {s: [pid for pid in ids if split_of[pid] == s] for s in SPLITS}
    result = SynthResult(root, cfg, slices, nodules, splits)
    with open(root / "synth.json", "w") as f:
        json.dump({"generator": GENERATOR, "config": asdict(cfg), "splits": splits,
                   "nodules": [asdict(n) for n in nodules]}, f, indent=1)
    return result


def map_patients(write, jobs: list[tuple], workers: int | None, progress: bool) -> list:
    """[write(*job) for job in jobs], in that order, in `workers` processes (None: one per
    CPU; 0 or 1: here), with a progress bar by patient."""
    from tqdm import tqdm

    n_workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
    n_workers = min(n_workers, len(jobs))
    bar = tqdm(total=len(jobs), unit="patient", desc="synth", disable=not progress)
    written = []
    try:
        if n_workers <= 1:
            for job in jobs:
                written.append(write(*job))
                bar.update(1)
        else:
            from concurrent.futures import ProcessPoolExecutor

            from nodulekit.data.procs import worker_context

            with ProcessPoolExecutor(n_workers, mp_context=worker_context()) as pool:
                for item in pool.map(write, *zip(*jobs, strict=True)):
                    written.append(item)
                    bar.update(1)
    finally:
        bar.close()
    return written


def prepare_root(out: str | os.PathLike, overwrite: bool) -> Path:
    """The folder a data set is written to: made way for (`_clear`), created, and marked
    as synth's (what a later `overwrite` may delete)."""
    root = Path(out)
    _clear(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by nodulekit synth: `nodulekit synth --overwrite` "
                               "may delete this folder\n")
    return root


def _clear(root: Path, overwrite: bool) -> None:
    """Make way for a data set at `root`: nothing there, or an empty folder, or (with
    `overwrite`) a data set that `synthesize` wrote, deleted. Anything else is refused:
    a file, a folder without the marker, or one that holds a file synth does not write."""
    if not root.exists() and not root.is_symlink():
        return
    if not root.is_dir() or root.is_symlink():
        raise FileExistsError(f"{root} exists and is not a folder; choose another name")
    if not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{root} exists and is not empty; pass overwrite=True "
                              "(--overwrite) to replace a data set that synth wrote there")
    if not ((root / MARKER).is_file() or _older_synth_set(root)):
        raise FileExistsError(f"{root} was not written by nodulekit synth (no {MARKER} "
                              "marker in it), so --overwrite does not delete it; remove it "
                              "yourself, or choose another folder")
    others = _not_written(root)
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                          else "")
        raise FileExistsError(f"{root} holds files that nodulekit synth did not write "
                              f"({listed}), so --overwrite does not delete it; move them "
                              "out, or choose another folder")
    shutil.rmtree(root)


def _older_synth_set(root: Path) -> bool:
    """A data set written before the marker: its synth.json is synth's."""
    try:
        info = json.loads((root / "synth.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"config", "splits", "nodules"} <= info.keys()


def _not_written(root: Path) -> list[str]:
    """The files and links under `root` (relative paths) that `synthesize` does not write."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found += [(rel / n).as_posix() for n in sorted(filenames)
                  if not _synth_file(rel.parts, n)]
        found += [(rel / n).as_posix() + "/" for n in sorted(dirnames)
                  if (Path(dirpath) / n).is_symlink()]  # os.walk does not enter them
    return found


def _synth_file(folder: tuple[str, ...], name: str) -> bool:
    """Whether `synthesize` writes a file `name` in `folder` (parts relative to the root),
    in any of its formats."""
    if not folder:
        if name in (MARKER, "synth.json"):
            return True
    from nodulekit.data.synth_export import written_by_export  # it imports this module

    if written_by_export(folder, name):
        return True
    split = folder[0] if folder else ""
    if split not in SPLITS:
        return False
    if len(folder) == 1:
        return name == f"{split}_dataset.csv"
    kind = {"images": ".dcm", "masks": ".png"}.get(folder[1])
    return (kind is not None and len(folder) == 4 and folder[2].startswith("patient_")
            and folder[3].startswith("exam_") and name.endswith(kind))


def _write_patient(cfg: SynthConfig, root: str, p: int, split: str):
    """Render and write one patient's slices and masks; its records, nodules, CSV rows."""
    pid = patient_id(p)
    body = anatomy(cfg, p)
    spacing = body.grid.spacing
    exam = "1"
    rel_dir = Path(f"patient_{pid}") / f"exam_{exam}"
    split_dir = Path(root) / split
    (split_dir / "images" / rel_dir).mkdir(parents=True, exist_ok=True)
    slices, rows = [], []
    for k in range(cfg.slices_per_patient):
        hu, mask = _render(cfg, p, k)
        instance = k + 1
        name = f"{instance:04d}"
        image_rel = (rel_dir / f"{name}.dcm").as_posix()
        z = float(body.z[k])
        tags = _CtTags(pid, instance, z, body.thickness, spacing, _uid(cfg, "study", p),
                       _uid(cfg, "series", p), _uid(cfg, "sop", p, k))
        _write_ct(split_dir / "images" / image_rel, hu, tags)
        mask_rel = None
        if mask.any():
            mask_rel = (rel_dir / f"{name}.png").as_posix()
            (split_dir / "masks" / rel_dir).mkdir(parents=True, exist_ok=True)
            write_mask(split_dir / "masks" / mask_rel, mask)
        rows.append([pid, exam, str(instance), image_rel, mask_rel or ""])
        slices.append(SynthSlice(
            split=split, patient=p, patient_id=pid, exam=exam, slice_index=k,
            instance_number=instance, z_mm=z, image=f"{split}/images/{image_rel}",
            mask=f"{split}/masks/{mask_rel}" if mask_rel else None,
            nodule_pixels=int(mask.sum()), pixel_spacing_mm=spacing))
    return slices, tuple(shape.nodule for shape in body.nodules), rows


@dataclass(frozen=True)
class _CtTags:
    """What a slice's DICOM header says beyond its pixels."""

    patient_id: str
    instance: int
    z: float
    thickness: float
    spacing: float
    study_uid: str
    series_uid: str
    sop_uid: str


def _uid(cfg: SynthConfig, kind: str, *parts: int) -> str:
    """A deterministic UID (2.25 + a name-based UUID): the same seed gives the same files."""
    name = "/".join(["nodulekit-synth", str(cfg.seed), str(cfg.size), kind, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _write_ct(path: Path, hu: np.ndarray, tags: _CtTags) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = tags.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = tags.sop_uid
    ds.Modality = "CT"
    ds.Manufacturer = "nodulekit synth"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = tags.patient_id
    ds.PatientName = f"Synthetic^{tags.patient_id}"
    ds.StudyInstanceUID = tags.study_uid
    ds.SeriesInstanceUID = tags.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = tags.instance
    ps = tags.spacing
    corner = -(hu.shape[1] - 1) / 2 * ps
    ds.ImagePositionPatient = [decimal_string(v) for v in (corner, corner, tags.z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = decimal_string(tags.z)
    ds.SliceThickness = decimal_string(tags.thickness)
    ds.PixelSpacing = [decimal_string(ps), decimal_string(ps)]
    ds.WindowCenter = "-500"
    ds.WindowWidth = "1600"
    set_ct_pixels(ds, hu, RESCALE_INTERCEPT)
    ds.save_as(path, enforce_file_format=True)

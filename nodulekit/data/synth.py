"""A synthetic chest CT data set in the exact UniToChest layout (`nodulekit synth OUT`).

Every patient is a small analytic phantom, defined in millimetres so consecutive slices
agree: a body (skin fat over soft tissue), two lungs with texture and vessels, the heart
between them, ribs that come and go with the slice position, a vertebra with its canal,
scanner noise, and spherical nodules inside the lungs. HU are realistic: air -1000, lung
about -850, fat about -100, soft tissue 0..60, bone 300..1200; clipped to the scanner range
[-1024, 3071]. Nodule diameters follow the paper's Table 3 (most under 10 mm), from 1 to
136 mm; each nodule is centred on a slice and a pixel, so it always shows, and spans
several slices. Patients are split 80/10/10 by the seeded patient-level split of
`layout.split_patients`.

Written (as docs/design.md describes UniToChest), for each split folder train/ val/ test/:

    images/patient_XXXX/exam_1/NNNN.dcm   CT slices, stored int16 with RescaleIntercept -1024
    masks/patient_XXXX/exam_1/NNNN.png    0/255 masks, only for slices with a nodule
    <split>_dataset.csv                   patientID, exam, slice, image, mask

plus ``synth.json`` at the top: the configuration and every nodule (centre, diameter, HU),
and ``.nodulekit-synth``, the marker that says `synthesize` wrote the folder: only a folder
with it (or an empty one) is replaced with ``overwrite=True``, and then only when it holds
nothing but files `synthesize` writes.

Everything is a function of the seed: patient p's anatomy comes from the RNG
``(seed, p)`` and slice k's noise from ``(seed, p, k)``, so `render_slice` regenerates any
slice's ground truth (HU int16 and mask) without reading a file.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nodulekit.data.layout import SPLITS, split_patients
from nodulekit.data.masks import write_mask

FIELD_OF_VIEW_MM = 360.0
HU_MIN, HU_MAX = -1024, 3071  # what a 12-bit CT scanner stores
RESCALE_INTERCEPT = -1024
# Table 3 of the paper, all splits: nodules per diameter bin; bins' ranges in mm.
TABLE3_COUNTS = (177, 7417, 2172, 305)
TABLE3_RANGES = ((1.0, 3.0), (3.0, 10.0), (10.0, 30.0), (30.0, 136.0))
SLICE_THICKNESSES_MM = (1.0, 1.25, 1.5, 2.0)
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

    @property
    def pixel_spacing_mm(self) -> float:
        return FIELD_OF_VIEW_MM / self.size


@dataclass(frozen=True)
class SynthNodule:
    patient: int
    center_mm: tuple[float, float, float]  # (x, y, z): columns, rows, along the body
    diameter_mm: float
    hu: float


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
        lines = [f"wrote {self.root}: {c.patients} patients x {c.slices_per_patient} slices, "
                 f"{c.size}x{c.size} ({c.pixel_spacing_mm:.3f} mm pixels), seed {c.seed}",
                 f"  {len(self.slices)} slices, {with_nodule} with a nodule; "
                 f"{len(self.nodules)} nodules, {diameters[0]:.1f} to {diameters[-1]:.1f} mm"
                 if diameters else f"  {len(self.slices)} slices, no nodules"]
        for split in SPLITS:
            lines.append(f"  {split:5s} {len(self.splits.get(split, [])):3d} patients")
        return "\n".join(lines)


def patient_id(p: int) -> str:
    return f"{p + 1:04d}"


# ----------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Anatomy:
    z_mm: np.ndarray  # slice positions
    thickness_mm: float
    body: tuple[float, float, float, float]  # cx, cy, ax, ay
    fat_mm: float
    lungs: tuple[tuple[float, float, float, float], ...]  # cx, cy, ax, ay at mid-stack
    heart: tuple[float, float, float, float]
    vessels: np.ndarray  # (n, 6): x0, y0, z0, slope_x, slope_y, radius
    ribs: np.ndarray  # (n, 4): angle, phase, half-length, half-width
    spine: tuple[float, float, float]  # cx, cy, body radius
    tissue_hu: float
    noise_hu: float
    nodules: tuple[SynthNodule, ...]


def _anatomy(cfg: SynthConfig, p: int) -> _Anatomy:
    rng = np.random.default_rng([cfg.seed, p])
    ps = cfg.pixel_spacing_mm
    thickness = float(rng.choice(SLICE_THICKNESSES_MM))
    z0 = float(rng.uniform(-200.0, -100.0))
    z = z0 - thickness * np.arange(cfg.slices_per_patient)  # head to feet
    ax, ay = rng.uniform(135.0, 165.0), rng.uniform(95.0, 115.0)
    body = (0.0, rng.uniform(-5.0, 5.0), ax, ay)
    fat = rng.uniform(6.0, 18.0)
    lungs = []
    for side in (-1.0, 1.0):
        lax, lay = rng.uniform(0.28, 0.34) * ax, rng.uniform(0.62, 0.72) * ay
        lungs.append((side * rng.uniform(0.42, 0.48) * ax, body[1] - rng.uniform(0.0, 8.0),
                      lax, lay))
    heart = (rng.uniform(-15.0, 5.0), body[1] - 0.25 * ay, rng.uniform(38.0, 50.0),
             rng.uniform(32.0, 42.0))
    n_vessels = int(rng.integers(20, 36))
    vessels = np.empty((n_vessels, 6))
    for i in range(n_vessels):
        lx, ly, lax, lay = lungs[i % 2]
        r, t = math.sqrt(rng.uniform(0.0, 0.8)), rng.uniform(0.0, 2 * math.pi)
        vessels[i] = (lx + r * lax * math.cos(t), ly + r * lay * math.sin(t),
                      rng.uniform(z.min(), z.max()), rng.uniform(-1.2, 1.2),
                      rng.uniform(-1.2, 1.2), rng.uniform(0.7, 3.0))
    n_ribs = int(rng.integers(10, 15))
    angles = np.linspace(0.15 * math.pi, 1.85 * math.pi, n_ribs) + rng.normal(0, 0.05, n_ribs)
    ribs = np.stack([angles, rng.uniform(0, 2 * math.pi, n_ribs),
                     rng.uniform(6.0, 9.0, n_ribs), rng.uniform(3.0, 4.5, n_ribs)], axis=1)
    spine = (0.0, body[1] + ay - rng.uniform(38.0, 45.0), rng.uniform(14.0, 18.0))
    nodules = _nodules(cfg, p, rng, z, lungs, ps)
    return _Anatomy(z, thickness, body, fat, tuple(lungs), heart, vessels, ribs, spine,
                    tissue_hu=rng.uniform(30.0, 50.0), noise_hu=rng.uniform(10.0, 20.0),
                    nodules=nodules)


def _nodules(cfg, p, rng, z, lungs, ps) -> tuple[SynthNodule, ...]:
    probabilities = np.asarray(TABLE3_COUNTS, dtype=float) / sum(TABLE3_COUNTS)
    count = 1 + min(int(rng.poisson(1.2)), cfg.max_nodules_per_patient - 1)
    size = cfg.size
    out: list[SynthNodule] = []
    for _ in range(count):
        lo, hi = TABLE3_RANGES[int(rng.choice(len(probabilities), p=probabilities))]
        diameter = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        for _attempt in range(20):
            lx, ly, lax, lay = lungs[int(rng.integers(2))]
            # Big masses sit near the lung's centre; small nodules anywhere inside it.
            reach = max(0.0, 0.75 - diameter / (2.0 * min(lax, lay)))
            r, t = math.sqrt(rng.uniform(0.0, 1.0)) * reach, rng.uniform(0.0, 2 * math.pi)
            # Snap the centre onto a pixel centre and a slice, so every nodule shows.
            col = round((lx + r * lax * math.cos(t)) / ps + (size - 1) / 2)
            row = round((ly + r * lay * math.sin(t)) / ps + (size - 1) / 2)
            cx, cy = (col - (size - 1) / 2) * ps, (row - (size - 1) / 2) * ps
            cz = float(z[int(rng.integers(len(z)))])
            if all(math.dist((cx, cy, cz), n.center_mm) > (diameter + n.diameter_mm) / 2 + 2 * ps
                   for n in out):
                out.append(SynthNodule(p, (cx, cy, cz), diameter, float(rng.uniform(10, 60))))
                break
    return tuple(out)


# ----------------------------------------------------------------------------- render


def render_slice(cfg: SynthConfig, patient: int, slice_index: int) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """HU int16 (H, W) and nodule mask uint8 {0,1} of one slice: the ground truth."""
    return _render(cfg, _anatomy(cfg, patient), patient, slice_index)


def _render(cfg: SynthConfig, a: _Anatomy, patient: int, k: int) -> tuple[np.ndarray,
                                                                         np.ndarray]:
    size, ps = cfg.size, cfg.pixel_spacing_mm
    rng = np.random.default_rng([cfg.seed, patient, k, 1])
    mm = ((np.arange(size) - (size - 1) / 2) * ps).astype(np.float32)
    x, y = mm[None, :], mm[:, None]
    z = float(a.z_mm[k])
    # Lungs widen towards the base: a gentle change along the stack keeps slices distinct.
    depth = (z - a.z_mm[0]) / max(1.0, float(np.ptp(a.z_mm)) or 1.0)
    grow = 0.9 + 0.15 * abs(depth)

    img = np.full((size, size), -1000.0, dtype=np.float32)
    bx, by, bax, bay = a.body
    body = _ellipse(x, y, bx, by, bax, bay)
    img[body] = -100.0  # subcutaneous fat
    img[_ellipse(x, y, bx, by, bax - a.fat_mm, bay - a.fat_mm)] = a.tissue_hu
    lung = np.zeros_like(body)
    for lx, ly, lax, lay in a.lungs:
        lung |= _ellipse(x, y, lx, ly, lax * grow, lay * grow)
    lung &= body
    # Parenchyma: about -850 with a smooth texture.
    img[lung] = -850.0 + 25.0 * _smooth_noise(rng, size, cell=max(2, size // 32))[lung]
    hx, hy, hax, hay = a.heart
    img[_ellipse(x, y, hx, hy, hax, hay)] = a.tissue_hu + 10.0  # blood-filled heart
    for x0, y0, z0, sx, sy, radius in a.vessels:
        cx, cy = x0 + sx * (z - z0), y0 + sy * (z - z0)
        box = _box(mm, cx, cy, radius)
        disc = _disc(x[:, box[1]], y[box[0]], cx, cy, radius) & lung[box]
        img[box][disc] = 40.0
    for angle, phase, half_len, half_wid in a.ribs:
        # Ribs run obliquely, so a given rib crosses only some slices.
        if math.sin(z / 9.0 + phase) < -0.2:
            continue
        ring_x = bx + (bax - a.fat_mm - 8.0) * math.cos(angle)
        ring_y = by + (bay - a.fat_mm - 8.0) * math.sin(angle)
        box = _box(mm, ring_x, ring_y, half_len)
        bxs, bys = x[:, box[1]], y[box[0]]
        turn = angle + math.pi / 2
        outer = _rotated_ellipse(bxs, bys, ring_x, ring_y, half_len, half_wid, turn)
        inner = _rotated_ellipse(bxs, bys, ring_x, ring_y, half_len - 1.5, half_wid - 1.5, turn)
        img[box][outer] = 1100.0  # cortical bone
        img[box][inner] = 320.0  # marrow
    sx0, sy0, sr = a.spine
    box = _box(mm, sx0, sy0 + sr, sr + 20.0)
    bxs, bys, part = x[:, box[1]], y[box[0]], img[box]
    vertebra = _disc(bxs, bys, sx0, sy0, sr)
    part[vertebra] = 1000.0
    part[_disc(bxs, bys, sx0, sy0, sr - 2.0)] = 300.0  # cancellous bone
    part[_ellipse(bxs, bys, sx0, sy0 + sr + 3.0, 12.0, 18.0) & ~vertebra] = 700.0  # arch
    part[_disc(bxs, bys, sx0, sy0 + sr + 6.0, 7.0)] = 20.0  # spinal canal

    mask = np.zeros((size, size), dtype=np.uint8)
    for n in a.nodules:
        cx, cy, cz = n.center_mm
        r = n.diameter_mm / 2.0
        dz = z - cz
        if abs(dz) > r:
            continue
        # A sub-pixel nodule still marks its centre pixel in its own slice.
        section = max(math.sqrt(r * r - dz * dz), 0.5 * ps if dz == 0 else 0.0)
        box = _box(mm, cx, cy, section)
        disc = _disc(x[:, box[1]], y[box[0]], cx, cy, section) & body[box]
        img[box][disc] = n.hu
        mask[box][disc] = 1

    img += rng.normal(0.0, a.noise_hu, size=img.shape).astype(np.float32)
    hu = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)
    return hu, mask


def _ellipse(x, y, cx, cy, ax, ay):
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _rotated_ellipse(x, y, cx, cy, ax, ay, theta):
    c, s = math.cos(theta), math.sin(theta)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _box(mm: np.ndarray, cx: float, cy: float, r: float) -> tuple[slice, slice]:
    """The (rows, columns) window holding a shape of radius `r` mm around (cx, cy)."""
    rows = np.searchsorted(mm, [cy - r - 1e-3, cy + r + 1e-3])
    cols = np.searchsorted(mm, [cx - r - 1e-3, cx + r + 1e-3])
    return slice(int(rows[0]), int(rows[1])), slice(int(cols[0]), int(cols[1]))


def _disc(x, y, cx, cy, r):
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _smooth_noise(rng, size: int, cell: int) -> np.ndarray:
    """Unit-variance-ish noise varying over about `cell` pixels (bilinear upsampling)."""
    n = size // cell + 2
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    pos = np.arange(size, dtype=np.float32) / cell
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    rows = coarse[i0] * (1.0 - f)[:, None] + coarse[i0 + 1] * f[:, None]  # (size, n)
    return rows[:, i0] * (1.0 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


# ----------------------------------------------------------------------------- writing


def synthesize(out: str | os.PathLike, config: SynthConfig | None = None, *,
               overwrite: bool = False, progress: bool = False,
               workers: int | None = 0) -> SynthResult:
    """Write a synthetic UniToChest-layout data set under `out` and return what it holds.

    workers: processes writing patients in parallel (None: one per CPU; 0: none). The
    files are the same whatever the number.
    """
    cfg = config or SynthConfig()
    root = Path(out)
    _clear(root, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by nodulekit synth: `nodulekit synth --overwrite` "
                               "may delete this folder\n")

    ids = [patient_id(p) for p in range(cfg.patients)]
    split_of = split_patients(ids, seed=cfg.seed)
    jobs = [(cfg, str(root), p, split_of[pid]) for p, pid in enumerate(ids)]
    n_workers = (os.cpu_count() or 1) if workers is None else max(0, int(workers))
    n_workers = min(n_workers, cfg.patients)

    from tqdm import tqdm

    bar = tqdm(total=cfg.patients, unit="patient", desc="synth", disable=not progress)
    written: list[tuple[list[SynthSlice], tuple[SynthNodule, ...], list[list[str]]]] = []
    if n_workers <= 1:
        for job in jobs:
            written.append(_write_patient(*job))
            bar.update(1)
    else:
        from concurrent.futures import ProcessPoolExecutor

        from nodulekit.data.procs import worker_context

        with ProcessPoolExecutor(n_workers, mp_context=worker_context()) as pool:
            for item in pool.map(_write_patient, *zip(*jobs, strict=True)):
                written.append(item)
                bar.update(1)
    bar.close()

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
        json.dump({"config": asdict(cfg), "splits": splits,
                   "nodules": [asdict(n) for n in nodules]}, f, indent=1)
    return result


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
    """Whether `synthesize` writes a file `name` in `folder` (parts relative to the root)."""
    if not folder:
        return name in (MARKER, "synth.json")
    split = folder[0]
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
    anatomy = _anatomy(cfg, p)
    study_uid, series_uid = _uid(cfg, "study", p), _uid(cfg, "series", p)
    exam = "1"
    rel_dir = Path(f"patient_{pid}") / f"exam_{exam}"
    split_dir = Path(root) / split
    (split_dir / "images" / rel_dir).mkdir(parents=True, exist_ok=True)
    slices, rows = [], []
    for k in range(cfg.slices_per_patient):
        hu, mask = _render(cfg, anatomy, p, k)
        instance = k + 1
        name = f"{instance:04d}"
        image_rel = (rel_dir / f"{name}.dcm").as_posix()
        _write_ct(split_dir / "images" / image_rel, hu, cfg, pid, instance,
                  float(anatomy.z_mm[k]), anatomy.thickness_mm, study_uid, series_uid,
                  _uid(cfg, "sop", p, k))
        mask_rel = None
        if mask.any():
            mask_rel = (rel_dir / f"{name}.png").as_posix()
            (split_dir / "masks" / rel_dir).mkdir(parents=True, exist_ok=True)
            write_mask(split_dir / "masks" / mask_rel, mask)
        rows.append([pid, exam, str(instance), image_rel, mask_rel or ""])
        slices.append(SynthSlice(
            split=split, patient=p, patient_id=pid, exam=exam, slice_index=k,
            instance_number=instance, z_mm=float(anatomy.z_mm[k]),
            image=f"{split}/images/{image_rel}",
            mask=f"{split}/masks/{mask_rel}" if mask_rel else None,
            nodule_pixels=int(mask.sum())))
    return slices, anatomy.nodules, rows


def _uid(cfg: SynthConfig, kind: str, *parts: int) -> str:
    """A deterministic UID (2.25 + a name-based UUID): the same seed gives the same files."""
    name = "/".join(["nodulekit-synth", str(cfg.seed), str(cfg.size), kind, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _ds(v: float) -> str:
    """A decimal string DICOM accepts (at most 16 characters)."""
    return f"{v:.10g}"


def _write_ct(path: Path, hu: np.ndarray, cfg: SynthConfig, pid: str, instance: int,
              z: float, thickness: float, study_uid: str, series_uid: str,
              sop_uid: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CT"
    ds.Manufacturer = "nodulekit synth"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = pid
    ds.PatientName = f"Synthetic^{pid}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ps = cfg.pixel_spacing_mm
    corner = -(cfg.size - 1) / 2 * ps
    ds.ImagePositionPatient = [_ds(corner), _ds(corner), _ds(z)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = _ds(z)
    ds.SliceThickness = _ds(thickness)
    ds.PixelSpacing = [_ds(ps), _ds(ps)]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-500"
    ds.WindowWidth = "1600"
    stored = (hu.astype(np.int32) - RESCALE_INTERCEPT).astype("<i2")
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)

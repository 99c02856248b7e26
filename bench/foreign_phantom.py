"""A chest phantom that nodulekit's own generator did not make, to try the defaults on.

    python bench/foreign_phantom.py OUT PATIENTS SEED     # e.g. foreign 24 3

Written apart from `nodulekit.data.synth`, with other geometry and other anatomy, so that a
recipe tuned on the demo meets something it was not tuned for (README, "Recipes"): MSD
layout (NIfTI, `dataset.json`), 40 slices of 300 x 260 (sides that are no multiple of 16)
at 0.75 mm, 1.25 mm apart; an elliptic body of soft tissue in air, two elliptic lungs of
smoothed-noise parenchyma, vessels as random walks of spheres that thin as they go, and
0-3 ellipsoid nodules per patient (70% of 3-10 mm, 25% of 10-20, 5% of 20-30) inside the
lungs, then blur and noise. Needs nibabel and scipy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SHAPE = (40, 300, 260)  # slices, rows, columns
SPACING = np.array([1.25, 0.75, 0.75])  # mm: slice, row, column


def _grid():
    z, y, x = (np.arange(n) * s for n, s in zip(SHAPE, SPACING, strict=True))
    return np.meshgrid(z, y, x, indexing="ij")


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def _vessels(rng, zz, yy, xx) -> np.ndarray:
    vessel = np.zeros(SHAPE, bool)
    extent = np.array(SHAPE) * SPACING
    for _ in range(rng.integers(25, 40)):
        pos = extent * [rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.9)]
        heading = rng.normal(size=3)
        heading /= np.linalg.norm(heading)
        radius = rng.uniform(0.7, 3.0)
        for _ in range(rng.integers(20, 60)):  # 1.5 mm steps, turning a little each
            heading = heading + rng.normal(scale=0.3, size=3)
            heading /= np.linalg.norm(heading)
            pos = pos + 1.5 * heading
            lo = np.maximum(((pos - radius - 1) / SPACING).astype(int), 0)
            hi = np.minimum(((pos + radius + 1) / SPACING).astype(int) + 1, SHAPE)
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            vessel[box] |= ((zz[box] - pos[0]) ** 2 + (yy[box] - pos[1]) ** 2
                            + (xx[box] - pos[2]) ** 2 < radius**2)
            radius = max(0.6, radius * 0.985)
    return vessel


def _nodules(rng, zz, yy, xx, lungs, volume) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    extent = np.array(SHAPE) * SPACING
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        u = rng.uniform()
        diameter = (rng.uniform(3, 10) if u < 0.7 else
                    rng.uniform(10, 20) if u < 0.95 else rng.uniform(20, 30))
        for _ in range(50):  # a centre inside a lung
            centre = [rng.uniform(4, extent[0] - 4), rng.uniform(0, extent[1]),
                      rng.uniform(0, extent[2])]
            if lungs[tuple((np.array(centre) / SPACING).astype(int))]:
                break
        axes = diameter / 2 * rng.uniform(0.8, 1.2, 3)
        inside = (((zz - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2
                  + ((xx - centre[2]) / axes[2]) ** 2 < 1)
        label[inside] = 1
        volume[inside] = rng.uniform(-60, 60)
    return label


def patient(rng) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, label uint8), both (slices, rows, columns)."""
    from scipy import ndimage

    zz, yy, xx = _grid()
    cy, cx = SHAPE[1] * SPACING[1] / 2, SHAPE[2] * SPACING[2] / 2
    volume = np.full(SHAPE, -1000.0, np.float32)
    volume[_ellipse(yy, xx, cy, cx, 0.45 * 2 * cy, 0.47 * 2 * cx)] = 35
    lungs = np.zeros(SHAPE, bool)
    for side in (-1, 1):
        lungs |= _ellipse(yy, xx, cy + rng.uniform(-5, 5), cx + side * 0.44 * cx,
                          0.66 * cy, 0.34 * cx)
    parenchyma = ndimage.gaussian_filter(rng.normal(0, 60, SHAPE).astype(np.float32), 2)
    volume[lungs] = -860 + parenchyma[lungs]
    volume[_vessels(rng, zz, yy, xx) & lungs] = 20
    label = _nodules(rng, zz, yy, xx, lungs, volume)
    volume = ndimage.gaussian_filter(volume, (0.5, 0.8, 0.8))
    volume += rng.normal(0, 25, SHAPE).astype(np.float32)
    return np.round(volume).astype(np.int16), label


def main(out: str, patients: int, seed: int) -> None:
    import nibabel as nib

    out = Path(out)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    # NIfTI holds (x, y, z) in RAS: negative x and y steps put DICOM's LPS axes in it
    affine = np.diag([-SPACING[2], -SPACING[1], SPACING[0], 1.0])
    training = []
    for p in range(patients):
        volume, label = patient(rng)
        name = f"phantom_{p:03d}"
        for folder, array in (("imagesTr", volume), ("labelsTr", label)):
            nib.save(nib.Nifti1Image(array.transpose(2, 1, 0), affine),
                     out / folder / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz",
                         "label": f"./labelsTr/{name}.nii.gz"})
        print(f"{name}: {int(label.sum())} nodule voxels", flush=True)
    (out / "dataset.json").write_text(json.dumps(
        {"name": "foreign phantom", "modality": {"0": "CT"},
         "labels": {"0": "background", "1": "nodule"}, "numTraining": patients,
         "training": training, "test": []}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

"""Drawing one slice of a synthetic patient: HU, the nodule mask and the tissue labels.

Per patient, the parts that do not change along the body are computed once on the pixel
grid (`Frame`: the chest wall's layers, the pleura's depth, the lungs' front-to-back
shading, two texture fields). Per slice: tissue labels from the analytic shapes at that
height, HU from the labels, then the tubes' sections (scars, vessels, airways, bones)
mixed in by the share of each pixel they cover, the fissures, the nodules, texture, the
scanner's blur and noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nodulekit.data.synth_anatomy import TEXTURE, Patient, Tissue
from nodulekit.data.synth_geometry import (
    dome,
    heart_coords,
    heart_scale,
    mediastinum,
    under_apex,
    wall,
)
from nodulekit.data.synth_nodules import Canvas, paint_nodules
from nodulekit.data.synth_skeleton import ARCH_MM, CANAL_MM, CORTEX_MM, canal_y
from nodulekit.data.synth_tubes import Tubes, blend, coverage, section

HU_MIN, HU_MAX = -1024, 3071  # what a 12-bit CT scanner stores
PSF_MM = 0.45  # the scanner's blur (sigma)
TEXTURE_MM = 2.5  # grain of the tissues' texture
# Texture amplitude (HU) per tissue.
TEXTURE_HU = {Tissue.LUNG: 14.0, Tissue.FAT: 10.0, Tissue.MEDIASTINAL_FAT: 10.0,
              Tissue.MUSCLE: 14.0, Tissue.SOFT: 6.0, Tissue.LIVER: 5.0, Tissue.SPLEEN: 5.0,
              Tissue.MARROW: 45.0, Tissue.MYOCARDIUM: 4.0, Tissue.SCAR: 20.0}


@dataclass(frozen=True)
class Frame:
    """A patient's slice-independent fields on the pixel grid."""

    mm: np.ndarray  # pixel centres, mm (rows and columns alike)
    labels: np.ndarray  # uint8: air, skin, fat, muscle; the cavity as SOFT
    cavity: np.ndarray  # float32 mm inside the pleura (negative in the wall and outside)
    inside: np.ndarray  # flat bool: cavity >= 0
    box: tuple[slice, slice]  # the cavity's bounding box
    shade: np.ndarray  # float32 0 at the lungs' front to 1 at their back, in the box
    textures: tuple[np.ndarray, np.ndarray]  # two smooth unit-variance fields


def frame(patient: Patient, seed: int) -> Frame:
    grid, chest = patient.grid, patient.chest
    mm = grid.mm()
    layers = wall(chest, mm[None, :].astype(np.float64), mm[:, None].astype(np.float64))
    labels = np.full((grid.size, grid.size), Tissue.AIR, dtype=np.uint8)
    labels[layers.depth >= 0] = Tissue.SKIN
    labels[layers.depth >= chest.skin] = Tissue.FAT
    labels[layers.depth >= layers.fat] = Tissue.MUSCLE
    labels[layers.cavity >= 0] = Tissue.SOFT
    cavity = layers.cavity.astype(np.float32)
    rows, cols = np.flatnonzero((cavity >= 0).any(axis=1)), np.flatnonzero((cavity >= 0).any(0))
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    y = mm[box[0]][:, None]
    front, back = chest.front_y, chest.spine[1]
    shade = np.broadcast_to(np.clip((y - front) / (back - front), 0.0, 1.0),
                            (box[0].stop - box[0].start, box[1].stop - box[1].start))
    rng = np.random.default_rng([seed, patient.index, TEXTURE, 0])
    cell = max(1.0, TEXTURE_MM / grid.spacing)
    textures = (_smooth_noise(rng, grid.size, cell), _smooth_noise(rng, grid.size, cell))
    return Frame(mm, labels, cavity, (cavity >= 0).reshape(-1), box, shade.astype(np.float32),
                 textures)


def render(patient: Patient, fr: Frame, k: int, rng: np.random.Generator,
           want_labels: bool = False):
    """(HU int16, mask uint8 {0,1}) of slice k, and the tissue labels if asked for."""
    z = float(patient.z[k])
    labels = fr.labels.copy()
    lung = _regions(patient, fr, labels, z)
    _heart(patient, fr, labels, z)
    _spine(patient, fr, labels, z)
    image = patient.hu[labels]
    rows, cols = fr.box
    image[rows, cols] += lung * (patient.lung_shade_hu * fr.shade)
    flat_image, flat_labels = image.reshape(-1), labels.reshape(-1)
    _tubes(patient, z, flat_image, flat_labels, fr.inside)
    _fissures(patient, fr, image, labels, z)
    mask = np.zeros_like(labels)
    canvas = Canvas(patient.grid, fr.mm, image, mask, labels, fr.cavity, z)
    paint_nodules(patient.nodules, canvas, Tissue.NODULE)
    _texture(patient, fr, image, labels, z)
    image = _scanner(patient, image, rng)
    hu = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.int16)
    return (hu, mask, labels) if want_labels else (hu, mask)


def _regions(patient: Patient, fr: Frame, labels: np.ndarray, z: float) -> np.ndarray:
    """Label the mediastinum, the liver and spleen under the diaphragm and the lungs at
    height z, within the cavity's box; returns the lungs there (float32 0/1)."""
    chest = patient.chest
    t = chest.t_of(z)
    rows, cols = fr.box
    x, y = fr.mm[cols][None, :], fr.mm[rows][:, None]
    depth = fr.cavity[rows, cols]
    part = labels[rows, cols]
    inside = depth >= 0
    middle = mediastinum(chest, x, y, t) & inside
    liver = dome(chest, 0, x, y, t) & inside & ~middle
    spleen = dome(chest, 1, x, y, t) & inside & ~middle & ~liver
    part[middle] = Tissue.MEDIASTINAL_FAT
    part[liver] = Tissue.LIVER
    part[spleen] = Tissue.SPLEEN
    if not 0.0 < t < 1.0:
        return np.zeros(depth.shape, dtype=np.float32)
    lung = inside & under_apex(chest, x, y, t) & ~middle & ~liver & ~spleen
    part[lung] = Tissue.LUNG
    return lung.astype(np.float32)


def _heart(patient: Patient, fr: Frame, labels: np.ndarray, z: float) -> None:
    """The heart's muscle and, inside it, the four chambers' blood."""
    chest = patient.chest
    t = chest.t_of(z)
    h = float(heart_scale(chest, t))
    if h <= 0:
        return
    hx, hy, hax, hay, _, _ = chest.heart
    rows, cols = patient.grid.window(hx, hy, max(hax, hay) * h + 1.0)
    u, v = heart_coords(chest, fr.mm[cols][None, :], fr.mm[rows][:, None])
    u, v = u / (hax * h), v / (hay * h)
    part = labels[rows, cols]
    part[(u * u + v * v <= 1.0) & (fr.cavity[rows, cols] >= 0)] = Tissue.MYOCARDIUM
    chambers = (((u - 0.3) / 0.38) ** 2 + ((v - 0.12) / 0.45) ** 2 <= 1.0)  # left ventricle
    chambers |= ((u + 0.05) / 0.45) ** 2 + ((v + 0.5) / 0.3) ** 2 <= 1.0  # right ventricle
    if t < chest.heart[5] + 0.25:  # the atria, in the heart's upper part
        chambers |= ((u + 0.55) / 0.33) ** 2 + ((v - 0.05) / 0.4) ** 2 <= 1.0
        chambers |= ((u + 0.1) / 0.35) ** 2 + ((v - 0.62) / 0.28) ** 2 <= 1.0
    part[chambers & (u * u + v * v <= 0.85)] = Tissue.BLOOD


def _spine(patient: Patient, fr: Frame, labels: np.ndarray, z: float) -> None:
    """The vertebral body (or the disc between two), the bony arch around the spinal
    canal (away from the discs) and the canal."""
    sx, sy, rx, ry = patient.chest.spine
    spine = patient.skeleton.spine
    cy = canal_y(patient.chest) - sy
    reach = CANAL_MM + ARCH_MM
    rows, cols = patient.grid.window(sx, sy + 0.5 * cy, max(rx, cy + reach) + 1.0)
    x, y = fr.mm[cols][None, :] - sx, fr.mm[rows][:, None] - sy
    part = labels[rows, cols]
    body = (x / rx) ** 2 + (y / ry) ** 2 <= 1.0
    phase = (spine.top - z) % spine.level
    if phase > spine.level - spine.disc:
        part[body] = Tissue.DISC
    else:
        part[body] = Tissue.CORTEX
        inner = (x / (rx - 0.8)) ** 2 + (y / (ry - 0.8)) ** 2 <= 1.0  # a thin cortex
        part[inner] = Tissue.MARROW
    canal = x * x + (y - cy) ** 2
    if 0.1 * spine.level < phase < spine.level - spine.disc - 2.0:
        arch = (canal <= reach * reach) & (y >= cy - 0.3 * CANAL_MM)
        arch |= (np.abs(x) >= CANAL_MM - 1.0) & (np.abs(x) <= reach) & (y >= 0.5 * ry) & (y <= cy)
        part[arch] = Tissue.CORTEX
    part[canal <= CANAL_MM * CANAL_MM] = Tissue.CANAL


def _tubes(patient: Patient, z: float, image: np.ndarray, labels: np.ndarray,
           in_cavity: np.ndarray) -> None:
    """Scars, vessels, airways (wall, then lumen), bones (cortex, then marrow), cartilage."""
    grid, hu = patient.grid, patient.hu
    pad = grid.spacing

    def draw(t: Tubes, shrink: float, tissue: Tissue, where: np.ndarray | None = None,
             grow: float = 0.0):
        s = section(t, z, grid, pad + grow)
        if s.index.size == 0:
            return
        radius = t.r[s.segment] - shrink + grow
        cover = coverage(s.distance, np.maximum(radius, 0.0), grid.spacing)
        if where is not None:
            cover = cover * where[s.index]
        used = blend(image, s.index, cover, float(hu[tissue]))
        labels[s.index[used > 0.5]] = tissue

    draw(patient.scars, 0.0, Tissue.SCAR, labels == Tissue.LUNG)
    draw(patient.vessels, 0.0, Tissue.BLOOD, in_cavity)
    wall_mm = 0.6 + 0.15 * float(np.median(patient.airways.r))
    draw(patient.airways, 0.0, Tissue.AIRWAY_WALL, in_cavity, grow=wall_mm)
    draw(patient.airways, 0.0, Tissue.AIRWAY, in_cavity)
    bones = patient.skeleton
    draw(bones.bone, 0.0, Tissue.CORTEX)
    draw(bones.bone, CORTEX_MM, Tissue.MARROW)
    draw(bones.cartilage, 0.0, Tissue.CARTILAGE)


def _fissures(patient: Patient, fr: Frame, image: np.ndarray, labels: np.ndarray,
              z: float) -> None:
    """Thin lines across each lung where its lobes meet."""
    chest = patient.chest
    t = chest.t_of(z)
    rows, cols = fr.box
    x, y = fr.mm[cols][None, :], fr.mm[rows][:, None]
    half = chest.body[2]
    for f in patient.fissures:
        if not f.t_top < t < 1.0:
            continue
        q = (t - f.t_top) / (1.0 - f.t_top)
        line = f.y_back + q * (f.y_front - f.y_back)
        side = (x - chest.mid_x) * f.side > 0
        along = line + f.bend * np.abs(x - chest.mid_x) / half
        slope = f.bend / half
        cover = coverage(np.abs(y - along) / math.sqrt(1 + slope * slope), 0.3,
                         patient.grid.spacing)
        cover *= (labels[rows, cols] == Tissue.LUNG) & side
        part = image[rows, cols]
        part += cover * (f.hu - part)


def _texture(patient: Patient, fr: Frame, image: np.ndarray, labels: np.ndarray,
             z: float) -> None:
    """Tissue texture that drifts smoothly along the body."""
    amplitude = np.zeros(len(Tissue), dtype=np.float32)
    for tissue, hu in TEXTURE_HU.items():
        amplitude[tissue] = hu
    angle = z / 3.0
    a, b = fr.textures
    mix = np.float32(math.cos(angle)) * a + np.float32(math.sin(angle)) * b
    mix *= np.take(amplitude, labels)
    image += mix


def _scanner(patient: Patient, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur by the point spread (where a pixel is finer than it) and add correlated noise."""
    ps = patient.grid.spacing
    weight = min(0.3, 0.5 * (PSF_MM / ps) ** 2)  # the 3-tap kernel's variance is 2 * weight
    sigma = patient.noise_hu * float(np.clip(0.7 / ps, 0.25, 1.2))
    gain = 1.0 - 4.0 * weight + 6.0 * weight * weight  # per axis: a^2 + (1-2a)^2 + a^2
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += (sigma / gain) * noise
    if weight < 0.01:
        return image
    return _blur(_blur(image, weight, 0), weight, 1)


def _blur(a: np.ndarray, w: float, axis: int) -> np.ndarray:
    a = np.moveaxis(a, axis, 0)
    out = a * (1.0 - 2.0 * w)
    out[1:] += w * a[:-1]
    out[:-1] += w * a[1:]
    out[0] += w * a[0]
    out[-1] += w * a[-1]
    return np.moveaxis(out, 0, axis)


def _smooth_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Unit-variance-ish noise varying over about `cell` pixels (bilinear upsampling)."""
    n = int(size / cell) + 2
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    pos = np.arange(size, dtype=np.float32) / cell
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    rows = coarse[i0] * (1.0 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    field = rows[:, i0] * (1.0 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return np.ascontiguousarray(field / max(float(field.std()), 1e-6), dtype=np.float32)


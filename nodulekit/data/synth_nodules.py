"""Synthetic nodules: how many, how big (the paper's Table 3), of which kind, where, and
how they look in a slice.

Kinds: solid (soft tissue), part-solid (a ground-glass halo around a solid core) and
ground-glass (hazy, vessels show through). Shapes are spheres made slightly ellipsoidal
and, for some, lobulated. Some nodules touch the chest wall (juxta-pleural), some sit on a
vessel; the rest lie free in a lung. The mask covers the nodule only, never the vessel or
the wall it touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nodulekit.data.synth_geometry import Chest, in_lung, wall
from nodulekit.data.synth_tubes import Grid, Tubes, coverage

# Table 3 of the paper, all splits: nodules per diameter bin; bins' ranges in mm.
TABLE3_COUNTS = (177, 7417, 2172, 305)
TABLE3_RANGES = ((1.0, 3.0), (3.0, 10.0), (10.0, 30.0), (30.0, 136.0))
KINDS = ("solid", "part-solid", "ground-glass")
KIND_SHARES = (0.75, 0.12, 0.13)
PLEURA_SHARE, VESSEL_SHARE = 0.2, 0.2  # of the nodules under 30 mm
ATTEMPTS = 30


@dataclass(frozen=True)
class SynthNodule:
    patient: int
    center_mm: tuple[float, float, float]  # (x, y, z): columns, rows, along the body
    diameter_mm: float
    hu: float  # of the solid part; of the halo for ground-glass and part-solid nodules
    kind: str = "solid"  # one of KINDS
    attached: str = ""  # "pleura" (juxta-pleural), "vessel" or "" (free in the lung)


@dataclass(frozen=True)
class NodulePlan:
    diameter: float
    kind: str
    attached: str


@dataclass(frozen=True)
class NoduleShape:
    """A nodule and what draws it: a sphere of radius r scaled by
    1 + stretch * P2(u . axes[0]) + lobe * Re((u . axes[1] + i u . axes[2]) ** lobes)."""

    nodule: SynthNodule
    axes: tuple[tuple[float, float, float], ...]
    stretch: float
    lobes: int
    lobe: float
    core: float  # radius of the solid core as a fraction of r (part-solid), else 0
    core_hu: float
    waves: tuple[tuple[float, float, float, float], ...]  # texture: kx, ky, kz, phase
    texture_hu: float

    @property
    def reach(self) -> float:
        return 0.5 * self.nodule.diameter_mm * (1.0 + abs(self.stretch) + self.lobe)


def plan_nodules(rng: np.random.Generator, max_count: int) -> list[NodulePlan]:
    """How many nodules a patient has (1 + Poisson(1.2), capped), their diameters (Table
    3's bins, log-uniform within a bin), kinds and attachments."""
    shares = np.asarray(TABLE3_COUNTS, dtype=float) / sum(TABLE3_COUNTS)
    count = 1 + min(int(rng.poisson(1.2)), max_count - 1)
    plans = []
    for _ in range(count):
        lo, hi = TABLE3_RANGES[int(rng.choice(len(shares), p=shares))]
        diameter = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_SHARES))]
        u = rng.random()
        attached = "pleura" if u < PLEURA_SHARE else "vessel" if u < PLEURA_SHARE + VESSEL_SHARE \
            else ""
        if diameter >= 30.0:
            kind, attached = "solid", ""
        plans.append(NodulePlan(diameter, kind, attached))
    return plans


@dataclass(frozen=True)
class Site:
    """What placement needs to know of a patient."""

    patient: int
    chest: Chest
    z: np.ndarray  # slice positions
    grid: Grid
    vessels: Tubes


def place_nodules(rng: np.random.Generator, plans: list[NodulePlan],
                  site: Site) -> tuple[NoduleShape, ...]:
    """Each planned nodule centred on a slice and a pixel (so it always shows), inside a
    lung, apart from the others; one that finds no place after `ATTEMPTS` is dropped."""
    t = site.chest.t_of(site.z)
    levels = np.flatnonzero((t > 0.04) & (t < 0.96))
    if levels.size == 0:
        return ()
    out: list[NoduleShape] = []
    for plan in plans:
        r = 0.5 * plan.diameter
        for attempt in range(ATTEMPTS):
            z = float(site.z[int(rng.choice(levels))])
            how = plan.attached if attempt < ATTEMPTS // 2 else ""
            spot = _candidate(rng, plan, how, site, z, relax=attempt / ATTEMPTS)
            if spot is None:
                continue
            x, y = (site.grid.origin + site.grid.spacing * np.rint(site.grid.index(spot)))
            if not in_lung(site.chest, np.array(x), np.array(y), np.array(z)):
                continue
            if any(math.dist((x, y, z), s.nodule.center_mm) <= r + s.reach
                   + 2 * site.grid.spacing for s in out):
                continue
            nodule = SynthNodule(site.patient, (float(x), float(y), z), plan.diameter, 0.0,
                                 plan.kind, how)
            out.append(_shape(rng, nodule))
            break
    return tuple(out)


def _candidate(rng, plan: NodulePlan, how: str, site: Site, z: float, relax: float):
    """A centre (x, y) at level z for `plan`, or None."""
    chest, r = site.chest, 0.5 * plan.diameter
    if how == "vessel":
        return _on_vessel(rng, r, site, z)
    cx, cy, ax, ay_front, ay_back, _ = chest.body
    n = 256
    x = rng.uniform(cx - ax, cx + ax, n)
    y = rng.uniform(cy - ay_front, cy + ay_back, n)
    if how == "pleura":
        depth = wall(chest, x, y).cavity
        ok = in_lung(chest, x, y, z) & (depth >= 0.75 * r) & (depth <= r + 0.5)
    else:
        margin = min(r + 1.0, 25.0) * (1.0 - relax)
        ok = in_lung(chest, x, y, z, margin)
        for dz in (-0.8 * min(r, 25.0), 0.8 * min(r, 25.0)):
            ok &= in_lung(chest, x, y, np.full(n, z + dz), 0.0)
    found = np.flatnonzero(ok)
    if found.size == 0:
        return None
    i = int(rng.choice(found))
    return x[i], y[i]


def _on_vessel(rng, r: float, site: Site, z: float):
    """A centre touching a vessel that crosses level z (its radius 0.7 to 3 mm)."""
    v = site.vessels
    d = v.b - v.a
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (z - v.a[:, 2]) / d[:, 2]
    ok = (u >= 0) & (u <= 1) & (v.r >= 0.7) & (v.r <= 3.0)
    ok &= np.abs(d[:, 2]) > 0.3 * np.linalg.norm(d, axis=1)  # crossing, not lying in the slice
    found = np.flatnonzero(ok)
    if found.size == 0:
        return None
    i = int(rng.choice(found))
    px, py = v.a[i, :2] + u[i] * d[i, :2]
    angle = rng.uniform(0.0, 2 * math.pi)
    gap = r + 0.4 * v.r[i]
    x, y = px + gap * math.cos(angle), py + gap * math.sin(angle)
    if not in_lung(site.chest, np.array(x), np.array(y), np.array(z), 0.3 * r):
        return None
    return x, y


def _shape(rng, nodule: SynthNodule) -> NoduleShape:
    axes, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    big = nodule.diameter_mm >= 10.0
    lobed = rng.random() < (0.6 if big else 0.3)
    if nodule.kind == "solid":
        hu, core, core_hu = rng.uniform(10.0, 60.0), 0.0, 0.0
    elif nodule.kind == "part-solid":
        hu, core, core_hu = rng.uniform(-650.0, -400.0), rng.uniform(0.3, 0.6), \
            rng.uniform(0.0, 50.0)
    else:
        hu, core, core_hu = rng.uniform(-720.0, -450.0), 0.0, 0.0
    waves = tuple((*(rng.standard_normal(3) * 2.0), rng.uniform(0, 2 * math.pi))
                  for _ in range(3))
    record = SynthNodule(nodule.patient, nodule.center_mm, nodule.diameter_mm,
                         float(round(hu, 1)), nodule.kind, nodule.attached)
    return NoduleShape(record, tuple(tuple(map(float, row)) for row in axes.T),
                       stretch=float(rng.uniform(-0.12, 0.12)),
                       lobes=int(rng.integers(3, 6)),
                       lobe=float(rng.uniform(0.04, 0.1)) if lobed else 0.0,
                       core=float(core), core_hu=float(core_hu), waves=waves,
                       texture_hu=10.0 if nodule.kind == "solid" else 40.0)


@dataclass
class Canvas:
    """One slice being drawn: HU (float32), nodule mask, tissue labels, cavity depth."""

    grid: Grid
    mm: np.ndarray
    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    cavity: np.ndarray
    z: float


def paint_nodules(shapes: tuple[NoduleShape, ...], canvas: Canvas, label: int) -> None:
    """Draw the nodules that reach the canvas's slice, and set their mask."""
    for shape in shapes:
        n = shape.nodule
        cx, cy, cz = n.center_mm
        dz = canvas.z - cz
        if abs(dz) > shape.reach:
            continue
        rows, cols = canvas.grid.window(cx, cy, shape.reach + canvas.grid.spacing)
        x, y = canvas.mm[cols][None, :] - cx, canvas.mm[rows][:, None] - cy
        dist, radius = _radius(shape, x, y, dz)
        wall_free = canvas.cavity[rows, cols] >= 0
        inside = (dist <= radius) & wall_free
        if dz == 0:  # a nodule smaller than a pixel still marks its centre pixel
            i, j = np.rint(canvas.grid.index([cy, cx])).astype(int)
            if rows.start <= i < rows.stop and cols.start <= j < cols.stop:
                inside[i - rows.start, j - cols.start] = True
        cover = np.maximum(coverage(dist, radius, canvas.grid.spacing) * wall_free, inside)
        value = np.full(dist.shape, n.hu, dtype=np.float32)
        if shape.core:
            solid = coverage(dist, shape.core * radius, canvas.grid.spacing)
            value += solid * (shape.core_hu - n.hu)
        value += shape.texture_hu * _waves(shape, x, y, dz)
        old = canvas.image[rows, cols]
        # The larger of nodule and what lies beneath: vessels show through ground glass.
        canvas.image[rows, cols] = np.maximum(old, old + cover * (value - old))
        canvas.mask[rows, cols] |= inside.astype(np.uint8)
        canvas.labels[rows, cols][inside] = label


def _radius(shape: NoduleShape, x, y, dz):
    """Distance from the centre and the surface's distance along the same direction."""
    dist = np.sqrt(x * x + y * y + dz * dz)
    safe = np.where(dist > 0, dist, 1.0)
    p = [(e[0] * x + e[1] * y + e[2] * dz) / safe for e in shape.axes]
    scale = 1.0 + shape.stretch * (1.5 * p[0] ** 2 - 0.5)
    if shape.lobe:
        scale = scale + shape.lobe * ((p[1] + 1j * p[2]) ** shape.lobes).real
    return dist.astype(np.float32), (0.5 * shape.nodule.diameter_mm * scale).astype(np.float32)


def _waves(shape: NoduleShape, x, y, dz):
    """A smooth texture in [-1, 1], fixed in 3-D so neighbouring slices agree."""
    total = sum(np.cos(kx * x + ky * y + kz * dz + phase)
                for kx, ky, kz, phase in shape.waves)
    return (total / len(shape.waves)).astype(np.float32)

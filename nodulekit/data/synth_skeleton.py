"""The bones of the synthetic chest as tubes: ribs and their cartilages, the sternum, the
scapulae and the vertebrae's arches and processes (the vertebral bodies and discs are drawn
per slice by the renderer, from `Spine`).

Ribs leave the spine, follow the chest wall just outside the pleura and descend towards the
front, so an axial slice cuts each rib obliquely into an elongated oval, and the ovals move
around the wall from slice to slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nodulekit.data.synth_geometry import Chest, outline_radius, wall
from nodulekit.data.synth_tubes import Tubes, join, polyline, tubes

CORTEX_MM = 1.2  # cortical bone around the marrow
CANAL_MM = 7.0  # the spinal canal's radius
CANAL_GAP_MM = 8.0  # from the vertebral body's back to the canal's centre
ARCH_MM = 4.0  # thickness of the bony arch around the canal


@dataclass(frozen=True)
class Spine:
    top: float  # z of the first vertebra's upper end plate
    level: float  # mm from one vertebra to the next
    disc: float  # disc height, mm


@dataclass(frozen=True)
class Skeleton:
    bone: Tubes  # cortex at the radius, marrow inside
    cartilage: Tubes
    spine: Spine


def wall_points(chest: Chest, side: int, phi, z, muscle_share: float = 1.0,
                extra: float | None = None) -> np.ndarray:
    """Points in the chest wall, (n, 3): `phi` radians around from the back (0) to the
    front (pi) on `side` (-1 right, +1 left), at height z, below the fat and
    `muscle_share` of the muscle, then `extra` mm deeper (default: half the rib zone)."""
    phi = np.atleast_1d(np.asarray(phi, dtype=np.float64))
    theta = math.pi / 2 - side * phi
    c, s = np.cos(theta), np.sin(theta)
    cx, cy = chest.body[:2]
    layers = wall(chest, cx + c, cy + s)  # the layers depend on the direction only
    depth = layers.fat + muscle_share * layers.muscle
    depth = depth + (0.5 * chest.rib_zone if extra is None else extra)
    r = outline_radius(chest, theta) - depth
    return np.stack([cx + r * c, cy + r * s, np.broadcast_to(z, phi.shape)], axis=1)


def ribs(rng: np.random.Generator, chest: Chest) -> tuple[Tubes, Tubes]:
    """Twelve ribs a side (bone) and the costal cartilages of the first ten."""
    spacing, drop = rng.uniform(20.0, 25.0), rng.uniform(100.0, 140.0)
    first = chest.z_of(rng.uniform(-0.1, -0.04))
    radius = rng.uniform(3.2, 4.2)
    sx, sy, rx, ry = chest.spine
    bone, cartilage = [], []
    for side in (-1, 1):
        for i in range(12):
            z0 = first - i * spacing + rng.normal(0.0, 1.5)
            end = 2.45 if i < 7 else 2.2 if i < 10 else 1.7

            def path(phis, z0=z0, side=side):
                return wall_points(chest, side, phis, z0 - drop * (phis / math.pi) ** 1.3)

            joint = (sx + side * (rx + 4.0), sy + 0.5 * ry, z0 + 3.0)
            r = radius * (0.8 if i == 0 else 1.0)
            bone.append(polyline([joint, *path(np.linspace(0.3, end, 14))], r))
            if i < 10:
                stop = 2.95 if i < 7 else 2.65
                cartilage.append(polyline(path(np.linspace(end, stop, 5)), 0.9 * r))
    return join(*bone), join(*cartilage)


def scapulae(rng: np.random.Generator, chest: Chest) -> Tubes:
    """Two thin bone plates in the upper back, outside the ribs: a line in each slice."""
    top, bottom = chest.z_of(-0.1), chest.z_of(rng.uniform(0.38, 0.46))
    z = np.arange(bottom, top, 1.0)
    q = (top - z) / (top - bottom)  # 0 at the top, 1 at the tip
    a, b = [], []
    for side in (-1, 1):
        inner, outer = rng.uniform(0.5, 0.65), rng.uniform(1.1, 1.3)
        lo = inner + (outer - inner) * 0.5 * q
        hi = outer - (outer - inner) * 0.45 * q
        mid = 0.5 * (lo + hi)
        for phi0, phi1 in ((lo, mid), (mid, hi)):
            a.append(wall_points(chest, side, phi0, z, 0.5, 2.0))
            b.append(wall_points(chest, side, phi1, z, 0.5, 2.0))
    return tubes(np.concatenate(a), np.concatenate(b), rng.uniform(1.4, 1.9))


def sternum(rng: np.random.Generator, chest: Chest) -> Tubes:
    """Three vertical bars side by side: one flat oval of bone behind the front wall."""
    y = chest.front_y - 0.5 * chest.rib_zone
    top, bottom = chest.z_of(-0.08), chest.z_of(rng.uniform(0.8, 0.9))
    x = chest.mid_x + np.array([-5.0, 0.0, 5.0])
    return tubes([(v, y, top) for v in x], [(v, y, bottom) for v in x], rng.uniform(5.0, 6.5))


def canal_y(chest: Chest) -> float:
    sx, sy, rx, ry = chest.spine
    return sy + ry + CANAL_GAP_MM


def vertebrae(rng: np.random.Generator, chest: Chest) -> tuple[Tubes, Spine]:
    """Each vertebra's spinous and transverse processes, sloping down (the body and the
    arch around the canal are drawn per slice)."""
    sx = chest.spine[0]
    spine = Spine(top=chest.z_of(-0.35), level=rng.uniform(22.0, 27.0),
                  disc=rng.uniform(4.0, 6.0))
    canal = canal_y(chest)
    reach = CANAL_MM + ARCH_MM
    a, b, r = [], [], []
    z = spine.top
    while z > chest.z_of(1.25):
        zc = z - 0.5 * spine.level
        for side in (-1, 1):
            a.append((sx + side * reach, canal, zc + 2.0))
            b.append((sx + side * (reach + 16.0), canal + 8.0, zc - 2.0))
            r.append(3.5)
        a.append((sx, canal + reach - 1.0, zc))
        b.append((sx, canal + reach + 24.0, zc - 18.0))
        r.append(3.5)
        z -= spine.level
    return tubes(a, b, r), spine


def skeleton(rng: np.random.Generator, chest: Chest) -> Skeleton:
    rib_bone, cartilage = ribs(rng, chest)
    arches, spine = vertebrae(rng, chest)
    bone = join(rib_bone, scapulae(rng, chest), sternum(rng, chest), arches)
    return Skeleton(bone, cartilage, spine)

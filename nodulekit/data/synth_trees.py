"""Branching trees of tubes that fill the lungs: pulmonary arteries, veins and airways.

A tree grows from its root towards a cloud of points spread through one lung: each branch
heads a fraction of the way to the centre of the points it supplies, then splits them in
two across their longest axis, one half per child, until a branch supplies one point and
ends there. The branches so fill the lung from the hilum outwards, thick near the root and
thinner towards the periphery (radius from the number of points supplied, Murray's law).
"""

from __future__ import annotations

import numpy as np

from nodulekit.data.synth_geometry import Chest, in_lung
from nodulekit.data.synth_tubes import Tubes, join, polyline, tubes

MAX_GENERATIONS = 64


def lung_points(rng: np.random.Generator, chest: Chest, side: int, n: int,
                margin: float) -> np.ndarray:
    """`n` points spread uniformly through one lung (side -1 right, +1 left), at least
    `margin` mm inside the pleura: (n, 3) x, y, z."""
    cx, cy, ax, ay_front, ay_back, _ = chest.body
    x_lo, x_hi = (cx - ax, chest.mid_x) if side < 0 else (chest.mid_x, cx + ax)
    found: list[np.ndarray] = []
    have = 0
    for _ in range(50):
        m = 4 * n
        p = np.stack([rng.uniform(x_lo, x_hi, m), rng.uniform(cy - ay_front, cy + ay_back, m),
                      chest.z_of(rng.uniform(0.0, 1.0, m))], axis=1)
        p = p[in_lung(chest, p[:, 0], p[:, 1], p[:, 2], margin)]
        found.append(p)
        have += len(p)
        if have >= n:
            break
    return np.concatenate(found)[:n]


def grow_tree(rng: np.random.Generator, root, points: np.ndarray, leaf_radius: float,
              exponent: float = 2.7) -> Tubes:
    """A tree from `root` whose branches end at every one of `points`."""
    pts = np.asarray(points, dtype=np.float64)
    group = np.zeros(len(pts), dtype=np.int64)
    starts = np.asarray(root, dtype=np.float64).reshape(1, 3)
    a, b, r = [], [], []
    for _ in range(MAX_GENERATIONS):
        if len(pts) == 0:
            break
        g = len(starts)
        n = np.bincount(group, minlength=g)
        centre = np.stack([np.bincount(group, pts[:, k], g) for k in range(3)], axis=1)
        centre /= np.maximum(n, 1)[:, None]
        leaf = n <= 1
        reach = rng.uniform(0.35, 0.5, g)[:, None]
        end = np.where(leaf[:, None], centre, starts + reach * (centre - starts))
        a.append(starts)
        b.append(end)
        r.append(leaf_radius * np.maximum(n, 1) ** (1.0 / exponent))
        keep = ~leaf[group]
        pts, group = pts[keep], group[keep]
        if len(pts) == 0:
            break
        offset = pts - centre[group]
        spread = np.zeros((g, 3, 3))
        for i in range(3):
            for j in range(i, 3):
                spread[:, i, j] = spread[:, j, i] = np.bincount(
                    group, offset[:, i] * offset[:, j], g)
        axis = np.linalg.eigh(spread)[1][:, :, -1]  # the direction of largest spread
        side = np.einsum("ij,ij->i", offset, axis[group]) > 0
        key, group = np.unique(group * 2 + side, return_inverse=True)
        starts = end[key // 2]
    return tubes(np.concatenate(a), np.concatenate(b), np.concatenate(r))


def hila(chest: Chest, rng: np.random.Generator) -> np.ndarray:
    """Where the pulmonary arteries enter the right and the left lung: (2, 3)."""
    cy, half, _, w_arch, _ = chest.mediastinum
    t = rng.uniform(0.36, 0.44)
    return np.array([[chest.mid_x - w_arch - 6.0, cy + rng.uniform(0.0, 12.0), chest.z_of(t)],
                     [chest.mid_x + w_arch + 4.0, cy + rng.uniform(0.0, 12.0),
                      chest.z_of(t - rng.uniform(0.0, 0.04))]])


def atrium(chest: Chest) -> np.ndarray:
    """The left atrium, where the pulmonary veins end."""
    hx, hy, hax, hay, _, top = chest.heart
    return np.array([hx - 0.3 * hax, hy + 0.75 * hay, chest.z_of(top + 0.1)])


def lung_vessels(rng: np.random.Generator, chest: Chest, hilum: np.ndarray,
                 points_per_tree: int) -> Tubes:
    """Arteries from the hila and veins to the left atrium, one tree of each per lung."""
    la = atrium(chest)
    parts = []
    for k, side in enumerate((-1, 1)):
        leaf = rng.uniform(0.45, 0.55)
        targets = lung_points(rng, chest, side, points_per_tree, margin=3.0)
        parts.append(grow_tree(rng, hilum[k], targets, leaf))
        vein_root = la + np.array([side * 22.0, 0.0, rng.uniform(-8.0, 8.0)])
        targets = lung_points(rng, chest, side, points_per_tree, margin=3.0)
        parts.append(grow_tree(rng, vein_root, targets, leaf * rng.uniform(0.95, 1.1)))
    return join(*parts)


def great_vessels(rng: np.random.Generator, chest: Chest, hilum: np.ndarray) -> Tubes:
    """The aorta and its branches, the superior vena cava, the pulmonary trunk and
    arteries to the hila, and the oesophagus (soft tissue like them)."""
    z = chest.z_of
    mx = chest.mid_x
    cy, half, _, w_arch, _ = chest.mediastinum
    hx, hy, hax, hay, _, top = chest.heart
    ao_x, ao_y, r_ao, t_arch = chest.aorta
    asc_top = (mx - 12.0, cy - 0.35 * half, z(t_arch + 0.03))
    ascending = polyline([(hx - 0.35 * hax, hy - 0.1 * hay, z(top + 0.1)),
                          (mx - 9.0, cy - 0.3 * half, z(top - 0.02)), asc_top], 1.25 * r_ao)
    arch = polyline([asc_top, (mx - 6.0, cy - 0.15 * half, z(t_arch - 0.03)),
                     (mx + 6.0, cy + 0.25 * half, z(t_arch - 0.04)),
                     (ao_x - 2.0, ao_y - 6.0, z(t_arch - 0.01)), (ao_x, ao_y, z(t_arch)),
                     (ao_x - 4.0, ao_y - 2.0, z(1.15))], r_ao)
    branches = tubes([(mx - 4.0, cy - 0.2 * half, z(t_arch - 0.03)),
                      (mx + 3.0, cy + 0.0 * half, z(t_arch - 0.04)),
                      (mx + 9.0, cy + 0.25 * half, z(t_arch - 0.04))],
                     [(mx - 18.0, cy - 0.25 * half, z(-0.4)), (mx + 10.0, cy - 0.1 * half, z(-0.4)),
                      (mx + 26.0, cy + 0.3 * half, z(-0.4))],
                     rng.uniform(4.5, 6.5, 3))
    cava = tubes([(mx - 28.0, cy - 0.3 * half, z(-0.4))],
                 [(mx - 24.0, cy - 0.2 * half, z(top + 0.08))], rng.uniform(8.0, 11.0))
    fork = np.array([mx + 6.0, cy - 0.05 * half, z(top - 0.07)])
    trunk = polyline([(hx - 0.1 * hax, hy - 0.75 * hay, z(top + 0.1)), fork], 1.1 * r_ao)
    right = polyline([fork, (mx - 6.0, cy + 0.2 * half, fork[2] - 4.0), hilum[0]],
                     rng.uniform(8.5, 10.5))
    left = polyline([fork, (mx + w_arch * 0.6, cy + 0.1 * half, fork[2] + 6.0), hilum[1]],
                    rng.uniform(8.5, 10.5))
    sx, sy, _, ry = chest.spine
    gullet = tubes([(mx + 4.0, sy - ry - 7.0, z(-0.4))], [(mx + 12.0, sy - ry - 5.0, z(1.15))],
                   rng.uniform(6.0, 8.0))
    return join(ascending, arch, branches, cava, trunk, right, left, gullet)


def airways(rng: np.random.Generator, chest: Chest, hilum: np.ndarray) -> Tubes:
    """The trachea, the main bronchi and a few generations of bronchi per lung (lumen
    radii; the wall is drawn around them)."""
    z = chest.z_of
    mx = chest.mid_x
    sx, sy, _, ry = chest.spine
    r_trachea = rng.uniform(7.5, 10.0)
    y = sy - ry - 14.0 - r_trachea
    carina = np.array([mx + 2.0, y + 4.0, z(rng.uniform(0.26, 0.32))])
    parts = [tubes([(mx, y, z(-0.4))], [carina], r_trachea)]
    for k, side in enumerate((-1, 1)):
        start = hilum[k] + np.array([-side * 2.0, 10.0, 6.0 if side < 0 else 10.0])
        parts.append(tubes([carina], [start], r_trachea * rng.uniform(0.62, 0.72)))
        targets = lung_points(rng, chest, side, int(rng.integers(40, 64)), margin=18.0)
        parts.append(grow_tree(rng, start, targets, rng.uniform(0.9, 1.2), exponent=3.0))
    return join(*parts)


def bands(rng: np.random.Generator, chest: Chest, count: int) -> Tubes:
    """Plate-like scars (atelectasis bands): thin sheets a few mm to 2 cm tall, each a
    stack of flat segments 0.8 mm apart, so a slice shows a short line."""
    if count == 0:
        return tubes(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))
    a, b, r = [], [], []
    for _ in range(count):
        side = -1 if rng.random() < 0.5 else 1
        centre = lung_points(rng, chest, side, 1, margin=12.0)[0]
        length, height = rng.uniform(12.0, 35.0), rng.uniform(4.0, 18.0)
        angle = rng.uniform(0.0, np.pi)
        half = 0.5 * length * np.array([np.cos(angle), np.sin(angle), rng.uniform(-0.1, 0.1)])
        radius = rng.uniform(0.6, 1.2)
        for dz in np.arange(-0.5 * height, 0.5 * height, 0.8):
            a.append(centre - half + (0, 0, dz))
            b.append(centre + half + (0, 0, dz))
            r.append(radius)
    return tubes(a, b, r)

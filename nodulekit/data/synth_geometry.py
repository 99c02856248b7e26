"""The synthetic chest's shape in millimetres, as analytic fields of (x, y, z).

One definition serves the images (evaluated on a slice's pixel grid) and the 3-D
placement of vessels and nodules (evaluated at points), so the two always agree.

Axes: x along image columns (towards the patient's left), y along rows (towards the back),
z the DICOM slice position (the head is up). ``t = (z_apex - z) / height`` is 0 at the lung
apex and 1 at the lung base.

The body is a superellipse, flatter at the back. Inwards from the skin come the
subcutaneous fat, the muscles (thick along the spine, the pectorals at the front), the rib
zone, then the thoracic cavity. The cavity holds the lungs, except where the mediastinum
(with the heart, the descending aorta and the vertebral body) or the diaphragm's domes
(liver on the right, spleen on the left) take the room; at the top the lungs are two
rounded apices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class Chest:
    body: tuple[float, float, float, float, float, float]  # cx, cy, ax, ay front, ay back, power
    skin: float
    fat: tuple[float, float, float]  # mm; gain at the sides; gain at the front
    muscle: tuple[float, float, float]  # everywhere; along the spine; pectorals
    waves: tuple[float, float, float, float]  # fat and muscle thickness ripples (fractions)
    rib_zone: float  # ribs and intercostal muscle, between the muscles and the pleura
    z_apex: float
    height: float  # lung apex to base, mm
    mid_x: float
    front_y: float  # inner edge of the front chest wall at the midline
    spine: tuple[float, float, float, float]  # vertebral body: cx, cy, rx, ry
    mediastinum: tuple[float, float, float, float, float]  # cy, half depth, half widths
    heart: tuple[float, float, float, float, float, float]  # cx, cy, ax, ay, angle, t top
    aorta: tuple[float, float, float, float]  # descending: x, y, radius, t of the arch
    domes: tuple[tuple[float, float, float, float], ...]  # x, y, radius, t top (right, left)
    apex: tuple[float, float, float, float, float]  # domes' x right, x left, y, radius, t end

    def t_of(self, z):
        return (self.z_apex - z) / self.height

    def z_of(self, t):
        return self.z_apex - t * self.height


class Wall(NamedTuple):
    depth: np.ndarray  # mm inwards from the skin (negative outside the body)
    fat: np.ndarray  # thickness of the subcutaneous fat along that direction
    muscle: np.ndarray  # ... of the muscles beneath it
    cavity: np.ndarray  # mm inwards from the parietal pleura (negative in the wall)


def make_chest(rng: np.random.Generator, fov: float) -> Chest:
    """A random chest that fits a field of view of `fov` mm."""
    ax = 0.5 * fov * rng.uniform(0.80, 0.92)
    ay_front = ax * rng.uniform(0.62, 0.72)
    ay_back = ay_front * rng.uniform(0.90, 1.0)
    cy = min(rng.uniform(-0.04, 0.04) * fov, 0.5 * fov - ay_back - 6.0)
    fat = (rng.uniform(4.0, 20.0), rng.uniform(0.1, 0.6), rng.uniform(0.0, 0.5))
    muscle = (rng.uniform(5.0, 9.0), rng.uniform(22.0, 36.0), rng.uniform(6.0, 22.0))
    waves = tuple(rng.uniform(-0.15, 0.15, 4))
    rib_zone = rng.uniform(8.0, 12.0)
    mid_x = rng.uniform(-6.0, 6.0)
    front_y = cy - ay_front + fat[0] * (1 + fat[2]) + muscle[0] + rib_zone
    back_wall = fat[0] + muscle[0] + muscle[1] + rib_zone
    rx, ry = rng.uniform(14.0, 18.0), rng.uniform(12.0, 15.0)
    spine_y = cy + ay_back - back_wall + 8.0 - ry
    spine = (mid_x, spine_y, rx, ry)
    med_half = 0.5 * (spine_y - ry - front_y) + 6.0
    mediastinum = (0.5 * (spine_y - ry + front_y), med_half, rng.uniform(20.0, 27.0),
                   rng.uniform(34.0, 42.0), rng.uniform(17.0, 23.0))
    hax, hay = rng.uniform(48.0, 60.0), rng.uniform(36.0, 46.0)
    heart = (mid_x + rng.uniform(12.0, 24.0), front_y + 0.9 * hay, hax, hay,
             math.radians(rng.uniform(22.0, 40.0)), rng.uniform(0.45, 0.52))
    r_aorta = rng.uniform(10.0, 13.0)
    aorta = (mid_x + 0.55 * rx + r_aorta, spine_y - 0.5 * ry, r_aorta, rng.uniform(0.22, 0.28))
    half_cavity = ax - fat[0] * (1 + fat[1]) - muscle[0] - rib_zone
    t_right = rng.uniform(0.70, 0.80)
    domes = tuple((mid_x + side * 0.5 * half_cavity, mediastinum[0] + rng.uniform(0.0, 15.0),
                   rng.uniform(0.62, 0.72) * half_cavity, t_top)
                  for side, t_top in ((-1.0, t_right), (1.0, t_right + rng.uniform(0.02, 0.07))))
    return Chest(body=(0.0, cy, ax, ay_front, ay_back, rng.uniform(2.2, 2.8)),
                 skin=rng.uniform(1.5, 2.5), fat=fat, muscle=muscle, waves=waves,
                 rib_zone=rib_zone,
                 z_apex=rng.uniform(-140.0, -60.0), height=rng.uniform(190.0, 250.0),
                 mid_x=mid_x, front_y=front_y, spine=spine, mediastinum=mediastinum,
                 heart=heart, aorta=aorta, domes=domes,
                 apex=(mid_x - 0.5 * half_cavity, mid_x + 0.5 * half_cavity,
                       mediastinum[0] + rng.uniform(5.0, 20.0), 0.75 * half_cavity,
                       rng.uniform(0.14, 0.2)))


def wall(chest: Chest, x, y) -> Wall:
    """The chest wall's layers at points (x, y) (arrays that broadcast)."""
    cx, cy, ax, ay_front, ay_back, power = chest.body
    dx, dy = x - cx, y - cy
    ay = np.where(dy > 0, ay_back, ay_front)
    norm = ((np.abs(dx) / ax) ** power + (np.abs(dy) / ay) ** power) ** (1.0 / power)
    r = np.hypot(dx, dy)
    # The norm is 1 on the outline and scales with r along a ray: the outline lies at
    # r / norm, and the depth below the skin along the ray is r / norm - r.
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(norm > 1e-9, r / norm - r, min(ax, ay_back))
        c = np.where(r > 0, dx / r, 0.0)
        s = np.where(r > 0, dy / r, 0.0)
    f0, side, front = chest.fat
    w1, w2, w3, w4 = chest.waves  # cos 3θ, sin 3θ, cos 5θ-like and sin 2θ ripples
    ripple = w1 * (4 * c ** 3 - 3 * c) + w2 * (3 * s - 4 * s ** 3)
    fat = np.maximum(f0 * (1.0 + side * c * c + front * np.maximum(-s, 0.0) + ripple), 2.0)
    m0, back, pectoral = chest.muscle
    muscle = (m0 * (1.0 + w3 * (2 * c * c - 1) + w4 * 2 * s * c)
              + back * np.maximum(s, 0.0) ** 6 + pectoral * 4.0 * (s * c) ** 2 * (s < 0))
    cavity = depth - fat - muscle - chest.rib_zone
    return Wall(depth, fat, muscle, np.minimum(cavity, _behind_spine(chest, x, y)))


def _behind_spine(chest: Chest, x, y):
    """Roughly mm outside the block of muscle and bone behind the vertebral body (the
    canal, the arches, the transverse processes, the rib heads), negative inside it: the
    lungs wrap around the vertebral body but stay in front of that block."""
    sx, sy, rx, ry = chest.spine
    ax, ay = rx + 14.0, ry + 10.0
    rho = np.sqrt(((x - sx) / ax) ** 2 + ((y - sy - ry - 10.0) / ay) ** 2)
    return (rho - 1.0) * ay


def outline_radius(chest: Chest, theta):
    """Distance from the body's centre to the skin along image angle `theta` (radians)."""
    _, _, ax, ay_front, ay_back, power = chest.body
    c, s = np.cos(theta), np.sin(theta)
    ay = np.where(s > 0, ay_back, ay_front)
    return 1.0 / ((np.abs(c) / ax) ** power + (np.abs(s) / ay) ** power) ** (1.0 / power)


def heart_scale(chest: Chest, t):
    """The heart's size at level t: 0 above its top, growing fast, 0 again at the base."""
    top = chest.heart[5]
    q = np.clip((t - top) / (1.04 - top), 0.0, 1.0)
    return np.sin(np.pi * q) ** 0.35


def heart_coords(chest: Chest, x, y):
    """(u, v): millimetres along and across the heart's long axis, from its centre."""
    hx, hy, _, _, angle, _ = chest.heart
    c, s = math.cos(angle), math.sin(angle)
    # The long axis points to the front left: +x, -y.
    return (x - hx) * c - (y - hy) * s, (x - hx) * s + (y - hy) * c


def mediastinum(chest: Chest, x, y, t):
    """Where the space between the lungs is at level t (x, y, t broadcast)."""
    cy, half, w_top, w_arch, w_low = chest.mediastinum
    top = chest.heart[5]  # the great vessels' roots keep it wide down to the heart's top
    width = np.interp(t, (0.0, 0.18, 0.28, top + 0.04, top + 0.16),
                      (w_top, w_top, w_arch, w_arch, w_low))
    inside = ((x - chest.mid_x) / width) ** 2 + ((y - cy) / half) ** 2 <= 1.0
    inside |= np.abs(x - chest.mid_x) < 3.0  # the junction lines, front and back
    _, _, hax, hay, _, _ = chest.heart
    h = heart_scale(chest, t)
    u, v = heart_coords(chest, x, y)
    inside |= (h > 0) & ((u / (hax * h + 4.0)) ** 2 + (v / (hay * h + 4.0)) ** 2 <= 1.0)
    ao_x, ao_y, r_ao, t_arch = chest.aorta
    inside |= (t >= t_arch) & ((x - ao_x) ** 2 + (y - ao_y) ** 2 <= (r_ao + 3.0) ** 2)
    sx, sy, rx, ry = chest.spine
    inside |= ((x - sx) / (rx + 4.0)) ** 2 + ((y - sy) / (ry + 4.0)) ** 2 <= 1.0
    return inside


def dome(chest: Chest, side: int, x, y, t):
    """Below the diaphragm on `side` (0 right: the liver, 1 left: the spleen) at level t."""
    dx, dy, radius, top = chest.domes[side]
    r = radius * np.sqrt(np.clip((t - top) / (1.04 - top), 0.0, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return (r > 0) & (((x - dx) / r) ** 2 + ((y - dy) / (0.8 * r)) ** 2 <= 1.0)


def under_apex(chest: Chest, x, y, t):
    """Where the lungs can be at level t: near the top they are two rounded domes that
    widen downwards until they fill the cavity."""
    x_right, x_left, ya, radius, end = chest.apex
    r = radius * np.sqrt(np.clip(t / end, 0.0, 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        near = np.minimum(((x - x_right) / r) ** 2, ((x - x_left) / r) ** 2)
        near = near + ((y - ya) / (0.85 * r)) ** 2 <= 1.0
    return (t >= end) | ((r > 0) & near)


def lung_from(chest: Chest, cavity, x, y, t, margin: float = 0.0):
    """The lungs, given the cavity depth (`Wall.cavity`) at the same points."""
    inside = (cavity >= margin) & (t > 0.0) & (t < 1.0) & under_apex(chest, x, y, t)
    inside &= ~mediastinum(chest, x, y, t)
    return inside & ~dome(chest, 0, x, y, t) & ~dome(chest, 1, x, y, t)


def in_lung(chest: Chest, x, y, z, margin: float = 0.0):
    """Whether 3-D points lie in a lung, at least `margin` mm inside the pleura."""
    return lung_from(chest, wall(chest, x, y).cavity, x, y, chest.t_of(z), margin)

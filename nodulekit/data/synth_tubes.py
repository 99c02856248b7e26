"""Tubes: 3-D line segments with a radius (capsules), and their sections by a slice.

Vessels, airways, ribs and bands are lists of such segments, fixed per patient. A slice at
height z shows every capsule that reaches it: a disc where a tube crosses the plane, an
elongated blob where it runs along it. `section` finds the pixels near each capsule
(inside per-segment bounding boxes only, all segments at once) and their distance to the
segment in 3-D; `coverage` turns distance into the drawn fraction of each pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A slice's pixel grid: `size` x `size` pixels of `spacing` mm, centred on x = y = 0."""

    size: int
    spacing: float

    @property
    def origin(self) -> float:
        return -(self.size - 1) / 2 * self.spacing

    def mm(self) -> np.ndarray:
        return (self.origin + self.spacing * np.arange(self.size)).astype(np.float32)

    def index(self, v):
        """Continuous pixel index of coordinate(s) `v` mm."""
        return (np.asarray(v) - self.origin) / self.spacing

    def window(self, cx: float, cy: float, r: float) -> tuple[slice, slice]:
        """(rows, columns) of the pixels within `r` mm of (cx, cy) in x and in y."""
        lo = np.ceil(self.index([cy - r, cx - r])).astype(int)
        hi = np.floor(self.index([cy + r, cx + r])).astype(int) + 1
        lo, hi = np.clip(lo, 0, self.size), np.clip(hi, 0, self.size)
        return slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1]))


@dataclass(frozen=True)
class Tubes:
    a: np.ndarray  # (n, 3) segment starts, mm
    b: np.ndarray  # (n, 3) segment ends
    r: np.ndarray  # (n,) radii

    @property
    def count(self) -> int:
        return len(self.r)


def tubes(a, b, r) -> Tubes:
    a = np.asarray(a, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 3)
    r = np.broadcast_to(np.asarray(r, dtype=np.float64), (len(a),)).copy()
    return Tubes(a, b, r)


def join(*parts: Tubes) -> Tubes:
    return Tubes(np.concatenate([p.a for p in parts]).reshape(-1, 3),
                 np.concatenate([p.b for p in parts]).reshape(-1, 3),
                 np.concatenate([p.r for p in parts]))


def polyline(points, r) -> Tubes:
    """Consecutive points joined by segments of radius `r` (a scalar or one per segment)."""
    p = np.asarray(points, dtype=np.float64)
    return tubes(p[:-1], p[1:], r)


@dataclass(frozen=True)
class Section:
    index: np.ndarray  # flat pixel index (row * size + column); repeats where boxes overlap
    distance: np.ndarray  # mm from the pixel centre (at the slice's z) to the segment
    segment: np.ndarray  # which segment


EMPTY = Section(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))


def section(t: Tubes, z: float, grid: Grid, pad: float) -> Section:
    """The pixels within radius + `pad` mm of each segment, in the slice at height z."""
    reach = t.r + pad
    za, zb = t.a[:, 2], t.b[:, 2]
    sel = np.flatnonzero((np.minimum(za, zb) - reach <= z) & (np.maximum(za, zb) + reach >= z))
    if sel.size == 0:
        return EMPTY
    a, d, reach = t.a[sel], t.b[sel] - t.a[sel], reach[sel]
    # The part of the segment within `reach` of the plane, then its box in x and y.
    dz = d[:, 2]
    flat = np.abs(dz) < 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(flat, 0.0, (z - reach - a[:, 2]) / dz)
        t2 = np.where(flat, 1.0, (z + reach - a[:, 2]) / dz)
    lo, hi = np.clip(np.minimum(t1, t2), 0, 1), np.clip(np.maximum(t1, t2), 0, 1)
    ends = [a[:, :2] + lo[:, None] * d[:, :2], a[:, :2] + hi[:, None] * d[:, :2]]
    low = grid.index(np.minimum(*ends) - reach[:, None])
    high = grid.index(np.maximum(*ends) + reach[:, None])
    c0, r0 = np.clip(np.ceil(low), 0, grid.size).astype(np.int64).T
    c1, r1 = np.clip(np.floor(high) + 1, 0, grid.size).astype(np.int64).T
    h, w = np.maximum(r1 - r0, 0), np.maximum(c1 - c0, 0)
    count = h * w
    total = int(count.sum())
    if total == 0:
        return EMPTY
    seg = np.repeat(np.arange(len(sel)), count)
    local = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    width = w[seg]
    row, col = r0[seg] + local // width, c0[seg] + local % width
    ps = grid.spacing
    vx = (grid.origin + ps * col) - a[seg, 0]
    vy = (grid.origin + ps * row) - a[seg, 1]
    vz = z - a[seg, 2]
    dx, dy, dzs = d[seg, 0], d[seg, 1], d[seg, 2]
    length2 = dx * dx + dy * dy + dzs * dzs
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(length2 > 0, (vx * dx + vy * dy + vz * dzs) / length2, 0.0)
    u = np.clip(u, 0.0, 1.0)
    dist = np.sqrt((vx - u * dx) ** 2 + (vy - u * dy) ** 2 + (vz - u * dzs) ** 2)
    return Section(row * grid.size + col, dist.astype(np.float32), sel[seg])


def coverage(distance: np.ndarray, radius, spacing: float) -> np.ndarray:
    """The fraction of a pixel a tube of `radius` covers at `distance` from its axis: a
    soft edge one pixel wide; a tube thinner than a pixel is drawn one pixel wide and as
    faint as its share of that pixel (partial volume)."""
    drawn = np.maximum(radius, 0.5 * spacing)
    share = np.minimum(1.0, (radius / drawn) ** 2)
    return (np.clip(0.5 + (drawn - distance) / spacing, 0.0, 1.0) * share).astype(np.float32)


def blend(image: np.ndarray, index: np.ndarray, cover: np.ndarray, value: float) -> np.ndarray:
    """Mix `value` into the flat `image` at `index` by `cover` (the largest cover where an
    index repeats). Returns the cover used at each entry."""
    if index.size == 0:
        return cover
    most = np.zeros(image.size, dtype=np.float32)
    np.maximum.at(most, index, cover)
    used = most[index]
    old = image[index]
    image[index] = old + used * (value - old)
    return used

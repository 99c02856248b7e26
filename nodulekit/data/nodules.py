"""Nodules in masks: connected components, their diameters in mm, and the paper's bins.

A slice's nodules are the 8-connected components of its mask. Each gets a *section
diameter*: the diameter of the circle with the same area, ``2 * sqrt(area_mm2 / pi)``.
A nodule spans several slices, so components that overlap in consecutive slices of an
exam are linked into one 3-D nodule (`NoduleLinker`), whose *nodule diameter* is its
largest section diameter: for a sphere, the section through its centre. The diameter
bins are the paper's Table 3: < 3 mm, 3-10, 10-30, > 30 mm.

Whole volumes (Z, H, W) have their nodules as 26-connected 3-D components
(`components_3d`, `label_voxels`, `measure`): each with its voxels, volume, equivalent-sphere
diameter, largest section diameter (the nodule diameter above), centroid, slice range and,
given probabilities, their mean and maximum. Labelling works on the bounding box of the set
voxels only, so a mostly empty scan costs little. The labelling is scipy.ndimage's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# (label, lower bound inclusive, upper bound exclusive) in mm: the paper's Table 3 bins.
DIAMETER_BINS: tuple[tuple[str, float, float], ...] = (
    ("<3mm", 0.0, 3.0),
    ("3-10mm", 3.0, 10.0),
    ("10-30mm", 10.0, 30.0),
    (">30mm", 30.0, math.inf),
)
BIN_LABELS: tuple[str, ...] = tuple(label for label, _, _ in DIAMETER_BINS)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # a slice's pixel touches its 8 neighbours


def diameter_bin(diameter_mm: float) -> str | None:
    """The Table 3 bin label for a diameter in mm; None for NaN (no nodule)."""
    d = float(diameter_mm)
    if math.isnan(d):
        return None
    if d < 0:
        raise ValueError(f"negative nodule diameter {d} mm")
    for label, lo, hi in DIAMETER_BINS:
        if lo <= d < hi:
            return label
    raise AssertionError("unreachable: the bins cover [0, inf)")


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a 2-D mask, each as sorted flat pixel indices (int64),
    in the order of their first pixel in reading order (row by row)."""
    m = np.asarray(mask) != 0
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    set_rows = np.flatnonzero(m.any(axis=1))
    if set_rows.size == 0:
        return []
    set_cols = np.flatnonzero(m.any(axis=0))
    # Work inside the bounding box of the set pixels: nodules are small.
    r0, c0 = int(set_rows[0]), int(set_cols[0])
    box = m[r0:int(set_rows[-1]) + 1, c0:int(set_cols[-1]) + 1]
    return box_components(box, r0, c0, m.shape[1])


def box_components(box: np.ndarray, top: int, left: int, width: int) -> list[np.ndarray]:
    """`components` of a mask of `width` columns whose set pixels all lie in `box`, a
    {0, 1} or boolean array whose first pixel is at (`top`, `left`) in the mask."""
    box = np.asarray(box)
    if box.size == 0:
        return []
    ndimage = _ndimage()
    # scipy numbers the components by their first pixel in reading order: the order kept
    labels, count = ndimage.label(box != 0, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    inside = np.flatnonzero(labels)  # reading order: each component's pixels stay sorted
    label_of = labels.ravel()[inside]
    inside = inside[np.argsort(label_of, kind="stable")]
    rows, cols = np.divmod(inside, box.shape[1])
    flat = (rows + int(top)) * int(width) + (cols + int(left))
    ends = np.cumsum(np.bincount(label_of, minlength=count + 1)[1:])
    return np.split(flat.astype(np.int64, copy=False), ends[:-1])


def label_slices(masks) -> tuple[np.ndarray, np.ndarray]:
    """(labels, slice_of): the 8-connected components of each slice of a stack of masks
    [N, H, W], numbered 1..K across the stack in one pass (int32 [N, H, W], 0 off every
    component), and the slice each lies in (int64 [K]). Slices are not connected to each
    other: these are `components`, not `components_3d`."""
    m = np.asarray(masks) != 0
    if m.ndim != 3:
        raise ValueError(f"masks must be a stack [N, H, W], got shape {m.shape}")
    within_slice = np.zeros((3, 3, 3), dtype=bool)
    within_slice[1] = EIGHT_CONNECTED
    labels, count = _ndimage().label(m, structure=within_slice, output=np.int32)
    slice_of = np.zeros(count + 1, np.int64)
    slice_of[labels] = np.arange(len(m))[:, None, None]  # every pixel names its slice
    return labels, slice_of[1:]


def _ndimage():
    """scipy.ndimage, imported on first use: the cache and the metrics import this module
    for the bins only (the preprocessing workers get it preloaded, see data/decode.py)."""
    from scipy import ndimage

    return ndimage


def section_diameter_mm(n_pixels: int, pixel_spacing: tuple[float, float]) -> float:
    """Equal-area circle diameter of a component of `n_pixels` at (row, col) spacing in mm."""
    area = n_pixels * float(pixel_spacing[0]) * float(pixel_spacing[1])
    return 2.0 * math.sqrt(area / math.pi)


class NoduleLinker:
    """Joins the components of consecutive slices of one exam into 3-D nodules.

    Feed the slices of an exam in order with `add`; `finish` gives, for every row added,
    the nodule diameter of each of its components (same order as given). Two components of
    consecutive slices that share a pixel are one nodule: they are an edge of a graph whose
    connected components (scipy.sparse.csgraph) are the nodules, built while the slices
    stream past (the writer never holds an exam's masks).
    """

    def __init__(self):
        self._section: list[float] = []
        self._edges: list[tuple[int, int]] = []
        self._rows: list[tuple[int, list[int]]] = []  # (row, node ids of its components)
        self._prev: list[tuple[int, np.ndarray]] = []  # previous slice's (node, pixels)
        self._prev_key: int | None = None

    def add(self, row: int, slice_key: int, parts: list[np.ndarray],
            section_mm: list[float] | None = None) -> None:
        """One slice: its cache row, its position in the exam (consecutive slices differ by
        1), its components' flat pixel indices and section diameters (None: not needed,
        for `labels` alone)."""
        if section_mm is None:
            section_mm = [0.0] * len(parts)
        adjacent = self._prev_key is not None and slice_key - self._prev_key == 1
        nodes = []
        current = []
        for pixels, diameter in zip(parts, section_mm, strict=True):
            node = len(self._section)
            self._section.append(float(diameter))
            nodes.append(node)
            current.append((node, pixels))
            if adjacent:
                self._edges += [(node, other) for other, other_pixels in self._prev
                                if _overlap(pixels, other_pixels)]
        self._rows.append((row, nodes))
        self._prev = current
        self._prev_key = slice_key

    def labels(self) -> np.ndarray:
        """int64 [components added]: each component's 3-D nodule, 0..count-1, components
        numbered in the order they were added."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n = len(self._section)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        edges = np.asarray(self._edges, dtype=np.int64).reshape(-1, 2)
        graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])),
                           shape=(n, n))
        return connected_components(graph, directed=False)[1].astype(np.int64)

    def finish(self) -> dict[int, list[float]]:
        if not self._section:
            return {row: [] for row, _ in self._rows}
        nodule = self.labels()
        biggest = np.zeros(nodule.max() + 1)
        np.maximum.at(biggest, nodule, np.asarray(self._section))
        return {row: [float(biggest[nodule[i]]) for i in nodes] for row, nodes in self._rows}


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two sorted arrays of unique flat pixel indices share a pixel."""
    if a[0] > b[-1] or b[0] > a[-1]:  # both sorted: disjoint ranges cannot share a pixel
        return False
    return bool(np.intersect1d(a, b, assume_unique=True).size)


# ------------------------------------------------------------------------- 3-D components


@dataclass(frozen=True)
class LabelledVoxels:
    """The set voxels of a volume of `shape` (Z, H, W) and their 26-connected components."""

    flat: np.ndarray  # int64 [V]: flat indices into `shape`, ascending
    labels: np.ndarray  # int32 [V]: each voxel's component, 1..count
    count: int
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class Component:
    """One 26-connected component of a volume; lengths in mm, positions in voxel indices."""

    label: int  # 1..count, by the component's first voxel in C order (slice, row, column)
    voxels: int
    volume_mm3: float
    diameter_mm: float  # of the sphere with the same volume
    section_diameter_mm: float  # largest equal-area section: the cache's nodule diameter
    centroid: tuple[float, float, float]  # (k, r, c), mean voxel index
    slices: tuple[int, int]  # first and last k
    mean_probability: float  # over its voxels; NaN without probabilities
    max_probability: float  # NaN without probabilities


def components_3d(mask: np.ndarray, spacing_zyx, probability: np.ndarray | None = None
                  ) -> list[Component]:
    """26-connected components of a (Z, H, W) mask (any nonzero voxel is set), measured at
    `spacing_zyx` (slice, row, column) in mm; `probability` (the mask's shape) gives each
    component's mean and maximum. Ordered by label."""
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3-D (Z, H, W), got shape {m.shape}")
    flat = np.flatnonzero(m)
    values = None
    if probability is not None:
        p = np.asarray(probability)
        if p.shape != m.shape:
            raise ValueError(f"probability {p.shape} and mask {m.shape} differ in shape")
        values = p.reshape(-1)[flat]
    return measure(label_voxels(flat, m.shape), spacing_zyx, values)


def label_voxels(flat, shape) -> LabelledVoxels:
    """The 26-connected components of the voxels at `flat` (ascending flat indices into a
    volume of `shape`), labelled by scipy.ndimage inside their bounding box."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (Z, H, W), got {shape}")
    flat = np.asarray(flat, dtype=np.int64).reshape(-1)
    if flat.size == 0:
        return LabelledVoxels(flat, np.zeros(0, np.int32), 0, shape)
    if np.any(np.diff(flat) <= 0) or flat[0] < 0 or flat[-1] >= math.prod(shape):
        raise ValueError(f"voxel indices must be ascending, distinct and inside {shape}")
    ndimage = _ndimage()
    where = np.unravel_index(flat, shape)
    local = tuple(a - a.min() for a in where)
    box = np.zeros([int(a.max()) + 1 for a in local], dtype=bool)
    box[local] = True
    labelled, count = ndimage.label(box, structure=ndimage.generate_binary_structure(3, 3))
    return LabelledVoxels(flat, labelled[local].astype(np.int32, copy=False), int(count),
                          shape)


def measure(voxels: LabelledVoxels, spacing_zyx, probability=None) -> list[Component]:
    """Each component of `voxels` measured at `spacing_zyx` (mm); `probability`: one value
    per voxel, in the order of `voxels.flat`."""
    n = voxels.count
    if n == 0:
        return []
    dz, dy, dx = (float(v) for v in spacing_zyx)
    k, r, c = np.unravel_index(voxels.flat, voxels.shape)
    # Grouped by label; within a label the voxels stay in C order, so k ascends.
    order = np.argsort(voxels.labels, kind="stable")
    label_sorted = voxels.labels[order].astype(np.int64)
    sizes = np.bincount(label_sorted, minlength=n + 1)[1:]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    k_sorted = k[order]
    centroids = [np.add.reduceat(a[order].astype(np.float64), starts) / sizes
                 for a in (k, r, c)]
    # the largest section: the longest run of one (label, slice) in that order
    key = label_sorted * voxels.shape[0] + k_sorted
    run_starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    run_sizes = np.diff(np.r_[run_starts, key.size])
    first_run = np.searchsorted(label_sorted[run_starts], np.arange(1, n + 1))
    section = np.maximum.reduceat(run_sizes, first_run)
    if probability is None:
        mean_p = max_p = np.full(n, math.nan)
    else:
        p = np.asarray(probability, dtype=np.float64).reshape(-1)
        if p.size != voxels.flat.size:
            raise ValueError(f"{p.size} probabilities for {voxels.flat.size} voxels")
        p = p[order]
        mean_p = np.add.reduceat(p, starts) / sizes
        max_p = np.maximum.reduceat(p, starts)
    voxel_mm3 = dz * dy * dx
    out = []
    for j in range(n):
        volume = float(sizes[j]) * voxel_mm3
        out.append(Component(
            label=j + 1, voxels=int(sizes[j]), volume_mm3=volume,
            diameter_mm=2.0 * (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0),
            section_diameter_mm=section_diameter_mm(int(section[j]), (dy, dx)),
            centroid=(float(centroids[0][j]), float(centroids[1][j]), float(centroids[2][j])),
            slices=(int(k_sorted[starts[j]]), int(k_sorted[ends[j] - 1])),
            mean_probability=float(mean_p[j]), max_probability=float(max_p[j])))
    return out

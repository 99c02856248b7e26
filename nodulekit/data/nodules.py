"""Nodules in masks: connected components, their diameters in mm, and the paper's bins.

A slice's nodules are the 8-connected components of its mask. Each gets a *section
diameter*: the diameter of the circle with the same area, ``2 * sqrt(area_mm2 / pi)``.
A nodule spans several slices, so components that overlap in consecutive slices of an
exam are linked into one 3-D nodule (`NoduleLinker`), whose *nodule diameter* is its
largest section diameter: for a sphere, the section through its centre. The diameter
bins are the paper's Table 3: < 3 mm, 3-10, 10-30, > 30 mm.
"""

from __future__ import annotations

import math

import numpy as np

# (label, lower bound inclusive, upper bound exclusive) in mm: the paper's Table 3 bins.
DIAMETER_BINS: tuple[tuple[str, float, float], ...] = (
    ("<3mm", 0.0, 3.0),
    ("3-10mm", 3.0, 10.0),
    ("10-30mm", 10.0, 30.0),
    (">30mm", 30.0, math.inf),
)
BIN_LABELS: tuple[str, ...] = tuple(label for label, _, _ in DIAMETER_BINS)


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
    """8-connected components of a 2-D mask, each as sorted flat pixel indices (int64).

    Works on runs of set pixels per row and joins runs that touch in the next row, so the
    cost follows the nodules' height, not the image's area (masks are mostly empty).
    """
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
    if box.size == 0:
        return []
    r0, c0, w = int(top), int(left), int(width)
    padded = np.zeros((box.shape[0], box.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = box
    edges = np.diff(padded, axis=1)
    start_rows, start_cols = np.nonzero(edges == 1)  # row-major: runs in reading order
    _, end_cols = np.nonzero(edges == -1)  # end is exclusive
    start_rows += r0
    start_cols += c0
    end_cols += c0
    n = len(start_rows)

    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, starts, ends = start_rows.tolist(), start_cols.tolist(), end_cols.tolist()
    prev_lo = prev_hi = 0  # runs of the previous row are [prev_lo, prev_hi)
    row_lo = 0
    for i in range(n):
        if i > 0 and rows[i] != rows[i - 1]:
            if rows[i] == rows[i - 1] + 1:
                prev_lo, prev_hi = row_lo, i
            else:
                prev_lo = prev_hi = i
            row_lo = i
        for j in range(prev_lo, prev_hi):
            # 8-connectivity: runs touch if their column ranges overlap or meet diagonally.
            if starts[j] <= ends[i] and starts[i] <= ends[j]:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[np.ndarray]] = {}
    for i in range(n):
        base = rows[i] * w
        groups.setdefault(find(i), []).append(np.arange(base + starts[i], base + ends[i]))
    return [np.concatenate(parts) for _, parts in sorted(groups.items())]


def section_diameter_mm(n_pixels: int, pixel_spacing: tuple[float, float]) -> float:
    """Equal-area circle diameter of a component of `n_pixels` at (row, col) spacing in mm."""
    area = n_pixels * float(pixel_spacing[0]) * float(pixel_spacing[1])
    return 2.0 * math.sqrt(area / math.pi)


class NoduleLinker:
    """Joins the components of consecutive slices of one exam into 3-D nodules.

    Feed the slices of an exam in order with `add`; `finish` gives, for every row added,
    the nodule diameter of each of its components (same order as given).
    """

    def __init__(self):
        self._parent: list[int] = []
        self._section: list[float] = []
        self._rows: list[tuple[int, list[int]]] = []  # (row, node ids of its components)
        self._prev: list[tuple[int, np.ndarray]] = []  # previous slice's (node, pixels)
        self._prev_key: int | None = None

    def _find(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def add(self, row: int, slice_key: int, parts: list[np.ndarray],
            section_mm: list[float]) -> None:
        """One slice: its cache row, its position in the exam (consecutive slices differ by
        1), its components' flat pixel indices and section diameters."""
        adjacent = self._prev_key is not None and slice_key - self._prev_key == 1
        nodes = []
        current = []
        for pixels, diameter in zip(parts, section_mm, strict=True):
            node = len(self._parent)
            self._parent.append(node)
            self._section.append(float(diameter))
            nodes.append(node)
            current.append((node, pixels))
            if adjacent:
                for other, other_pixels in self._prev:
                    if _overlap(pixels, other_pixels):
                        a, b = self._find(node), self._find(other)
                        if a != b:
                            self._parent[max(a, b)] = min(a, b)
        self._rows.append((row, nodes))
        self._prev = current
        self._prev_key = slice_key

    def finish(self) -> dict[int, list[float]]:
        biggest: dict[int, float] = {}
        for node, d in enumerate(self._section):
            root = self._find(node)
            biggest[root] = max(biggest.get(root, 0.0), d)
        return {row: [biggest[self._find(n)] for n in nodes] for row, nodes in self._rows}


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    if a[0] > b[-1] or b[0] > a[-1]:  # both sorted: disjoint ranges cannot share a pixel
        return False
    return bool(np.intersect1d(a, b, assume_unique=True).size)

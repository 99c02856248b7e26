"""LUNA16's layout as scan records: MetaImage scans and nodules as spheres.

::

    subset0/ ... subset9/SERIESUID.mhd (+ .raw)   the scans (or SERIESUID.mhd at the top,
                                                   read when there is no subset folder)
    annotations.csv                                seriesuid, coordX, coordY, coordZ,
                                                   diameter_mm: one row per nodule

Coordinates are world millimetres as ITK (SimpleITK) gives them, which is DICOM's LPS, so
`Volume.to_index` places them; each nodule's mask is the sphere of its diameter
(`scans.sphere_mask`: the voxels whose centre lies within diameter / 2 of the centre), as
the detection frameworks built on LUNA16 mark them. A scan without a row has no nodule.
Each scan is a patient (its seriesuid) with one exam, split 80/10/10 by patient, seeded
(`layout.split_patients`).

A row that cannot be read (a number that is not one, a diameter not above 0) skips its scan,
whose truth would be incomplete; a row naming a scan that is not here (only some subsets
downloaded) is counted in one note. Other folders (``seg-lungs-LUNA16/``, whose lung masks
are MetaImage too) are not read when subset folders exist.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from nodulekit.data.layout import DEFAULT_FRACTIONS, DataIndex, LayoutError, Problem
from nodulekit.data.scans import Sphere, file_scan_spec, scan_index

ANNOTATIONS = "annotations.csv"
COLUMNS = ("seriesuid", "coordx", "coordy", "coordz", "diametermm")


def read_luna16(root: str | os.PathLike, *, seed: int = 0,
                fractions: Sequence[float] = DEFAULT_FRACTIONS) -> DataIndex:
    root = Path(root)
    problems: list[Problem] = []
    files = _scan_files(root)
    if not files:
        raise LayoutError(f"{root}: no MetaImage scans (subset*/*.mhd or *.mhd): not a "
                          "LUNA16 layout")
    spheres, bad = _annotations(root / ANNOTATIONS, problems)
    seen: dict[str, Path] = {}
    scans = []
    for path in files:
        uid = path.name[:-len(".mhd")]
        if uid in seen:
            problems.append(Problem(str(path), f"seriesuid {uid} again (first: {seen[uid]}); "
                                               "skipped"))
            continue
        seen[uid] = path
        if uid in bad:
            problems.append(Problem(str(path), f"{bad[uid]}; scan skipped (its nodules "
                                               "would be incomplete)"))
            continue
        spec = file_scan_spec(path, root, problems, spheres=tuple(spheres.get(uid, ())),
                              annotations=str(root / ANNOTATIONS))
        if spec is not None:
            scans.append((uid, "1", spec))
    elsewhere = sorted(set(spheres) - set(seen))
    if elsewhere:
        problems.append(Problem(str(root / ANNOTATIONS),
                                f"{len(elsewhere)} annotated scan(s) not here (such as "
                                f"{elsewhere[0]}): only some subsets?", skipped=False))
    return scan_index(root, "luna16", scans, problems, seed=seed, fractions=fractions)


def _scan_files(root: Path) -> list[Path]:
    subsets = sorted(d for d in root.glob("subset*") if d.is_dir())
    folders = subsets or [root]
    return [p for d in folders for p in sorted(d.glob("*.mhd"))
            if p.is_file() and not p.name.startswith(".")]


def _annotations(path: Path, problems: list[Problem]
                 ) -> tuple[dict[str, list[Sphere]], dict[str, str]]:
    """(spheres by seriesuid, the first unreadable row of a seriesuid by seriesuid)."""
    spheres: dict[str, list[Sphere]] = {}
    bad: dict[str, str] = {}
    if not path.is_file():
        problems.append(Problem(str(path), "missing: every scan read without nodules",
                                skipped=False))
        return spheres, bad
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        columns = {_norm(c): c for c in rows.fieldnames or []}
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise LayoutError(f"{path}: no column {', '.join(missing)} (columns: "
                              f"{', '.join(rows.fieldnames or [])}); LUNA16's are seriesuid, "
                              "coordX, coordY, coordZ, diameter_mm")
        for line, row in enumerate(rows, start=2):
            where = f"{path}:{line}"
            uid = (row.get(columns["seriesuid"]) or "").strip()
            if not uid:
                problems.append(Problem(where, "no seriesuid; row ignored"))
                continue
            try:
                x, y, z, d = (float(row.get(columns[c]) or "nan") for c in COLUMNS[1:])
            except ValueError:
                x = y = z = d = math.nan
            if not all(math.isfinite(v) for v in (x, y, z, d)) or d <= 0:
                values = ", ".join(str(row.get(columns[c])) for c in COLUMNS[1:])
                bad.setdefault(uid, f"{where}: unreadable nodule ({values})")
                continue
            spheres.setdefault(uid, []).append(Sphere((x, y, z), d, where))
    return spheres, bad


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "").replace("-", "")

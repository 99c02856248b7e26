"""One synthetic patient: everything fixed before any slice is drawn.

The scan's geometry (pixel spacing 0.6-0.85 mm at 512 pixels, the field of view following;
slice thickness; which stretch of the lungs the slices cover), the chest's shape, its
tissues' HU (with or without contrast in the blood), the vessel and airway trees, the
bones, scars, fissures and nodules. All of it comes from random generators seeded with
(seed, patient, stream), one stream per part, so a part can change without moving the
others, and any slice can be drawn again from the seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from nodulekit.data.synth_geometry import Chest, make_chest
from nodulekit.data.synth_nodules import NoduleShape, Site, place_nodules, plan_nodules
from nodulekit.data.synth_skeleton import Skeleton, skeleton
from nodulekit.data.synth_trees import airways, bands, great_vessels, hila, lung_vessels
from nodulekit.data.synth_tubes import Grid, Tubes, join

SLICE_THICKNESSES_MM = (1.0, 1.25, 1.5, 2.0)
SPACING_AT_512_MM = (0.6, 0.85)  # the field of view is 512 x this, whatever the size
VESSEL_POINTS = 1400  # per tree: each lung has an arterial and a venous tree
# Streams of (seed, patient, stream, 0); slice k's noise is (seed, patient, k, 1).
TREES, NODULE_PLAN, NODULE_PLACE, BONES, SCARS, TEXTURE = 1, 2, 3, 4, 5, 6


class Tissue(IntEnum):
    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    SOFT = 4  # what fills the chest cavity where there is no lung: neck, abdomen
    MEDIASTINAL_FAT = 5
    LUNG = 6
    LIVER = 7
    SPLEEN = 8
    MYOCARDIUM = 9
    BLOOD = 10
    CORTEX = 11
    MARROW = 12
    DISC = 13
    CANAL = 14
    CARTILAGE = 15
    AIRWAY = 16
    AIRWAY_WALL = 17
    SCAR = 18
    NODULE = 19


@dataclass(frozen=True)
class Fissure:
    side: int  # -1 right lung, +1 left
    t_top: float  # the fissure runs from the back at t_top to the front at the base
    y_back: float
    y_front: float
    bend: float  # mm it comes forwards at the lung's side (negative: towards the front)
    hu: float


@dataclass(frozen=True)
class Patient:
    index: int
    grid: Grid
    z: np.ndarray  # slice positions, head to feet
    thickness: float
    chest: Chest
    hu: np.ndarray  # mean HU per Tissue
    vessels: Tubes  # blood: lung trees, great vessels (and the oesophagus)
    airways: Tubes  # lumen radii
    skeleton: Skeleton
    scars: Tubes
    fissures: tuple[Fissure, ...]
    nodules: tuple[NoduleShape, ...]
    noise_hu: float  # at 0.7 mm pixels
    lung_shade_hu: float  # how much denser the lung's back is than its front


def build_patient(seed: int, patient: int, size: int, slices: int,
                  max_nodules: int) -> Patient:
    rng = np.random.default_rng([seed, patient])
    fov = 512 * rng.uniform(*SPACING_AT_512_MM)
    grid = Grid(size, fov / size)
    thickness = float(rng.choice(SLICE_THICKNESSES_MM))
    chest = make_chest(rng, fov)
    z = _slab(rng, chest, thickness, slices)
    hu = _tissue_hu(rng)

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([seed, patient, k, 0])

    trees = stream(TREES)
    hilum = hila(chest, trees)
    vessels = join(lung_vessels(trees, chest, hilum, VESSEL_POINTS),
                   great_vessels(trees, chest, hilum))
    tubes_of_air = airways(trees, chest, hilum)
    scars_rng = stream(SCARS)
    scars = bands(scars_rng, chest, int(scars_rng.integers(0, 4)))
    fissures = _fissures(scars_rng, chest)
    plans = plan_nodules(stream(NODULE_PLAN), max_nodules)
    nodules = place_nodules(stream(NODULE_PLACE), plans,
                            Site(patient, chest, z, grid, vessels))
    return Patient(patient, grid, z, thickness, chest, hu, vessels, tubes_of_air,
                   skeleton(stream(BONES), chest), scars, fissures, nodules,
                   noise_hu=float(rng.uniform(8.0, 18.0)),
                   lung_shade_hu=float(rng.uniform(40.0, 90.0)))


def _slab(rng: np.random.Generator, chest: Chest, thickness: float, slices: int) -> np.ndarray:
    """Slice positions: a stretch of the lungs chosen at random (centred if it is longer
    than the lungs)."""
    span = thickness * (slices - 1) / chest.height
    top = rng.uniform(0.08, 0.92 - span) if span < 0.84 else 0.5 - span / 2
    return chest.z_of(top) - thickness * np.arange(slices)


def _tissue_hu(rng: np.random.Generator) -> np.ndarray:
    """Mean HU per tissue; half the patients have contrast in the blood."""
    contrast = rng.random() < 0.5
    blood = rng.uniform(120.0, 220.0) if contrast else rng.uniform(35.0, 48.0)
    fat = rng.uniform(-110.0, -85.0)
    muscle = rng.uniform(25.0, 55.0)
    hu = {
        Tissue.AIR: -1000.0, Tissue.SKIN: rng.uniform(20.0, 50.0), Tissue.FAT: fat,
        Tissue.MUSCLE: muscle, Tissue.SOFT: muscle, Tissue.MEDIASTINAL_FAT: fat + 10.0,
        Tissue.LUNG: rng.uniform(-885.0, -845.0),
        Tissue.LIVER: rng.uniform(50.0, 65.0) + (45.0 if contrast else 0.0),
        Tissue.SPLEEN: rng.uniform(40.0, 55.0) + (50.0 if contrast else 0.0),
        Tissue.MYOCARDIUM: rng.uniform(40.0, 55.0) + (50.0 if contrast else 0.0),
        Tissue.BLOOD: blood, Tissue.CORTEX: rng.uniform(500.0, 800.0),
        Tissue.MARROW: rng.uniform(150.0, 260.0), Tissue.DISC: rng.uniform(70.0, 100.0),
        Tissue.CANAL: rng.uniform(20.0, 35.0), Tissue.CARTILAGE: rng.uniform(90.0, 160.0),
        Tissue.AIRWAY: rng.uniform(-1000.0, -970.0), Tissue.AIRWAY_WALL: rng.uniform(0.0, 40.0),
        Tissue.SCAR: rng.uniform(-150.0, 0.0),
        Tissue.NODULE: 40.0,  # unused: each nodule has its own HU (synth_nodules)
    }
    return np.array([hu[t] for t in Tissue], dtype=np.float32)


def _fissures(rng: np.random.Generator, chest: Chest) -> tuple[Fissure, ...]:
    """The oblique fissures, one per lung, from high at the back to low at the front."""
    sx, sy, rx, ry = chest.spine
    return tuple(Fissure(side, rng.uniform(0.2, 0.32), sy + rng.uniform(-0.2, 0.4) * ry,
                         chest.front_y + rng.uniform(15.0, 35.0), rng.uniform(-70.0, -25.0),
                         rng.uniform(-620.0, -450.0))
                 for side in (-1, 1))

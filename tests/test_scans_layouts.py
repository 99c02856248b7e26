"""Whole-scan layouts (series, msd, luna16) and in-plane resampling: synth's export of the
generated patients, preprocessed into the cache, against the generator's ground truth."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
from cachefile import write_cache
from click.testing import CliRunner

from nodulekit.cli import main
from nodulekit.data import resample
from nodulekit.data.cache import Cache
from nodulekit.data.layout import LayoutError, detect_layout, read_layout
from nodulekit.data.preprocess import PreprocessError, preprocess
from nodulekit.data.synth import SynthConfig, anatomy, render_slice, synthesize
from nodulekit.data.synth_export import world_rotation
from nodulekit.data.volumes import Volume, affine_from, read_nifti, write_nifti

CFG = SynthConfig(size=64, patients=3, slices_per_patient=6, seed=3)
FORMATS = ("msd", "luna16", "series")
ORIENTATIONS = ("axial", "flipped", "oblique")
# Positions come back through NIfTI's float32 affine: ~1e-5 mm at 200 mm.
POSITION_MM = 1e-3


def _export(tmp_path, fmt, orientation="axial", cfg=CFG):
    return synthesize(tmp_path / f"{fmt}-{orientation}", cfg, format=fmt,
                      orientation=orientation)


def _preprocess(root, out, **settings):
    return preprocess(root, out, workers=0, progress=False, **settings)


def _cache_rows(path):
    """Every row of every split: (meta of the row as a dict, hu, mask)."""
    with Cache(path) as c:
        for name in c.splits:
            split = c.split(name)
            meta = split.meta
            for i in range(len(split)):
                yield {k: v[i] for k, v in meta.items()}, split.hu[i], split.mask[i]


def _generator_slice(result, orientation, row):
    """(patient index, slice index) of the generator's slice that a cache row shows, found
    from the row's recorded position (turned back by the export's rotation); checks that
    the recorded geometry is the generator's."""
    p = next(s.patient for s in result.slices if s.patient_id == row["patient"])
    body = anatomy(result.config, p)
    turn = world_rotation(orientation)
    x, y, z = turn.T @ row["image_position"]
    assert x == pytest.approx(body.grid.origin, abs=POSITION_MM)
    assert y == pytest.approx(body.grid.origin, abs=POSITION_MM)
    k = int(np.argmin(np.abs(body.z - z)))
    assert body.z[k] == pytest.approx(z, abs=POSITION_MM)
    np.testing.assert_allclose(row["image_orientation"], np.concatenate([turn[:, 0], turn[:, 1]]),
                               atol=1e-5)
    np.testing.assert_allclose(row["pixel_spacing"], body.grid.spacing, rtol=1e-5)
    assert row["slice_position"] == pytest.approx(body.z[k], abs=POSITION_MM)
    return p, k


def _spheres(cfg, p, k):
    """The generator's nodules of patient p as spheres on slice k's pixels, computed here:
    (inside, near the surface) boolean masks (LPS = the generator's x, y, z)."""
    body = anatomy(cfg, p)
    mm = body.grid.origin + body.grid.spacing * np.arange(cfg.size)
    inside = np.zeros((cfg.size, cfg.size), dtype=bool)
    near = np.zeros_like(inside)
    for shape in body.nodules:
        cx, cy, cz = shape.nodule.center_mm
        dist = np.sqrt((mm[None, :] - cx) ** 2 + (mm[:, None] - cy) ** 2
                       + (float(body.z[k]) - cz) ** 2)
        radius = shape.nodule.diameter_mm / 2
        inside |= dist <= radius
        near |= np.abs(dist - radius) < 1e-6
    return inside, near


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_layout_gives_the_generators_slices(tmp_path, fmt, orientation):
    """Every slice of every patient once, with the generator's HU and masks (LUNA16: the
    spheres of its annotations), whatever order the file stores the voxels in."""
    result = _export(tmp_path, fmt, orientation)
    assert detect_layout(result.root) == fmt
    report = _preprocess(result.root, tmp_path / "cache.h5")
    assert report.layout == fmt and report.skipped == [] and report.fixups == []
    seen = set()
    for row, hu, mask in _cache_rows(tmp_path / "cache.h5"):
        p, k = _generator_slice(result, orientation, row)
        assert (p, k) not in seen
        seen.add((p, k))
        truth_hu, truth_mask = render_slice(CFG, p, k)
        np.testing.assert_array_equal(hu, truth_hu)
        if fmt == "luna16":
            # The reader measures in world mm after the export's rotation, the spheres here
            # in the generator's: the same distances to ~1e-12 mm, so only a voxel centre
            # within 1e-6 mm of a sphere's surface may fall either way.
            inside, near = _spheres(CFG, p, k)
            np.testing.assert_array_equal(mask[~near], inside[~near])
            truth_mask = inside
        else:
            np.testing.assert_array_equal(mask, truth_mask)
        assert bool(row["has_nodule"]) == bool(truth_mask.any())
        assert row["source_pixel_spacing"] == pytest.approx(row["pixel_spacing"])
        # slices count from 1, feet to head
        assert row["slice"] == CFG.slices_per_patient - k
        if fmt == "series":
            assert row["source"].startswith(f"patient_{row['patient']}/series_1/")
            assert row["source"].endswith(".dcm")
        else:
            assert row["source"].endswith(f"#{row['slice'] - 1}")
    assert len(seen) == CFG.patients * CFG.slices_per_patient
    with Cache(tmp_path / "cache.h5") as c:
        assert c.attrs["layout"] == fmt and "spacing_mm" not in c.attrs
        assert sum(len(c.split(s)) for s in c.splits) == len(seen)
        # a patient-level split, seeded as the folder layout's
        patients = {s: set(c.split(s).meta["patient"].tolist()) for s in c.splits}
    assert all(len(v) == 1 for v in patients.values())


def test_luna16_rows_and_scans_that_do_not_fit(tmp_path):
    result = _export(tmp_path, "luna16")
    root = result.root
    uids = [f.stem for f in sorted((root / "subset0").glob("*.mhd"))]
    with open(root / "annotations.csv", "a", newline="") as f:
        w = csv.writer(f)
        w.writerow(["1.2.3.not.here", "0", "0", "0", "5"])  # a scan of another subset
        w.writerow([uids[1], "12", "x", "3", "5"])  # unreadable: its scan is skipped
    report = _preprocess(root, tmp_path / "c.h5")
    skipped = {p.path: p.reason for p in report.skipped}
    assert list(skipped) == [str(root / "subset0" / f"{uids[1]}.mhd")]
    assert "unreadable nodule" in skipped[str(root / "subset0" / f"{uids[1]}.mhd")]
    assert any("1 annotated scan(s) not here" in p.reason for p in report.notes)
    assert report.total_slices == 2 * CFG.slices_per_patient
    # a scan whose data file is missing or short is named, with why
    mhd = root / "subset0" / f"{uids[0]}.mhd"
    raw = mhd.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    skipped = {p.path: p.reason for p in _preprocess(root, tmp_path / "d.h5").skipped}
    assert f"{raw} holds 100 bytes where its header" in skipped[str(mhd)]
    raw.unlink()
    skipped = {p.path: p.reason for p in _preprocess(root, tmp_path / "e.h5").skipped}
    assert skipped[str(mhd)] == f"its data file {raw} is missing"
    # an annotation file without its columns is a clear error
    (root / "annotations.csv").write_text("uid,x,y\n1,2,3\n")
    with pytest.raises(LayoutError, match="no column seriesuid"):
        read_layout(root, "luna16")


def test_luna16_sphere_between_voxel_centres_is_noted(tmp_path):
    """A sphere that holds no voxel centre marks nothing, and says so."""
    volume = Volume(np.full((4, 16, 16), -1000, np.int16),
                    affine_from((0, 0, 0), np.eye(3), (2.0, 1.0, 1.0)))
    root = tmp_path / "luna"
    (root / "subset0").mkdir(parents=True)
    from nodulekit.data.volumes import write_metaimage

    write_metaimage(volume, root / "subset0" / "1.2.3.mhd")
    (root / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n"
                                          "1.2.3,5.5,5.5,3.0,0.5\n1.2.3,8,8,2,3\n")
    report = _preprocess(root, tmp_path / "c.h5")
    assert [p.reason for p in report.fixups] == [
        f"{root / 'annotations.csv'}:2: nodule at (5.5, 5.5, 3.0) mm, 0.5 mm, marks no voxel "
        "(between voxel centres)"]
    with Cache(tmp_path / "c.h5") as c:
        masks = np.concatenate([c.split(s).mask[()] for s in c.splits])
    # the second: radius 1.5 mm around (8, 8, 2): 9 + 4 voxels in one slice... counted here
    zz, yy, xx = np.meshgrid(np.arange(4) * 2.0, np.arange(16), np.arange(16), indexing="ij")
    expected = ((xx - 8) ** 2 + (yy - 8) ** 2 + (zz - 2) ** 2) <= 1.5 ** 2
    assert masks.sum() == expected.sum() > 0


def test_msd_missing_label_mismatched_label_and_test_images(tmp_path):
    result = _export(tmp_path, "msd")
    root = result.root
    (root / "labelsTr" / "lung_002.nii.gz").unlink()
    label = read_nifti(root / "labelsTr" / "lung_003.nii.gz")
    shifted = label.affine.copy()
    shifted[:3, 3] += (0.0, 2.5, 0.0)
    write_nifti(Volume(label.array, shifted), root / "labelsTr" / "lung_003.nii.gz")
    (root / "imagesTs").mkdir()
    shutil.copy(root / "imagesTr" / "lung_001.nii.gz", root / "imagesTs" / "lung_009.nii.gz")
    (root / "imagesTr" / "._lung_001.nii.gz").write_bytes(b"macOS resource fork")

    report = _preprocess(root, tmp_path / "c.h5")
    skipped = {p.path: p.reason for p in report.skipped}
    assert set(skipped) == {str(root / "imagesTr" / "lung_002.nii.gz"),
                            str(root / "imagesTr" / "lung_003.nii.gz")}
    assert "no label" in skipped[str(root / "imagesTr" / "lung_002.nii.gz")]
    reason = skipped[str(root / "imagesTr" / "lung_003.nii.gz")]
    assert str(root / "labelsTr" / "lung_003.nii.gz") in reason
    assert str(root / "imagesTr" / "lung_003.nii.gz") in reason
    assert "origin" in reason and "shape" not in reason
    assert any("1 test scan(s) without labels" in p.reason for p in report.notes)
    assert report.total_slices == CFG.slices_per_patient
    with Cache(tmp_path / "c.h5") as c:
        assert {p for s, r in c.skipped() for p in [s]} == set(skipped)

    with pytest.raises(PreprocessError, match="--strict"):
        _preprocess(root, tmp_path / "strict.h5", strict=True)
    assert not (tmp_path / "strict.h5").exists()


def test_msd_label_of_another_shape_or_spacing_is_named_with_its_values(tmp_path):
    result = _export(tmp_path, "msd")
    root = result.root
    label = read_nifti(root / "labelsTr" / "lung_001.nii.gz")
    coarse = label.affine.copy()
    coarse[:3, :3] *= 2
    write_nifti(Volume(label.array[:, ::2], coarse), root / "labelsTr" / "lung_001.nii.gz")
    report = _preprocess(root, tmp_path / "c.h5")
    (problem,) = report.skipped
    assert problem.path == str(root / "imagesTr" / "lung_001.nii.gz")
    assert "shape (6, 64, 64) vs (6, 32, 64)" in problem.reason
    assert "spacing" in problem.reason


def test_series_label_of_another_spacing_missing_slice_and_mixed_series(tmp_path):
    result = _export(tmp_path, "series", cfg=SynthConfig(size=64, patients=4,
                                                         slices_per_patient=6, seed=3))
    root = result.root
    folders = sorted(root.glob("patient_*/series_1"))[:3]
    # patient 1: a missing slice; patient 2: a slice of another series in its folder
    (folders[1] / "0003.dcm").unlink()
    import pydicom

    stranger = pydicom.dcmread(folders[0] / "0001.dcm")
    stranger.SeriesInstanceUID = "1.2.3.4"
    stranger.save_as(folders[2] / "9999.dcm")
    # patient 0: its label on a grid of another spacing
    label_path = folders[0].with_name("series_1.nii.gz")
    label = read_nifti(label_path)
    stretched = label.affine.copy()
    stretched[:3, 2] *= 1.5
    write_nifti(Volume(label.array, stretched), label_path)
    (root / "stray.nii.gz").write_bytes(label_path.read_bytes())
    (folders[0] / "README").write_text("not a slice")  # no suffix, no DICM: not read

    report = _preprocess(root, tmp_path / "c.h5")
    skipped = {p.path: p.reason for p in report.skipped}
    assert set(skipped) == {str(f) for f in folders} | {str(root / "stray.nii.gz")}
    assert str(label_path) in skipped[str(folders[0])]
    assert "spacing" in skipped[str(folders[0])]
    assert "0002.dcm" in skipped[str(folders[1])] and "missing slice" in skipped[str(folders[1])]
    assert "mixed series" in skipped[str(folders[2])] and "1.2.3.4" in skipped[str(folders[2])]
    assert "beside no series folder" in skipped[str(root / "stray.nii.gz")]
    assert report.total_slices == CFG.slices_per_patient  # the fourth patient's


def test_series_label_as_dicom_seg(tmp_path):
    """A DICOM SEG beside the folder (X.seg.dcm) labels the series it references; it is no
    slice of the folder it lies in."""
    from nodulekit.data.seg import write_seg
    from nodulekit.data.volumes import read_dicom_series

    result = _export(tmp_path, "series")
    root = result.root
    for label in sorted(root.glob("patient_*/series_1.nii.gz")):
        series = read_dicom_series(label.with_name("series_1"))
        write_seg(read_nifti(label).array, series.files, label.with_name("series_1.seg.dcm"))
        label.unlink()
    assert detect_layout(root) == "series"
    report = _preprocess(root, tmp_path / "c.h5")
    assert report.skipped == [] and report.total_slices == 18
    for row, _, mask in _cache_rows(tmp_path / "c.h5"):
        p, k = _generator_slice(result, "axial", row)
        np.testing.assert_array_equal(mask, render_slice(CFG, p, k)[1])


def test_series_without_label_has_no_nodule(tmp_path):
    result = _export(tmp_path, "series")
    root = result.root
    for label in root.glob("patient_*/series_1.nii.gz"):
        label.unlink()
    assert detect_layout(root) == "folder"  # nothing says "series" now: named instead
    report = _preprocess(root, tmp_path / "c.h5", layout="series")
    assert report.skipped == [] and report.total_slices == 18
    assert all(c["nodule_slices"] == 0 for c in report.counts.values())


@pytest.mark.parametrize("columns", [(2, 0, 1), (1, 2, 0), (0, 1, 2)])
@pytest.mark.parametrize("signs", [(1, 1, 1), (-1, 1, -1), (1, -1, 1)])
def test_canonical_keeps_every_voxel_in_its_place(columns, signs):
    """Any axis order and direction (a sagittal scan, one stored feet first, ...): turned to
    slices along z, rows along y, columns along x, each voxel value where it was."""
    from nodulekit.data.scans import canonical, canonical_grid

    rng = np.random.default_rng(sum(columns) * 7 + sum(signs))
    direction = np.eye(3)[:, list(columns)] * np.array(signs)
    affine = affine_from((10.0, -20.0, 30.0), direction, (2.0, 0.7, 0.9))
    scan = Volume(rng.integers(-1000, 1000, (3, 4, 5)).astype(np.int16), affine)
    turned = canonical(scan)
    np.testing.assert_allclose(np.abs(turned.direction), np.eye(3), atol=1e-12)
    assert (np.diag(turned.direction) > 0).all()
    slices, shape, spacing = canonical_grid(scan.shape, scan.affine)
    assert turned.shape == (slices, *shape) and turned.spacing[1:] == pytest.approx(spacing)
    index = np.stack(np.meshgrid(*map(np.arange, turned.shape), indexing="ij"), axis=-1)
    old = np.rint(scan.to_index(turned.to_patient(index))).astype(int)
    np.testing.assert_array_equal(scan.array[old[..., 0], old[..., 1], old[..., 2]],
                                  turned.array)


# ----------------------------------------------------------------------------- detection


def test_detection_of_every_layout(tmp_path):
    uni = synthesize(tmp_path / "uni", SynthConfig(size=32, patients=3, slices_per_patient=2))
    assert detect_layout(uni.root) == "unitochest"
    folder = tmp_path / "folder"
    shutil.copytree(uni.root / "train" / "images", folder / "images")
    shutil.copytree(uni.root / "train" / "masks", folder / "masks")
    assert detect_layout(folder) == "folder"
    small = SynthConfig(size=32, patients=3, slices_per_patient=2)
    for fmt in FORMATS:
        assert detect_layout(synthesize(tmp_path / fmt, small, format=fmt).root) == fmt
    # two layouts in one folder: named, not guessed
    shutil.copy(tmp_path / "msd" / "dataset.json", tmp_path / "luna16" / "dataset.json")
    (tmp_path / "luna16" / "imagesTr").mkdir()
    with pytest.raises(LayoutError, match="more than one layout"):
        detect_layout(tmp_path / "luna16")
    png = next((folder / "masks").rglob("*.png"))
    shutil.copy(png, tmp_path / "series" / "mask.png")
    with pytest.raises(LayoutError, match="name the layout"):
        detect_layout(tmp_path / "series")


def test_overwrite_accepts_each_formats_files_only(tmp_path):
    small = SynthConfig(size=32, patients=2, slices_per_patient=2)
    root = tmp_path / "d"
    for fmt in ("msd", "luna16", "series", "unitochest", "series"):
        synthesize(root, small, format=fmt, overwrite=True)
    (root / "patient_0001" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        synthesize(root, small, format="msd", overwrite=True)
    with pytest.raises(ValueError, match="whole scans"):
        synthesize(tmp_path / "e", small, orientation="oblique")


# ----------------------------------------------------------------------------- resampling


def test_resampling_round_trip_and_grid_rule():
    """0.7 -> 1.4 -> 0.7 mm: the image comes back close, a mask made of 2 x 2 blocks (so
    no nearest-pixel choice is a tie) exactly; the grid keeps its field of view and centre."""
    n = 64
    y, x = np.mgrid[:n, :n] * 0.7
    hu = (-600 + 400 * np.sin(x / 9.0) * np.cos(y / 7.0)).round().astype(np.int16)
    mask = np.zeros((n // 2, n // 2), np.uint8)
    mask[5:11, 7:12] = 1
    mask[20:23, 3:5] = 1
    mask = np.kron(mask, np.ones((2, 2), np.uint8))
    coarse = resample.regrid(hu, mask, (0.7, 0.7), 1.4, None)
    assert coarse.hu.shape == (32, 32) and coarse.offset == (0.5, 0.5)
    # output pixel i samples input 2i + 0.5: the mean of a block, the mask's block value
    np.testing.assert_array_equal(coarse.mask, mask[::2, ::2])
    back = resample.regrid(coarse.hu, coarse.mask, (1.4, 1.4), 0.7, None)
    assert back.hu.shape == (n, n) and back.offset == (-0.25, -0.25)
    np.testing.assert_array_equal(back.mask, mask)
    error = np.abs(back.hu.astype(float) - hu)
    assert error[2:-2, 2:-2].max() <= 6 and error.mean() < 2
    # sizes: round(n * old / new), at least 1; rows and columns apart
    assert resample.resampled_shape((512, 400), (0.7, 0.8), 1.0) == (358, 320)
    assert resample.resampled_shape((3, 3), (0.1, 0.1), 5.0) == (1, 1)
    assert resample.common_size([(10, 10), (12, 12), (10, 10), (12, 12), (8, 8)]) == (12, 12)


def test_fit_pads_with_air_crops_and_counts_the_nodule_pixels_it_would_cut():
    hu = np.arange(16, dtype=np.int16).reshape(4, 4)
    mask = np.zeros((4, 4), np.uint8)
    (padded, padded_mask), top_left, lost = resample.fit(hu, mask, (6, 7))
    assert top_left == (-1, -2) and lost == 0
    np.testing.assert_array_equal(padded[1:5, 2:6], hu)
    assert (padded == resample.AIR_HU).sum() == 42 - 16 and padded_mask.sum() == 0
    mask[0, 0] = mask[1, 1] = 1
    (cropped, cropped_mask), top_left, lost = resample.fit(hu, mask, (2, 2))
    assert top_left == (1, 1) and lost == 1
    np.testing.assert_array_equal(cropped, hu[1:3, 1:3])
    refused = resample.regrid(hu, mask, (1.0, 1.0), 1.0, (2, 2))
    assert refused.hu is None and refused.lost_nodule_pixels == 1


@pytest.mark.parametrize("fmt", ["unitochest", "msd"])
def test_spacing_in_the_cache(tmp_path, fmt):
    """`--spacing`: each slice as `resample.regrid` makes it, its new spacing and position
    recorded, and the source spacing kept; DICOM slices (workers' path) and scans alike."""
    result = synthesize(tmp_path / "d", CFG, format=fmt)
    report = _preprocess(result.root, tmp_path / "c.h5", spacing=3.5)
    assert report.spacing_mm == 3.5 and "at 3.5 mm" in report.format()
    sizes = [resample.resampled_shape((64, 64), (anatomy(CFG, p).grid.spacing,) * 2, 3.5)
             for p in range(CFG.patients)]
    assert report.image_shape == resample.common_size(sizes)
    with Cache(tmp_path / "c.h5") as c:
        assert c.attrs["spacing_mm"] == 3.5
        rows = 0
        for name in c.splits:
            split = c.split(name)
            m = split.meta
            for i in range(len(split)):
                p = int(m["patient"][i].removeprefix("lung_")) - 1
                body = anatomy(CFG, p)
                k = int(np.argmin(np.abs(body.z - m["slice_position"][i])))
                hu, mask = render_slice(CFG, p, k)
                # the spacing as the file holds it: DICOM's 10 digits, NIfTI's float32
                stored = (float(f"{body.grid.spacing:.10g}") if fmt == "unitochest"
                          else float(np.float32(body.grid.spacing)))
                expected = resample.regrid(hu, mask, (stored, stored), 3.5, report.image_shape)
                np.testing.assert_array_equal(split.hu[i], expected.hu)
                np.testing.assert_array_equal(
                    split.mask[i], np.zeros_like(expected.hu, np.uint8)
                    if expected.mask is None else expected.mask)
                np.testing.assert_allclose(m["pixel_spacing"][i], 3.5)
                np.testing.assert_allclose(m["source_pixel_spacing"][i], body.grid.spacing,
                                           rtol=1e-6)
                origin = body.grid.origin + np.array(expected.offset)[::-1] * body.grid.spacing
                np.testing.assert_allclose(m["image_position"][i][:2], origin, atol=POSITION_MM)
                rows += 1
    assert rows == CFG.patients * CFG.slices_per_patient


def test_spacing_size_rule_on_scans_of_other_fields_of_view(tmp_path):
    """The most common resampled size wins; a larger scan is cropped, and a slice whose
    crop would cut its nodule is skipped, said why; a smaller one is padded with air."""
    root = tmp_path / "msd"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "hand-made"}))
    for i, size in enumerate((20, 20, 28, 16)):
        hu = np.full((3, size, size), -800, np.int16)
        label = np.zeros((3, size, size), np.uint8)
        label[1, 1:3, 1:3] = 1  # a corner nodule in slice 1
        label[2, size // 2, size // 2] = 1  # a central one in slice 2
        affine = affine_from((0, 0, 0), np.eye(3), (2.0, 1.0, 1.0))
        write_nifti(Volume(hu, affine), root / "imagesTr" / f"lung_{i:03d}.nii.gz")
        write_nifti(Volume(label, affine), root / "labelsTr" / f"lung_{i:03d}.nii.gz")
    report = _preprocess(root, tmp_path / "c.h5", spacing=1.0)
    assert report.image_shape == (20, 20)
    assert [p.path for p in report.skipped] == [f"{root / 'imagesTr' / 'lung_002.nii.gz'} "
                                                "slice 1"]
    assert "cropping it to the cache's 20x20 would cut 4 nodule pixel(s)" in \
        report.skipped[0].reason
    assert report.total_slices == 4 * 3 - 1
    with Cache(tmp_path / "c.h5") as c:
        for name in c.splits:
            split = c.split(name)
            for i, patient in enumerate(split.meta["patient"]):
                if patient == "lung_003":  # 16 -> 20: two pixels of air on each side
                    assert (split.hu[i][:2] == -1024).all() and (split.hu[i][2:18, 2:18]
                                                                 == -800).all()
                    np.testing.assert_allclose(split.meta["image_position"][i][:2], -2.0)
                if patient == "lung_002":  # 28 -> 20, cropped about the centre
                    np.testing.assert_allclose(split.meta["image_position"][i][:2], 4.0)
    with pytest.raises(PreprocessError, match="--spacing"):
        _preprocess(root, tmp_path / "bad.h5", spacing=0.0)


# ----------------------------------------------------------------------------- the cache


def test_old_cache_without_the_new_columns_opens(tmp_path):
    n = 4
    path = write_cache(tmp_path / "old.h5", {"train": {
        "hu": np.zeros((n, 8, 8), np.int16), "mask": np.zeros((n, 8, 8), np.uint8)}})
    with h5py.File(path, "r") as f:
        assert "image_position" not in f["train/meta"]
    with Cache(path) as c:
        m = c.split("train").meta
        assert m["image_position"].shape == (n, 3) and np.isnan(m["image_position"]).all()
        assert m["image_orientation"].shape == (n, 6)
        assert np.isnan(m["image_orientation"]).all()
        np.testing.assert_array_equal(m["source_pixel_spacing"], m["pixel_spacing"])
        assert len(c.split("val").meta["image_position"]) == 0


def test_cli_synth_formats_and_preprocess_layouts(tmp_path):
    runner = CliRunner()
    data = tmp_path / "luna"
    done = runner.invoke(main, ["synth", str(data), "--size", "32", "--patients", "3",
                                "--slices-per-patient", "2", "--format", "luna16",
                                "--orientation", "flipped", "--workers", "0",
                                "--no-progress"])
    assert done.exit_code == 0, done.output
    assert (data / "annotations.csv").is_file()
    done = runner.invoke(main, ["preprocess", str(data), str(tmp_path / "c.h5"),
                                "--spacing", "10", "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "luna16 layout" in done.output and "at 10 mm" in done.output
    done = runner.invoke(main, ["preprocess", str(data), str(tmp_path / "d.h5"),
                                "--layout", "msd", "--no-progress"])
    assert done.exit_code != 0 and "no imagesTr/" in done.output

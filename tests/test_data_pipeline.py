"""The synthetic CT generator, then synth -> preprocess -> cache -> loader, against the
generator's ground truth."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from PIL import Image

from nodulekit.data import preprocess as preprocess_module
from nodulekit.data.cache import FORMAT_VERSION, Cache, CacheError
from nodulekit.data.loader import eval_loader
from nodulekit.data.preprocess import PreprocessError, preprocess
from nodulekit.data.synth import SynthConfig, anatomy, render_slice, synthesize
from nodulekit.data.synth_anatomy import NODULE_PLAN, Tissue
from nodulekit.data.synth_geometry import in_lung, wall
from nodulekit.data.synth_nodules import TABLE3_COUNTS, TABLE3_RANGES, plan_nodules


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "data"
    return synthesize(root, SynthConfig(size=128, patients=4, slices_per_patient=10, seed=7))


@pytest.fixture(scope="module")
def cache_path(synth_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "cache.h5"
    report = preprocess(synth_set.root, out, workers=0, progress=False)
    assert report.skipped == [] and report.fixups == []
    return out


def test_synth_is_reproducible_and_realistic(synth_set):
    cfg = synth_set.config
    again = render_slice(cfg, 0, 3)
    first = synth_set.truth(next(s for s in synth_set.slices if s.patient == 0
                                 and s.slice_index == 3))
    np.testing.assert_array_equal(again[0], first[0])
    np.testing.assert_array_equal(again[1], first[1])
    hu, _ = render_slice(cfg, 1, 0)
    assert hu.dtype == np.int16
    corner = hu[:8, :8]
    assert abs(float(corner.mean()) + 1000) < 30  # air
    assert np.percentile(hu, 99.9) > 300  # bone somewhere
    assert ((hu > -950) & (hu < -750)).mean() > 0.05  # lung parenchyma
    assert ((hu > -20) & (hu < 80)).mean() > 0.04  # soft tissue
    assert ((hu > -150) & (hu < -50)).mean() > 0.04  # fat
    assert hu.min() >= -1024 and hu.max() <= 3071
    # A different seed is a different data set.
    other = render_slice(SynthConfig(size=128, patients=4, slices_per_patient=10, seed=8), 0, 3)
    assert not np.array_equal(other[0], again[0])


def test_synth_files_carry_real_tags(synth_set):
    s = synth_set.slices[5]
    ds = pydicom.dcmread(synth_set.root / s.image)
    assert ds.Modality == "CT"
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    # 0.6 to 0.85 mm at 512 pixels; 128 pixels cover the same field of view
    assert float(ds.PixelSpacing[0]) == pytest.approx(s.pixel_spacing_mm)
    assert 0.6 * 4 <= s.pixel_spacing_mm <= 0.85 * 4
    assert float(ds.SliceThickness) in (1.0, 1.25, 1.5, 2.0)
    assert int(ds.InstanceNumber) == s.instance_number
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(s.z_mm)
    assert ds.PatientID == s.patient_id
    if s.mask:
        png = np.asarray(Image.open(synth_set.root / s.mask))
        assert set(np.unique(png).tolist()) == {0, 255}


def test_synth_refuses_to_overwrite(synth_set):
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(synth_set.root, synth_set.config)


# ----------------------------------------------------------------------------- the generator


def _grow(m: np.ndarray) -> np.ndarray:
    """A boolean mask grown by one pixel (4-neighbours)."""
    g = m.copy()
    g[1:] |= m[:-1]
    g[:-1] |= m[1:]
    g[:, 1:] |= m[:, :-1]
    g[:, :-1] |= m[:, 1:]
    return g


def test_synth_has_a_real_ct_geometry(tmp_path):
    """512 pixels of 0.6 to 0.85 mm, drawn per patient; other sizes keep the field of view."""
    cfg = SynthConfig(size=512, patients=40, slices_per_patient=1, seed=11)
    spacing = np.array([cfg.spacing_mm(p) for p in range(cfg.patients)])
    assert spacing.min() >= 0.6 and spacing.max() <= 0.85 and np.ptp(spacing) > 0.1
    small = SynthConfig(size=128, patients=40, slices_per_patient=1, seed=11)
    np.testing.assert_allclose([small.spacing_mm(p) for p in range(40)], spacing * 4)
    written = synthesize(tmp_path / "d", SynthConfig(size=512, patients=2, slices_per_patient=1,
                                                     seed=11), workers=0)
    for s in written.slices:
        ds = pydicom.dcmread(written.root / s.image)
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert float(ds.PixelSpacing[0]) == pytest.approx(spacing[s.patient])
        assert anatomy(written.config, s.patient).grid.spacing == pytest.approx(spacing[s.patient])
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        border = np.concatenate([hu[0], hu[-1], hu[:, 0], hu[:, -1]])
        assert np.all(border < -900)  # the body fits in the field of view


# Median HU each tissue must have (Hounsfield's scale; blur, noise and partial volume in).
TISSUE_HU = {Tissue.AIR: (-1024, -980), Tissue.FAT: (-130, -60), Tissue.MUSCLE: (10, 70),
             Tissue.MEDIASTINAL_FAT: (-130, -50), Tissue.LUNG: (-900, -700),
             Tissue.BLOOD: (20, 260), Tissue.MYOCARDIUM: (20, 160), Tissue.CORTEX: (300, 1200),
             Tissue.MARROW: (100, 400), Tissue.LIVER: (30, 160), Tissue.SPLEEN: (30, 160),
             Tissue.AIRWAY: (-1024, -800), Tissue.CANAL: (0, 60), Tissue.DISC: (50, 130)}


def test_synth_tissues_have_plausible_hu():
    cfg = SynthConfig(size=256, patients=4, slices_per_patient=12, seed=5)
    pooled: dict[Tissue, list[np.ndarray]] = {t: [] for t in Tissue}
    for p in range(cfg.patients):
        for k in (0, cfg.slices_per_patient - 1):
            hu, _, labels = render_slice(cfg, p, k, labels=True)
            for t in Tissue:
                pooled[t].append(hu[labels == t])
    seen = {t: np.concatenate(v) for t, v in pooled.items()}
    for t, (lo, hi) in TISSUE_HU.items():
        if seen[t].size >= 30:
            assert lo <= np.median(seen[t]) <= hi, (t.name, np.median(seen[t]))
    must = {Tissue.FAT, Tissue.MUSCLE, Tissue.MEDIASTINAL_FAT, Tissue.LUNG, Tissue.BLOOD,
            Tissue.CORTEX, Tissue.MARROW, Tissue.AIRWAY, Tissue.NODULE}
    assert all(seen[t].size >= 30 for t in must), {t.name: seen[t].size for t in must}
    lung = seen[Tissue.LUNG]
    assert np.percentile(lung, 1) > -1000 and np.percentile(lung, 99) < -400


def test_synth_vessels_continue_from_slice_to_slice():
    """A lung vessel in one slice is there (within a pixel) in the next; 16 slices away
    the vessels are elsewhere: they are 3-D tubes, not drawn per slice."""
    cfg = SynthConfig(size=256, patients=2, slices_per_patient=20, seed=3)
    for p in range(cfg.patients):
        vessels = []
        for k in range(cfg.slices_per_patient):
            _, _, labels = render_slice(cfg, p, k, labels=True)
            lung = _grow(_grow(labels == Tissue.LUNG))
            vessels.append((labels == Tissue.BLOOD) & lung)
        assert np.mean([v.sum() for v in vessels]) > 100  # vessels in every lung slice

        def kept(a, b):
            return (a & _grow(b)).sum() / max(a.sum(), 1)

        near = [kept(vessels[k], vessels[k + 1]) for k in range(len(vessels) - 1)]
        far = [kept(vessels[k], vessels[k + 16]) for k in range(len(vessels) - 16)]
        assert np.mean(near) > 0.6 and min(near) > 0.5, near
        assert np.mean(far) < 0.3, far


def test_synth_nodule_sizes_follow_table_3():
    """The diameters' bins in the paper's proportions (Table 3: 1.8%, 73.6%, 21.6%, 3.0%)."""
    plans = [plan for p in range(3000)
             for plan in plan_nodules(np.random.default_rng([0, p, NODULE_PLAN, 0]), 4)]
    d = np.array([plan.diameter for plan in plans])
    assert d.min() >= 1.0 and d.max() <= 136.0
    expected = np.array(TABLE3_COUNTS) / sum(TABLE3_COUNTS)
    share = np.array([np.mean((d >= lo) & (d < hi)) for lo, hi in TABLE3_RANGES])
    tolerance = 4 * np.sqrt(expected * (1 - expected) / len(d)) + 0.002
    assert np.all(np.abs(share - expected) < tolerance), (share, expected)
    kinds = [plan.kind for plan in plans]
    assert 0.65 < kinds.count("solid") / len(kinds) < 0.85
    assert kinds.count("part-solid") > 0.05 * len(kinds)
    assert kinds.count("ground-glass") > 0.05 * len(kinds)
    # The anatomy places what was planned (each nodule finds a place).
    cfg = SynthConfig(size=64, patients=6, slices_per_patient=8, seed=0)
    for p in range(cfg.patients):
        planned = plan_nodules(np.random.default_rng([0, p, NODULE_PLAN, 0]), 4)
        placed = [s.nodule.diameter_mm for s in anatomy(cfg, p).nodules]
        assert placed == [plan.diameter for plan in planned]


def _distance_to_tubes(tubes, point) -> np.ndarray:
    d = tubes.b - tubes.a
    u = np.clip(np.einsum("ij,ij->i", point - tubes.a, d)
                / np.maximum(np.einsum("ij,ij->i", d, d), 1e-12), 0, 1)
    return np.linalg.norm(point - tubes.a - u[:, None] * d, axis=1)


def test_synth_places_juxta_pleural_and_vessel_attached_nodules():
    cfg = SynthConfig(size=256, patients=16, slices_per_patient=16, seed=1)
    seen = {"pleura": 0, "vessel": 0, "": 0}
    wall_tissue = [Tissue.MUSCLE, Tissue.SOFT, Tissue.CORTEX, Tissue.MARROW, Tissue.CARTILAGE]
    for p in range(cfg.patients):
        body = anatomy(cfg, p)
        for shape in body.nodules:
            n = shape.nodule
            x, y, z = n.center_mm
            r = n.diameter_mm / 2
            assert in_lung(body.chest, np.array(x), np.array(y), np.array(z))
            seen[n.attached] += 1
            if n.attached == "":
                continue
            k = int(np.flatnonzero(body.z == z)[0])
            _, mask, labels = render_slice(cfg, p, k, labels=True)
            touching = _grow(_grow(mask.astype(bool)))
            if n.attached == "pleura":
                depth = float(wall(body.chest, np.array(x), np.array(y)).cavity)
                assert depth <= r + 1.0, (n, depth)
                assert np.isin(labels[touching], wall_tissue).any(), n
            else:
                gap = _distance_to_tubes(body.vessels, np.array(n.center_mm)) - body.vessels.r
                assert gap.min() <= r, (n, gap.min())
    assert seen["pleura"] >= 3 and seen["vessel"] >= 3 and seen[""] >= 10, seen


def test_synth_masks_cover_nodules_only(synth_set):
    cfg = synth_set.config
    checked = 0
    for s in synth_set.slices:
        hu, mask, labels = render_slice(cfg, s.patient, s.slice_index, labels=True)
        assert np.array_equal(mask.astype(bool), labels == Tissue.NODULE)
        if not mask.any():
            continue
        # every mask pixel is within a nodule of this patient that reaches this slice
        rows, cols = np.nonzero(mask)
        body = anatomy(cfg, s.patient)
        mm = body.grid.origin + body.grid.spacing * np.stack([cols, rows], 1)
        near = np.zeros(len(rows), dtype=bool)
        for shape in body.nodules:
            cx, cy, cz = shape.nodule.center_mm
            reach = shape.reach + body.grid.spacing
            if abs(s.z_mm - cz) <= reach:
                near |= np.hypot(mm[:, 0] - cx, mm[:, 1] - cy) <= reach
        assert near.all()
        checked += 1
    assert checked >= 5


def test_synth_is_a_function_of_the_seed():
    cfg = SynthConfig(size=96, patients=3, slices_per_patient=6, seed=21)
    first = [render_slice(cfg, p, k, labels=True) for p in range(3) for k in (0, 5)]
    anatomy.cache_clear()  # everything drawn again from the seed
    again = [render_slice(cfg, p, k, labels=True) for p in range(3) for k in (0, 5)]
    for a, b in zip(first, again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    other = render_slice(SynthConfig(size=96, patients=3, slices_per_patient=6, seed=22), 0, 0)
    assert not np.array_equal(other[0], first[0][0])


def test_hu_and_masks_through_the_pipeline_equal_the_ground_truth(synth_set, cache_path):
    by_source = {s.image: s for s in synth_set.slices}
    seen = 0
    with Cache(cache_path) as cache:
        for split in cache.splits:
            meta = cache.split(split).meta
            with eval_loader(cache, split, batch_size=7, num_workers=2) as loader:
                for batch in loader:
                    hu, mask, aug = batch
                    assert hu.dtype == np.int16 and mask.dtype == np.uint8
                    assert hu.flags.c_contiguous and mask.flags.c_contiguous
                    assert not aug.any()
                    for j, row in enumerate(batch.index):
                        s = by_source[meta["source"][row]]
                        truth_hu, truth_mask = synth_set.truth(s)
                        np.testing.assert_array_equal(hu[j], truth_hu)
                        np.testing.assert_array_equal(mask[j], truth_mask)
                        assert meta["has_nodule"][row] == bool(truth_mask.any())
                        seen += 1
    assert seen == len(synth_set.slices)


def test_cache_layout_and_metadata(synth_set, cache_path):
    with h5py.File(cache_path, "r") as f:
        # strings are fixed-length UTF-8 (checksummed with the header): h5py gives bytes
        assert f.attrs["format"] == b"nodulekit-cache"
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f.attrs["window_center"] == -500 and f.attrs["window_width"] == 1600
        assert f.attrs["created_by"].decode().startswith("nodulekit ")
        for split in ("train", "val", "test"):
            g = f[split]
            n = g["hu"].shape[0]
            assert g["hu"].dtype == np.int16 and g["hu"].chunks == (1, 128, 128)
            assert g["mask"].dtype == np.uint8 and g["mask"].shape == (n, 128, 128)
            assert g["meta/pixel_spacing"].shape == (n, 2)
            assert set(np.unique(g["mask"][()]).tolist()) <= {0, 1}
    with Cache(cache_path) as cache:
        total = sum(len(cache.split(s)) for s in cache.splits)
        assert total == len(synth_set.slices)
        m = cache.split("train").meta
        assert np.all(np.diff(m["slice"][m["patient"] == m["patient"][0]]) > 0)  # ordered
        spacing = {s.patient_id: s.pixel_spacing_mm for s in synth_set.slices}
        expected = [spacing[pid] for pid in m["patient"].tolist()]
        assert np.allclose(m["pixel_spacing"], np.array(expected)[:, None])
        rows = cache.split("train").nodule_rows()
        assert np.all(m["n_nodules"][rows] >= 1)
        assert np.all(np.isnan(m["max_diameter_mm"][cache.split("train").empty_rows()]))
        bins = cache.split("train").diameter_bins()
        assert all((b is None) == (not m["has_nodule"][i]) for i, b in enumerate(bins))


def test_nodule_diameters_match_the_generator(synth_set, cache_path):
    """Nodules several pixels across are measured (largest section, linked over slices)
    within about a pixel of the generator's diameter."""
    checked = 0
    with Cache(cache_path) as cache:
        for split in cache.splits:
            m = cache.split(split).meta
            for nodule in synth_set.nodules:
                pixel = synth_set.config.spacing_mm(nodule.patient)
                if nodule.diameter_mm < 4 * pixel:
                    continue
                pid = f"{nodule.patient + 1:04d}"
                centre = np.flatnonzero((m["patient"] == pid) & np.isclose(
                    m["slice_position"], nodule.center_mm[2], atol=1e-3))
                if len(centre) == 0:
                    continue  # that patient is in another split
                measured = m["nodule_diameter_mm"][centre[0]]
                measured = measured[~np.isnan(measured)]
                assert np.min(np.abs(measured - nodule.diameter_mm)) <= 1.5 * pixel, (
                    nodule, measured)
                checked += 1
    assert checked >= 2


def test_workers_give_the_same_cache(synth_set, cache_path, tmp_path):
    out = tmp_path / "parallel.h5"
    report = preprocess(synth_set.root, out, workers=2, progress=False)
    assert report.workers == 2 and report.total_slices == len(synth_set.slices)
    with Cache(cache_path) as a, Cache(out) as b:
        for split in a.splits:
            sa, sb = a.split(split), b.split(split)
            np.testing.assert_array_equal(sa.hu[()], sb.hu[()])
            np.testing.assert_array_equal(sa.mask[()], sb.mask[()])
            for key, value in sa.meta.items():
                np.testing.assert_array_equal(value, sb.meta[key], err_msg=key)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def damaged_set(synth_set, tmp_path):
    """A copy of the synthetic set with one bad file of each kind:
    reason -> (bad file, the slice's image source it takes out)."""
    root = tmp_path / "damaged"
    shutil.copytree(synth_set.root, root)
    train = [s for s in synth_set.slices if s.split == "train"]
    with_mask = [s for s in train if s.mask]
    without_mask = [s for s in train if not s.mask]
    bad = {}
    truncated = root / without_mask[0].image
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    bad["truncated"] = (truncated, without_mask[0].image)
    mr = root / without_mask[1].image
    ds = pydicom.dcmread(mr)
    ds.Modality = "MR"
    ds.save_as(mr, enforce_file_format=True)
    bad["'MR', not CT"] = (mr, without_mask[1].image)
    grey = root / with_mask[0].mask
    pixels = np.asarray(Image.open(grey)).copy()
    pixels[0, 0] = 128
    Image.fromarray(pixels).save(grey)
    bad["not a binary mask"] = (grey, with_mask[0].image)
    small = root / with_mask[1].mask
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(small)
    bad["size 64x64 differs"] = (small, with_mask[1].image)
    text = root / without_mask[2].image
    text.write_text("not an image")
    bad["not a DICOM file"] = (text, without_mask[2].image)
    return root, bad


def test_skipped_files_are_reported_with_the_reason(damaged_set, tmp_path):
    root, bad = damaged_set
    out = tmp_path / "c.h5"
    report = preprocess(root, out, workers=0, progress=False)
    assert len(report.skipped) == len(bad)
    text = report.format()
    for reason, (path, _) in bad.items():
        # Each skip names the file at fault and says what is wrong with it.
        assert any(reason in p.reason and str(path) in f"{p.path} {p.reason}"
                   for p in report.skipped), (reason, report.skipped)
        assert reason in text
    with Cache(out) as cache:
        assert len(cache.skipped()) == len(bad)
        sources = set(cache.split("train").meta["source"].tolist())
    assert sources.isdisjoint(source for _, source in bad.values())
    with open(root / "train" / "train_dataset.csv") as f:
        listed = len(f.read().splitlines()) - 1
    assert len(sources) == listed - len(bad)


def test_workers_skip_like_the_inline_decoder(damaged_set, tmp_path):
    """Workers write each slice's HU at the row it would have without skips; a skipped
    file before it moves it up. The cache must be the one decoded inline."""
    root, bad = damaged_set
    inline = preprocess(root, tmp_path / "inline.h5", workers=0, progress=False)
    pooled = preprocess(root, tmp_path / "pooled.h5", workers=2, progress=False)
    assert [(p.path, p.reason) for p in pooled.skipped] == [
        (p.path, p.reason) for p in inline.skipped]
    assert len(pooled.skipped) == len(bad)
    with Cache(tmp_path / "inline.h5") as a, Cache(tmp_path / "pooled.h5") as b:
        for split in a.splits:
            sa, sb = a.split(split), b.split(split)
            assert sa.hu.shape == sb.hu.shape
            np.testing.assert_array_equal(sa.hu[()], sb.hu[()])
            np.testing.assert_array_equal(sa.mask[()], sb.mask[()])
            for key, value in sa.meta.items():
                np.testing.assert_array_equal(value, sb.meta[key], err_msg=key)
        assert a.skipped() == b.skipped()


def test_workers_handle_a_bad_first_file_and_an_odd_size(synth_set, tmp_path):
    """The first file in the layout's order is unreadable (so the parent decodes on until
    a readable one sets the slice size) and a later one is of another size (a worker
    measures it, writes nothing, and the parent skips it)."""
    from nodulekit.data.layout import read_layout

    root = tmp_path / "odd"
    shutil.copytree(synth_set.root, root)
    records = read_layout(root).records
    Path(records[0].image).write_bytes(b"not a DICOM file at all")
    odd = next(r for r in records[len(records) // 2:] if not r.mask)
    ds = pydicom.dcmread(odd.image)
    small = ds.pixel_array[::2, ::2].copy()
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    ds.save_as(odd.image, enforce_file_format=True)
    inline = preprocess(root, tmp_path / "inline.h5", workers=0, progress=False)
    pooled = preprocess(root, tmp_path / "pooled.h5", workers=2, progress=False)
    reasons = [(p.path, p.reason) for p in pooled.skipped]
    assert reasons == [(p.path, p.reason) for p in inline.skipped] and len(reasons) == 2
    assert "not a DICOM file" in reasons[0][1] and "differs from the cache's" in reasons[1][1]
    with Cache(tmp_path / "inline.h5") as a, Cache(tmp_path / "pooled.h5") as b:
        for split in a.splits:
            np.testing.assert_array_equal(a.split(split).hu[()], b.split(split).hu[()])
            np.testing.assert_array_equal(a.split(split).mask[()], b.split(split).mask[()])
            for key, value in a.split(split).meta.items():
                np.testing.assert_array_equal(value, b.split(split).meta[key], err_msg=key)


def test_strict_turns_a_skip_into_an_error(damaged_set, tmp_path):
    root, bad = damaged_set
    with pytest.raises(PreprocessError, match="--strict"):
        preprocess(root, tmp_path / "c.h5", workers=0, strict=True, progress=False)
    assert os.listdir(tmp_path) == ["damaged"]  # nothing written, no temporary left


def test_existing_output_is_kept_unless_overwrite(synth_set, tmp_path):
    out = tmp_path / "c.h5"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        preprocess(synth_set.root, out, workers=0, progress=False)
    assert out.read_bytes() == b"precious"
    # --overwrite replaces a cache only, never a file preprocess did not write
    with pytest.raises(PreprocessError, match="not a nodulekit cache"):
        preprocess(synth_set.root, out, workers=0, overwrite=True, progress=False)
    assert out.read_bytes() == b"precious"
    out.unlink()
    preprocess(synth_set.root, out, workers=0, progress=False)
    preprocess(synth_set.root, out, workers=0, overwrite=True, progress=False)
    with Cache(out) as cache:
        assert len(cache.split("train")) > 0


def test_interrupted_run_leaves_nothing_half_written(synth_set, tmp_path, monkeypatch):
    out = tmp_path / "c.h5"
    original = preprocess_module._CacheWriter.add
    calls = {"n": 0}

    def add_then_interrupt(self, decoded):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, decoded)

    monkeypatch.setattr(preprocess_module._CacheWriter, "add", add_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        preprocess(synth_set.root, out, workers=2, progress=False)
    assert os.listdir(tmp_path) == []


def test_not_a_cache(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "something else"
    with pytest.raises(CacheError, match="not a nodulekit cache"):
        Cache(path)
    with pytest.raises(CacheError, match="no such file"):
        Cache(tmp_path / "absent.h5")


def test_diameters_are_nan_padded(cache_path):
    with Cache(cache_path) as cache:
        m = cache.split("train").meta
        for row in range(len(m["n_nodules"])):
            k = int(m["n_nodules"][row])
            section = m["section_diameter_mm"][row]
            assert np.all(~np.isnan(section[:k])) and np.all(np.isnan(section[k:]))
            if k:
                assert m["max_diameter_mm"][row] == pytest.approx(
                    np.max(m["nodule_diameter_mm"][row][:k]))
                assert not math.isnan(m["max_diameter_mm"][row])

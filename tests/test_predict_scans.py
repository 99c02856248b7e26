"""`nodulekit predict` on whole scans (`nodulekit.inference.scans`): NIfTI, MetaImage and
DICOM series in; the mask in the input's geometry (NIfTI, DICOM SEG) and nodules.csv out.

The model is the demo's (tests/data/demo_model.h5, see tests/test_real_slice.py) and the
scan is twelve slices of a synthetic patient it never saw (seed 123), around a 20.6 mm
part-solid nodule centred at LPS (38.9, 44.3, -209.0) mm, so every check is on a real
prediction: a model that found nothing, or a writer that put the mask elsewhere, fails.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from nodulekit.data.volumes import Volume, affine_from

MODEL = Path(__file__).with_name("data") / "demo_model.h5"
SLICES = range(20, 32)
NODULE_CENTRE_LPS = np.array([38.915, 44.309, -209.001])


@pytest.fixture(scope="module")
def scan():
    """(volume, truth): the slices as a volume with synth's own DICOM geometry (slices
    going down 1.5 mm each: the third affine column points to the feet)."""
    from nodulekit.data.synth import SynthConfig, anatomy, render_slice

    cfg = SynthConfig(size=512, patients=1, slices_per_patient=32, seed=123)
    body = anatomy(cfg, 0)
    ps = body.grid.spacing
    pairs = [render_slice(cfg, 0, k)[:2] for k in SLICES]
    hu = np.stack([p[0] for p in pairs])
    truth = np.stack([p[1] for p in pairs])
    corner = -(cfg.size - 1) / 2 * ps  # where synth's DICOM files put pixel (0, 0)
    affine = affine_from([corner, corner, body.z[SLICES[0]]], np.diag([1.0, 1.0, -1.0]),
                         (body.thickness, ps, ps))
    return Volume(hu, affine), truth


def _predict(inputs, out, **options):
    from nodulekit.inference.predict import PredictOptions, predict

    opts = dict(device="cpu", progress=False, truth="none")
    opts.update(options)
    said = []
    result = predict(MODEL, inputs, out, PredictOptions(**opts), report=said.append)
    return result, said


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def nifti_run(scan, tmp_path_factory):
    import nibabel as nib

    from nodulekit.data.volumes import write_nifti

    folder = tmp_path_factory.mktemp("nifti")
    volume, _ = scan
    path = write_nifti(volume, folder / "patient.nii.gz")
    result, said = _predict([path], folder / "pred", probabilities=True)
    return path, folder / "pred", result, nib.load(path)


def test_nifti_mask_has_the_inputs_grid_and_finds_the_nodule(scan, nifti_run):
    import nibabel as nib

    volume, truth = scan
    path, out, result, source = nifti_run
    assert not result.failed and result.written == 1
    mask_img = nib.load(out / "masks" / "patient.nii.gz")
    assert mask_img.shape == source.shape
    assert np.array_equal(mask_img.affine, source.affine)
    mask = np.asarray(mask_img.dataobj).transpose(2, 1, 0)  # back to [k, r, c]
    tp = int((mask & (truth > 0)).sum())
    assert tp / truth.sum() > 0.3, f"found {tp} of {int(truth.sum())} nodule voxels"
    prob = np.asarray(nib.load(out / "probabilities" / "patient.nii.gz").dataobj)
    assert prob.dtype == np.float32 and np.array_equal(prob > 0.5, mask_img.get_fdata() > 0)


def test_nodules_csv_places_the_nodule_in_patient_coordinates(nifti_run):
    _, out, result, _ = nifti_run
    rows = _rows(out / "nodules.csv")
    assert rows and len(rows) == len(result.nodules)
    p = [float(r["max_probability"]) for r in rows]
    assert p == sorted(p, reverse=True)  # the most probable first
    centres = np.array([[float(r["x_mm"]), float(r["y_mm"]), float(r["z_mm"])] for r in rows])
    distance = np.linalg.norm(centres - NODULE_CENTRE_LPS, axis=1)
    best = rows[int(np.argmin(distance))]
    assert distance.min() < 5.0, f"nearest predicted nodule {distance.min():.1f} mm away"
    assert 10.0 < float(best["diameter_mm"]) < 30.0
    assert 0.5 < float(best["max_probability"]) <= 1.0
    assert float(best["mean_probability"]) <= float(best["max_probability"])
    assert 0 <= int(best["first_slice"]) <= int(best["last_slice"]) < len(SLICES)
    scans = _rows(out / "scans.csv")
    assert [r["input"] for r in scans] == [str(result.scans[0]["input"])]
    assert int(scans[0]["nodules"]) == len(rows)


def test_metaimage_and_dicom_series_give_the_same_mask(scan, nifti_run, tmp_path):
    """One volume in three formats: one mask. The DICOM series also gets a DICOM SEG that
    references its slices and reads back as the same mask."""
    import nibabel as nib

    from nodulekit.data.seg import read_seg
    from nodulekit.data.volumes import (
        read_dicom_series,
        read_nifti,
        write_dicom_series,
        write_metaimage,
    )

    volume, _ = scan
    _, nifti_out, _, _ = nifti_run
    expected = read_nifti(nifti_out / "masks" / "patient.nii.gz")
    mhd = write_metaimage(volume, tmp_path / "patient.mhd")
    write_dicom_series(volume, tmp_path / "series", patient_id="P123", study_uid="1.2.840.1",
                       series_uid="1.2.840.1.1")
    result, _ = _predict([mhd, tmp_path / "series"], tmp_path / "pred", scans=True)
    assert not result.failed and result.written == 2
    from_mhd = read_nifti(tmp_path / "pred" / "masks" / "patient.nii.gz")
    assert np.array_equal(from_mhd.array, expected.array)
    assert np.allclose(from_mhd.affine, expected.affine, atol=1e-4)
    # the series runs along +z (cross(row, column)): its slices are the volume's reversed
    series = read_dicom_series(tmp_path / "series")
    from_dicom = read_nifti(tmp_path / "pred" / "masks" / "series.nii.gz")
    assert np.array_equal(from_dicom.array, expected.array[::-1])
    seg = read_seg(tmp_path / "pred" / "seg" / "series.dcm", series.sop_uids,
                   series.shape[1:])
    assert np.array_equal(seg, from_dicom.array)
    assert nib.load(tmp_path / "pred" / "masks" / "series.nii.gz").shape == (512, 512, 12)
    rows = _rows(tmp_path / "pred" / "nodules.csv")
    by_scan = {name: np.array([[float(r[c]) for c in ("x_mm", "y_mm", "z_mm")]
                               for r in rows if r["scan"] == name])
               for name in ("patient", "series")}
    # the same nodules at the same places, whichever way the slices are stored
    assert len(by_scan["patient"]) == len(by_scan["series"]) > 0
    assert np.allclose(np.sort(by_scan["patient"], axis=0), np.sort(by_scan["series"], axis=0),
                       atol=0.01)


def test_context_follows_the_slice_normal():
    """A model with context takes "below" along cross(row, column), as training's series
    order does: a volume stored feet first gets its neighbours swapped back."""
    from nodulekit.inference.scans import context_order, slice_stack

    hu = np.arange(5)[:, None, None] * np.ones((1, 2, 2), np.int16)
    up = Volume(hu, affine_from([0, 0, 0], np.eye(3), (2.0, 1.0, 1.0)))
    down = Volume(hu, affine_from([0, 0, 0], np.diag([1.0, 1.0, -1.0]), (2.0, 1.0, 1.0)))
    assert context_order(up) == 1 and context_order(down) == -1
    assert slice_stack(hu, 2, 1, 1)[:, 0, 0].tolist() == [1, 2, 3]
    assert slice_stack(hu, 2, 1, -1)[:, 0, 0].tolist() == [3, 2, 1]
    assert slice_stack(hu, 0, 2, 1)[:, 0, 0].tolist() == [0, 0, 0, 1, 2]  # the edge repeats
    assert slice_stack(hu, 4, 0, 1).shape == (2, 2)


def test_a_bad_scan_is_reported_and_the_rest_written(scan, tmp_path):
    from nodulekit.data.volumes import write_nifti

    volume, _ = scan
    small = Volume(volume.array[:3, 200:264, 0:64], volume.affine)
    good = write_nifti(small, tmp_path / "good.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really")
    result, said = _predict([bad, good], tmp_path / "pred")
    assert [p for p, _ in result.failed] == [str(bad)]
    assert any("bad.nii.gz: not a readable NIfTI" in line for line in said)
    assert (tmp_path / "pred" / "masks" / "good.nii.gz").is_file()
    # a second run into the same folder needs --overwrite, and replaces only its files
    with pytest.raises(ValueError, match="holds an earlier prediction"):
        _predict([good], tmp_path / "pred")
    (tmp_path / "pred" / "keep.txt").write_text("mine")
    result, _ = _predict([good], tmp_path / "pred", overwrite=True)
    assert result.written == 1 and (tmp_path / "pred" / "keep.txt").is_file()


def test_a_model_trained_at_a_pixel_size_gets_inputs_resampled_and_masks_mapped_back(
        scan, tmp_path):
    """The demo model, told it trained at the scan's own pixel size (as `preprocess
    --spacing` records it), on the same crop given at half that pixel size (each pixel 2 x
    2): it sees the native crop again, and its mask comes back on the fine grid as the
    native mask upsampled, the nodule at the same place."""
    import dataclasses

    from nodulekit.data.volumes import read_nifti, write_nifti
    from nodulekit.training.checkpoint import load_checkpoint, save_checkpoint

    volume, _ = scan
    ps = volume.spacing[1]
    crop = volume.array[:, 250:378, 243:371]  # around the 20 mm nodule
    native = Volume(crop, volume.affine.copy())
    native.affine[:3, 3] = volume.to_patient((0, 250, 243))
    fine_affine = native.affine.copy()
    fine_affine[:3, :2] /= 2  # half the pixel size, the same field of view
    fine_affine[:3, 3] = native.to_patient((0, -0.25, -0.25))
    fine = Volume(np.repeat(np.repeat(crop, 2, axis=1), 2, axis=2), fine_affine)
    write_nifti(native, tmp_path / "native.nii.gz")
    write_nifti(fine, tmp_path / "fine.nii.gz")
    ckpt = load_checkpoint(MODEL)
    told = save_checkpoint(tmp_path / "at_ps.h5", dataclasses.replace(
        ckpt, config={**ckpt.config, "spacing_mm": ps}))

    from nodulekit.inference.predict import PredictOptions, predict

    opts = PredictOptions(device="cpu", progress=False, truth="none")
    said = []
    predict(MODEL, [tmp_path / "native.nii.gz"], tmp_path / "a", opts, report=said.append)
    predict(told, [tmp_path / "fine.nii.gz"], tmp_path / "b", opts, report=said.append)
    assert any(f"trained at {ps:g} mm pixels" in line for line in said)
    a = read_nifti(tmp_path / "a" / "masks" / "native.nii.gz").array > 0
    b = read_nifti(tmp_path / "b" / "masks" / "fine.nii.gz").array > 0
    assert b.shape == fine.shape and a.sum() > 100
    up = np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)
    dice = 2 * (b & up).sum() / (b.sum() + up.sum())
    assert dice > 0.95, f"Dice {dice:.3f} between the fine mask and the native one upsampled"
    # the largest nodule of each (specks at the edge of a mask may split or merge)
    largest = [max(_rows(tmp_path / x / "nodules.csv"), key=lambda r: float(r["volume_mm3"]))
               for x in "ab"]
    a_mm, b_mm = (np.array([float(r[c]) for c in ("x_mm", "y_mm", "z_mm")]) for r in largest)
    assert np.linalg.norm(a_mm - b_mm) < 0.5, f"the nodule moved {a_mm} -> {b_mm}"
    assert abs(float(largest[0]["volume_mm3"]) / float(largest[1]["volume_mm3"]) - 1) < 0.1


def test_model_grid_is_the_caches_grid_rule():
    from nodulekit.data.resample import regrid
    from nodulekit.inference.resampling import model_grid, to_model, to_source

    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 400, (37, 50)).astype(np.int16)
    grid = model_grid(hu.shape, (0.6, 0.8), 0.7)
    # the model sees what preprocessing would have put in the cache
    assert np.array_equal(to_model(hu, grid), regrid(hu, None, (0.6, 0.8), 0.7, None).hu)
    assert model_grid(hu.shape, (0.7, 0.7), 0.7).identity
    smooth = np.add.outer(np.arange(37.0), 2 * np.arange(50.0)).astype(np.float32)
    back = to_source(to_model(smooth[None], grid).astype(np.float32), grid)[0]
    inner = np.s_[2:-2, 2:-2]  # a linear ramp comes back exactly, away from the clamped edge
    assert np.allclose(back[inner], smooth[inner], atol=0.51)


def _turned(v: Volume, axes, flip_axis=None) -> Volume:
    """The same voxels in the same places, stored with the array axes permuted (`axes`,
    as numpy's transpose) and one of the new axes reversed."""
    step = {j: v.affine[:3, 2 - j] for j in range(3)}  # array axis -> its step, mm
    affine = np.eye(4)
    for i in range(3):
        affine[:3, 2 - i] = step[axes[i]]
    affine[:3, 3] = v.affine[:3, 3]
    array = v.array.transpose(axes)
    turned = Volume(array, affine)
    if flip_axis is not None:
        last = [0, 0, 0]
        last[flip_axis] = array.shape[flip_axis] - 1
        affine = affine.copy()
        affine[:3, 3] = turned.to_patient(last)
        affine[:3, 2 - flip_axis] *= -1
        turned = Volume(np.flip(array, flip_axis), affine)
    return turned


def test_a_scan_stored_sagittally_or_mirrored_gets_the_axial_ones_mask(scan, tmp_path):
    """A 2-D model sees the slices the training cache holds (axial, as `preprocess` turns
    scans): the same scan stored with its axes swapped or one reversed gets the same mask on
    the same voxels."""
    from nodulekit.data.volumes import read_nifti, write_nifti

    volume, _ = scan
    crop = Volume(volume.array[:, 250:378, 243:371].copy(), volume.affine.copy())
    crop.affine[:3, 3] = volume.to_patient((0, 250, 243))
    variants = {"axial": crop, "sagittal": _turned(crop, (2, 1, 0)),
                "mirrored": _turned(crop, (0, 1, 2), flip_axis=2)}
    for name, v in variants.items():
        write_nifti(v, tmp_path / f"{name}.nii.gz")
    _predict([tmp_path / f"{n}.nii.gz" for n in variants], tmp_path / "pred")
    masks = {n: read_nifti(tmp_path / "pred" / "masks" / f"{n}.nii.gz") for n in variants}
    axial = masks["axial"].array
    assert axial.sum() > 100
    assert np.array_equal(masks["sagittal"].array, axial.transpose(2, 1, 0))
    assert np.array_equal(masks["mirrored"].array, axial[:, :, ::-1])
    for n, v in variants.items():
        assert np.allclose(masks[n].affine, v.affine, atol=1e-4)


def test_scans_finds_every_series_in_a_tree(scan, tmp_path):
    """`--scans` on a patient folder: a series in a subfolder, two series sharing another
    folder (named by SeriesNumber), a SEG object beside them (left out, said), and a folder
    with no DICOM at all (reported as failed); each series gets its own mask."""
    import pydicom

    from nodulekit.data.seg import write_seg
    from nodulekit.data.volumes import read_dicom_series, read_nifti, write_dicom_series

    volume, _ = scan
    small = Volume(volume.array[:3, 250:314, 243:307].copy(), volume.affine)
    root = tmp_path / "P1"
    write_dicom_series(small, root / "study" / "ct", patient_id="P1", study_uid="1.2.9",
                       series_uid="1.2.9.1")
    for number, uid in ((2, "1.2.9.2"), (3, "1.2.9.3")):
        files = write_dicom_series(small, tmp_path / f"tmp{number}", patient_id="P1",
                                   study_uid="1.2.9", series_uid=uid)
        (root / "mixed").mkdir(parents=True, exist_ok=True)
        for f in files:
            ds = pydicom.dcmread(f)
            ds.SeriesNumber = number
            ds.save_as(root / "mixed" / f"s{number}_{f.name}")
    ct = read_dicom_series(root / "study" / "ct")
    write_seg(np.zeros(ct.shape, np.uint8), ct.files, root / "study" / "ct" / "nodules.dcm")
    (tmp_path / "nothing").mkdir()
    result, said = _predict([root, tmp_path / "nothing"], tmp_path / "pred", scans=True)
    names = sorted(r["mask"] for r in result.scans)
    assert names == ["masks/P1_mixed_s2.nii.gz", "masks/P1_mixed_s3.nii.gz",
                     "masks/P1_study_ct.nii.gz"]
    assert [p for p, _ in result.failed] == [str(tmp_path / "nothing")]
    assert any("1 DICOM file(s) that are not CT images left out (nodules.dcm)" in line
               for line in said)
    for name in ("P1_mixed_s2", "P1_mixed_s3", "P1_study_ct"):
        mask = read_nifti(tmp_path / "pred" / "masks" / f"{name}.nii.gz")
        assert mask.shape == small.shape
        assert (tmp_path / "pred" / "seg" / f"{name}.dcm").is_file()


def test_slices_are_resampled_to_the_models_pixels_as_scans_are(scan, tmp_path):
    """The per-slice path (DICOM files, PNG masks) resamples each slice to the model's pixel
    size by its own PixelSpacing, and maps the mask back, as the scan path does."""
    import dataclasses

    from PIL import Image

    from nodulekit.data.volumes import read_nifti, write_dicom_series
    from nodulekit.training.checkpoint import load_checkpoint, save_checkpoint

    volume, _ = scan
    crop = Volume(volume.array[:, 250:378, 243:371].copy(), volume.affine.copy())
    crop.affine[:3, 3] = volume.to_patient((0, 250, 243))
    up = crop.affine.copy()
    up[:3, 2] *= -1  # slices going up (+z): the series' own order
    up[:3, 3] = crop.to_patient((crop.shape[0] - 1, 0, 0))
    files = write_dicom_series(Volume(crop.array[::-1].copy(), up), tmp_path / "series",
                               patient_id="P", study_uid="1.2.7", series_uid="1.2.7.1")
    ckpt = load_checkpoint(MODEL)
    told = save_checkpoint(tmp_path / "at_1mm.h5", dataclasses.replace(
        ckpt, config={**ckpt.config, "spacing_mm": 1.0}))  # coarser than the 0.77 mm here

    from nodulekit.inference.predict import PredictOptions, predict

    opts = dict(device="cpu", progress=False, truth="none")
    said = []
    slices = predict(told, files, tmp_path / "slices", PredictOptions(**opts),
                     report=said.append)
    scans = predict(told, [tmp_path / "series"], tmp_path / "scans",
                    PredictOptions(scans=True, **opts), report=said.append)
    assert not slices.failed and not scans.failed
    by_scan = read_nifti(tmp_path / "scans" / "masks" / "series.nii.gz").array
    assert by_scan.sum() > 50
    for k, f in enumerate(files):
        png = np.asarray(Image.open(tmp_path / "slices" / "masks" / f"{f.stem}.png")) > 0
        assert np.array_equal(png, by_scan[k] > 0), f"slice {k}"


def test_a_folder_of_scans_is_predicted_scan_by_scan(scan, nifti_run, tmp_path):
    """A folder holding NIfTI and MetaImage files (at any depth, no DICOM) is the scans it
    holds, each as if given by itself; a folder that also holds DICOM slices stays one."""
    import shutil

    from nodulekit.data.volumes import read_nifti, write_dicom_series, write_metaimage
    from nodulekit.inference.scans import scan_files_in_folders

    volume, _ = scan
    path, nifti_out, _, _ = nifti_run
    expected = read_nifti(nifti_out / "masks" / "patient.nii.gz").array
    folder = tmp_path / "scans"
    (folder / "deeper").mkdir(parents=True)
    shutil.copy(path, folder / "patient.nii.gz")
    write_metaimage(volume, folder / "deeper" / "again.mhd")
    (folder / "notes.txt").write_text("not a scan")
    result, _ = _predict([folder], tmp_path / "pred")
    assert not result.failed and result.written == 2
    for name in ("patient", "again"):
        assert np.array_equal(read_nifti(tmp_path / "pred" / "masks" / f"{name}.nii.gz").array,
                              expected)
    mixed = tmp_path / "mixed"
    write_dicom_series(volume, mixed / "series", patient_id="P1", study_uid="1.2.840.2",
                       series_uid="1.2.840.2.1")
    shutil.copy(path, mixed / "patient.nii.gz")
    assert scan_files_in_folders([mixed]) == [mixed / "patient.nii.gz", mixed]
    assert scan_files_in_folders([folder]) == [folder / "deeper" / "again.mhd",
                                               folder / "patient.nii.gz"]

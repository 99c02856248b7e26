"""Scans in and out (`nodulekit.data.volumes`, `nodulekit.data.seg`): each format's reader
puts every voxel where the format says it is, writers round-trip, and a geometry that cannot
be used is an error naming the file and the values."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.data.volumes import (
    RAS_FROM_LPS,
    GeometryError,
    Volume,
    affine_from,
    check_same_grid,
    read_dicom_series,
    read_metaimage,
    read_nifti,
    read_volume,
    write_dicom_series,
    write_metaimage,
    write_nifti,
)

SHAPE = (5, 7, 9)  # slices, rows, columns: all different, so a swapped axis shows


def _rotation(angle: float, axis: int) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


# +column, +row, +slice as columns: axial (slices going up), axial with the slices going
# down (feet first, as many scanners store them), and an oblique plane.
DIRECTIONS = {
    "axial": np.eye(3),
    "flipped": np.diag([1.0, 1.0, -1.0]),
    "oblique": _rotation(0.3, 2) @ _rotation(-0.2, 0),
}


def _volume(direction: str, dtype=np.int16, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, SHAPE).astype(dtype)
    return Volume(array, affine_from([12.5, -40.0, 101.0], DIRECTIONS[direction],
                                     (2.5, 0.7, 0.8)))


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("fmt", ["nifti", "metaimage", "dicom"])
def test_round_trip(fmt, direction, tmp_path):
    v = _volume(direction)
    if fmt == "nifti":
        path = write_nifti(v, tmp_path / "scan.nii.gz")
        # NIfTI keeps its affine in float32
        tol = 1e-4
    elif fmt == "metaimage":
        path = write_metaimage(v, tmp_path / "scan.mhd")
        tol = 1e-9
    else:
        write_dicom_series(v, tmp_path / "series", patient_id="P1", study_uid="1.2.3",
                           series_uid="1.2.3.4")
        path, tol = tmp_path / "series", 1e-6  # decimal strings of 10 digits
    back = read_volume(path)
    assert back.shape == v.shape
    assert np.allclose(back.spacing, (2.5, 0.7, 0.8), atol=tol)
    if fmt == "dicom" and direction == "flipped":
        # a series runs along cross(row, column): slices stored feet first come back in
        # the other order, each still where it was
        reversed_affine = v.affine.copy()
        reversed_affine[:3, 2] *= -1
        reversed_affine[:3, 3] = v.to_patient((SHAPE[0] - 1, 0, 0))
        v = Volume(v.array[::-1], reversed_affine)
    assert np.array_equal(back.array, v.array)
    assert np.allclose(back.affine, v.affine, atol=tol)


def test_nifti_voxels_sit_where_nibabel_says(tmp_path):
    """A NIfTI written by nibabel with its own RAS affine: voxel (i, j, k) of the file is our
    [k, j, i], at nibabel's RAS position with x and y negated."""
    import nibabel as nib

    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)  # (i, j, k)
    ras = np.array([[-0.7, 0, 0, 90.0], [0, 0.8, 0.1, -120.0], [0, 0, 2.0, -50.0],
                    [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "a.nii")
    v = read_nifti(tmp_path / "a.nii")
    assert v.shape == (2, 3, 4)
    for i, j, k in [(0, 0, 0), (3, 2, 1), (1, 2, 0)]:
        assert v.array[k, j, i] == data[i, j, k]
        expected = (RAS_FROM_LPS @ ras @ [i, j, k, 1])[:3]
        assert np.allclose(v.to_patient((k, j, i)), expected, atol=1e-4)
    assert np.allclose(v.to_index(v.to_patient((1, 2, 3))), (1, 2, 3))


def test_nifti_mask_written_for_a_nifti_input_has_its_affine_bit_for_bit(tmp_path):
    import nibabel as nib

    ras = np.array([[0.74, 0.01, 0, -180.3], [0.02, -0.74, 0, 170.1], [0, 0, -1.25, 33.3],
                    [0, 0, 0, 1]], dtype=np.float32)
    src = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), ras.astype(np.float64))
    nib.save(src, tmp_path / "in.nii.gz")
    v = read_nifti(tmp_path / "in.nii.gz")
    write_nifti(v.with_array(np.ones(v.shape, np.uint8)), tmp_path / "mask.nii.gz")
    a, b = nib.load(tmp_path / "in.nii.gz"), nib.load(tmp_path / "mask.nii.gz")
    assert a.shape == b.shape
    assert np.array_equal(a.affine, b.affine)
    assert np.array_equal(a.header.get_sform(), b.header.get_sform())


def test_metaimage_voxels_sit_where_itk_says(tmp_path):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4))
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-100.0, 20.0, 300.0))
    img.SetDirection(tuple(DIRECTIONS["oblique"].reshape(-1)))
    sitk.WriteImage(img, str(tmp_path / "a.mhd"))
    v = read_metaimage(tmp_path / "a.mhd")
    for c, r, k in [(0, 0, 0), (3, 2, 1), (1, 0, 1)]:
        expected = img.TransformIndexToPhysicalPoint((c, r, k))
        assert np.allclose(v.to_patient((k, r, c)), expected, atol=1e-9)
        assert v.array[k, r, c] == sitk.GetArrayFromImage(img)[k, r, c]


def test_dicom_series_is_ordered_by_position_not_by_file_name(tmp_path):
    """Files named against the slice order: the reader still puts slice k at k."""
    v = _volume("flipped")
    files = write_dicom_series(v, tmp_path / "s", patient_id="P", study_uid="1.2",
                               series_uid="1.2.3")
    for i, f in enumerate(files):  # 0001 <-> 0005, ...: the names now run backwards
        f.rename(f.with_name(f"x{len(files) - i:04d}.dcm"))
    back = read_dicom_series(tmp_path / "s")
    # slices run along cross(row, column) = +z, so the flipped volume comes back reversed
    assert np.array_equal(back.array, v.array[::-1])
    for k in range(v.shape[0]):
        assert np.allclose(back.to_patient((k, 2, 3)), v.to_patient((v.shape[0] - 1 - k, 2, 3)),
                           atol=1e-6)
    assert back.ids["SeriesInstanceUID"] == "1.2.3" and len(back.sop_uids) == v.shape[0]


def _series(tmp_path, name="s", **kw):
    v = _volume("axial")
    args = dict(patient_id="P", study_uid="1.2", series_uid="1.2.3")
    args.update(kw)
    return write_dicom_series(v, tmp_path / name, **args)


def test_a_missing_slice_is_named(tmp_path):
    files = _series(tmp_path)
    files[2].unlink()
    with pytest.raises(GeometryError, match=r"5 mm between 0002\.dcm .* and 0004\.dcm .*2\.5 mm"):
        read_dicom_series(tmp_path / "s")
    lenient = read_dicom_series(tmp_path / "s", strict=False)
    assert lenient.shape[0] == 4 and any("missing slice" in n for n in lenient.notes)


def test_mixed_series_and_duplicates_are_named(tmp_path):
    import shutil

    _series(tmp_path, "a")
    other = _series(tmp_path, "b", series_uid="9.9.9")
    shutil.copy(other[0], tmp_path / "a" / "other.dcm")
    with pytest.raises(GeometryError, match=r"mixed series \(1\.2\.3: 5 file\(s\), 9\.9\.9: 1"):
        read_dicom_series(tmp_path / "a")
    files = _series(tmp_path, "c")
    shutil.copy(files[1], tmp_path / "c" / "copy.dcm")
    with pytest.raises(GeometryError, match="two slices at one position"):
        read_dicom_series(tmp_path / "c")
    assert read_dicom_series(tmp_path / "c", strict=False).shape[0] == 5


def test_two_orientations_are_named(tmp_path):
    import pydicom

    files = _series(tmp_path)
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    ds.save_as(files[3])
    with pytest.raises(GeometryError,
                       match=r"two orientations: .*0004\.dcm has \(1, 0, 0, 0, 0\.8"):
        read_dicom_series(tmp_path / "s")


def test_label_on_another_grid_is_named_with_both_files_and_values():
    image = _volume("axial")
    label = Volume(np.zeros(SHAPE, np.uint8), affine_from([12.5, -40.0, 101.0], np.eye(3),
                                                          (2.5, 0.7, 0.9)))
    with pytest.raises(GeometryError, match=r"lbl\.nii\.gz does not match its image "
                                            r"img\.nii\.gz: spacing \(2\.5, 0\.7, 0\.8\) vs "
                                            r"\(2\.5, 0\.7, 0\.9\)"):
        check_same_grid(image, label, image_path="img.nii.gz", label_path="lbl.nii.gz")
    moved = Volume(np.zeros((5, 7, 8), np.uint8), image.affine + np.eye(4)[3] * 0)
    moved.affine[0, 3] += 1.0
    with pytest.raises(GeometryError, match=r"shape \(5, 7, 9\) vs \(5, 7, 8\); .*origin"):
        check_same_grid(image, moved, image_path="a", label_path="b")
    check_same_grid(image, image.with_array(np.zeros(SHAPE, np.uint8)))  # the same grid


def test_unreadable_files_are_named(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(GeometryError, match="bad.nii.gz: not a readable NIfTI"):
        read_nifti(bad)
    (tmp_path / "bad.mhd").write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(GeometryError, match="bad.mhd: not a readable MetaImage"):
        read_metaimage(tmp_path / "bad.mhd")
    with pytest.raises(GeometryError, match="not a scan nodulekit reads"):
        read_volume(tmp_path / "x.png")


def test_float_images_are_rounded_to_hu():
    """A float scan (NIfTI with a scale): rounded, clipped to int16, each said; NaN refused
    (`data.scans.hu_int16`, which `preprocess` and `predict` both read scans through)."""
    from nodulekit.data.scans import ScanError, hu_int16

    hu, notes = hu_int16(np.array([[[-1000.4, 0.5, 1.6, 40000.0]]]), "a.nii")
    assert hu.dtype == np.int16 and hu.tolist() == [[[-1000, 0, 2, 32767]]]
    assert len(notes) == 2 and "rounded" in notes[0] and "clipped" in notes[1]
    with pytest.raises(ScanError, match="a.nii: 1 voxel"):
        hu_int16(np.array([[[np.nan, 0.0]]]), "a.nii")


def test_seg_round_trip_onto_its_series(tmp_path):
    from nodulekit.data.seg import read_seg, write_seg

    _series(tmp_path)
    v = read_dicom_series(tmp_path / "s")
    mask = np.zeros(v.shape, np.uint8)
    mask[1, 2:4, 3:6] = 1
    mask[3, 5, 8] = 1
    path = write_seg(mask, v.files, tmp_path / "seg.dcm")
    assert np.array_equal(read_seg(path, v.sop_uids, v.shape[1:]), mask)

    import pydicom

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentSequence[0].SegmentLabel == "nodule"
    referenced = {i.ReferencedSOPInstanceUID
                  for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(v.sop_uids)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3"


def test_seg_of_pydicom_reads_onto_the_slice_it_references():
    """pydicom's bundled liver_1frame.dcm: a real one-frame SEG (512 x 512)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from nodulekit.data.seg import SegError, read_seg

    path = get_testdata_file("liver_1frame.dcm")
    ds = pydicom.dcmread(path)
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
    mask = read_seg(path, ["1.2.3.unrelated", uid])
    assert mask.shape == (2, 512, 512)
    assert not mask[0].any()
    assert np.array_equal(mask[1], ds.pixel_array != 0)
    with pytest.raises(SegError, match="references none of the 1 slices"):
        read_seg(path, ["1.2.3.unrelated"])

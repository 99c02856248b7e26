"""DICOM ingest: real files bundled with pydicom, and generated bad ones."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000

from nodulekit.data import dicom
from nodulekit.data.dicom import DicomError, DicomWarning, read_slice, read_slices, stored_to_hu

CT_SMALL = get_testdata_file("CT_small.dcm")
J2K = get_testdata_file("693_J2KI.dcm")


def _save(ds: pydicom.Dataset, path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_ct_small_hu_from_its_own_rescale_tags():
    ds = pydicom.dcmread(CT_SMALL)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept)
    s = read_slice(CT_SMALL)
    assert s.hu.dtype == np.int16 and s.hu.flags.c_contiguous
    assert s.hu.shape == (128, 128)
    np.testing.assert_array_equal(s.hu, expected.astype(np.int16))
    m = s.meta
    assert m.patient_id == "1CT1"
    assert m.modality == "CT"
    assert m.instance_number == 1
    assert m.pixel_spacing == pytest.approx((0.661468, 0.661468))
    assert m.slice_thickness == pytest.approx(5.0)
    assert m.slice_position == pytest.approx(-75.699997)
    assert m.study_uid == str(ds.StudyInstanceUID)
    assert m.series_uid == str(ds.SeriesInstanceUID)
    assert (m.rescale_slope, m.rescale_intercept) == (1.0, -1024.0)
    assert m.warnings == ()


def _j2k_decoder_available() -> bool:
    from pydicom.pixels import get_decoder

    return get_decoder(JPEG2000).is_available


def test_jpeg2000_is_decoded_or_names_the_missing_decoder():
    if not _j2k_decoder_available():
        with pytest.raises(DicomError, match="pylibjpeg-openjpeg") as e:
            read_slice(J2K)
        assert "693_J2KI.dcm" in str(e.value)
        return
    # Here a decoder is installed (Pillow with OpenJPEG): the values must be a CT slice.
    s = read_slice(J2K)
    assert s.hu.shape == (512, 512) and s.hu.dtype == np.int16
    stored = pydicom.dcmread(J2K).pixel_array.astype(np.int32)
    np.testing.assert_array_equal(s.hu, stored - 1024)  # its RescaleIntercept is -1024
    hu = s.hu.astype(np.int32)
    assert -4096 <= hu.min() and hu.max() <= 4096
    assert hu.std() > 100  # an image, not a constant
    air = np.mean(hu < -900)
    soft_tissue = np.mean((hu > -150) & (hu < 150))
    assert air > 0.05 and soft_tissue > 0.05, (air, soft_tissue)


def test_compressed_without_decoder_names_the_package(monkeypatch):
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEG2000)
    # Make pydicom believe no JPEG 2000 plugin is installed, as on a bare machine.
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(DicomError) as e:
        read_slice(J2K)
    text = str(e.value)
    assert "693_J2KI.dcm" in text
    assert "pylibjpeg-openjpeg" in text and "pip install" in text


def test_truncated_in_pixel_data(tmp_path):
    data = open(CT_SMALL, "rb").read()
    bad = tmp_path / "cut_pixels.dcm"
    bad.write_bytes(data[:-6000])
    with pytest.raises(DicomError, match="truncated") as e:
        read_slice(bad)
    assert "cut_pixels.dcm" in str(e.value)


def test_truncated_in_header(tmp_path):
    data = open(CT_SMALL, "rb").read()
    bad = tmp_path / "cut_header.dcm"
    bad.write_bytes(data[:1000])
    with pytest.raises(DicomError, match="truncated"):
        read_slice(bad)


def test_not_dicom_at_all(tmp_path):
    bad = tmp_path / "notes.dcm"
    bad.write_text("these are not the pixels you are looking for\n" * 10)
    with pytest.raises(DicomError, match="not a DICOM file") as e:
        read_slice(bad)
    assert "notes.dcm" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DicomError, match="no such file"):
        read_slice(tmp_path / "absent.dcm")


def test_mr_is_refused_unless_allowed(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.Modality = "MR"
    path = _save(ds, tmp_path / "mr.dcm")
    with pytest.raises(DicomError, match="'MR', not CT") as e:
        read_slice(path)
    assert "mr.dcm" in str(e.value) and "allow_non_ct" in str(e.value)
    assert read_slice(path, allow_non_ct=True).meta.modality == "MR"


def test_no_pixel_data(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    path = _save(ds, tmp_path / "header_only.dcm")
    with pytest.raises(DicomError, match="no pixel data"):
        read_slice(path)


def test_missing_rescale_uses_identity_and_warns(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    stored = ds.pixel_array.copy()
    del ds.RescaleSlope
    del ds.RescaleIntercept
    path = _save(ds, tmp_path / "no_rescale.dcm")
    with pytest.warns(DicomWarning, match="RescaleSlope / RescaleIntercept"):
        s = read_slice(path)
    np.testing.assert_array_equal(s.hu, stored)
    assert s.meta.warnings and "slope 1 and intercept 0" in s.meta.warnings[0]


def test_hu_outside_int16_is_clipped_with_a_warning(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.RescaleSlope = "40"
    path = _save(ds, tmp_path / "steep.dcm")
    expected = ds.pixel_array.astype(np.int64) * 40 - 1024
    assert expected.max() > 32767  # the test needs values out of range
    with pytest.warns(DicomWarning, match="clipped"):
        s = read_slice(path)
    np.testing.assert_array_equal(s.hu, np.clip(expected, -32768, 32767))


def test_multi_frame_refused_by_read_slice_and_split_by_read_slices(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    frames = np.stack([ds.pixel_array, ds.pixel_array[::-1]])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype("<i2").tobytes()
    path = _save(ds, tmp_path / "two_frames.dcm")
    with pytest.raises(DicomError, match="multi-frame image with 2 frames"):
        read_slice(path)
    slices = read_slices(path)
    assert [s.meta.frame for s in slices] == [0, 1]
    np.testing.assert_array_equal(slices[1].hu, frames[1].astype(np.int32) - 1024)


def test_not_grey(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    path = _save(ds, tmp_path / "rgb.dcm")
    with pytest.raises(DicomError, match="3 samples per pixel"):
        read_slice(path)


@pytest.mark.parametrize("signed,bits_stored", [(1, 16), (0, 16), (1, 12), (0, 12)])
def test_fast_native_pixels_match_pydicom(tmp_path, signed, bits_stored):
    """Our shortcut for uncompressed 16-bit pixels gives exactly pydicom's pixel_array,
    unused high bits included."""
    ds = pydicom.dcmread(CT_SMALL)
    rng = np.random.default_rng(bits_stored + signed)
    raw = rng.integers(0, 65536, size=(128, 128), dtype=np.uint16)  # garbage in high bits
    ds.PixelRepresentation = signed
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelData = raw.tobytes()
    path = _save(ds, tmp_path / f"px_{signed}_{bits_stored}.dcm")
    fresh = pydicom.dcmread(path)
    ours = dicom._native_pixels(fresh)
    assert ours is not None
    np.testing.assert_array_equal(ours, pydicom.dcmread(path).pixel_array)


def test_stored_to_hu_is_exact_near_the_int16_limits():
    stored = np.array([0, 40000, 65535], dtype=np.uint16)
    hu, clipped = stored_to_hu(stored, 1, -32768)
    np.testing.assert_array_equal(hu, [-32768, 7232, 32767])
    assert clipped == 0
    hu, clipped = stored_to_hu(np.array([0, 100], dtype=np.uint16), 1, -40000)
    np.testing.assert_array_equal(hu, [-32768, -32768])
    assert clipped == 2
    hu, _ = stored_to_hu(np.array([-3, 0, 3], dtype=np.int16), 0.5, -1024)
    np.testing.assert_array_equal(hu, np.rint([-1025.5, -1024, -1022.5]))


def test_hu_written_into_a_given_buffer():
    out = np.empty((128, 128), dtype=np.int16)
    s = read_slice(CT_SMALL, out=out)
    assert s.hu is out
    np.testing.assert_array_equal(out, read_slice(CT_SMALL).hu)


def test_warnings_do_not_leak_when_nothing_is_wrong():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_slice(CT_SMALL)


# ----------------------------------------------------------------------------- fast paths
# read_slice reads header values straight from pydicom's raw elements (dicom._value) and
# uncompressed 16-bit pixels straight from their bytes (dicom._native_pixels); both must
# give exactly what pydicom's own Dataset and pixel_array give, and step aside otherwise.

_HEADER_TAGS = [
    "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber",
    "ImagePositionPatient", "SliceLocation", "PixelSpacing", "SliceThickness",
    "SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "PixelData", "NumberOfFrames",
]


def _implicit_vr_copy(tmp_path) -> str:
    ds = pydicom.dcmread(CT_SMALL)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return _save(ds, tmp_path / "implicit.dcm")


@pytest.mark.parametrize("implicit", [False, True])
def test_fast_header_values_equal_pydicoms(tmp_path, implicit):
    path = _implicit_vr_copy(tmp_path) if implicit else CT_SMALL
    fast, slow = pydicom.dcmread(path), pydicom.dcmread(path)
    assert fast.file_meta.TransferSyntaxUID.is_implicit_VR == implicit
    for keyword in _HEADER_TAGS:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        ours, theirs = dicom._value(fast, tag), slow.get(keyword)
        assert type(ours) is type(theirs), keyword
        assert ours == theirs, keyword
    absent = 0x00540081  # NumberOfSlices
    assert absent not in fast and dicom._value(fast, absent) is None
    assert dicom._number(fast, absent) is None


def _as_numbers(value):
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [float(v) for v in value]
    return None if value is None else float(value)


@pytest.mark.parametrize("implicit", [False, True])
def test_numbers_read_from_the_element_bytes_equal_pydicoms(tmp_path, implicit):
    path = _implicit_vr_copy(tmp_path) if implicit else CT_SMALL
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 1  # an IS too
    path = _save(ds, tmp_path / "numbers.dcm")
    fast, slow = pydicom.dcmread(path), pydicom.dcmread(path)
    for tag in dicom._NUMBER_VRS:
        keyword = pydicom.datadict.keyword_for_tag(tag)
        ours, theirs = dicom._number(fast, tag), slow.get(keyword)
        assert _as_numbers(ours) == _as_numbers(theirs), keyword
        assert isinstance(ours, (int, float, list)) or ours is None, keyword


def test_numbers_that_are_not_plain_go_through_pydicom(tmp_path):
    """Padding, signs and exponents are Python's to read; an empty value is pydicom's."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.RescaleIntercept = "-1.024E+03 "
    ds.RescaleSlope = ""
    ds.SliceThickness = "5\\0"  # two values where one is expected: kept as two
    ds.InstanceNumber = "+7"
    path = _save(ds, tmp_path / "odd_numbers.dcm")
    fast, slow = pydicom.dcmread(path), pydicom.dcmread(path)
    for keyword in ("RescaleIntercept", "RescaleSlope", "SliceThickness", "InstanceNumber"):
        tag = pydicom.datadict.tag_for_keyword(keyword)
        ours, theirs = dicom._number(fast, tag), slow.get(keyword)
        if theirs in ("", None):
            assert ours == theirs, keyword
        else:
            assert _as_numbers(ours) == _as_numbers(theirs), keyword
    assert dicom._number(fast, tag) == 7
    with pytest.warns(DicomWarning, match="RescaleSlope"):
        s = read_slice(path)
    assert (s.meta.rescale_slope, s.meta.rescale_intercept, s.meta.instance_number) == (
        1.0, -1024.0, 7)


def test_fast_path_hu_equals_pixel_array_times_slope_plus_intercept(tmp_path):
    """CT_small (explicit VR), its implicit-VR copy and a synthetic 512 x 512 slice."""
    from nodulekit.data.synth import SynthConfig, synthesize

    root = synthesize(tmp_path / "synth", SynthConfig(size=512, patients=1,
                                                      slices_per_patient=1, seed=3),
                      workers=0, progress=False).root
    synthetic = str(next(root.rglob("*.dcm")))
    for path in (CT_SMALL, _implicit_vr_copy(tmp_path), synthetic):
        ds = pydicom.dcmread(path)
        assert dicom._native_pixels(ds) is not None, path  # the fast path is taken
        expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)
        s = read_slice(path)
        np.testing.assert_array_equal(s.hu, expected.astype(np.int16))
        assert s.meta.instance_number == int(ds.InstanceNumber)
        assert s.meta.slice_position == pytest.approx(float(ds.ImagePositionPatient[2]))
        assert s.meta.pixel_spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))


def test_compressed_pixels_take_the_pixel_array_path(monkeypatch):
    ds = pydicom.dcmread(J2K)
    assert dicom._native_pixels(ds) is None
    if not _j2k_decoder_available():
        pytest.skip("no JPEG 2000 decoder installed")
    calls = []
    original = pydicom.Dataset.pixel_array

    def spy(self):
        calls.append(1)
        return original.fget(self)

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(spy))
    s = read_slice(J2K)
    assert calls == [1]
    np.testing.assert_array_equal(s.hu, pydicom.dcmread(J2K).pixel_array.astype(np.int32)
                                  - 1024)


def test_eight_bit_pixels_take_the_pixel_array_path(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    pixels = (np.arange(128 * 128) % 251).astype(np.uint8).reshape(128, 128)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    path = _save(ds, tmp_path / "eight.dcm")
    assert dicom._native_pixels(pydicom.dcmread(path)) is None
    np.testing.assert_array_equal(read_slice(path).hu, pixels.astype(np.int16) - 1024)


def test_a_users_pydicom_hook_is_still_honoured(monkeypatch):
    """With a conversion hook of the user's, values come through pydicom's full path."""
    from pydicom import hooks

    def shift_intercept(raw, data, **kwargs):
        hooks.raw_element_value(raw, data, **kwargs)
        if raw.tag == 0x00281052:
            data["value"] = data["value"] - 10

    monkeypatch.setattr(hooks.hooks, "raw_element_value", shift_intercept)
    assert read_slice(CT_SMALL).meta.rescale_intercept == -1034.0


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32])
@pytest.mark.parametrize("intercept", [-40000, -32768, -1024, 0, 1024, 40000])
def test_stored_to_hu_integer_rescale_is_exact_for_every_stored_type(dtype, intercept):
    """The integer path checks only the end of the range that can leave int16; 32-bit
    stored values do not wrap on the way."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(abs(intercept) + info.bits)
    for lo, hi in ((info.min, info.max), (max(info.min, -3000), min(info.max, 3000))):
        stored = rng.integers(lo, hi, size=500, endpoint=True).astype(dtype)
        stored[:2] = lo, hi
        exact = stored.astype(np.int64) + intercept
        hu, clipped = stored_to_hu(stored, 1, intercept)
        assert hu.dtype == np.int16
        np.testing.assert_array_equal(hu, np.clip(exact, -32768, 32767))
        assert clipped == np.count_nonzero((exact < -32768) | (exact > 32767))


def test_identifiers_can_be_left_out():
    full, lean = read_slice(CT_SMALL), read_slice(CT_SMALL, identifiers=False)
    assert (lean.meta.patient_id, lean.meta.study_uid, lean.meta.series_uid) == ("", "", "")
    np.testing.assert_array_equal(full.hu, lean.hu)
    for name in ("instance_number", "slice_position", "pixel_spacing", "slice_thickness",
                 "modality", "rescale_slope", "rescale_intercept", "warnings"):
        assert getattr(full.meta, name) == getattr(lean.meta, name), name

"""One CT slice from a DICOM file: HU as int16 plus the metadata the pipeline needs.

Parsing is pydicom's; this module only checks what pydicom hands back and turns every way
a file can be unusable into a `DicomError` that names the file and the reason:

- not DICOM at all, or truncated (its last element runs past the end of the file);
- no pixel data;
- not CT (refused unless ``allow_non_ct=True``);
- multi-frame (`read_slice` refuses; `read_slices` splits it into slices);
- compressed pixel data with no decoder installed (the message names what to install);
- not a single-channel image.

Soft problems are warned about (`DicomWarning`) and also kept in `SliceMeta.warnings`, so a
worker process can pass them back to whoever writes the report:

- RescaleSlope / RescaleIntercept missing: slope 1 and intercept 0 are used;
- HU outside int16: clipped.

HU follows docs/design.md: ``hu = stored * RescaleSlope + RescaleIntercept``, rounded to int16.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as _pydicom_config
from pydicom import hooks as _pydicom_hooks
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.values import convert_value

INT16_MIN = int(np.iinfo(np.int16).min)
INT16_MAX = int(np.iinfo(np.int16).max)

# pydicom names a missing decoder's requirement by its import name; pip wants these.
_PIP_NAMES = {"gdcm": "python-gdcm", "pillow": "pillow"}


class DicomError(ValueError):
    """A file that cannot be read as a CT slice; `path` and `reason` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NotCTError(DicomError):
    """A DICOM image whose Modality is not CT (`what` says what it is instead)."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.what = what
        super().__init__(path, f"{what}, not CT (allow_non_ct=True reads it anyway)")


class DicomWarning(UserWarning):
    """A slice that was read, but with a fix-up (default rescale, clipped HU)."""


@dataclass(frozen=True)
class SliceMeta:
    """What the pipeline keeps about one slice besides its pixels."""

    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    instance_number: int | None
    slice_position: float | None  # mm along the patient axis (ImagePositionPatient z)
    pixel_spacing: tuple[float, float] | None  # (row, column) mm
    slice_thickness: float | None  # mm
    modality: str
    rescale_slope: float
    rescale_intercept: float
    frame: int | None = None  # index within a multi-frame file, None for a plain slice
    warnings: tuple[str, ...] = field(default=())
    # LPS mm of pixel (0, 0)'s centre (ImagePositionPatient); None: absent
    image_position: tuple[float, float, float] | None = None
    # ImageOrientationPatient: the row direction (along a row: +column), then the column
    # direction (+row), LPS cosines; None: absent
    image_orientation: tuple[float, float, float, float, float, float] | None = None


@dataclass(frozen=True)
class CTSlice:
    hu: np.ndarray  # int16 (H, W), C-contiguous
    meta: SliceMeta


def read_slice(path: str | os.PathLike, *, allow_non_ct: bool = False,
               out: np.ndarray | None = None, identifiers: bool = True) -> CTSlice:
    """Read a single-frame DICOM file into HU int16 and its metadata.

    A multi-frame file is refused (use `read_slices` to split it into slices).
    out: an int16 C-contiguous array to write the HU into when the slice has its shape
    (saves an allocation and a copy); otherwise a new array is made.
    identifiers: False leaves `SliceMeta.patient_id`, `study_uid` and `series_uid` empty
    (for callers that take them from elsewhere: a little faster).
    """
    ds = _open(path)
    with _readable_header(path):
        h = _Header(ds)
        if h.frames > 1:
            raise DicomError(path, f"multi-frame image with {h.frames} frames; this reads one "
                                   "slice per file (read_slices(..., split_frames=True) splits "
                                   "it)")
        _check_image(ds, path, allow_non_ct, h)
        stored = _pixels(ds, path, h)
        return _make_slice(ds, path, stored, frame=None, out=out, header=h,
                           identifiers=identifiers)


def read_slices(path: str | os.PathLike, *, allow_non_ct: bool = False,
                split_frames: bool = True) -> list[CTSlice]:
    """Read a DICOM file into one `CTSlice` per frame (a plain file gives a list of one)."""
    ds = _open(path)
    with _readable_header(path):
        h = _Header(ds)
        frames = h.frames
        if frames > 1 and not split_frames:
            raise DicomError(path, f"multi-frame image with {frames} frames and "
                                   "split_frames=False")
        _check_image(ds, path, allow_non_ct, h)
        stored = _pixels(ds, path, h)
        if frames <= 1:
            return [_make_slice(ds, path, stored, frame=None, header=h)]
        positions = _per_frame_positions(ds, frames)
        orientation = _shared_orientation(ds)
        out = []
        for i in range(frames):
            s = _make_slice(ds, path, stored[i], frame=i, header=h)
            if positions[i] is not None:
                s = CTSlice(s.hu, replace(s.meta, slice_position=positions[i][2],
                                          image_position=positions[i]))
            if s.meta.image_orientation is None and orientation is not None:
                s = CTSlice(s.hu, replace(s.meta, image_orientation=orientation))
            out.append(s)
        return out


def read_header(path: str | os.PathLike) -> pydicom.Dataset:
    """The dataset without its pixel data (fast: for patient IDs when building a split)."""
    return _open(path, stop_before_pixels=True)


def header_text(ds, name: str) -> str:
    """A header element as stripped text; "" where absent or unreadable."""
    try:
        return str(ds.get(name) or "").strip()
    except Exception:  # noqa: BLE001 (a damaged element: as if absent)
        return ""


def header_floats(ds, name: str, n: int) -> tuple[float, ...] | None:
    """A numeric element's n values as floats, all finite; None where absent or not so."""
    try:
        value = ds.get(name)
        if value is None or value == "":
            return None
        several = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        values = tuple(float(v) for v in (value if several else [value]))
    except Exception:  # noqa: BLE001 (a damaged or odd element: as if absent)
        return None
    return values if len(values) == n and np.isfinite(values).all() else None


def stored_to_hu(stored: np.ndarray, slope: float, intercept: float,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """HU int16 from stored values, and how many pixels had to be clipped into int16.

    out: optional int16 C-contiguous array of the same shape to write the result into.
    """
    if out is not None and (out.shape != stored.shape or out.dtype != np.int16
                            or not out.flags.c_contiguous):
        out = None
    if float(slope) == 1.0 and float(intercept).is_integer():
        # Exact integer arithmetic, the common case: when the result surely fits in int16,
        # add in int16 directly (a third of the memory traffic of int32).
        shift = int(intercept)
        # Only the end that can leave int16 needs a pass over the pixels: CT's usual signed
        # 16-bit values with a negative intercept can only fall below it.
        if stored.dtype.kind in "iu":
            info = np.iinfo(stored.dtype)
            lo = int(stored.min()) if info.min + shift < INT16_MIN else int(info.min)
            hi = int(stored.max()) if info.max + shift > INT16_MAX else int(info.max)
        else:
            lo, hi = int(stored.min()), int(stored.max())
        if INT16_MIN <= lo + shift and hi + shift <= INT16_MAX:
            # One pass in int16. Wrap-around is harmless here: the sum is computed modulo
            # 2**16 and the true result is known to fit, so it comes out exact.
            wrapped = np.int16((shift + 32768) % 65536 - 32768)
            hu = np.add(stored, wrapped, out=out, dtype=np.int16, casting="unsafe")
            return hu, 0
        hu = stored.astype(np.int64 if stored.itemsize >= 4 else np.int32) + shift
    else:
        hu = np.rint(stored.astype(np.float64) * float(slope) + float(intercept))
    lo, hi = hu.min(), hu.max()
    clipped = 0
    if lo < INT16_MIN or hi > INT16_MAX:
        clipped = int(np.count_nonzero((hu < INT16_MIN) | (hu > INT16_MAX)))
        hu = np.clip(hu, INT16_MIN, INT16_MAX)
    if out is None:
        return np.ascontiguousarray(hu, dtype=np.int16), clipped
    out[...] = hu
    return out, clipped


# ----------------------------------------------------------------------------- internals


# What pydicom (or Python's int / float) raises for a header value it cannot convert: an
# unknown VR, "m1024" as a decimal string, ... (a damaged or odd file).
_VALUE_ERRORS = (ValueError, TypeError, NotImplementedError, KeyError, IndexError,
                 OverflowError)


@contextlib.contextmanager
def _readable_header(path):
    """A header value that cannot be converted as a `DicomError` naming the file."""
    try:
        yield
    except DicomError:
        raise
    except _VALUE_ERRORS as e:
        raise DicomError(path, f"a header value cannot be read ({type(e).__name__}: "
                               f"{e})") from None


def _open(path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise DicomError(path, "no such file") from None
    except IsADirectoryError:
        raise DicomError(path, "is a directory, not a DICOM file") from None
    except InvalidDicomError:
        raise DicomError(path, "not a DICOM file (no 'DICM' marker after the 128-byte "
                               "preamble)") from None
    except PermissionError as e:
        raise DicomError(path, f"cannot be read ({e.strerror})") from None
    except Exception as e:  # pydicom's parser on a damaged file: struct.error, unknown VRs..
        raise DicomError(path, f"not a readable DICOM file, or truncated "
                               f"({type(e).__name__}: {e})") from None
    if not stop_before_pixels:
        with _readable_header(path):
            _check_not_truncated(ds, path)
    return ds


def _check_not_truncated(ds: pydicom.Dataset, path) -> None:
    """pydicom stops quietly at end of file; the last element's declared length tells."""
    if not len(ds):
        raise DicomError(path, "truncated: no data elements after the file meta header")
    last = ds.get_item(max(map(int, ds.keys())), keep_deferred=True)
    value_tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if value_tell is None or length is None or length == 0xFFFFFFFF:
        return
    size = os.path.getsize(path)
    if value_tell + length > size:
        raise DicomError(path, f"truncated: element {last.tag} needs bytes up to "
                               f"{value_tell + length} but the file ends at {size}")


# The tags read from every slice.
_TRANSFER_SYNTAX = 0x00020010
_MODALITY = 0x00080060
_PATIENT_ID = 0x00100020
_SLICE_THICKNESS = 0x00180050
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_INSTANCE_NUMBER = 0x00200013
_POSITION = 0x00200032
_ORIENTATION = 0x00200037
_SLICE_LOCATION = 0x00201041
_SAMPLES = 0x00280002
_PHOTOMETRIC = 0x00280004
_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_PIXEL_SPACING = 0x00280030
_BITS_ALLOCATED = 0x00280100
_BITS_STORED = 0x00280101
_PIXEL_REPRESENTATION = 0x00280103
_INTERCEPT = 0x00281052
_SLOPE = 0x00281053
_PIXEL_DATA = 0x7FE00010
_ANY_PIXEL_DATA = (0x7FE00008, 0x7FE00009, _PIXEL_DATA)  # float, double float, integer

# The VR of each numeric tag `_number` reads (for implicit-VR files, whose elements do not
# say): the data dictionary's.
_NUMBER_VRS = {_SAMPLES: "US", _FRAMES: "IS", _ROWS: "US", _COLUMNS: "US",
               _BITS_ALLOCATED: "US", _BITS_STORED: "US", _PIXEL_REPRESENTATION: "US",
               _SLOPE: "DS", _INTERCEPT: "DS", _INSTANCE_NUMBER: "IS", _POSITION: "DS",
               _ORIENTATION: "DS", _SLICE_LOCATION: "DS", _PIXEL_SPACING: "DS",
               _SLICE_THICKNESS: "DS"}

# VRs whose values pydicom's `convert_value` decodes without the data set's character set.
_PLAIN_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "DS", "IS", "CS", "UI", "OB",
                        "OW"})


def _value(ds: pydicom.Dataset, tag: int):
    """``ds[tag].value`` (None where absent), the same object pydicom would give.

    An element the data set has not converted yet is converted here by pydicom's own
    `convert_value`, as its default hook does, without going through the `Dataset`'s item
    machinery, which costs about three times the conversion itself (a dozen tags per
    slice add up to more than the pixels). Only for the VRs in `_PLAIN_VRS`, and only when
    no conversion hook or callback of the user's is set; anything else, and any value
    `convert_value` refuses, takes the normal path, with pydicom's own errors and warnings.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if type(elem) is not RawDataElement:
        return elem.value
    vr = elem.VR
    if vr is None:  # implicit VR: the dictionary's, as pydicom's default hook does
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = None
    if vr in _PLAIN_VRS and elem.value is not None and _default_conversion():
        try:
            return convert_value(vr, elem)
        except Exception:  # pydicom's full path below raises or warns as it should
            pass
    return ds[tag].value


def _number(ds: pydicom.Dataset, tag: int):
    """A numeric element's value (US, IS or DS: the header values a slice needs) as an int,
    a float or a list of them; None where absent.

    pydicom has parsed the file into elements; this only reads a number out of an element's
    value bytes when that is plain (a 2-byte US; an IS or DS string that Python's own
    int/float take as it is, several values split at backslashes), as `_native_pixels`
    does for the pixel bytes: a quarter of what the conversion into pydicom's value types
    costs. Anything else is `_value`'s (so pydicom's) value, which means the same number.
    """
    elem = ds.get_item(tag)
    if type(elem) is RawDataElement and elem.value and _default_conversion():
        vr = elem.VR or _NUMBER_VRS.get(tag)
        raw = elem.value
        try:
            if vr == "US":
                if len(raw) == 2:
                    return int.from_bytes(raw, "little" if elem.is_little_endian else "big")
            elif vr == "IS":
                if b"\\" not in raw:
                    return int(raw)
            elif vr == "DS":
                values = [float(v) for v in raw.split(b"\\")]
                return values[0] if len(values) == 1 else values
        except ValueError:
            pass  # not plain: pydicom's conversion decides what it means
    return _value(ds, tag)


def _default_conversion() -> bool:
    h = _pydicom_hooks.hooks
    return (h.raw_element_vr is _pydicom_hooks.raw_element_vr
            and h.raw_element_value is _pydicom_hooks.raw_element_value
            and not h.raw_element_kwargs and _pydicom_config.data_element_callback is None)


def _blank(v) -> bool:
    return v is None or v == ""


class _Header:
    """The header values one slice needs, each converted once."""

    __slots__ = ("transfer_syntax", "frames", "modality", "samples", "rows", "columns",
                 "bits_allocated", "bits_stored", "signed", "slope", "intercept")

    def __init__(self, ds: pydicom.Dataset):
        meta = getattr(ds, "file_meta", None)
        self.transfer_syntax = _value(meta, _TRANSFER_SYNTAX) if meta is not None else None
        try:
            self.frames = int(_number(ds, _FRAMES) or 1)
        except (TypeError, ValueError):
            self.frames = 1
        self.modality = str(_value(ds, _MODALITY) or "").strip()
        self.samples = int(_number(ds, _SAMPLES) or 1)
        self.rows = _number(ds, _ROWS)
        self.columns = _number(ds, _COLUMNS)
        self.bits_allocated = _number(ds, _BITS_ALLOCATED)
        self.bits_stored = _number(ds, _BITS_STORED)
        self.signed = _number(ds, _PIXEL_REPRESENTATION)
        self.slope = _number(ds, _SLOPE)
        self.intercept = _number(ds, _INTERCEPT)


def _check_image(ds: pydicom.Dataset, path, allow_non_ct: bool,
                 h: _Header | None = None) -> None:
    h = _Header(ds) if h is None else h
    if not any(tag in ds for tag in _ANY_PIXEL_DATA):
        raise DicomError(path, "no pixel data: not an image (or truncated before its pixels)")
    modality = h.modality
    if modality != "CT" and not allow_non_ct:
        raise NotCTError(path, f"modality is {modality!r}" if modality else "no Modality tag")
    if h.samples != 1:
        raise DicomError(path, f"{h.samples} samples per pixel "
                               f"({_value(ds, _PHOTOMETRIC) or '?'}): not a grey CT slice")
    _check_decoder(h.transfer_syntax, path)


def _check_decoder(uid, path) -> None:
    if uid is None:
        raise DicomError(path, "no Transfer Syntax UID in the file meta header: cannot tell "
                               "how the pixels are encoded")
    uid = UID(str(uid))
    if uid in _NATIVE_LITTLE_ENDIAN or not uid.is_compressed:
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise DicomError(path, f"pixel data compressed as {uid.name} ({uid}), which pydicom "
                               "cannot decode") from None
    if not decoder.is_available:
        raise DicomError(path, f"pixel data compressed as {uid.name} and no decoder for it "
                               f"is installed; install one of: {_install_hint(decoder)}")


def _install_hint(decoder) -> str:
    options = []
    for _plugin, deps in sorted(decoder._unavailable.items()):
        names = [d.split(">")[0].split("=")[0].strip() for d in deps]
        pip = " ".join(_PIP_NAMES.get(n, n) for n in names)
        options.append(f"{' + '.join(deps)} (pip install {pip})")
    if not options:  # pydicom lists no plugin: say what usually works for compressed CT
        options.append("pylibjpeg + pylibjpeg-openjpeg (pip install pylibjpeg "
                       "pylibjpeg-openjpeg)")
    return "; ".join(options)


# Uncompressed little-endian transfer syntaxes, whose pixels are the raw bytes.
_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _native_pixels(ds: pydicom.Dataset, h: _Header | None = None) -> np.ndarray | None:
    """Stored values of an uncompressed one-frame 16-bit slice straight from its bytes.

    The common CT case, which pydicom's general decoder handles several times slower; the
    rules are pydicom's own (mask unused high bits, sign-extend signed values). Anything
    else (compressed, big endian, 8 or 32 bits, several frames or samples, short pixel
    data) returns None and goes through `ds.pixel_array`.
    """
    h = _Header(ds) if h is None else h
    if str(h.transfer_syntax or "") not in _NATIVE_LITTLE_ENDIAN:
        return None
    rows, cols, stored_bits, signed = h.rows, h.columns, h.bits_stored, h.signed
    if (h.bits_allocated != 16 or signed not in (0, 1) or not rows or not cols
            or stored_bits is None or not 1 <= stored_bits <= 16
            or h.frames != 1 or h.samples != 1):
        return None
    data = _value(ds, _PIXEL_DATA)
    if not isinstance(data, bytes) or len(data) < rows * cols * 2:
        return None  # let pydicom say what is wrong
    raw = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols)
    pixels = raw.reshape(rows, cols)  # read-only view: stored_to_hu makes the copy
    if stored_bits < 16:
        pixels = pixels.copy()
        shift = 16 - stored_bits
        if signed:
            pixels <<= shift
            pixels >>= shift  # arithmetic shift: sign-extends
        else:
            pixels &= (1 << stored_bits) - 1
    return pixels


def _pixels(ds: pydicom.Dataset, path, h: _Header | None = None) -> np.ndarray:
    native = _native_pixels(ds, h)
    if native is not None:
        return native
    try:
        stored = ds.pixel_array
    except ValueError as e:
        text = str(e)
        if "less than expected" in text or "doesn't match the expected" in text:
            raise DicomError(path, f"truncated pixel data: {text}") from None
        raise DicomError(path, f"pixel data could not be decoded: {text}") from None
    except (RuntimeError, NotImplementedError) as e:
        raise DicomError(path, f"pixel data could not be decoded: {e}") from None
    except Exception as e:  # a decoder plugin raising its own type on a corrupt stream
        raise DicomError(path, f"pixel data could not be decoded ({type(e).__name__}: "
                               f"{e})") from None
    if stored.dtype.kind not in "iub":
        raise DicomError(path, f"{stored.dtype} pixels; integer stored values expected for CT")
    return stored


def _make_slice(ds: pydicom.Dataset, path, stored: np.ndarray, frame: int | None,
                out: np.ndarray | None = None, header: _Header | None = None,
                identifiers: bool = True) -> CTSlice:
    h = _Header(ds) if header is None else header
    notes: list[str] = []
    slope, intercept = h.slope, h.intercept
    if _blank(slope) or _blank(intercept):
        missing = [n for n, v in (("RescaleSlope", slope), ("RescaleIntercept", intercept))
                   if _blank(v)]
        notes.append(f"no {' / '.join(missing)}: using slope 1 and intercept 0")
        slope = 1.0 if _blank(slope) else slope
        intercept = 0.0 if _blank(intercept) else intercept
    slope, intercept = float(slope), float(intercept)
    hu, clipped = stored_to_hu(stored, slope, intercept, out=out)
    if clipped:
        notes.append(f"{clipped} pixel(s) outside int16 HU [{INT16_MIN}, {INT16_MAX}]: clipped")
    for note in notes:
        warnings.warn(f"{path}: {note}", DicomWarning, stacklevel=3)
    position = _floats(_number(ds, _POSITION), 3)
    meta = SliceMeta(
        path=str(path),
        patient_id=str(_value(ds, _PATIENT_ID) or "") if identifiers else "",
        study_uid=str(_value(ds, _STUDY_UID) or "") if identifiers else "",
        series_uid=str(_value(ds, _SERIES_UID) or "") if identifiers else "",
        instance_number=_int_or_none(_number(ds, _INSTANCE_NUMBER)),
        slice_position=(position[2] if position is not None
                        else _float_or_none(_number(ds, _SLICE_LOCATION))),
        pixel_spacing=_spacing(ds),
        slice_thickness=_float_or_none(_number(ds, _SLICE_THICKNESS)),
        modality=h.modality,
        rescale_slope=slope,
        rescale_intercept=intercept,
        frame=frame,
        warnings=tuple(notes),
        image_position=position,
        image_orientation=_orientation(ds),
    )
    return CTSlice(hu=hu, meta=meta)


def _orientation(ds) -> tuple[float, ...] | None:
    """ImageOrientationPatient, None where absent or unreadable: a slice is read without it,
    as it was before the cache kept it."""
    try:
        return _floats(_number(ds, _ORIENTATION), 6)
    except _VALUE_ERRORS:
        return None


def _floats(values, n: int) -> tuple[float, ...] | None:
    """A multi-valued number (ImagePositionPatient, ...) as `n` finite floats, else None."""
    if not isinstance(values, (list, tuple, MultiValue)) or len(values) != n:
        return None
    out = tuple(_float_or_none(v) for v in values)
    return out if all(v is not None and np.isfinite(v) for v in out) else None


def _spacing(ds) -> tuple[float, float] | None:
    ps = _number(ds, _PIXEL_SPACING)
    if ps is None:
        # Enhanced multi-frame CT keeps it in the shared functional groups.
        try:
            ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError, KeyError):
            return None
    try:
        return float(ps[0]), float(ps[1])
    except (TypeError, ValueError, IndexError):
        return None


def _per_frame_positions(ds, frames: int) -> list[tuple[float, float, float] | None]:
    try:
        groups = ds.PerFrameFunctionalGroupsSequence
        found = [_floats(g.PlanePositionSequence[0].ImagePositionPatient, 3) for g in groups]
    except (AttributeError, IndexError, KeyError):
        found = []
    return (found + [None] * frames)[:frames]


def _shared_orientation(ds) -> tuple[float, ...] | None:
    """Enhanced multi-frame CT's orientation (the shared functional groups), else None."""
    try:
        group = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        return _floats(group.ImageOrientationPatient, 6)
    except (AttributeError, IndexError, KeyError):
        return None


def _int_or_none(v) -> int | None:
    try:
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError):
        return None


def _float_or_none(v) -> float | None:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def is_dicom_path(path: str | os.PathLike) -> bool:
    """Whether a file name looks like a DICOM slice (.dcm, .dicom, .ima, or no suffix)."""
    suffix = Path(path).suffix.lower()
    return suffix in (".dcm", ".dicom", ".ima") or suffix == ""

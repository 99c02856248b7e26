"""DICOM SEG: a nodule mask as a Segmentation object that references its CT series
(highdicom writes and reads it; nothing of the format is written by hand).

`write_seg` makes a BINARY segmentation with one segment, "nodule" (SNOMED CT: category
"Morphologically abnormal structure", type "Nodule"), algorithm type AUTOMATIC, named
nodulekit; each frame references the source slice (SOPInstanceUID) it lies on, empty frames
left out (highdicom's default). `read_seg` gives the mask back on the series' own slices, in
the order of the series' `Volume` (`nodulekit.data.volumes.read_dicom_series`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from nodulekit import __version__


class SegError(ValueError):
    """A SEG file that cannot be read onto a series; the message names the file."""


def write_seg(mask: np.ndarray, source_files: list[str], path: str | os.PathLike, *,
              series_number: int = 300, label: str = "nodule") -> Path:
    """`mask` (Z, H, W), slice k on `source_files[k]` (a CT series, `Volume.files` order),
    as a DICOM SEG file at `path`."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.shape[0] != len(source_files):
        raise ValueError(f"mask {mask.shape} must have one slice per source file "
                         f"({len(source_files)})")
    sources = [_with_type2(pydicom.dcmread(os.fspath(f))) for f in source_files]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="nodulekit", version=__version__,
            family=codes.cid7162.ArtificialIntelligence))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=(mask != 0).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(),
        series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="nodulekit", manufacturer_model_name="nodulekit U-Net",
        software_versions=__version__, device_serial_number="0",
        series_description="nodulekit nodule segmentation")
    path = Path(path)
    seg.save_as(path)
    return path


# Patient and study attributes of DICOM type 2 (required, may be empty) that highdicom
# copies from the source images: a series written without them (many anonymised or
# converted ones) gets them empty, which the standard allows.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds):
    for name in _TYPE2:
        if name not in ds:
            setattr(ds, name, "")
    return ds


def read_seg(path: str | os.PathLike, sop_uids: list[str], shape: tuple[int, int] | None = None,
             segment: int | None = None) -> np.ndarray:
    """The mask (uint8 {0, 1}, [len(sop_uids), H, W]) that the SEG file at `path` puts on the
    slices `sop_uids` (a series' SOPInstanceUIDs, in its order; slices it does not cover
    are empty). segment: which segment (None: the union of all)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(os.fspath(path))
    except Exception as e:  # pydicom / highdicom raise many kinds for a bad file
        raise SegError(f"{path}: not a readable DICOM SEG ({type(e).__name__}: {e})") from None
    covered = {uid for _, _, uid in seg.get_source_image_uids()}
    wanted = [u for u in sop_uids if u in covered]
    if not wanted:
        raise SegError(f"{path}: references none of the {len(sop_uids)} slices of the series")
    numbers = seg.get_segment_numbers() if segment is None else [segment]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=wanted, segment_numbers=numbers, combine_segments=False,
        skip_overlap_checks=True, assert_missing_frames_are_empty=True,
        # many SEG files (pydicom's liver_1frame.dcm among them) leave out "spatial
        # locations preserved"; the frames are matched by the slice they reference
        ignore_spatial_locations=True)
    h, w = pixels.shape[1:3]
    if shape is not None and (h, w) != tuple(shape):
        raise SegError(f"{path}: its frames are {h}x{w}, the series' slices {shape[0]}x"
                       f"{shape[1]}")
    out = np.zeros((len(sop_uids), h, w), dtype=np.uint8)
    row = {u: i for i, u in enumerate(sop_uids)}
    for j, uid in enumerate(wanted):
        out[row[uid]] = pixels[j].any(axis=-1)
    return out

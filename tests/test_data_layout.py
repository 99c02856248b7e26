"""Data-set layouts: UniToChest (split folders + CSVs) and a plain folder tree."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from nodulekit.data.layout import (
    SPLITS,
    LayoutError,
    detect_layout,
    read_folder_tree,
    read_layout,
    read_unitochest,
    split_patients,
)
from nodulekit.data.masks import write_mask
from nodulekit.data.synth import SynthConfig, synthesize

CT_SMALL = get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    return synthesize(root, SynthConfig(size=64, patients=4, slices_per_patient=5, seed=0))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- split


def test_split_is_80_10_10_by_patient_and_seeded():
    patients = [f"p{i:03d}" for i in range(100)]
    a = split_patients(patients, seed=1)
    assert set(a) == set(patients)
    counts = {s: sum(v == s for v in a.values()) for s in SPLITS}
    assert counts == {"train": 80, "val": 10, "test": 10}
    assert split_patients(list(reversed(patients)), seed=1) == a  # order does not matter
    assert split_patients(patients, seed=2) != a


@pytest.mark.parametrize("n", [1, 2, 3, 5, 11])
def test_split_of_few_patients(n):
    s = split_patients([str(i) for i in range(n)], seed=0)
    values = list(s.values())
    assert values.count("train") >= 1
    if n >= 3:
        assert values.count("val") >= 1 and values.count("test") >= 1


# ----------------------------------------------------------------------------- UniToChest


def test_unitochest_from_synth(small_synth):
    root = small_synth.root
    assert detect_layout(root) == "unitochest"
    index = read_layout(root)
    assert index.layout == "unitochest"
    assert index.problems == []
    assert len(index.records) == len(small_synth.slices)
    by_source = {r.source: r for r in index.records}
    for s in small_synth.slices:
        r = by_source[s.image]
        assert r.split == s.split and r.patient == s.patient_id and r.slice == s.instance_number
        assert (r.mask is None) == (s.mask is None)
        if s.mask:
            assert r.mask.endswith(s.mask)
    # Patients never straddle splits.
    for patient in {r.patient for r in index.records}:
        assert len({r.split for r in index.records if r.patient == patient}) == 1


def test_unitochest_reports_what_does_not_fit(small_synth, tmp_path):
    root = _copy(small_synth.root, tmp_path / "data")
    train = root / "train"
    rows = list(csv.reader(open(train / "train_dataset.csv")))
    body = rows[1:]
    with_mask = next(r for r in body[2:] if r[4])
    without_mask = next(r for r in body[2:] if not r[4])
    # 1. a listed image that is missing
    (train / "images" / body[0][3]).unlink()
    # 2. a listed mask that is missing
    (train / "masks" / with_mask[4]).unlink()
    # 3. a DICOM on disk that the CSV does not list
    extra = train / "images" / Path(body[1][3]).parent / "9999.dcm"
    shutil.copy(CT_SMALL, extra)
    # 4. a mask whose slice does not exist
    orphan = train / "masks" / "patient_9999" / "exam_1" / "0001.png"
    orphan.parent.mkdir(parents=True)
    write_mask(orphan, np.ones((64, 64), dtype=np.uint8))
    # 5. a mask on disk for a slice the CSV says has none
    stray = train / "masks" / Path(without_mask[3]).with_suffix(".png")
    stray.parent.mkdir(parents=True, exist_ok=True)
    write_mask(stray, np.ones((64, 64), dtype=np.uint8))

    index = read_unitochest(root)
    text = "\n".join(str(p) for p in index.problems)
    assert f"image {body[0][3]!r} listed but not found" in text
    assert f"mask {with_mask[4]!r} listed but not found" in text
    assert "9999.dcm: DICOM not listed in train_dataset.csv" in text
    assert "patient_9999/exam_1/0001.png: mask without a slice" in text
    assert "CSV lists no mask for its slice" in text
    sources = {r.source for r in index.records}
    assert f"train/images/{body[0][3]}" not in sources
    assert f"train/images/{with_mask[3]}" not in sources  # truth unknown: skipped
    stray_source = f"train/images/{without_mask[3]}"
    stray_record = next(r for r in index.records if r.source == stray_source)
    assert stray_record.mask is None  # the CSV decides, and the clash is reported
    skipped = [p for p in index.problems if p.skipped]
    # The row whose image is gone leaves its mask (if it had one) without a slice too.
    assert len(skipped) == 4 + bool(body[0][4])


def test_unitochest_lenient_column_names(small_synth, tmp_path):
    root = _copy(small_synth.root, tmp_path / "data")
    path = root / "val" / "val_dataset.csv"
    rows = list(csv.reader(open(path)))
    rows[0] = ["Patient ID", "EXAM", "Slice", " image ", "Mask"]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    index = read_unitochest(root)
    assert len(index.split("val")) == len(rows) - 1
    assert not index.problems


def test_unitochest_without_image_column_is_an_error(small_synth, tmp_path):
    root = _copy(small_synth.root, tmp_path / "data")
    (root / "test" / "test_dataset.csv").write_text("patientID,exam,slice,picture\n1,1,1,x\n")
    with pytest.raises(LayoutError, match="no 'image' column"):
        read_unitochest(root)


# ----------------------------------------------------------------------------- folder tree


def _ct(path: Path, patient: str, instance: int) -> None:
    ds = pydicom.dcmread(CT_SMALL)
    ds.PatientID = patient
    ds.InstanceNumber = instance
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_folder_tree_with_sidecar_and_mirrored_masks(tmp_path):
    root = tmp_path / "tree"
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[10:20, 10:20] = 1
    for p in range(10):
        for k in range(3):
            _ct(root / "images" / f"case{p}" / f"s{k}.dcm", f"P{p}", k + 1)
    write_mask(root / "images" / "case0" / "s1_mask.png", mask)  # sidecar
    (root / "masks" / "case1").mkdir(parents=True)
    write_mask(root / "masks" / "case1" / "s2.png", mask)  # mirrored
    write_mask(root / "masks" / "case1" / "gone.png", mask)  # no slice
    write_mask(root / "images" / "case2" / "s0_mask.png", mask)  # two masks for one slice
    (root / "masks" / "case2").mkdir(parents=True)
    write_mask(root / "masks" / "case2" / "s0.png", mask)

    assert detect_layout(root) == "folder"
    index = read_folder_tree(root, seed=0)
    assert index.layout == "folder"
    assert len(index.records) == 29  # 30 slices, one with two masks skipped
    by_source = {r.source: r for r in index.records}
    assert by_source["images/case0/s1.dcm"].mask.endswith("case0/s1_mask.png")
    assert by_source["images/case1/s2.dcm"].mask.endswith("masks/case1/s2.png")
    assert by_source["images/case0/s0.dcm"].mask is None
    assert by_source["images/case0/s0.dcm"].slice == 1
    text = "\n".join(map(str, index.problems))
    assert "gone.png: mask without a slice" in text
    assert "s0.dcm: two masks for this slice" in text
    # Split by the PatientID tag, seeded, patient-level.
    splits = {r.patient: r.split for r in index.records}
    assert sorted(splits) == [f"P{p}" for p in range(10)]
    assert sorted(splits.values()).count("train") == 8
    assert read_folder_tree(root, seed=0).records == index.records


def test_folder_tree_without_dicoms_is_an_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(LayoutError, match="no DICOM files"):
        read_layout(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(LayoutError, match="not a directory"):
        read_layout(tmp_path / "nowhere")

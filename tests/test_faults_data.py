"""Faults and bad input on the data side (issue 13): each test names its item.

3: `synth --overwrite` and `preprocess --overwrite` replace only what they wrote.
4: a full disk while preprocessing leaves no file, and says so in one line naming the cache.
5: a damaged cache is a CacheError naming the file, on every read path.
6: the cache's chunks carry checksums (HDF5's Fletcher-32), checked on every read.
7: paths in a UniToChest CSV stay inside the data folder unless --allow-outside-paths.
8: plain folder trees: masks beside the slices as X.png are read, unknown names reported;
   the messages suggest options that exist.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from nodulekit.cli import main
from nodulekit.data import preprocess as preprocess_module
from nodulekit.data.cache import FORMAT_NAME, Cache, CacheError, open_cache
from nodulekit.data.checksum import fletcher32, with_checksum
from nodulekit.data.decode import Task, decode_to_file
from nodulekit.data.layout import read_folder_tree, read_layout
from nodulekit.data.loader import Loader, LoaderError, ReadOptions, SampleOptions, train_loader
from nodulekit.data.preprocess import PreprocessError, preprocess
from nodulekit.data.synth import MARKER, SynthConfig, synthesize
from nodulekit.inference.inputs import SliceInput
from nodulekit.inference.predict import read_slices

# Every split holds slices with and without a nodule (as tests/tiny.py's TINY).
TINY = SynthConfig(size=32, patients=6, slices_per_patient=12, seed=0)
SYNTH_ARGS = ["--size", "32", "--patients", "3", "--slices-per-patient", "2", "--workers", "0",
              "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny synthetic UniToChest set (read only: copy it to change it)."""
    root = tmp_path_factory.mktemp("faults") / "data"
    synthesize(root, TINY, workers=0)
    return root


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory) -> Path:
    """Its cache (read only: copy it to damage it)."""
    path = tmp_path_factory.mktemp("faults-cache") / "cache.h5"
    preprocess(data, path, workers=0, progress=False)
    return path


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _chunk(path: Path, dataset: str, row: int) -> tuple[int, int]:
    """(byte offset, stored size) of chunk `row` of `dataset` in the file."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info_by_coord((row,) + (0,) * (f[dataset].ndim - 1))
        return int(info.byte_offset), int(info.size)


def _all_rows(cache_path: Path, split: str):
    """Every row of a split through the loader (raw whole-chunk reads), in cache order."""
    with Loader(cache_path, split, batch_size=4,
                sample=SampleOptions(sampling="all", shuffle=False, augment=False,
                                     drop_last=False),
                read=ReadOptions(num_workers=0)) as loader:
        return [b for b in loader.epoch(0)]


# ----------------------------------------------------------------------------- 3: overwrite


def test_synth_overwrite_deletes_only_a_data_set_it_wrote(tmp_path):
    """Item 3: `synth OUT --overwrite` deleted any folder (a thesis.txt in it was gone)."""
    runner = CliRunner()
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.txt").write_text("four years")
    r = runner.invoke(main, ["synth", str(thesis), *SYNTH_ARGS, "--overwrite"])
    assert r.exit_code != 0 and str(thesis) in r.output and "Traceback" not in r.output
    assert "not written by nodulekit synth" in r.output
    assert (thesis / "thesis.txt").read_text() == "four years"

    out = tmp_path / "data"
    assert runner.invoke(main, ["synth", str(out), *SYNTH_ARGS]).exit_code == 0
    assert (out / MARKER).is_file()
    r = runner.invoke(main, ["synth", str(out), *SYNTH_ARGS, "--seed", "5", "--overwrite"])
    assert r.exit_code == 0, r.output  # its own data set: replaced
    # ... but not once it holds a file synth did not write
    (out / "train" / "notes.txt").write_text("mine")
    r = runner.invoke(main, ["synth", str(out), *SYNTH_ARGS, "--overwrite"])
    assert r.exit_code != 0 and str(out) in r.output and "train/notes.txt" in r.output
    assert (out / "train" / "notes.txt").read_text() == "mine"


def test_preprocess_overwrite_replaces_only_a_cache(data, cache, tmp_path):
    """Item 3, preprocess: `--overwrite` replaced any file with the cache."""
    runner = CliRunner()
    args = ["--workers", "0", "--no-progress", "--overwrite"]
    precious = tmp_path / "thesis.h5"
    precious.write_bytes(b"four years")
    r = runner.invoke(main, ["preprocess", str(data), str(precious), *args])
    assert r.exit_code != 0 and str(precious) in r.output
    assert "not a nodulekit cache" in r.output and "Traceback" not in r.output
    assert precious.read_bytes() == b"four years"
    # A cache, even a damaged one, was written by preprocess: --overwrite rebuilds it.
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(cache.read_bytes()[:cache.stat().st_size // 2])
    with pytest.raises(CacheError):
        open_cache(damaged)
    r = runner.invoke(main, ["preprocess", str(data), str(damaged), *args])
    assert r.exit_code == 0, r.output
    open_cache(damaged).close()


# ----------------------------------------------------------------------------- 4: disk full


def test_disk_full_when_closing_the_cache_leaves_no_partial_file(data, tmp_path, monkeypatch):
    """Item 4, --workers 0: closing the writer raised (ENOSPC) before the cleanup, so the
    hidden .partial file stayed, and the error was h5py's, naming only that file."""
    real_close = h5py.File.close
    failing = []

    def close_on_a_full_disk(self):
        if self.id.valid and self.filename.endswith(".partial"):  # the cache being written
            failing.append(self)
            raise OSError(errno.ENOSPC, "Can't flush cache: No space left on device")
        real_close(self)

    monkeypatch.setattr(h5py.File, "close", close_on_a_full_disk)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "cache.h5"
    try:
        with pytest.raises(PreprocessError) as e:
            preprocess(data, out, workers=0, progress=False)
    finally:
        for f in failing:
            real_close(f)
    message = str(e.value)
    assert message.startswith(f"{out}: cannot write the cache")
    assert "No space left on device" in message and "\n" not in message
    assert ".partial" not in message
    assert os.listdir(folder) == []


_FULL_DISK_SCRIPT = """
import resource, signal, sys
import nodulekit.data.checksum  # first: Numba may write its cache of compiled code
import nodulekit.data.decode, nodulekit.data.synth  # the fork server's modules
from nodulekit.data.preprocess import PreprocessError, preprocess

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if __name__ == "__main__":
    try:
        preprocess(sys.argv[1], sys.argv[2], workers=2, progress=False)
    except PreprocessError as e:
        print("PreprocessError:", e)
"""


def test_disk_full_with_workers_says_so_and_leaves_no_file(data, tmp_path):
    """Item 4, with workers: the error named the hidden file, the .partial stayed, and the
    hint spoke of `if __name__ == "__main__":`. A real write failure: the file size limit
    (RLIMIT_FSIZE) makes the kernel refuse writes past 40 kB, as a full disk would."""
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "cache.h5"
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(data), str(out), "40000"],
                       capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stdout.splitlines() if line.startswith("PreprocessError")]
    assert len(lines) == 1, r.stdout + r.stderr
    assert f"{out}: cannot write the cache: File too large" in lines[0]
    assert "__main__" not in lines[0] and ".partial" not in lines[0]
    assert "Traceback" not in r.stderr, r.stderr
    assert os.listdir(folder) == []


def test_a_worker_that_cannot_write_reports_why(data, tmp_path):
    """Item 4: a worker's failed write killed it (an uncaught OSError); now it comes back."""
    image = str(sorted((data / "train" / "images").rglob("*.dcm"))[0])
    target = tmp_path / "cache.partial"
    target.write_bytes(b"")
    fd = os.open(target, os.O_RDONLY)  # writes fail: EBADF
    try:
        d = decode_to_file(Task(0, image, None, False), fd, 0,
                           np.empty((TINY.size, TINY.size), np.int16))
    finally:
        os.close(fd)
    assert not d.written and d.write_error is not None
    assert "Bad file descriptor" in d.write_error


def test_a_worker_killed_midway_is_not_blamed_on_the_main_guard(data, tmp_path, monkeypatch):
    """Item 4: any worker that stopped was explained by `if __name__ == "__main__":`."""
    import signal

    original = preprocess_module._Dispatch.receive
    killed = []

    def kill_then_receive(self, conn):
        if not killed:
            proc = self.worker_of[conn]
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=10)
            killed.append(proc.pid)
        return original(self, conn)

    monkeypatch.setattr(preprocess_module._Dispatch, "receive", kill_then_receive)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(PreprocessError) as e:
        preprocess(data, folder / "cache.h5", workers=2, progress=False)
    assert "decoding process stopped (exit code -9)" in str(e.value)
    assert "__main__" not in str(e.value)
    assert os.listdir(folder) == []


# ----------------------------------------------------------------------------- 5: damaged


def test_damaged_cache_is_a_cache_error_naming_the_file_on_every_read_path(cache, tmp_path):
    """Item 5: a damaged cache gave h5py's OSError ("Can't synchronously read data ..."),
    naming no file, or other pixels without an error."""
    # open_cache: a file cut short
    short = tmp_path / "short.h5"
    short.write_bytes(cache.read_bytes()[:4096])
    with pytest.raises(CacheError, match=str(short)):
        open_cache(short)

    # split reads (pixels and metadata) and loader rows: one byte changed in a chunk
    hu_bad = tmp_path / "hu.h5"
    shutil.copy(cache, hu_bad)
    offset, size = _chunk(hu_bad, "train/hu", 2)
    _flip(hu_bad, offset + size // 2, bit=3)
    with open_cache(hu_bad) as c:
        split = c.split("train")
        with pytest.raises(CacheError, match=f"{hu_bad}: cannot read train/hu row 2"):
            split.hu[2]
        with pytest.raises(CacheError, match=str(hu_bad)):
            split.hu[()]
        np.testing.assert_array_equal(split.hu[3], Cache(cache).split("train").hu[3])
    with pytest.raises(CacheError, match=f"{hu_bad}: train/hu row 2: checksum mismatch"):
        _all_rows(hu_bad, "train")

    meta_bad = tmp_path / "meta.h5"
    shutil.copy(cache, meta_bad)
    offset, size = _chunk(meta_bad, "val/meta/has_nodule", 0)
    _flip(meta_bad, offset, bit=0)
    with open_cache(meta_bad) as c:
        with pytest.raises(CacheError, match=f"{meta_bad}: cannot read val/meta/has_nodule"):
            assert c.split("val").meta
    with pytest.raises(CacheError, match=str(meta_bad)):
        _all_rows(meta_bad, "val")


# ----------------------------------------------------------------------------- 6: checksums


def test_every_dataset_carries_fletcher32(cache):
    """Item 6: the cache had no checksums."""
    with h5py.File(cache, "r") as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(obj)
                     if isinstance(obj, h5py.Dataset) else None)
        assert len(datasets) > 30
        for ds in datasets:
            plist = ds.id.get_create_plist()
            filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
            assert filters == [h5py.h5z.FILTER_FLETCHER32], ds.name
            assert not h5py.check_vlen_dtype(ds.dtype), ds.name  # no unchecked global heap


@pytest.mark.parametrize("dataset", ["train/hu", "train/mask", "test/hu"])
def test_single_bit_flips_in_pixels_are_errors_never_other_pixels(cache, tmp_path, rng,
                                                                  dataset):
    """Item 6: 76 of 300 single-bit flips changed pixels unnoticed."""
    split = dataset.split("/")[0]
    with open_cache(cache) as c:
        row = int(c.split(split).nodule_rows()[0])  # a mask chunk exists only with a nodule
    offset, size = _chunk(cache, dataset, row)
    damaged = tmp_path / "damaged.h5"
    for where in rng.choice(size, size=4, replace=False).tolist():  # checksum bytes too
        shutil.copy(cache, damaged)
        _flip(damaged, offset + where, bit=int(rng.integers(0, 8)))
        with pytest.raises(CacheError, match=f"{damaged}: .*{dataset} row {row}"):
            _all_rows(damaged, split)
        with open_cache(damaged) as c:
            ds = getattr(c.split(split), dataset.split("/")[1])
            with pytest.raises(CacheError, match=str(damaged)):
                ds[row]


def test_chunks_written_past_hdf5_pass_its_own_check(data, cache, tmp_path):
    """Item 6: the workers write HU chunks, and the parent whole chunks, past HDF5's filter;
    HDF5's own Fletcher-32 check accepts every one of them, and they hold the same pixels."""
    pooled = tmp_path / "pooled.h5"
    preprocess(data, pooled, workers=2, progress=False)
    with open_cache(cache) as a, open_cache(pooled) as b:
        for name in a.splits:
            np.testing.assert_array_equal(a.split(name).hu[()], b.split(name).hu[()])
            np.testing.assert_array_equal(a.split(name).mask[()], b.split(name).mask[()])


@pytest.mark.parametrize("shape,dtype", [((32, 32), np.int16), ((37, 41), np.uint8),
                                         ((3, 5), np.int16), ((1,), np.uint8),
                                         ((700, 9), np.int16)])
def test_fletcher32_is_hdf5s(tmp_path, rng, shape, dtype):
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for name, v in (("random", values), ("zeros", np.zeros_like(values)),
                        ("ones", np.full_like(values, -1 if info.min else info.max))):
            ds = f.create_dataset(name, data=v, chunks=v.shape, fletcher32=True)
            _, stored = ds.id.read_direct_chunk((0,) * v.ndim)
            assert with_checksum(v).tobytes() == stored
            assert fletcher32(v) == int.from_bytes(stored[-4:], "little")


def test_cache_without_checksums_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    """Item 6: a version-1 cache (no checksums) is refused, saying how to rebuild it."""
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = 1
    with pytest.raises(CacheError, match="version 1 .*checksums.* `nodulekit preprocess "
                                         rf"DATA {old} --overwrite`"):
        open_cache(old)


# ----------------------------------------------------------------------------- 7: CSV paths


def _rewrite_csv(path: Path, rows: dict[int, dict[str, str]]) -> None:
    """Set fields of data rows (numbered from 0) of a split's CSV."""
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
        fields = list(table[0])
    for i, values in rows.items():
        table[i].update(values)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)


def test_csv_paths_must_stay_inside_the_data_folder(data, tmp_path, monkeypatch):
    """Item 7: `../../../../outside/scan.dcm` and absolute paths in a CSV were read (and
    /etc/passwd was opened)."""
    root = tmp_path / "data"
    shutil.copytree(data, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted((root / "train" / "images").rglob("*.dcm"))[0]
    shutil.copy(first, outside / "scan.dcm")
    masks = sorted((root / "train" / "masks").rglob("*.png"))
    shutil.copy(masks[0], outside / "mask.png")
    csv_path = root / "train" / "train_dataset.csv"
    _rewrite_csv(csv_path, {0: {"image": "../../../outside/scan.dcm"},  # from images/
                            1: {"image": str(outside / "scan.dcm")},
                            2: {"image": "/etc/passwd"},
                            3: {"mask": "../../../outside/mask.png"}})

    opened = []
    real_dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda path, *a, **k: (
        opened.append(os.path.abspath(path)), real_dcmread(path, *a, **k))[1])
    index = read_layout(root)
    outside_rows = [p for p in index.problems if "outside the data folder" in p.reason]
    assert [p.path for p in outside_rows] == [f"{csv_path}:{line}" for line in (2, 3, 4, 5)]
    assert all(p.skipped and "--allow-outside-paths" in p.reason for p in outside_rows)
    assert "an absolute path" in outside_rows[1].reason
    inside = str(root) + os.sep
    assert all(r.image.startswith(inside) for r in index.records)
    assert all(r.mask is None or r.mask.startswith(inside) for r in index.records)
    assert not [p for p in opened if not p.startswith(inside)]
    n_inside = len(index.records)

    allowed = read_layout(root, allow_outside_paths=True)
    images = {r.image for r in allowed.records}
    assert str(outside / "scan.dcm") in images and "/etc/passwd" in images
    assert len(allowed.records) == n_inside + 3

    # preprocess -> layout: skipped (and reported) by default, read with the option
    runner = CliRunner()
    args = ["preprocess", str(root), "--workers", "0", "--no-progress"]
    r = runner.invoke(main, [*args[:2], str(tmp_path / "a.h5"), *args[2:]])
    assert r.exit_code == 0, r.output
    assert "outside the data folder" in r.output
    r = runner.invoke(main, [*args[:2], str(tmp_path / "b.h5"), *args[2:],
                             "--allow-outside-paths"])
    assert r.exit_code == 0, r.output
    assert "/etc/passwd: not a DICOM file" in r.output  # read, then refused as not DICOM
    with open_cache(tmp_path / "a.h5") as a, open_cache(tmp_path / "b.h5") as b:
        assert len(b.split("train")) == len(a.split("train")) + 2


# ----------------------------------------------------------------------------- 8: folder trees


def _folder_tree(data: Path, root: Path, mask_name: str) -> int:
    """The synthetic set as a plain tree: patient/NNNN.dcm, masks beside them named
    `mask_name` (format with the slice's stem). Returns the number of masks."""
    n = 0
    for dcm in sorted(data.rglob("*.dcm")):
        patient = dcm.parent.parent.name
        (root / patient).mkdir(parents=True, exist_ok=True)
        shutil.copy(dcm, root / patient / dcm.name)
        mask = Path(str(dcm).replace("/images/", "/masks/")).with_suffix(".png")
        if mask.is_file():
            shutil.copy(mask, root / patient / mask_name.format(dcm.stem))
            n += 1
    return n


@pytest.mark.parametrize("mask_name", ["{}.png", "{}_mask.png"])
def test_folder_tree_masks_beside_the_slices_are_read(data, tmp_path, mask_name):
    """Item 8: masks named X.png beside X.dcm were ignored, with no note (0 nodule slices)."""
    root = tmp_path / "tree"
    n_masks = _folder_tree(data, root, mask_name)
    index = read_folder_tree(root)
    assert sum(r.mask is not None for r in index.records) == n_masks > 0
    assert not [p for p in index.problems if p.skipped]
    report = preprocess(root, tmp_path / "c.h5", workers=0, progress=False)
    assert sum(c["nodule_slices"] for c in report.counts.values()) > 0


def test_folder_tree_reports_mask_files_it_cannot_pair(data, tmp_path):
    """Item 8: a mask with an unknown name pattern is reported, not silently ignored."""
    root = tmp_path / "tree"
    _folder_tree(data, root, "{}.png")
    patient = sorted(p for p in root.iterdir())[0]
    a_mask = sorted(patient.glob("*.png"))[0]
    shutil.copy(a_mask, patient / "0001_seg.png")
    (patient / "0001.jpg").write_bytes(b"\xff\xd8\xff")
    (root / "masks" / patient.name).mkdir(parents=True)
    shutil.copy(a_mask, root / "masks" / patient.name / "9999.png")  # mirrored, no slice
    problems = {Path(p.path).name: p.reason for p in read_folder_tree(root).problems}
    assert "fits no slice's mask" in problems["0001_seg.png"]
    assert "X.png or X_mask.png beside X.dcm" in problems["0001_seg.png"]
    assert "masks are read from PNG" in problems["0001.jpg"]
    assert "mask without a slice" in problems["9999.png"]


def test_train_without_nodule_slices_suggests_what_exists(data, tmp_path):
    """Item 8: `train` suggested sampling='all', which is not one of its options."""
    root = tmp_path / "tree"
    _folder_tree(data, root, "{}_label.png")  # a name no reader pairs: no nodule anywhere
    preprocess(root, tmp_path / "c.h5", workers=0, progress=False)
    with pytest.raises(LoaderError) as e:
        train_loader(tmp_path / "c.h5", num_workers=0)
    message = str(e.value)
    assert "sampling" not in message
    assert "no slice with a nodule" in message and "nodulekit preprocess" in message


def test_predict_non_ct_message_suggests_no_missing_option(tmp_path):
    """Item 8: `predict` suggested --allow-non-ct, which it does not have."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "MR"
    path = tmp_path / "mr.dcm"
    ds.save_as(path, enforce_file_format=True)
    failed: list[tuple[str, str]] = []
    said: list[str] = []
    loaded = list(read_slices([SliceInput(path, Path("mr"), None, False)], depth=2,
                              failed=failed, report=said.append))
    assert loaded == [] and len(failed) == 1
    assert "modality is 'MR', not CT" in failed[0][1]
    assert "allow" not in failed[0][1] and "allow" not in said[0]
    # preprocess, which has the option, still names it
    from nodulekit.data.decode import decode

    d = decode(Task(0, str(path), None, False))
    assert "--allow-non-ct" in d.error

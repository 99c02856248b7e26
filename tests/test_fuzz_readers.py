"""Fuzz tests of the DICOM and cache readers (issue 13): real files with random single-bit
flips and truncations, seeded, a few hundred cases.

Every case must end one of these ways, never in a crash, a hang, another exception or other
values:

- DICOM (`read_slice`): the original HU; or, since DICOM has no checksum, exactly what the
  damaged file says (a flipped pixel byte is a changed pixel), as pydicom's own decoder
  reads it; or a `DicomError` naming the file.
- Cache (`Cache`, its splits, the loader's raw reads): every value as in the original file
  (a flip in unused space), or a `CacheError` naming the file. The cases run in a child
  process (this file run as a script), so that a crash inside HDF5 fails the test, naming
  the case, instead of ending the test run.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from nodulekit.data.cache import Cache, CacheError
from nodulekit.data.dicom import DicomError, read_slice
from nodulekit.data.loader import Loader, ReadOptions, SampleOptions
from nodulekit.data.preprocess import preprocess
from nodulekit.data.synth import SynthConfig, synthesize

DICOM_CASES = 200  # per file
CACHE_CASES = 250


def mutations(data: bytes, n: int, seed: int):
    """`n` damaged copies of `data`, seeded: (what was done, the bytes). One in four is cut
    short, the others have one bit flipped."""
    rng = np.random.default_rng(seed)
    for case in range(n):
        damaged = bytearray(data)
        if case % 4 == 3:
            cut = int(rng.integers(0, len(data)))
            yield f"truncated to {cut} bytes", bytes(damaged[:cut])
        else:
            where, bit = int(rng.integers(0, len(data))), int(rng.integers(0, 8))
            damaged[where] ^= 1 << bit
            yield f"bit {bit} of byte {where} flipped", bytes(damaged)


# ----------------------------------------------------------------------------- DICOM


def _as_pydicom_reads_it(path: Path) -> np.ndarray:
    """The HU that pydicom's general decoder makes of a file (the docs/design.md formula)."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array
    slope = float(ds.RescaleSlope) if ds.get("RescaleSlope") not in (None, "") else 1.0
    intercept = (float(ds.RescaleIntercept) if ds.get("RescaleIntercept") not in (None, "")
                 else 0.0)
    hu = np.rint(stored.astype(np.float64) * slope + intercept)
    return np.clip(hu, -32768, 32767).astype(np.int16)


def _dicom_outcome(path: Path, original: np.ndarray) -> str:
    try:
        hu = read_slice(path).hu
    except DicomError as e:
        return "error" if str(path) in str(e) else f"DicomError not naming the file: {e}"
    except Exception as e:  # exactly what must not happen
        return f"{type(e).__name__}: {e}"
    if hu.shape == original.shape and np.array_equal(hu, original):
        return "original"
    try:
        expected = _as_pydicom_reads_it(path)
    except Exception as e:
        return f"read, though pydicom cannot decode it ({type(e).__name__}: {e})"
    if expected.shape == hu.shape and np.array_equal(expected, hu):
        return "as the file says"
    return "other pixels than the file holds"


@pytest.fixture(scope="module")
def synth_slice(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-synth") / "data"
    synthesize(root, SynthConfig(size=64, patients=1, slices_per_patient=1, seed=1))
    return next(root.rglob("*.dcm"))


@pytest.mark.parametrize("source", ["CT_small.dcm", "synth"])
def test_dicom_reader_on_damaged_files(source, synth_slice, tmp_path):
    path = Path(get_testdata_file(source)) if source != "synth" else synth_slice
    original = read_slice(path).hu
    target = tmp_path / "damaged.dcm"
    outcomes: dict[str, int] = {}
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's and ours about odd values: not the point
        for what, data in mutations(path.read_bytes(), DICOM_CASES, seed=13):
            target.write_bytes(data)
            outcome = _dicom_outcome(target, original)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome not in ("original", "as the file says", "error"):
                failures.append(f"{what}: {outcome}")
    assert not failures, f"{len(failures)} bad case(s) of {DICOM_CASES}: {failures[:10]}"
    assert outcomes.get("error", 0) >= DICOM_CASES // 4  # every truncation at least


# ----------------------------------------------------------------------------- cache


def read_everything(path: Path) -> dict:
    """Every value a cache holds, through the public readers (the loader's raw whole-chunk
    reads included)."""
    out = {}
    with Cache(path) as cache:
        out["attrs"] = cache.attrs
        out["skipped"] = cache.skipped()
        for name in cache.splits:
            split = cache.split(name)
            out[f"{name}/hu"] = split.hu[()]
            out[f"{name}/mask"] = split.mask[()]
            out.update({f"{name}/meta/{k}": v for k, v in split.meta.items()})
            if len(split):
                sample = SampleOptions(sampling="all", shuffle=False, augment=False,
                                       drop_last=False)
                with Loader(cache, name, batch_size=len(split), sample=sample,
                            read=ReadOptions(num_workers=0)) as loader:
                    batch = next(iter(loader.epoch(0)))
                out[f"{name}/loader hu"], out[f"{name}/loader mask"] = batch.hu, batch.mask
    return out


def _differences(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys {sorted(a.keys() ^ b.keys())}"]
    out = []
    for key, x in a.items():
        y = b[key]
        if isinstance(x, np.ndarray):
            same = (x.shape == y.shape and x.dtype == y.dtype
                    and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))
        else:
            same = x == y
        if not same:
            out.append(key)
    return out


def run_cache_cases(source: Path, n: int, seed: int) -> None:
    """The child process: one line per case, flushed before the case runs (so that the
    parent knows which case a crash or a hang was)."""
    original = read_everything(source)
    target = source.with_name("damaged.h5")
    for case, (what, data) in enumerate(mutations(source.read_bytes(), n, seed)):
        target.write_bytes(data)
        print(f"case {case} ({what}):", end=" ", flush=True)
        try:
            differs = _differences(read_everything(target), original)
            outcome = f"other values: {differs}" if differs else "original"
        except CacheError as e:
            outcome = "error" if str(target) in str(e) else f"CacheError not naming it: {e}"
        except Exception as e:  # exactly what must not happen
            outcome = f"{type(e).__name__}: {e}"
        print(" ".join(outcome.split()), flush=True)


def test_cache_reader_on_damaged_files(tmp_path):
    root = tmp_path / "data"
    synthesize(root, SynthConfig(size=32, patients=3, slices_per_patient=4, seed=2))
    cache = tmp_path / "cache.h5"
    preprocess(root, cache, workers=0, progress=False)
    try:
        r = subprocess.run([sys.executable, __file__, str(cache), str(CACHE_CASES), "29"],
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"a case hangs: {out.splitlines()[-1:]}")
    lines = r.stdout.splitlines()
    assert r.returncode == 0, f"crashed (exit {r.returncode}) at {lines[-1:]}: {r.stderr}"
    assert len(lines) == CACHE_CASES, r.stdout[-2000:] + r.stderr
    outcomes = [line.split(": ", 1)[1] for line in lines]
    failures = [line for line, o in zip(lines, outcomes, strict=True)
                if o not in ("original", "error")]
    assert not failures, f"{len(failures)} bad case(s) of {CACHE_CASES}: {failures[:10]}"
    assert outcomes.count("error") >= CACHE_CASES // 2  # nearly every byte is checked


if __name__ == "__main__":
    run_cache_cases(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

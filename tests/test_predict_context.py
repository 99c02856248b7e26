"""`predict` with a model trained on context slices (`--context-slices K`): each slice gets
its K neighbours below and above from its series, as in training, whatever order the files
come in; the same slices evaluated from the cache give the same counts.

On the tiny synthetic set (a 1-epoch run with K = 1): the channels against the files' own z
order, evaluate's counts, a shuffled input order (every output byte the same), a lone slice.
On hand-written series (untrained U-Nets with 1, 3 and 5 channels; each slice's pixels say
which slice it is): interleaved series in one folder, the slice normal's sign, the fallbacks
of the order, series without UIDs, a change of size or spacing, an unreadable slice, slices
read only as their neighbours need them, and K = 0's path as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import tiny_train

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def context_run(tiny_data, tmp_path_factory):
    _, cache = tiny_data
    run = tmp_path_factory.mktemp("ctx") / "run"
    tiny_train(cache, run, epochs=1, context_slices=1, test=False)
    return run


def _captured(monkeypatch):
    """Every batch's hu as `Network.run` passes it on, by slice path."""
    from nodulekit.inference import predict as predict_module

    seen: dict[str, np.ndarray] = {}
    original = predict_module.Network.run

    def run(self, batch):
        for s in batch:
            seen[str(s.item.path)] = (s.hu if s.context is None else s.context).copy()
        return original(self, batch)

    monkeypatch.setattr(predict_module.Network, "run", run)
    return seen


def _by_position(folder):
    """{patient: [(z, path, hu)]} of the DICOMs under folder, sorted by z (read here with
    pydicom alone, not with the code under test)."""
    scans: dict[str, list] = {}
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int16) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        scans.setdefault(ds.PatientID, []).append(
            (float(ds.ImagePositionPatient[2]), str(path), hu.astype(np.int16)))
    return {p: sorted(v) for p, v in scans.items()}


def test_each_slice_gets_its_neighbours_in_z_order(context_run, tiny_data, tmp_path,
                                                   monkeypatch):
    from nodulekit.inference.predict import PredictOptions, predict

    data, _ = tiny_data
    seen = _captured(monkeypatch)
    files = sorted((data / "test" / "images").rglob("*.dcm"))
    reordered = files[::-1]  # the order of the inputs must not matter
    predict(context_run / "checkpoint_best.h5", reordered, tmp_path / "pred",
            PredictOptions(device="cpu", progress=False, truth="none"), report=lambda *_: None)
    checked = 0
    for scan in _by_position(data / "test" / "images").values():
        for i, (_, path, _) in enumerate(scan):
            below, above = scan[max(i - 1, 0)][2], scan[min(i + 1, len(scan) - 1)][2]
            np.testing.assert_array_equal(seen[path], np.stack([below, scan[i][2], above]))
            checked += 1
    assert checked == len(files) > 2


def test_predict_agrees_with_evaluate(context_run, tiny_data, tmp_path):
    """The test split's slices through predict (with truth) and through evaluate (from the
    cache, context from the loader): the same TP/FP/FN per slice."""
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate
    from nodulekit.inference.predict import PredictOptions, predict

    data, cache = tiny_data
    result = predict(context_run / "checkpoint_best.h5", [data / "test"], tmp_path / "pred",
                     PredictOptions(device="cpu", progress=False), report=lambda *_: None)
    evaluate(EvaluateOptions(str(context_run), str(cache), split="test", device="cpu",
                             out=str(tmp_path / "ev"), progress=False), report=lambda *_: None)
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert len(summary["slices"]) == len(result.rows) > 2
    predicted = sorted((int(r["tp"]), int(r["fp"]), int(r["fn"])) for r in result.rows)
    evaluated = sorted((s["tp"], s["fp"], s["fn"]) for s in summary["slices"])
    assert predicted == evaluated
    assert sum(tp + fp for tp, fp, _ in predicted) > 0, "the model marks nothing: no test"


def test_a_lone_slice_repeats_itself_and_says_so(context_run, tiny_data, tmp_path,
                                                 monkeypatch):
    from nodulekit.inference.predict import PredictOptions, predict

    data, _ = tiny_data
    seen = _captured(monkeypatch)
    one = sorted((data / "test" / "images").rglob("*.dcm"))[3]
    said = []
    predict(context_run / "checkpoint_best.h5", [one], tmp_path / "pred",
            PredictOptions(device="cpu", progress=False, truth="none"), report=said.append)
    stack = seen[str(one)]
    assert stack.shape[0] == 3 and (stack == stack[1]).all()
    assert any("no neighbour in their series" in line for line in said)


# --- hand-written series: each slice's pixels say which slice it is --------------------------

SIZE = 16


def _slice_file(path, value, *, shape=(SIZE, SIZE), spacing=(0.7, 0.7), **tags):
    """A CT slice of HU `value` (its first pixel value + 1) at `path`; tags: PatientID,
    StudyInstanceUID, SeriesInstanceUID, ImagePositionPatient, ImageOrientationPatient,
    SliceLocation, InstanceNumber (None: left out)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, generate_uid(), "CT"
    for name, v in tags.items():
        if v is not None:
            setattr(ds, name, [f"{x:g}" for x in v] if isinstance(v, (list, tuple)) else v)
    ds.PixelSpacing = [f"{v:g}" for v in spacing]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    hu = np.full(shape, value, "<i2")
    hu[0, 0] += 1
    ds.PixelData = hu.tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return hu.astype(np.int16)


AXIAL = (1, 0, 0, 0, 1, 0)


def _series(folder, zs, *, names=None, patient="P1", series="1.2.3.4", orientation=AXIAL,
            position=lambda z: (-5.0, -5.0, z), base=0, **tags):
    """Slices at `zs` (in that order) written as folder/<name>.dcm; names default to a
    scrambled order. Returns [(path, hu)] in the order of zs."""
    names = names or [f"s{(7 * i + 3) % 97:02d}" for i in range(len(zs))]
    out = []
    for i, (z, name) in enumerate(zip(zs, names, strict=True)):
        path = folder / f"{name}.dcm"
        kw = dict(PatientID=patient, StudyInstanceUID="1.2.3", SeriesInstanceUID=series,
                  ImagePositionPatient=position(z), ImageOrientationPatient=orientation,
                  InstanceNumber=i + 1)
        kw.update(tags)
        out.append((path, _slice_file(path, base + 10 * i, **kw)))
    return out


def _expected(ordered, k):
    """{path: [2k+1, H, W]}: each slice of an ordered series with its k neighbours, the edge
    slice repeated at both ends."""
    n = len(ordered)
    return {str(p): np.stack([ordered[min(max(i + d, 0), n - 1)][1] for d in range(-k, k + 1)])
            for i, (p, _) in enumerate(ordered)}


@pytest.fixture(scope="module")
def context_model(tmp_path_factory):
    """{k: checkpoint}: tiny untrained U-Nets with 2k+1 input channels (k = 0, 1, 2)."""
    from nodulekit.engine import get_backend
    from nodulekit.nn import UNet
    from nodulekit.training.checkpoint import Checkpoint, layout_list, save_checkpoint

    be = get_backend("cpu")
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for k in (0, 1, 2):
        model = UNet(be, depth=2, width=4, in_channels=2 * k + 1, seed=3)
        paths[k] = folder / f"k{k}.h5"
        save_checkpoint(paths[k], Checkpoint(
            params=be.to_host(model.params), layout=layout_list(model.layout),
            config={"depth": 2, "width": 4, "seed": 3, "in_channels": 2 * k + 1,
                    "context_slices": k}))
    return paths


def _predict(ckpt, inputs, out, said=None, **options):
    from nodulekit.inference.predict import PredictOptions, predict

    opts = dict(device="cpu", progress=False, truth="none")
    opts.update(options)
    return predict(ckpt, inputs, out, PredictOptions(**opts),
                   report=(said.append if said is not None else lambda *_: None))


@pytest.mark.parametrize("k", [1, 2])
def test_two_interleaved_series_in_shuffled_files(context_model, tmp_path, monkeypatch, k):
    """Two series of one patient in one folder, their files named in no order and given in a
    random order: each slice's channels are its own series' neighbours by z."""
    seen = _captured(monkeypatch)
    zs_a = [-30.0, -27.5, -25.0, -22.5, -20.0, -17.5]
    zs_b = [12.0, 4.0, 8.0, 0.0]  # written out of order
    a = _series(tmp_path / "in", zs_a[::-1], series="1.2.3.4")  # files in descending z
    b = _series(tmp_path / "in", zs_b, series="1.2.3.5", base=1000,
                names=["b3", "b1", "b2", "b0"])
    files = [p for p, _ in a + b]
    np.random.default_rng(0).shuffle(files)
    result = _predict(context_model[k], files, tmp_path / "pred")
    assert result.written == 10 and not result.failed
    expected = _expected(a[::-1], k) | _expected([b[i] for i in (3, 1, 2, 0)], k)
    assert seen.keys() == expected.keys()
    for path, stack in expected.items():
        np.testing.assert_array_equal(seen[path], stack, err_msg=path)
    # predictions.csv in the input order
    assert [r["input"] for r in result.rows] == [str(p) for p in files]


def test_the_input_order_does_not_change_any_output(context_run, tiny_data, tmp_path):
    """The test split given sorted, and shuffled: every file written is the same, byte for
    byte, and predictions.csv has the same rows."""
    import csv

    data, _ = tiny_data
    files = sorted((data / "test" / "images").rglob("*.dcm"))
    shuffled = list(files)
    np.random.default_rng(1).shuffle(shuffled)
    assert shuffled != files
    outs = []
    for n, given in enumerate((files, shuffled)):
        outs.append(tmp_path / f"pred{n}")
        _predict(context_run / "checkpoint_best.h5", given, outs[-1], probabilities=True,
                 truth="auto", batch_size=3 + n)
    pngs = [sorted(p.relative_to(o) for p in o.rglob("*.png")) for o in outs]
    assert pngs[0] == pngs[1] and len(pngs[0]) == 3 * len(files)
    for rel in pngs[0]:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    rows = []
    for o in outs:
        with open(o / "predictions.csv", newline="") as f:
            rows.append(sorted(map(tuple, map(dict.items, csv.DictReader(f)))))
    assert rows[0] == rows[1]


def test_orientation_decides_the_order(context_model, tmp_path, monkeypatch):
    """The order is along the slice normal, signed so that z ascends: an axial series whose
    rows run right to left (normal -z) is still ordered by z ascending; a sagittal one (z the
    same in every slice) by x."""
    from nodulekit.inference.inputs import plan_series, read_header, series_order

    seen = _captured(monkeypatch)
    flipped = _series(tmp_path / "in" / "flip", [3.0, 1.0, 2.0, 0.0], series="9.1",
                      orientation=(-1, 0, 0, 0, 1, 0))
    sagittal = _series(tmp_path / "in" / "sag", [5.0, -5.0, 0.0], series="9.2", base=500,
                       orientation=(0, 1, 0, 0, 0, -1), position=lambda x: (x, -8.0, 40.0))
    headers = [read_header(p) for p, _ in flipped]
    assert series_order(headers)[1] == "position"
    _predict(context_model[1], [tmp_path / "in"], tmp_path / "pred")
    want = _expected([flipped[i] for i in (3, 1, 2, 0)], 1) | \
        _expected([sagittal[i] for i in (1, 2, 0)], 1)
    for path, stack in want.items():
        np.testing.assert_array_equal(seen[path], stack, err_msg=path)
    from nodulekit.inference.inputs import find_inputs
    items = find_inputs([tmp_path / "in" / "sag"], "none")
    plan = plan_series(items, [read_header(i.path) for i in items])
    assert len(plan.series) == 1 and not plan.notes


def test_fallbacks_of_the_order(tmp_path):
    """Without ImageOrientationPatient: z; without ImagePositionPatient: SliceLocation, then
    InstanceNumber; without any (or with ties): the input order; each said in a note."""
    from nodulekit.inference.inputs import find_inputs, plan_series, read_header

    def plan(folder):
        items = find_inputs([folder], "none")
        p = plan_series(items, [read_header(i.path) for i in items])
        return [[items[i].path.stem for i in s] for s in p.series], p.notes

    def write(folder, **per_slice):
        """Slices a, b, c of one series with these tags, one value per slice."""
        for i, name in enumerate("abc"):
            _slice_file(tmp_path / folder / f"{name}.dcm", i, PatientID="P1",
                        StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4",
                        **{tag: values[i] for tag, values in per_slice.items()})

    z = [(0, 0, 2.0), (0, 0, 0.0), (0, 0, 1.0)]
    write("z", ImagePositionPatient=z, InstanceNumber=(1, 2, 3))
    order, notes = plan(tmp_path / "z")
    assert order == [["b", "c", "a"]] and "the z of ImagePositionPatient" in notes[0]
    write("loc", SliceLocation=(9.0, 7.0, 8.0), InstanceNumber=(1, 2, 3))
    order, notes = plan(tmp_path / "loc")
    assert order == [["b", "c", "a"]] and "SliceLocation" in notes[0]
    write("inst", InstanceNumber=(3, 1, 2))
    order, notes = plan(tmp_path / "inst")
    assert order == [["b", "c", "a"]] and "InstanceNumber" in notes[0]
    write("tie", ImagePositionPatient=[(0, 0, 5.0)] * 3, InstanceNumber=(2, 2, 1))
    order, notes = plan(tmp_path / "tie")
    assert order == [["a", "b", "c"]] and "the input order" in notes[0]
    write("full", ImagePositionPatient=z, ImageOrientationPatient=[AXIAL] * 3)
    assert plan(tmp_path / "full") == ([["b", "c", "a"]], [])


def test_slices_without_series_uid_are_one_series_per_folder(context_model, tmp_path,
                                                             monkeypatch):
    seen = _captured(monkeypatch)
    one = _series(tmp_path / "x" / "one", [0.0, 1.0, 2.0], SeriesInstanceUID=None,
                  StudyInstanceUID=None, PatientID=None)
    two = _series(tmp_path / "x" / "two", [0.5, 1.5], SeriesInstanceUID=None,
                  StudyInstanceUID=None, PatientID=None, base=300)
    said = []
    _predict(context_model[1], [tmp_path / "x"], tmp_path / "pred", said)
    for path, stack in (_expected(one, 1) | _expected(two, 1)).items():
        np.testing.assert_array_equal(seen[path], stack, err_msg=path)
    assert sum("no SeriesInstanceUID" in line for line in said) == 1


def test_a_change_of_size_or_spacing_splits_a_series(context_model, tmp_path, monkeypatch):
    """Slices 0-2 at 16 x 16, 3-4 at 20 x 20, 5-6 at another spacing: neighbours only from
    a slice's own part, its edge slice repeated at the change; said once."""
    seen = _captured(monkeypatch)
    zs = [float(z) for z in range(7)]
    parts = [(0, 3, (SIZE, SIZE), (0.7, 0.7)), (3, 5, (20, 20), (0.7, 0.7)),
             (5, 7, (20, 20), (0.9, 0.9))]
    written = []
    for lo, hi, shape, spacing in parts:
        written.append([(p, hu) for p, hu in _series(
            tmp_path / "in", zs[lo:hi], names=[f"f{i}" for i in range(lo, hi)],
            base=10 * lo, shape=shape, spacing=spacing,
            InstanceNumber=None)])
    said = []
    result = _predict(context_model[1], [tmp_path / "in"], tmp_path / "pred", said)
    assert result.written == 7
    for part in written:
        for path, stack in _expected(part, 1).items():
            np.testing.assert_array_equal(seen[path], stack, err_msg=path)
    assert sum("change slice size or pixel spacing" in line for line in said) == 1


def test_an_unreadable_slice_is_skipped_and_its_neighbours_close_up(context_model, tmp_path,
                                                                    monkeypatch):
    seen = _captured(monkeypatch)
    written = _series(tmp_path / "in", [0.0, 1.0, 2.0, 3.0], names=["a", "b", "c", "d"])
    data = written[1][0].read_bytes()
    written[1][0].write_bytes(data[:len(data) - 100])  # truncated pixels
    said = []
    result = _predict(context_model[1], [tmp_path / "in"], tmp_path / "pred", said)
    assert [p for p, _ in result.failed] == [str(written[1][0])] and result.written == 3
    for path, stack in _expected([written[i] for i in (0, 2, 3)], 1).items():
        np.testing.assert_array_equal(seen[path], stack, err_msg=path)


def test_slices_are_read_as_their_neighbours_need_them(context_model, tmp_path, monkeypatch):
    """A series of 12 slices, batches of 2: when a batch runs, only the slices up to its last
    one's upper neighbours have been read, not the whole series."""
    from nodulekit.data import dicom
    from nodulekit.inference import predict as predict_module

    _series(tmp_path / "in", [float(z) for z in range(12)])
    read, at_batch = [], []
    original_read, original_run = dicom.read_slice, predict_module.Network.run

    def read_slice(path, **kw):
        read.append(path)
        return original_read(path, **kw)

    def run(self, batch):
        at_batch.append(len(read))
        return original_run(self, batch)

    monkeypatch.setattr(dicom, "read_slice", read_slice)
    monkeypatch.setattr(predict_module.Network, "run", run)
    _predict(context_model[2], [tmp_path / "in"], tmp_path / "pred", batch_size=2)
    assert at_batch == [4, 6, 8, 10, 12, 12]  # slices 0-1 need up to 3; 2-3 up to 5; ...


def test_k0_reads_no_headers_and_takes_the_input_order(context_model, tmp_path, monkeypatch):
    """A one-channel model: the path it always took (no series, no context, the input
    order); its outputs were checked byte for byte against the code before context slices
    (the tiny set's test split, K = 0 and K = 1)."""
    from nodulekit.inference import inputs as inputs_module

    seen = _captured(monkeypatch)

    def refuse(path):
        raise AssertionError("K = 0 reads no headers")

    monkeypatch.setattr(inputs_module, "read_header", refuse)
    written = _series(tmp_path / "in", [2.0, 0.0, 1.0])
    files = [p for p, _ in written]
    order = []
    monkeypatch.setattr("nodulekit.inference.predict.write_slice",
                        _recording(order))
    result = _predict(context_model[0], files, tmp_path / "pred")
    assert order == [str(p) for p in files] and result.written == 3
    for path, hu in written:
        np.testing.assert_array_equal(seen[str(path)], hu)  # [H, W]: no context


def _recording(order):
    from nodulekit.inference.writers import write_slice

    def record(out, p, probabilities):
        order.append(str(p.item.path))
        return write_slice(out, p, probabilities)
    return record

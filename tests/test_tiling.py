"""Whole-slice inference at any size (nodulekit.inference.tiling): padding with air, and
tiles that give the untiled logits."""

from __future__ import annotations

import numpy as np
import pytest

from nodulekit.engine import get_backend
from nodulekit.inference import tiling
from nodulekit.nn import UNet

WINDOW = (-500.0, 1600.0)


@pytest.fixture(scope="module")
def be():
    return get_backend("cpu")


def _hu(rng, n, h, w):
    """Chest-like HU: lung (-850), soft tissue (40) blobs, a few bright spots."""
    hu = np.full((n, h, w), -850, np.int16)
    hu += rng.integers(-60, 60, (n, h, w)).astype(np.int16)
    for j in range(n):
        r, c = rng.integers(0, h), rng.integers(0, w)
        yy, xx = np.ogrid[:h, :w]
        hu[j][(yy - r) ** 2 + (xx - c) ** 2 < (min(h, w) // 5) ** 2] = 40
    return hu


def _model(be, depth, norm="none", seed=3):
    model = UNet(be, depth=depth, width=4, seed=seed, norm=norm)
    if norm == "batch":  # running statistics that are not the identity
        rng = np.random.default_rng(seed)
        for name, view in model.b.items():
            view[...] = (rng.uniform(0.5, 2.0, view.shape) if name.endswith("var")
                         else rng.normal(0, 0.3, view.shape))
    return model


def test_halo_follows_the_network():
    # 3 * 2**(D+1) - 4 from the convolutions, plus the poolings' rounding up
    assert [tiling.halo(d) for d in (1, 2, 3, 4, 5)] == [8, 22, 46, 94, 190]
    assert [tiling.tile_halo(d) for d in (1, 2, 3, 4)] == [8, 24, 48, 96]
    for d in range(1, 7):
        assert tiling.halo(d) >= 3 * 2 ** (d + 1) - 4 and tiling.tile_halo(d) % 2**d == 0


@pytest.mark.parametrize("depth,norm", [(2, "none"), (3, "none"), (2, "batch")])
def test_tiled_equals_untiled_on_an_odd_slice(be, rng, depth, norm):
    """An odd-sized slice (not a multiple of 2**depth): padded with air, run whole and in
    tiles; the logits agree to float rounding and the masks are identical."""
    model = _model(be, depth, norm)
    hu = _hu(rng, 2, 75, 61)
    mask = (rng.random(hu.shape) < 0.05).astype(np.uint8)
    whole, target, image = tiling.run_hu(model, hu, mask, WINDOW, tile="off")
    assert whole.shape == (2, 75, 61, 1) and image.shape == (2, 75, 61, 1)
    np.testing.assert_array_equal(target[..., 0], mask)  # cropped back to the slice's pixels
    assert 0.05 < float((whole > 0).mean()) < 0.95  # a mask with both classes to compare
    f = 2**depth
    for tile in (f, 2 * f, 24):  # the last: 24 rounded up to a multiple of 2**depth
        tiled, _, _ = tiling.run_hu(model, hu, mask, WINDOW, tile=tile)
        assert tiled.shape == whole.shape
        assert np.abs(tiled - whole).max() < 1e-4, tile
        np.testing.assert_array_equal(tiled > 0, whole > 0)


def test_a_smaller_overlap_would_differ(be, rng):
    """The halo is what it takes: one pooling step less and the tiles' logits change."""
    depth = 3
    model = _model(be, depth)
    image = be.asarray(rng.random((1, 8 * 9, 8 * 7, 1), dtype=np.float32))
    whole = model.forward(image, keep_for_backward=False)
    pad = tiling.tile_halo(depth)
    exact = tiling.forward_tiled(model, image, 16, pad)
    short = tiling.forward_tiled(model, image, 16, pad - 2**depth)
    assert np.abs(exact - whole).max() < 1e-4
    assert np.abs(short - whole).max() > 1e-3


def test_padding_is_air_and_centred():
    hu = np.full((1, 5, 6), 100, np.int16)
    mask = np.ones((1, 5, 6), np.uint8)
    big, big_mask, box = tiling.pad_to_multiple(hu, mask, 4)
    assert big.shape == (1, 8, 8) and box == (1, 1, 5, 6)
    assert (big[0, 1:6, 1:7] == 100).all() and (big == tiling.AIR_HU).sum() == 64 - 30
    assert big_mask.sum() == 30 and big_mask[0, 1:6, 1:7].all()
    same = tiling.pad_to_multiple(big, big_mask, 4)
    assert same[0] is big and same[2] == (0, 0, 8, 8)
    # context slices as channels [N, C, H, W]: the last two axes padded
    ctx, _, _ = tiling.pad_to_multiple(np.zeros((2, 3, 5, 6), np.int16), mask.repeat(2, 0), 4)
    assert ctx.shape == (2, 3, 8, 8) and ctx[0, 2, 0, 0] == tiling.AIR_HU


def test_plan_follows_the_memory_budget(be, rng):
    model = _model(be, 2)
    per_pixel = tiling.bytes_per_pixel(model)
    # the estimate is what `nodulekit inspect` counts for the batch
    from nodulekit.nn.summary import totals, unet_layers

    layers = unet_layers(2, 4, size=(64, 48), batch=3)
    assert per_pixel * 3 * 64 * 48 == pytest.approx(totals(layers)["activation_bytes"])
    shape = (3, 64, 48)
    one = 64 * 48 * per_pixel
    assert tiling.plan(model, shape, budget=int(4 * one)).slices_per_pass == 3
    fewer = tiling.plan(model, shape, budget=int(1.5 * one))
    assert (fewer.slices_per_pass, fewer.tile) == (1, None)
    tiled = tiling.plan(model, shape, budget=int(0.5 * one))
    assert tiled.tile is not None and tiled.tile % 4 == 0
    assert (tiled.tile + 2 * tiled.halo) ** 2 * per_pixel <= 0.5 * one or tiled.tile == 4
    assert tiling.plan(model, shape, tile="off", budget=1).tile is None
    assert tiling.plan(model, shape, tile=10).tile == 12
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth"):
        tiling.plan(model, (1, 30, 32))
    # every plan gives the same logits
    image = be.asarray(rng.random((3, 64, 48, 1), dtype=np.float32))
    whole = model.forward(image, keep_for_backward=False)
    for budget in (int(1.5 * one), int(0.5 * one), 1):
        out = tiling.forward(model, image, tiling.plan(model, image.shape, budget=budget))
        assert np.abs(out - whole).max() < 1e-4, budget


def test_memory_budget_from_the_environment(be, monkeypatch):
    monkeypatch.setenv(tiling.MEMORY_ENV, "64")
    assert tiling.default_budget(be) == 64 << 20
    monkeypatch.setenv(tiling.MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="MiB"):
        tiling.default_budget(be)
    monkeypatch.delenv(tiling.MEMORY_ENV)
    assert tiling.default_budget(be) >= 256 << 20


def test_instance_norm_is_never_tiled(be):
    model = _model(be, 2, "instance")
    with pytest.raises(ValueError, match="instance norm"):
        tiling.plan(model, (1, 64, 64), tile=16)
    how = tiling.plan(model, (2, 64, 64), budget=1)  # over any budget: whole slices
    assert how.tile is None and how.slices_per_pass == 1


def test_tile_option_values():
    assert tiling.parse_tile(None) == "auto" and tiling.parse_tile("OFF") == "off"
    assert tiling.parse_tile("96") == 96 and tiling.parse_tile(64) == 64
    for bad in ("big", "0", -3):
        with pytest.raises(ValueError, match="--tile"):
            tiling.parse_tile(bad)


def test_predict_on_an_odd_sized_dicom(be, tmp_path):
    """A real CT slice cropped to 127 x 125 (no multiple of 4): predict pads it, runs it
    (tiled and not), and writes a mask of the slice's own size; both agree."""
    pydicom = pytest.importorskip("pydicom")
    from PIL import Image
    from pydicom.data import get_testdata_file

    from nodulekit.inference.predict import PredictOptions, predict
    from nodulekit.training.checkpoint import Checkpoint, layout_list, save_checkpoint

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = ds.pixel_array[:127, :125].copy()
    ds.PixelData, ds.Rows, ds.Columns = pixels.tobytes(), 127, 125
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "odd.dcm", enforce_file_format=True)
    model = _model(be, 2)
    ckpt = tmp_path / "model.h5"
    save_checkpoint(ckpt, Checkpoint(params=be.to_host(model.params),
                                     layout=layout_list(model.layout),
                                     config={"depth": 2, "width": 4, "seed": 3}))
    masks = {}
    for tile in ("off", "16"):
        out = tmp_path / f"out-{tile}"
        result = predict(ckpt, [tmp_path / "in"], out,
                         PredictOptions(device="cpu", progress=False, truth="none", tile=tile),
                         report=lambda *_: None)
        assert result.written == 1 and not result.failed
        masks[tile] = np.asarray(Image.open(out / "masks" / "odd.png"))
        assert masks[tile].shape == (127, 125)
    np.testing.assert_array_equal(masks["off"], masks["16"])
    assert 0 < int((masks["off"] > 0).sum()) < 127 * 125


def test_evaluate_pads_and_tiles_a_split(be, tiny_data, tmp_path):
    """`evaluate` on slices cropped to 30 x 29 (not a multiple of 2**depth = 4): padded with
    air, run whole and in 8 x 8 tiles, the same counts slice by slice."""
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate
    from nodulekit.training.checkpoint import Checkpoint, layout_list, save_checkpoint

    _, cache = tiny_data
    model = _model(be, 2)
    ckpt = tmp_path / "model.h5"
    save_checkpoint(ckpt, Checkpoint(params=be.to_host(model.params),
                                     layout=layout_list(model.layout),
                                     config={"depth": 2, "width": 4, "seed": 3,
                                             "batch_size": 4}))
    said, summaries = [], {}
    for tile in ("off", "8"):
        summaries[tile], _ = evaluate(EvaluateOptions(ckpt, cache, split="val", size=29,
                                                      tile=tile, out=tmp_path / tile,
                                                      device="cpu", workers=0,
                                                      progress=False), report=said.append)
    off, tiled = summaries["off"], summaries["8"]
    assert off["image_shape"] == [29, 29] and "padded with air to 32x32" in off["inference"]
    assert "8x8 tiles" in tiled["inference"] and "8x8 tiles" in said[-1]
    assert [(s["tp"], s["fp"], s["fn"]) for s in off["slices"]] == \
        [(s["tp"], s["fp"], s["fn"]) for s in tiled["slices"]]
    # the counts cover the slice's own pixels only, none of the padding
    predicted = sum(s["tp"] + s["fp"] for s in off["slices"])
    assert 0 < predicted and all(s["tp"] + s["fp"] <= 29 * 29 for s in off["slices"])
    assert (tmp_path / "off" / "table.csv").is_file()

"""PNG masks, connected components, nodule diameters and the paper's bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from nodulekit.data.masks import MaskError, read_mask, write_mask
from nodulekit.data.nodules import (
    BIN_LABELS,
    NoduleLinker,
    components,
    diameter_bin,
    section_diameter_mm,
)


def _png(path, array):
    Image.fromarray(array).save(path)
    return path


def test_mask_0_255_and_0_1_read_as_0_1(tmp_path):
    a = np.zeros((8, 10), dtype=np.uint8)
    a[2:4, 3:6] = 1
    for name, pixels in (("m255.png", a * 255), ("m01.png", a)):
        m = read_mask(_png(tmp_path / name, pixels), shape=(8, 10))
        assert m.dtype == np.uint8 and m.flags.c_contiguous
        np.testing.assert_array_equal(m, a)


def test_mask_one_bit_and_grey_rgb_are_accepted(tmp_path):
    a = np.zeros((6, 6), dtype=np.uint8)
    a[1:3, 1:3] = 1
    Image.fromarray(a.astype(bool)).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "bits.png"), a)
    rgb = np.repeat((a * 255)[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_mask(_png(tmp_path / "rgb.png", rgb)), a)


def test_write_mask_round_trip(tmp_path):
    a = (np.random.default_rng(0).random((16, 16)) > 0.7).astype(np.uint8)
    write_mask(tmp_path / "w.png", a)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "w.png"))).tolist()) <= {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "w.png"), a)


def test_non_binary_mask_is_reported_not_thresholded(tmp_path):
    a = np.zeros((8, 8), dtype=np.uint8)
    a[2, 2], a[3, 3] = 255, 128  # a resampled edge
    with pytest.raises(MaskError, match=r"not a binary mask: values \{0, 128, 255\}") as e:
        read_mask(_png(tmp_path / "soft.png", a))
    assert "soft.png" in str(e.value)


def test_mask_size_mismatch_is_reported(tmp_path):
    path = _png(tmp_path / "small.png", np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(MaskError, match="size 4x5 differs from its slice's 8x8"):
        read_mask(path, shape=(8, 8))


def test_colour_mask_is_reported(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[1, 1] = (255, 0, 0)
    with pytest.raises(MaskError, match="colour mask"):
        read_mask(_png(tmp_path / "red.png", rgb))


def test_unreadable_mask(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match="not a readable image"):
        read_mask(tmp_path / "junk.png")
    with pytest.raises(MaskError, match="no such file"):
        read_mask(tmp_path / "missing.png")


def _flood_fill_labels(mask: np.ndarray) -> set[frozenset[int]]:
    """Slow, obvious 8-connected labelling: the reference for `components`."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = set()
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        stack, comp = [(r0, c0)], set()
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            comp.add(int(r * w + c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        out.add(frozenset(comp))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_components_match_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(5, 40, size=2))
    mask = (rng.random(shape) < rng.uniform(0.05, 0.6)).astype(np.uint8)
    parts = components(mask)
    assert {frozenset(p.tolist()) for p in parts} == _flood_fill_labels(mask)
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates


def test_components_diagonal_touch_is_one_nodule():
    m = np.zeros((5, 5), dtype=np.uint8)
    m[1, 1] = m[2, 2] = 1
    m[4, 0] = 1
    assert sorted(len(p) for p in components(m)) == [1, 2]
    assert components(np.zeros((3, 3), dtype=np.uint8)) == []


def test_section_diameter_of_a_disc():
    r_px, spacing = 20, (0.7, 0.7)
    yy, xx = np.mgrid[-30:31, -30:31]
    disc = (yy**2 + xx**2 <= r_px**2).astype(np.uint8)
    (part,) = components(disc)
    d = section_diameter_mm(len(part), spacing)
    assert d == pytest.approx(2 * r_px * 0.7, rel=0.02)


def test_linker_gives_each_section_the_sphere_diameter():
    """A ball of radius 10 px cut into slices 4 px apart: every section belongs to one
    nodule whose diameter is the largest section's."""
    size, radius, step = 41, 10.0, 4
    yy, xx = np.mgrid[:size, :size] - size // 2
    linker = NoduleLinker()
    sections = {}
    for row, z in enumerate(range(-8, 9, step)):
        r2 = radius**2 - z**2
        disc = (yy**2 + xx**2 <= r2).astype(np.uint8)
        (part,) = components(disc)
        sections[row] = section_diameter_mm(len(part), (1.0, 1.0))
        linker.add(row, slice_key=row, parts=[part], section_mm=[sections[row]])
    result = linker.finish()
    biggest = max(sections.values())
    assert biggest == pytest.approx(20.0, rel=0.05)
    assert all(v == [pytest.approx(biggest)] for v in result.values())


def test_linker_keeps_separate_nodules_and_gaps_apart():
    a = np.zeros((10, 10), dtype=np.uint8)
    a[1:3, 1:3] = 1
    b = np.zeros((10, 10), dtype=np.uint8)
    b[1:3, 1:3] = 1
    b[6:9, 6:9] = 1
    linker = NoduleLinker()
    linker.add(0, 1, components(a), [1.0])
    pb = components(b)
    linker.add(1, 2, pb, [2.0, 3.0])
    linker.add(2, 4, components(a), [5.0])  # slice 3 missing: not adjacent
    result = linker.finish()
    assert result[0] == [2.0]  # linked to the small one of slice 2 only
    assert result[1] == [2.0, 3.0]
    assert result[2] == [5.0]


@pytest.mark.parametrize("d,label", [(0.5, "<3mm"), (2.999, "<3mm"), (3.0, "3-10mm"),
                                     (9.99, "3-10mm"), (10.0, "10-30mm"), (29.9, "10-30mm"),
                                     (30.0, ">30mm"), (136.0, ">30mm")])
def test_diameter_bins_follow_table_3(d, label):
    assert diameter_bin(d) == label


def test_diameter_bin_edge_cases():
    assert BIN_LABELS == ("<3mm", "3-10mm", "10-30mm", ">30mm")
    assert diameter_bin(math.nan) is None
    with pytest.raises(ValueError, match="negative"):
        diameter_bin(-1.0)


# ----------------------------------------------------------------------------- mask boxes


def _mask_cases(tmp_path):
    a = np.zeros((20, 24), dtype=np.uint8)
    a[3:6, 4:9] = 1
    a[6, 9] = 1  # touches diagonally
    a[12:15, 15:22] = 1
    full = np.ones((5, 6), dtype=np.uint8)
    rgb = np.repeat((a * 255)[..., None], 3, axis=2)
    Image.fromarray(a.astype(bool)).save(tmp_path / "bits.png")
    Image.fromarray(a * 255).convert("P").save(tmp_path / "palette.png")
    return {
        "grey255": (_png(tmp_path / "g.png", a * 255), a),
        "grey01": (_png(tmp_path / "g01.png", a), a),
        "bits": (tmp_path / "bits.png", a),
        "palette": (tmp_path / "palette.png", a),
        "rgb": (_png(tmp_path / "rgb.png", rgb), a),
        "full": (_png(tmp_path / "full.png", full * 255), full),
        "empty": (_png(tmp_path / "empty.png", np.zeros((7, 7), dtype=np.uint8)),
                  np.zeros((7, 7), dtype=np.uint8)),
    }


def test_mask_box_is_the_mask_and_its_components(tmp_path):
    from nodulekit.data.masks import read_mask_box
    from nodulekit.data.nodules import box_components

    for name, (path, truth) in _mask_cases(tmp_path).items():
        box = read_mask_box(path, shape=truth.shape)
        np.testing.assert_array_equal(box.full(), truth, err_msg=name)
        out = np.full(truth.shape, 7, dtype=np.uint8)
        assert box.full(out=out) is out
        np.testing.assert_array_equal(out, truth, err_msg=name)
        np.testing.assert_array_equal(read_mask(path), truth, err_msg=name)
        assert box.empty == (not truth.any())
        if not box.empty:
            assert box.pixels.shape == tuple(np.ptp(np.nonzero(truth), axis=1) + 1)
        ours = box_components(box.pixels, box.top, box.left, truth.shape[1])
        assert [p.tolist() for p in ours] == [p.tolist() for p in components(truth)], name


def test_mask_box_reports_non_binary_values_like_the_whole_image(tmp_path):
    a = np.full((6, 6), 128, dtype=np.uint8)  # no zero anywhere
    with pytest.raises(MaskError, match=r"values \{128\} \(1 distinct\)"):
        read_mask(_png(tmp_path / "grey.png", a))
    a[0, 0] = 0  # a zero outside the bounding box of the rest
    a[:, 1:] = 0
    a[1:, 0] = 128
    with pytest.raises(MaskError, match=r"values \{0, 128\} \(2 distinct\)"):
        read_mask(_png(tmp_path / "grey0.png", a))

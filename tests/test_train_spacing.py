"""`train DATA --spacing MM` on a data-set folder: the run's cache resampled as `preprocess
--spacing` does, the pixel size recorded in the run's configuration, and `evaluate` on a
folder preprocessing it at that pixel size too (else a model would be scored off its scale).
"""

from __future__ import annotations

import json

import pytest
from tiny import tiny_train

SPACING = 12.0  # mm: the tiny set's 32-pixel slices have 9.6-13.6 mm pixels


def test_train_on_a_folder_at_a_pixel_size_and_evaluate_at_it(tiny_data, tmp_path):
    from nodulekit.data.cache import open_cache
    from nodulekit.evaluation.evaluate import EvaluateOptions, evaluate

    data, _ = tiny_data
    result = tiny_train(data, tmp_path / "run", epochs=1, spacing=SPACING, size=32,
                        test=False)  # 35 x 35 slices at 12 mm: cropped to a multiple of 4
    config = json.loads((result.out / "config.json").read_text())["config"]
    assert config["spacing_mm"] == SPACING
    with open_cache(config["cache"]) as c:
        assert float(c.attrs["spacing_mm"]) == SPACING
        assert (c.split("train").meta["pixel_spacing"] == SPACING).all()
    said = []
    evaluate(EvaluateOptions(result.out, data, out=tmp_path / "eval", device="cpu",
                             workers=0, progress=False), report=said.append)
    with open_cache(tmp_path / "eval" / "cache.h5") as c:
        assert float(c.attrs["spacing_mm"]) == SPACING
    assert not any(line.startswith("warning: the model trained at") for line in said)


def test_spacing_is_for_a_folder_and_fixed_on_resume(tiny_data, tmp_path):
    _, cache = tiny_data
    with pytest.raises(ValueError, match=r"--spacing resamples a data-set folder .* the cache"):
        tiny_train(cache, tmp_path / "run", epochs=1, spacing=SPACING)
    tiny_train(cache, tmp_path / "native", epochs=1, test=False)
    from nodulekit.training.loop import train

    with pytest.raises(ValueError, match="spacing is None, cannot change it to 12.0"):
        train(resume=str(tmp_path / "native"), epochs=2, spacing=SPACING, device="cpu",
              workers=0, progress=False, echo=lambda *_: None)


def test_preprocess_says_when_pixel_sizes_differ(tiny_data, tmp_path):
    """Slices kept at pixel sizes more than 10% apart: the report gives their range and
    median and the --spacing that resamples them to it (nnU-Net's default); resampled, no
    such line."""
    import numpy as np

    from nodulekit.data.cache import open_cache
    from nodulekit.data.preprocess import preprocess

    data, _ = tiny_data
    native = preprocess(data, tmp_path / "native.h5", workers=0, progress=False)
    with open_cache(tmp_path / "native.h5") as c:
        mm = np.concatenate([c.split(s).meta["pixel_spacing"].mean(axis=1)
                             for s in ("train", "val", "test")])
    low, median, high = native.pixel_spacing_mm
    assert (low, median, high) == pytest.approx((mm.min(), np.median(mm), mm.max()))
    assert high > 1.1 * low
    assert f"(median {median:.2f}): each keeps its own; --spacing median resamples" \
        in native.format()
    assert native.to_dict()["pixel_spacing_mm"]["median"] == pytest.approx(median)
    resampled = preprocess(data, tmp_path / "at12.h5", workers=0, progress=False,
                           spacing=SPACING)
    assert resampled.pixel_spacing_mm == pytest.approx((SPACING,) * 3)
    assert resampled.spacing_hint() == "" and "--spacing" not in resampled.format()


def test_spacing_median_resamples_to_the_scans_median(tiny_data, tmp_path):
    """`--spacing median`: the median of the scans' pixel spacings (one vote a scan, from
    the headers), as nnU-Net resamples by default; `train DIR --spacing median` records the
    number it became; a bad value is a clear usage error."""
    import numpy as np
    from click.testing import CliRunner

    from nodulekit.cli import main
    from nodulekit.data.cache import open_cache
    from nodulekit.data.layout import read_layout
    from nodulekit.data.preprocess import _scan_geometry, median_spacing

    data, _ = tiny_data
    index = read_layout(data, "auto")
    per_scan = [float(np.mean(s)) for _, s in _scan_geometry(index)]
    assert len(per_scan) > 2 and max(per_scan) > 1.1 * min(per_scan)
    median = median_spacing(_scan_geometry(index), index.root)
    assert median == pytest.approx(np.median(per_scan), abs=1e-4)
    result = CliRunner().invoke(main, ["preprocess", str(data), str(tmp_path / "m.h5"),
                                       "--spacing", "median", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"at {median:g} mm" in result.output and "resamples them all" not in result.output
    with open_cache(tmp_path / "m.h5") as c:
        assert float(c.attrs["spacing_mm"]) == pytest.approx(median)
    run = tiny_train(data, tmp_path / "run", epochs=1, spacing="median", size=32, test=False)
    assert json.loads((run.out / "config.json").read_text())["config"]["spacing_mm"] \
        == pytest.approx(median)
    bad = CliRunner().invoke(main, ["preprocess", str(data), str(tmp_path / "x.h5"),
                                    "--spacing", "mean"])
    assert bad.exit_code == 2 and "neither a pixel size in mm above 0 nor 'median'" \
        in bad.output

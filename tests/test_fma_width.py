"""fma_width: whether 16-lane FMAs run at full width, measured once and cached, and what
it changes in the CPU's choice of convolution kernels (engine/cpu.py)."""

import json

import pytest

from nodulekit.engine import cpu, cpu_conv_packed, fma_width


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NODULEKIT_CACHE", str(tmp_path))
    monkeypatch.delenv(fma_width.ENV, raising=False)
    fma_width.forget()
    yield tmp_path
    fma_width.forget()


def test_the_environment_decides_without_measuring(fresh, monkeypatch):
    monkeypatch.setattr(fma_width, "measure", lambda: pytest.fail("measured"))
    monkeypatch.setenv(fma_width.ENV, "512")
    assert fma_width.full_width()
    fma_width.forget()
    monkeypatch.setenv(fma_width.ENV, "256")
    assert not fma_width.full_width()
    fma_width.forget()
    monkeypatch.setenv(fma_width.ENV, "384")
    with pytest.raises(ValueError, match="NODULEKIT_FMA_WIDTH='384'"):
        fma_width.decide()


def test_a_measurement_is_cached_and_reused(fresh, monkeypatch):
    calls = []

    def fake_measure():
        calls.append(1)
        return {"gflops_8_lanes": 100.0, "gflops_16_lanes": 190.0, "ratio": 1.9,
                "full_width": True}

    monkeypatch.setattr(fma_width, "measure", fake_measure)
    assert fma_width.full_width()
    files = list((fresh / "cpu").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["full_width"] is True
    fma_width.forget()  # a new process: reads the file, does not measure again
    assert fma_width.full_width() and len(calls) == 1
    assert "cached" in fma_width.decide()["source"]
    # another CPU model behind the same name: measured again
    data = json.loads(files[0].read_text())
    data["cpu"]["model"] = -1
    files[0].write_text(json.dumps(data))
    fma_width.forget()
    fma_width.decide()
    assert len(calls) == 2


def test_the_measurement_compares_the_two_widths():
    m = fma_width.measure()
    assert m["gflops_8_lanes"] > 0 and m["gflops_16_lanes"] > 0
    assert m["ratio"] == pytest.approx(m["gflops_16_lanes"] / m["gflops_8_lanes"])
    assert m["full_width"] == (m["ratio"] >= fma_width.THRESHOLD)
    # 16 lanes never do more than twice 8 lanes' work (timer noise aside)
    assert m["ratio"] < 2.4
    if cpu_conv_packed.WIDE_BLOCKS:  # AVX-512: a 16-lane FMA is one instruction, not much slower
        assert m["ratio"] > 0.7
    else:  # AVX2: two 8-lane halves, and the 16-lane chains spill (0.57 on a Zen 3)
        assert not m["full_width"]


@pytest.mark.parametrize("c, k, width", [(32, 32, 256), (64, 32, 256), (32, 64, 128)])
def test_full_width_fmas_give_the_shallow_layers_to_packed(fresh, monkeypatch, c, k, width):
    monkeypatch.setenv(fma_width.ENV, "512")
    assert cpu._packed_conv("auto", c, k, width) == cpu_conv_packed.WIDE_BLOCKS
    fma_width.forget()
    monkeypatch.setenv(fma_width.ENV, "256")
    assert not cpu._packed_conv("auto", c, k, width)
    # 8 channels in or out stay with register_blocked either way (packed's blocks of 8
    # are 8 lanes wide too); 16 -> 16 takes packed's 16 x 16 block where it is full width;
    # a named variant is held to
    fma_width.forget()
    monkeypatch.setenv(fma_width.ENV, "512")
    assert not cpu._packed_conv("auto", 8, 16, width)
    assert not cpu._packed_conv("auto", 16, 8, width)
    assert cpu._packed_conv("auto", 16, 16, width) == cpu_conv_packed.WIDE_BLOCKS
    assert cpu._packed_conv("packed", c, k, width)


def test_a_failed_measurement_falls_back_without_caching(fresh, monkeypatch):
    def broken():
        raise RuntimeError("no FMA loop here")

    monkeypatch.setattr(fma_width, "measure", broken)
    assert not fma_width.full_width()
    assert "not measured (RuntimeError: no FMA loop here)" in fma_width.decide()["source"]
    assert not (fresh / "cpu").exists() or not list((fresh / "cpu").glob("*.json"))

"""The GPU's ceilings, measured (CuPy; written without a GPU at hand, untested on one):
fp32 FMA throughput, HBM copy bandwidth, cuBLAS SGEMM.

FMA throughput: every thread of a full grid (as many resident threads as the SMs hold) runs
``FMA_CHAINS`` independent chains ``a = fmaf(a, m, c)``; with 8 chains per thread and 64
warps per SM the FMA pipes never wait on a latency. The multiplier and addend are kernel
arguments, so NVRTC cannot fold a chain at its fixed point. Copy: ``gpu_timing``'s
device-to-device copy of 1 GiB, bytes read plus written. SGEMM: ``cupy.matmul`` of two
8192 x 8192 float32 matrices (cuBLAS; fp32 arithmetic unless CUPY_TF32=1 is set, which we
record). All timed with CUDA events, the best of a few runs.
"""

from __future__ import annotations

import os

import numpy as np

FMA_CHAINS = 8
FMA_SOURCE = r"""
extern "C" __global__ void fma_chains(int iterations, float m, float c, float* out) {
    float a[CHAINS];
#pragma unroll
    for (int j = 0; j < CHAINS; ++j) a[j] = threadIdx.x * 1e-3f + j;
    for (int i = 0; i < iterations; ++i) {
#pragma unroll
        for (int j = 0; j < CHAINS; ++j) a[j] = fmaf(a[j], m, c);
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < CHAINS; ++j) s += a[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;  // keeps the chains alive
}
"""
THREADS = 256
REPEATS = 5


def _best_event_ms(fn, repeats: int = REPEATS) -> float:
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end))
    return best


def device_properties() -> dict:
    import cupy

    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device().id
    props = runtime.getDeviceProperties(device)
    name = props["name"]
    return {"name": name.decode() if isinstance(name, bytes) else name,
            "sms": int(props["multiProcessorCount"]),
            "threads_per_sm": int(props["maxThreadsPerMultiProcessor"]),
            "clock_ghz": _clock_khz(runtime, props, device) / 1e6 or None,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "l2_bytes": int(props["l2CacheSize"])}


def _clock_khz(runtime, props: dict, device: int) -> int:
    """The SMs' boost clock in kHz, 0 if unknown (CUDA 13 dropped it from the properties;
    the device attribute remains)."""
    if props.get("clockRate"):
        return int(props["clockRate"])
    try:
        return int(runtime.deviceGetAttribute(getattr(runtime, "cudaDevAttrClockRate", 13),
                                              device))
    except Exception:  # an older or newer runtime without it: no theoretical peak
        return 0


def fma_throughput(iterations: int = 1 << 14) -> dict:
    import cupy

    kernel = cupy.RawKernel(FMA_SOURCE, "fma_chains",
                            options=("-std=c++17", f"-DCHAINS={FMA_CHAINS}"))
    props = device_properties()
    blocks = props["sms"] * (props["threads_per_sm"] // THREADS)
    out = cupy.empty(blocks * THREADS, dtype=cupy.float32)
    args = (np.int32(iterations), np.float32(0.999), np.float32(0.001), out)
    ms = _best_event_ms(lambda: kernel((blocks,), (THREADS,), args))
    flops = 2 * FMA_CHAINS * iterations * blocks * THREADS
    return {"chains": FMA_CHAINS, "threads": blocks * THREADS, "gflops": flops / ms / 1e6}


def copy_bandwidth(nbytes: int = 1 << 30) -> dict:
    from nodulekit.bench.gpu_timing import copy_bandwidth_gbps

    result = copy_bandwidth_gbps(nbytes)
    return {"bytes": 2 * nbytes, "gbps": result["gbps"], "method": result["method"]}


def gemm_throughput(n: int = 8192) -> dict:
    import cupy

    a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    b = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    c = cupy.empty_like(a)
    ms = _best_event_ms(lambda: cupy.matmul(a, b, out=c), repeats=3)
    tf32 = os.environ.get("CUPY_TF32", "0") == "1"
    return {"n": n, "library": f"cuBLAS via CuPy {cupy.__version__}"
                               + (" (CUPY_TF32=1: TF32 operands)" if tf32 else ""),
            "gflops": 2 * n**3 / ms / 1e6}


# FP32 lanes per SM by compute capability (NVIDIA's CUDA C++ Programming Guide, arithmetic
# instructions: results per clock per SM of a 32-bit fused multiply-add)
FP32_LANES_PER_SM = {"7.0": 64, "7.5": 64, "8.0": 64, "8.6": 128, "8.7": 128, "8.9": 128,
                     "9.0": 128, "10.0": 128, "12.0": 128}


def theoretical(props: dict) -> dict | None:
    lanes = FP32_LANES_PER_SM.get(props["compute_capability"])
    if lanes is None or not props["clock_ghz"]:
        return None
    gflops = props["sms"] * lanes * 2 * props["clock_ghz"]
    return {"gflops": gflops, "basis": f"{props['sms']} SMs x {lanes} FP32 lanes x 2 FLOP x "
                                       f"{props['clock_ghz']:.2f} GHz (boost clock)"}


def measure() -> dict:
    props = device_properties()
    fma, copy, gemm = fma_throughput(), copy_bandwidth(), gemm_throughput()
    ideal = theoretical(props)
    if ideal is not None:
        ideal["fraction_reached"] = fma["gflops"] / ideal["gflops"]
    return {"fma_gflops": fma["gflops"], "fma": [fma],
            "copy_gbps": copy["gbps"], "copy": copy,
            # no cache-level copy on the GPU yet: no L2 ceiling
            "cache_copy_gbps": None, "cache": {"level": "L2", "bytes": props["l2_bytes"]},
            "gemm_gflops": gemm["gflops"], "gemm": gemm,
            "theoretical": ideal, "hardware": props}

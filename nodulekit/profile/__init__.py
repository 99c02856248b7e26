"""`nodulekit profile`: one training step, op by op, against the machine's own limits.

    peaks.py       the device's ceilings, measured on it and cached: FMA throughput, copy
                   bandwidth, the vendor GEMM (peaks_cpu.py: Numba; peaks_gpu.py: CuPy)
    counts.py      each op's FLOPs and the bytes it must move at least, from its arguments
    timing.py      a backend wrapper that times every op call (host clock or CUDA events)
    layers.py      which U-Net layer each op call of a training step belongs to
    steps.py       the step run timed and plain, in turns (several set-ups in turns too)
    roofline.py    the roofline at an op's arithmetic intensity, and the roofline plot
    run.py         the profile itself: timed steps, per-op medians, the result dict
    report.py      the result as text
"""

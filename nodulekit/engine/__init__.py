"""The engine: the op contract (ops.py) and the backends that implement it."""

from __future__ import annotations

from nodulekit.engine.ops import Backend

BACKENDS = ("reference", "cpu", "cuda")


def cuda_usable() -> tuple[bool, str]:
    """(True, device name) when CuPy can allocate on a GPU, else (False, why not)."""
    try:
        import cupy
    except ImportError:
        return False, "cupy is not installed (pip install 'nodulekit[cuda]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "no CUDA device"
        cupy.zeros(1)
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        return True, props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    except Exception as exc:  # CUDARuntimeError and friends: no driver, no device
        return False, f"no usable GPU ({type(exc).__name__}: {exc})"


def resolve_device(device: str) -> tuple[str, str]:
    """'auto' | 'cpu' | 'cuda' | 'reference' -> (backend name, a sentence saying why)."""
    if device == "auto":
        ok, why = cuda_usable()
        return ("cuda", f"auto: using cuda ({why})") if ok else ("cpu", f"auto: using cpu ({why})")
    if device not in BACKENDS:
        raise ValueError(f"unknown device {device!r}; choose one of auto, {', '.join(BACKENDS)}")
    return device, f"using {device}"


def get_backend(device: str = "cpu", precision: str = "fp32",
                threads: int | None = None) -> Backend:
    """The backend object for a device name ('auto' resolves first).

    threads: the CPU backend's worker threads (default: one per core); data-parallel ranks
    sharing a host take a share of the cores each. Ignored by the other backends.
    """
    name, _ = resolve_device(device)
    if name == "reference":
        from nodulekit.engine.reference import ReferenceBackend

        return ReferenceBackend()
    if name == "cpu":
        from nodulekit.engine.cpu import CPUBackend

        return CPUBackend(precision=precision, threads=threads)
    ok, why = cuda_usable()
    if not ok:
        raise RuntimeError(f"--device cuda asked for, but {why}")
    try:
        from nodulekit.engine.cuda import CudaBackend
    except ImportError as exc:
        raise RuntimeError(f"the CUDA backend is not available: {exc}") from exc
    return CudaBackend(precision=precision)

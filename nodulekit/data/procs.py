"""Worker processes of the data pipeline: one start method, one fork server for all.

`preprocess` (decoding) and `synthesize` (writing a synthetic set) both run worker
processes. They are started by a fork server where there is one (spawn elsewhere), never by
a bare fork of the caller: a fork would copy the caller's open HDF5 files and threads
(progress bars, a loader) into the workers. The fork server is one per process and is
started by whichever of the two comes first, with the modules it imports once for every
worker forked from it; so both ask for the same list here. Were the server started without
them (by other code, first), every worker would import NumPy, pydicom and Pillow again:
about half a second of CPU each.
"""

from __future__ import annotations

import multiprocessing as mp

# The modules the workers run; `decode` brings NumPy, pydicom and Pillow with it, `checksum`
# Numba and its compiled code (loaded on import).
PRELOAD = ("nodulekit.data.decode", "nodulekit.data.checksum", "nodulekit.data.synth")


def worker_context():
    """The multiprocessing context for data workers: forkserver (preloaded) or spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        return ctx
    return mp.get_context("spawn")

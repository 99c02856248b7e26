"""HDF5's Fletcher-32 chunk checksum, computed and checked here, outside HDF5.

The cache's datasets carry HDF5's Fletcher-32 filter: each chunk is stored as its bytes
followed by a 4-byte checksum (little-endian), which HDF5 checks whenever it reads the chunk
through its filter pipeline. Two places write and read chunks past that pipeline, for
speed: the preprocessing workers write each slice's bytes straight into the file
(`nodulekit.data.decode`), and the loader reads whole chunks raw (`nodulekit.data.loader`).
They compute and check the same checksum with `chunk_checksum` and `chunk_ok`, so a chunk
they write is one HDF5 accepts, and a chunk they read is checked as HDF5 would check it.

HDF5's algorithm (H5_checksum_fletcher32) sums the data as big-endian 16-bit words w_i
(an odd last byte padded with a zero byte), i = 0 .. n-1, folding both sums into 16 bits
every 360 words: sum1 = sum(w_i), sum2 = sum((n - i) * w_i), each reduced modulo 65535
into 1 .. 65535 (0 only when every word is 0), checksum = sum2 << 16 | sum1. Folding keeps
each sum's residue modulo 65535, and it leaves a positive sum positive, which fixes the
result from the exact sums. A big-endian word is 256 x the little-endian one modulo 65535
(256 * 256 = 65536 = 1 modulo 65535), so the sums are taken over the native
(little-endian) 16-bit words, in one pass that Numba vectorises: about 20 us for a
512 x 512 int16 slice, a tenth of HDF5's own byte loop.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, uint32, uint64

CHECKSUM_BYTES = 4
_MODULUS = 65535
# Words per call of `_word_sums`: keeps its weighted sum below 2**63.
_PIECE = 1 << 22


@njit(cache=True, nogil=True)
def _word_sums(words):
    """(sum of words[i], sum of i * words[i]) over at most 2**22 words, exactly.

    Blocks of 256 words are summed in 32-bit lanes (255 * 255 * 65535 < 2**32), which the
    compiler vectorises; the blocks are added up in 64 bits.
    """
    n = words.shape[0]
    total = uint64(0)
    weighted = uint64(0)
    blocks = n // 256
    for k in range(blocks):
        start = k * 256
        a = uint32(0)
        b = uint32(0)
        for j in range(256):
            x = uint32(words[start + j])
            a += x
            b += uint32(j) * x
        total += uint64(a)
        weighted += uint64(b) + uint64(start) * uint64(a)
    for i in range(blocks * 256, n):
        x = uint64(words[i])
        total += x
        weighted += uint64(i) * x
    return total, weighted


def _words(data: np.ndarray) -> np.ndarray:
    """The data's bytes as native-order little-endian 16-bit words (odd: one zero byte
    appended, as HDF5 does)."""
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if raw.shape[0] % 2:
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    words = raw.view("<u2")
    if sys.byteorder != "little" or not (words.flags.writeable and words.flags.aligned):
        # native, and the one array type `_word_sums` is compiled for (`_warm_up`)
        words = words.astype(np.uint16)
    return words


def fletcher32(data: np.ndarray | bytes) -> int:
    """HDF5's Fletcher-32 checksum of `data`'s bytes (in memory order)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    words = _words(data)
    n = words.shape[0]
    total = weighted = 0  # sum(v_i), sum(i * v_i), exact (Python integers)
    for start in range(0, n, _PIECE):
        a, b = _word_sums(words[start:start + _PIECE])
        total += int(a)
        weighted += int(b) + start * int(a)
    if total == 0:
        return 0
    # x 256: a big-endian word is 256 x the little-endian one, modulo 65535
    sum1 = (256 * total) % _MODULUS or _MODULUS
    sum2 = (256 * (n * total - weighted)) % _MODULUS or _MODULUS
    return (sum2 << 16) | sum1


def chunk_checksum(data: np.ndarray) -> np.ndarray:
    """The 4 bytes that follow `data`'s bytes in a Fletcher-32 filtered chunk."""
    return np.frombuffer(fletcher32(data).to_bytes(CHECKSUM_BYTES, "little"), np.uint8)


def with_checksum(data: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A filtered chunk: `data`'s bytes then their checksum, as uint8 (into `out` when it
    has the size)."""
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    n = raw.shape[0]
    if out is None or out.shape != (n + CHECKSUM_BYTES,) or out.dtype != np.uint8:
        out = np.empty(n + CHECKSUM_BYTES, np.uint8)
    out[:n] = raw
    out[n:] = chunk_checksum(raw)
    return out


def chunk_ok(chunk: np.ndarray) -> bool:
    """Whether a filtered chunk as stored (uint8: the data, then 4 checksum bytes) is
    intact."""
    if chunk.shape[0] < CHECKSUM_BYTES:
        return False
    n = chunk.shape[0] - CHECKSUM_BYTES
    stored = int.from_bytes(chunk[n:].tobytes(), "little")
    return fletcher32(chunk[:n]) == stored


def _warm_up() -> None:
    """Compile `_word_sums` (or load it from Numba's cache) now: the fork server imports this
    module once (`procs.PRELOAD`), and every worker forked from it then has the code
    without loading it again (a tenth of a second or more each)."""
    _word_sums(np.zeros(256, np.uint16))


_warm_up()

"""Where a cache came from, and whether two caches hold the same slices.

A cache that `nodulekit train DIR` or `nodulekit evaluate RUN DIR` preprocesses into a run
folder is reused by the next command that names the same folder, but only while it still
describes that folder: `source_fingerprint` hashes the folder's resolved path, every file
the layout readers could read under it (relative path, size, modification time in ns;
hidden files and folders are skipped, as the readers skip them), the preprocessing options
and the cache format version. The callers store it in the cache (`SOURCE_ATTRS`) and
`source_mismatch` says why a cache no longer fits (another folder, files changed, no record),
so they rebuild it and say so. Sizes and times, not contents: a walk with one stat a file
costs ~1 s per 100k files, where hashing a data set's bytes costs minutes; a file rewritten
in place keeps its size but not its mtime.

`cache_for_folder` is the one call of both: reuse the cache when it fits, else preprocess the
folder again into a temporary file beside it, record the source there, and rename it over
the cache, so a cache under the final name always carries the record it was built with.

`cache_identity` is what a resumed run checks when it is pointed at its cache at a new path
(`nodulekit train --resume RUN --data NEW.h5`): the splits' shapes and the slices' metadata
(patient, exam, slice, source file, nodule flag), hashed. It reads only the metadata, so it
is cheap; the pixels themselves are guarded by the cache's chunk checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import h5py

SOURCE_PATH_ATTR = "source_path"  # the folder's resolved path, for the message
SOURCE_FINGERPRINT_ATTR = "source_fingerprint"
SOURCE_ATTRS = (SOURCE_PATH_ATTR, SOURCE_FINGERPRINT_ATTR)
_IDENTITY_META = ("patient", "exam", "slice", "source", "has_nodule")
# What `nodulekit train DIR` and `nodulekit evaluate RUN DIR` preprocess with.
FOLDER_OPTIONS = {"layout": "auto", "allow_non_ct": False, "split_seed": 0, "strict": False}


def source_fingerprint(folder: str | os.PathLike, options: dict,
                       exclude: str | os.PathLike | None = None) -> str:
    """SHA-256 (hex) of the folder's resolved path, its files' relative paths, sizes and
    mtimes, the preprocessing `options` (JSON-able) and the cache format version.

    exclude: a folder not to walk (the run folder, when it lies inside the data folder).
    """
    from nodulekit.data.cache import FORMAT_VERSION

    root = Path(folder).resolve()
    skip = str(Path(exclude).resolve()) if exclude is not None else None
    h = hashlib.sha256()
    h.update(json.dumps({"root": str(root), "options": options,
                         "cache_format": FORMAT_VERSION}, sort_keys=True).encode())
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                             and os.path.join(dirpath, n) != skip)
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link: the readers cannot read it either
                continue
            rel = os.path.relpath(path, root)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def source_attrs(folder: str | os.PathLike, options: dict,
                 exclude: str | os.PathLike | None = None) -> dict:
    """The attributes a cache built from `folder` with `options` records."""
    return {SOURCE_PATH_ATTR: str(Path(folder).resolve()),
            SOURCE_FINGERPRINT_ATTR: source_fingerprint(folder, options, exclude)}


def source_mismatch(cache: str | os.PathLike, folder: str | os.PathLike, options: dict,
                    exclude: str | os.PathLike | None = None) -> str | None:
    """None when `cache` records `folder` as it is now (with these options); else why not,
    as a phrase ("it was built from /a, not /b", ...)."""
    try:
        with h5py.File(cache, "r") as f:
            recorded = {k: _text(f.attrs.get(k, "")) for k in SOURCE_ATTRS}
    except OSError as e:
        return f"it cannot be read ({e})"
    root = str(Path(folder).resolve())
    if not recorded[SOURCE_FINGERPRINT_ATTR]:
        return "it records no source (written by `nodulekit preprocess` or an older nodulekit)"
    if recorded[SOURCE_PATH_ATTR] != root:
        return f"it was built from {recorded[SOURCE_PATH_ATTR]}, not {root}"
    if recorded[SOURCE_FINGERPRINT_ATTR] != source_fingerprint(folder, options, exclude):
        return (f"files under {root} changed since it was built (or the preprocessing "
                "options did)")
    return None


def cache_for_folder(folder: str | os.PathLike, cache: str | os.PathLike, *,
                     report: Callable[[str], object] = print, progress: bool = True,
                     exclude: str | os.PathLike | None = None,
                     spacing: float | str | None = None) -> Path:
    """`cache` built from `folder` (with `FOLDER_OPTIONS`, and `spacing`: `preprocess
    --spacing`, mm or "median", None: native pixels): reused when it records the folder as
    it is now and the same options, else (re)built, saying which and why. Returns the
    cache's path."""
    from nodulekit.data.preprocess import preprocess

    options = dict(FOLDER_OPTIONS)
    if spacing is not None:  # only then: a native cache's fingerprint stays what it was
        options["spacing"] = spacing if spacing == "median" else float(spacing)
    cache = Path(cache)
    if cache.is_file():
        why = source_mismatch(cache, folder, options, exclude)
        if why is None:
            report(f"reusing {cache}: built from {Path(folder).resolve()}, unchanged since")
            return cache
        report(f"rebuilding {cache}: {why}")
    else:
        report(f"preprocessing {folder} into {cache}")
    # Taken before the folder is read: a file that changes while it is read then makes the
    # next check rebuild, rather than reuse a cache of the older file.
    attrs = source_attrs(folder, options, exclude)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        result = preprocess(folder, tmp, progress=progress, **options)
        with h5py.File(tmp, "r+") as f:
            f.attrs.update(attrs)
        os.replace(tmp, cache)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    result.out = cache
    report(result.format())
    return cache


def cache_identity(cache: str | os.PathLike) -> str:
    """SHA-256 (hex) of a cache's splits (shapes) and slice metadata; equal for two copies of
    one cache, different for caches of other slices."""
    from nodulekit.data.cache import open_cache

    h = hashlib.sha256()
    with open_cache(cache) as c:
        for name in c.splits:
            s = c.split(name)
            h.update(f"{name}:{s.hu.shape}:{s.mask.shape}\n".encode())
            meta = s.meta
            for key in _IDENTITY_META:
                h.update(json.dumps([key, [_plain(v) for v in meta[key].tolist()]]).encode())
    return h.hexdigest()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _plain(v):
    return v.decode() if isinstance(v, bytes) else v

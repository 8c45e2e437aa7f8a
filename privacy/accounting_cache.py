"""Accounting results kept across processes: a small on-disk cache of pure function results.

What it holds: numbers that depend only on their key (a calibrated σ for its target, δ, q,
steps, accountant and library version; an ε for its history, δ, accountant, grid and
version), one file per entry, so a fresh process (a site answering one Flower message, an
auditor's second run) does not rebuild privacy-loss distributions it already built.

Where: ``VEIL_ACCOUNTING_CACHE`` (a directory; ``off`` disables the cache), by default
``$XDG_CACHE_HOME/veil/accounting`` or ``~/.cache/veil/accounting``.

Why a cached number cannot lower a reported ε:

* every entry carries an HMAC-SHA256 of its key and value under the cache's own random
  32-byte key (``<dir>/key``, mode 0600, made once). A corrupted, truncated, hand-edited,
  or copied-in entry (another machine's cache has another key) fails it and is ignored, then
  recomputed; so is an entry whose stored key differs from the one asked for;
* a calibrated σ is also re-checked by the caller on the reporting grid before it is used
  (``privacy.calibration``), so even a forged σ can never overshoot the target;
* the directory must belong to this user and be writable by no one else, or the cache is off.

Whoever can read the cache's key can forge entries: that is the site's own account, which can
equally rewrite its ledger (see ``privacy.ledger``: the site is the party enforcing its cap).

Writes are atomic (a temporary file renamed into place, mode 0600) and never fsynced: a crash
can lose an entry, never publish half of one that verifies. Every failure to read or write
only means a recomputation; the cache never raises.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import stat
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from veil import env
from veil.files import atomic_write, read_small, temp_beside
from veil.logs import get_logger

log = get_logger("accounting")

FORMAT = "veil-accounting-cache-1"
"""Part of every entry's key: a new format (or a change to what a key means) starts afresh."""
MAX_ENTRIES = 20_000
"""Past this many entries, the oldest half is removed (checked once per process, on its first write)."""
_KEY_FILE = "key"
_ENTRY_LIMIT = 64 * 1024
_pruned: set[Path] = set()


def cache_dir() -> Path | None:
    """The cache directory from ``VEIL_ACCOUNTING_CACHE`` (default under the user's cache dir); None if off."""
    value = os.environ.get(env.ACCOUNTING_CACHE, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "veil" / "accounting"


def load(kind: str, key: Mapping[str, object]) -> float | None:
    """The value stored for ``key``, or None if absent, unreadable, or failing its MAC."""
    found = _locate(kind, key)
    if found is None:
        return None
    path, canon, secret = found
    try:
        entry = json.loads(read_small(path, _ENTRY_LIMIT))
        value = float(entry["value"])
        good = (entry["key"] == canon and math.isfinite(value)
                and hmac.compare_digest(str(entry["mac"]), _mac(secret, canon, value)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.debug("accounting cache: ignoring unreadable entry %s (%s)", path.name, err)
        return None
    if not good:
        log.warning("accounting cache: entry %s does not verify (corrupted or edited); recomputing", path.name)
        return None
    return value


def save(kind: str, key: Mapping[str, object], value: float) -> None:
    """Store ``value`` for ``key`` (finite values only); any failure is logged and ignored."""
    if not math.isfinite(value):
        return
    found = _locate(kind, key)
    if found is None:
        return
    path, canon, secret = found
    body = json.dumps({"key": canon, "value": value, "mac": _mac(secret, canon, value)}).encode()
    tmp = temp_beside(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.debug("accounting cache: cannot write %s (%s)", path, err)
        return
    if path.parent not in _pruned:
        _pruned.add(path.parent)
        _prune(path.parent)


def canonical(kind: str, key: Mapping[str, object]) -> str:
    """The exact text an entry's key is stored and authenticated as (floats as exact reprs)."""
    return json.dumps({"format": FORMAT, "kind": kind, **key}, sort_keys=True, separators=(",", ":"))


def _mac(secret: bytes, canon: str, value: float) -> str:
    return hmac.new(secret, f"{canon}\n{value!r}".encode(), hashlib.sha256).hexdigest()


def _locate(kind: str, key: Mapping[str, object]) -> tuple[Path, str, bytes] | None:
    directory = cache_dir()
    if directory is None:
        return None
    secret = _secret(directory)
    if secret is None:
        return None
    canon = canonical(kind, key)
    name = f"{kind}-{hashlib.sha256(canon.encode()).hexdigest()[:40]}.json"
    return directory / name, canon, secret


def _secret(directory: Path) -> bytes | None:
    """This cache's MAC key, made on first use; None (cache off) if the directory is unsafe."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(directory)
    except OSError as err:
        _warn_once(directory, f"cannot create it ({err.strerror})")
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        _warn_once(directory, "it is not a directory of this user's that only this user can write")
        return None
    return _read_secret(directory, st.st_ino)


@lru_cache(maxsize=8)
def _read_secret(directory: Path, _inode: int) -> bytes | None:
    path = directory / _KEY_FILE
    try:
        atomic_write(path, os.urandom(32), mode=0o600, exclusive=True)
    except FileExistsError:
        pass  # made before (or by another process just now: published whole, never half)
    except OSError as err:
        _warn_once(directory, f"cannot write its key ({err.strerror})")
        return None
    try:
        secret = read_small(path, 64)
        mode = os.stat(path).st_mode
    except OSError as err:
        _warn_once(directory, f"cannot read its key ({err.strerror})")
        return None
    if len(secret) != 32 or mode & 0o077:
        _warn_once(directory, "its key file is not 32 bytes readable only by this user")
        return None
    return secret


@lru_cache(maxsize=8)
def _warn_once(directory: Path, why: str) -> None:
    log.warning("accounting cache %s is off: %s (set %s to another directory, or to 'off')",
                directory, why, env.ACCOUNTING_CACHE)


def _prune(directory: Path) -> None:
    """Remove the oldest half of the entries once there are more than ``MAX_ENTRIES``."""
    try:
        entries = [e for e in os.scandir(directory) if e.name.endswith(".json") and e.is_file()]
        if len(entries) <= MAX_ENTRIES:
            return
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        for e in entries[: len(entries) - MAX_ENTRIES // 2]:
            Path(e.path).unlink(missing_ok=True)
    except OSError as err:
        log.debug("accounting cache: cannot prune %s (%s)", directory, err)

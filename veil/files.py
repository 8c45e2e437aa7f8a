"""Writing files so that a crash leaves the old version or the new one, never half of one.

The one place Veil writes files that matter (keys, certificates, ledgers, checkpoints,
exports, site.yaml): build under a temporary name beside the target, fsync, then rename
(``atomic_write``) or hard-link (``publish_new``, which refuses an existing target), then
fsync the directory so the rename itself survives a power loss. The file has its final mode
from its first byte, so a secret is never world-readable in between.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path


def temp_beside(path: Path, suffix: str = "tmp") -> Path:
    """A fresh hidden name in ``path``'s directory (same filesystem, so rename/link is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.{suffix}")


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def publish_new(tmp: Path, path: Path) -> bool:
    """Put the finished file ``tmp`` at ``path`` unless something is already there.

    ``os.link`` fails if ``path`` exists, so two racing writers cannot both win and nothing is
    ever replaced. ``tmp`` is removed either way. False when ``path`` already existed.
    """
    try:
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with ``mode``: whole or not at all, durable on return.

    ``exclusive``: refuse (``FileExistsError``) when ``path`` exists instead of replacing it;
    callers turn that into their own one-line error.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and target.exists():
        raise FileExistsError(str(target))
    tmp = temp_beside(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            if not publish_new(tmp, target):
                raise FileExistsError(str(target))
            return
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def resolved(path: Path | str) -> Path:
    """``path`` made absolute with its symlinks followed; ``OSError`` (not the ``RuntimeError``
    pathlib raises) for a symlink loop, so callers turn it into their one-line error."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError "Symlink loop from ..." before Python 3.13
        if isinstance(err, OSError) and err.errno != errno.ELOOP:
            raise
        raise OSError(errno.ELOOP, "a symlink loop (a link that points back at itself)", str(path)) from err


def file_kind(mode: int) -> str:
    """What a non-regular file is, for a message: "a directory", "a FIFO", "a device", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"


def regular_file_problem(path: Path | str) -> str | None:
    """Why ``path`` (symlinks followed) is not a regular file Veil may open, or None when it is.

    Checked with ``os.stat`` *before* any ``open``, so a FIFO never blocks and a device such as
    ``/dev/zero`` is never read. A missing file is left to the caller (None), which says so itself."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop (a link that points back at itself), not a regular file"
        return None  # the caller's open() reports it (permission denied, ...)
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}, not a regular file"


def read_small(path: Path | str, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    ``OSError`` (with a one-line ``strerror``) for a file that is not regular or is larger than
    ``limit``: for files small by nature (certificates, keys), never read without a bound."""
    problem = regular_file_problem(path)
    if problem:
        raise OSError(errno.EINVAL, problem, str(path))
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"is larger than {limit:,} bytes; such a file is a few kilobytes", str(path))
    return data

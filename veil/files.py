"""Writing files so that a crash leaves the old version or the new one, never half of one.

The one place Veil writes files that matter (keys, certificates, ledgers, checkpoints,
exports, site.yaml): build under a temporary name beside the target, fsync, then rename
(``atomic_write``) or hard-link (``publish_new``, which refuses an existing target), then
fsync the directory so the rename itself survives a power loss. The file has its final mode
from its first byte, so a secret is never world-readable in between.
"""

from __future__ import annotations

import os
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

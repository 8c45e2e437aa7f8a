"""Writing small files so that a crash leaves the old version or the new one, never half of one."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``,
    and fsync the directory, so the rename itself survives a power loss."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""Writing a file so that a reader sees the old content or the new, never half of either.

One helper for every small file the pipeline writes in place (checkpoint specs, replay buffers,
resume checkpoints, expectation suites, validation and demo reports): a temporary file in the
same folder, flushed and fsynced, then `os.replace`. Free of torch so that validation and
reporting can import it without loading a training stack.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

READABLE = 0o644  # mkstemp creates 0600; what we write is meant to be read (reports, suites)


def atomic_write_bytes(path: Path | str, data: bytes, *, sync_folder: bool = False) -> None:
    """Replace `path` with `data` atomically; the folder is created if missing.

    Args:
        sync_folder: also fsync the folder, so the rename itself survives a power loss
            (resume checkpoints, which a restarted run must find).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, READABLE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_folder:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def atomic_write_text(path: Path | str, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))

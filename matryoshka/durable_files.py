"""Files that survive a crash or a kill whole: written, flushed to disk, then renamed into place.

``os.replace`` is atomic on POSIX: a reader (or the next run) sees the old file or the new one,
never half of one; fsync'ing the file before the rename and its folder after makes the new contents
and the rename survive a power loss too.  Used by the checkpoints (a whole folder published at
once), the saved SAE and the studies' run cache.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["fsync_folder", "replace_file", "write_synced"]


def write_synced(file: Path, data: bytes) -> None:
    """Write ``data`` to ``file`` and wait until it is on disk."""
    with open(file, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a folder's entries (new files, a rename) durable, not only the files' contents."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def replace_file(file: str | Path, data: bytes) -> None:
    """Give ``file`` the contents ``data`` atomically: a kill at any moment leaves the old file
    (or none) or the new one, and at most a hidden ``.NAME.tmp-*`` file beside it."""
    file = Path(file)
    handle, temporary = tempfile.mkstemp(prefix=f".{file.name}.tmp-", dir=file.parent)
    os.close(handle)
    try:
        write_synced(Path(temporary), data)
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_folder(file.parent)

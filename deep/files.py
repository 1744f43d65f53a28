"""Files written atomically: a killed process, or a machine that loses power, leaves the old file or the new one,
never a part. Everything the project writes but its checkpoints (results, figures, converted weights) goes through
:func:`write_atomically`; Orbax writes the checkpoints (deep/checkpoint.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary file next to ``path``, flushes it to the disk, then renames it into place:
    a killed process, or a machine that loses power, leaves the old file or the new one, never a part.

    An ``OSError`` about the temporary file names ``path`` instead (a name the user never gave).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    except OSError as error:
        raise _naming(error, path) from error
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results and weights are shared like any other
        _flush_to_disk(tmp, os.O_RDWR)  # writable: fsync needs it on some systems
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # and the rename itself, where folders can be opened (POSIX)
            _flush_to_disk(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        if error.filename not in (None, tmp_name, str(path)):
            raise  # about another file (one ``write`` reads, say): its own name is the right one
        raise _naming(error, path) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def _flush_to_disk(path: Path, flags: int) -> None:
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` as the same kind of ``OSError`` about ``path`` alone (``OSError(errno, ...)`` picks the subclass)."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))

"""Files written atomically: a killed process, or a machine that loses power, leaves the old file or the new one,
never a part. Results, figures and weights files go through :func:`write_atomically`; Orbax writes the checkpoints
(deep/checkpoint.py) the same way.
"""

from __future__ import annotations

import os
import secrets
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
        tmp = _new_file_beside(path)
    except OSError as error:
        raise _naming(error, path) from error
    try:
        write(tmp)
        _flush_to_disk(tmp, os.O_RDWR)  # writable: fsync needs it on some systems
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # and the rename itself, where folders can be opened (POSIX)
            _flush_to_disk(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        if error.filename not in (None, str(tmp), str(path)):
            raise  # about another file (one ``write`` reads, say): its own name is the right one
        raise _naming(error, path) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_file_beside(path: Path) -> Path:
    """An empty file of a new, hidden name next to ``path``, created with the permissions any new file gets (0666 less
    the umask, which the kernel applies): not mkstemp's 0600, since results and weights are shared like any other
    file, and without reading the umask, which only setting it can do, leaving it 0 a moment for every thread.
    The name keeps ``path``'s suffix (writers such as ``np.save`` go by it) and at most 40 characters of its stem, so
    that a long name with a usual suffix still fits the longest name the file system allows."""
    while True:
        candidate = path.with_name(f".{path.stem[:40]}.{secrets.token_hex(6)}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


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

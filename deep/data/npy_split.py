"""The reader shared by the LibMTL/MTAN ``.npy`` layouts (NYUv2 and Cityscapes): one folder per field, ``<i>.npy``.

``root/{split}/{folder}/<i>.npy`` for i = 0..N-1 in every folder. Each file is validated before it is used, and the
first problem found raises a :class:`~deep.data.errors.DataError` whose one-line message names the file (or the
folder) and says what is allowed. Checks, in order: the root, the split and every folder exist; each folder holds
exactly ``0.npy .. (N-1).npy`` (no gap, no other ``.npy`` name) and all folders hold the same N; then per file: it is
a readable, complete ``.npy`` file (not text, an ``.npz``, a pickle or a pickled object array) of integers or
floats, of the field's shape, non-empty and of the split's height x width, finite, and within the field's range.

Fields (``kind``) and what each one accepts:

* ``image``: ``[H, W, 3]`` in [0, 1] (LibMTL never normalises with ImageNet statistics) -> float32.
* ``label``: ``[H, W]`` integers in -1..C-1 (-1 = ignore); integer-valued floats are accepted, as MTAN stores
  labels as floats -> int32.
* ``depth``: ``[H, W]`` or ``[H, W, 1]``, >= 0 (0 = invalid) -> float32 ``[H, W, 1]``.
* ``normal``: ``[H, W, 3]`` of length at most 1 + :data:`NORMAL_LENGTH_TOLERANCE` (0 = invalid) -> float32. Unit
  length is not required: MTAN rescaled the pre-computed normals, and interpolated unit vectors are shorter than 1
  near creases (LibMTL's metric normalises only the prediction, so that is the data as the benchmark sees it).

Loading runs on a few threads (numpy's file read releases the GIL); validation is vectorised per file.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from deep.data.errors import DataError

__all__ = ["SPLITS", "FIELD_KEYS", "NORMAL_LENGTH_TOLERANCE", "read_split", "read_npy", "os_error"]

SPLITS = ("train", "val")
# Folder (as on disk) -> the key of the returned dict, which is also the task name the model and losses use.
FIELD_KEYS = {"image": "images", "label": "segmentation", "depth": "depth", "normal": "normal"}
NORMAL_LENGTH_TOLERANCE = 1e-2
_INDEX_NAME = re.compile(r"(0|[1-9][0-9]*)\.npy")
_READ_THREADS = 4
_NPY_SIGNATURE = b"\x93NUMPY"
_NPY_EXPECTED = "expected a numeric array (integers or floats) saved with numpy.save"


def _count_indexed_files(directory: Path) -> int:
    """N, after checking that ``directory`` holds exactly ``0.npy .. (N-1).npy`` among its ``.npy`` files."""
    indices = set()
    try:
        entries = list(os.scandir(directory))
    except OSError as error:
        raise os_error(directory, error, "a folder of <i>.npy files") from None
    for entry in entries:
        if not entry.name.endswith(".npy"):
            continue  # other files (a README, .DS_Store) are not part of the layout and are ignored
        match = _INDEX_NAME.fullmatch(entry.name)
        if match is None:
            raise DataError(f"{directory / entry.name}: unexpected file name; files must be named <i>.npy with "
                            f"i = 0..N-1 (no leading zeros)")
        indices.add(int(match.group(1)))
    if not indices:
        raise DataError(f"{directory}: no <i>.npy files; expected 0.npy .. (N-1).npy")
    count = len(indices)
    if max(indices) != count - 1:
        missing = next(i for i in range(count) if i not in indices)
        raise DataError(f"{directory / f'{missing}.npy'}: missing; the folder holds {count} files numbered up to "
                        f"{max(indices)}, but files must be numbered 0..N-1 without gaps")
    return count


def os_error(path: Path, error: OSError, expected: str) -> DataError:
    """The one-line :class:`DataError` for an ``OSError`` met while opening or listing ``path``."""
    if isinstance(error, FileNotFoundError):
        return DataError(f"{path}: {'broken symbolic link' if path.is_symlink() else 'missing'}")
    if isinstance(error, IsADirectoryError):
        return DataError(f"{path}: is a folder; expected {expected}")
    if isinstance(error, PermissionError):
        return DataError(f"{path}: cannot be read (permission denied); expected {expected} readable by this user")
    return DataError(f"{path}: cannot be read ({error.strerror or type(error).__name__}); expected {expected}")


def _not_npy(path: Path, start: bytes) -> DataError:
    """Why a file that does not start with the .npy signature is not a .npy file."""
    if not start:
        what = "an empty file (0 bytes), not a .npy file"
    elif _NPY_SIGNATURE.startswith(start):
        what = f"a truncated .npy file ({len(start)} bytes, cut short in its signature)"
    elif start.startswith(b"PK\x03\x04"):
        what = "an .npz archive (a zip of arrays), not a single .npy array"
    elif len(start) > 1 and start[0] == 0x80 and 2 <= start[1] <= 5:
        what = "a Python pickle, not a .npy file"
    else:
        what = f"not a valid .npy file (it starts with {start!r}, not the .npy signature {_NPY_SIGNATURE!r})"
    return DataError(f"{path}: {what}; {_NPY_EXPECTED}")


def _header_is_cut(file) -> bool:
    """Whether the .npy file open in ``file`` ends before the end of the header its length field declares."""
    file.seek(0)
    prefix = file.read(12)  # signature (6), version (2), header length (2 bytes in format 1.0, else 4)
    width = 2 if prefix[6:7] == b"\x01" else 4
    if len(prefix) < 8 + width:
        return True
    return os.fstat(file.fileno()).st_size < 8 + width + int.from_bytes(prefix[8:8 + width], "little")


def _read_npy_header(file, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from the header of the open ``file``, left positioned after the header."""
    start = file.read(len(_NPY_SIGNATURE))
    if start != _NPY_SIGNATURE:
        raise _not_npy(path, start)
    file.seek(0)
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            shape = dtype = None
    except Exception as error:  # numpy's parser of arbitrary bytes: ValueError, EOFError, TokenError, TypeError...
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        if _header_is_cut(file):
            raise DataError(f"{path}: a truncated .npy file, cut short in its header ({reason}); "
                            f"{_NPY_EXPECTED}") from None
        raise DataError(f"{path}: not a valid .npy file (its header cannot be read: {reason}); "
                        f"{_NPY_EXPECTED}") from None
    if dtype is None:  # format 3.0 exists only for structured dtypes with non-latin-1 field names
        raise DataError(f"{path}: .npy format version {version[0]}.{version[1]} is not supported; {_NPY_EXPECTED} "
                        f"(format 1.0 or 2.0)")
    return shape, dtype


def read_npy(path: Path) -> np.ndarray:
    """``np.load(path, allow_pickle=False)`` of a single ``.npy`` array, every failure a one-line
    :class:`DataError` naming ``path``: missing, a folder, unreadable, not a .npy file (text, empty, an .npz, a
    pickle), a bad header, a pickled object array, or truncated data. The dtype is not checked here."""
    try:
        with open(path, "rb") as file:
            shape, dtype = _read_npy_header(file, path)
            if dtype.hasobject:
                raise DataError(f"{path}: holds a pickled object array (dtype {dtype}), which is not loaded; "
                                f"{_NPY_EXPECTED}")
            expected_bytes = math.prod(shape) * dtype.itemsize
            available = os.fstat(file.fileno()).st_size - file.tell()
            if available < expected_bytes:
                raise DataError(f"{path}: truncated .npy file: its header declares a {dtype} array of shape {shape} "
                                f"({expected_bytes} bytes of data) but only {available} bytes follow; the file was "
                                f"cut short or not fully written")
            file.seek(0)
            try:
                return np.lib.format.read_array(file, allow_pickle=False)
            except (ValueError, EOFError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise DataError(f"{path}: not a valid .npy file ({reason}); {_NPY_EXPECTED}") from None
    except OSError as error:
        raise os_error(path, error, "a .npy file") from None


def _load(path: Path) -> np.ndarray:
    array = read_npy(path)
    if array.dtype.kind not in "iuf":
        raise DataError(f"{path}: dtype {array.dtype} is not allowed; expected integers or floats")
    return array


def _check_spatial(array: np.ndarray, path: Path, kind: str, spatial: tuple[int, int], reference: Path) -> None:
    expected = {"image": "[H, W, 3]", "label": "[H, W]", "depth": "[H, W] or [H, W, 1]",
                "normal": "[H, W, 3]"}[kind]
    shape = array.shape
    if kind in ("image", "normal"):
        ok = array.ndim == 3 and shape[2] == 3
    elif kind == "label":
        ok = array.ndim == 2
    else:
        ok = array.ndim == 2 or (array.ndim == 3 and shape[2] == 1)
    if not ok:
        raise DataError(f"{path}: {kind} of shape {shape}; expected {expected}")
    if array.size == 0:
        raise DataError(f"{path}: empty {kind} of shape {shape}; expected {expected} with H, W >= 1")
    if shape[:2] != spatial:
        raise DataError(f"{path}: {kind} of height x width {shape[0]}x{shape[1]}; every file of the split must be "
                        f"{spatial[0]}x{spatial[1]} (as {reference})")


def _check_values(array: np.ndarray, path: Path, kind: str, num_classes: int) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{path}: holds NaN or infinite values; every value must be finite")
    if kind == "image":
        low, high = array.min(), array.max()
        if low < 0 or high > 1:
            raise DataError(f"{path}: image values span [{low:.4g}, {high:.4g}]; expected values in [0, 1] (RGB "
                            f"scaled to [0, 1], no mean/std normalisation)")
    elif kind == "label":
        if array.dtype.kind == "f":
            fractional = array != np.round(array)
            if fractional.any():
                raise DataError(f"{path}: label value {array[fractional].flat[0]:.6g} is not an integer; labels "
                                f"must be integers in -1..{num_classes - 1}")
        low, high = array.min(), array.max()
        if low < -1 or high > num_classes - 1:
            bad = low if low < -1 else high
            hint = "; 255 is a common 'no label' value elsewhere: map it to -1" if bad == 255 else ""
            raise DataError(f"{path}: label value {bad:.6g} is out of range; labels must be in -1..{num_classes - 1} "
                            f"({num_classes} classes, -1 = ignore){hint}")
    elif kind == "depth":
        low = array.min()
        if low < 0:
            raise DataError(f"{path}: depth value {low:.4g} is negative; depth must be >= 0 (0 = invalid)")
    elif kind == "normal":
        length = np.sqrt(np.max(np.sum(np.square(array, dtype=np.float64), axis=-1)))
        if length > 1 + NORMAL_LENGTH_TOLERANCE:
            raise DataError(f"{path}: a normal of length {length:.4g}; normals must be unit vectors (or shorter, "
                            f"from interpolation) or all-zero for invalid pixels")


def read_split(root: str | os.PathLike, split: str, folders: Sequence[str], num_classes: int,
               layout: str) -> dict[str, np.ndarray]:
    """Reads and validates ``root/split/{folder}/<i>.npy`` for each of ``folders``.

    Args:
        root: the data set's root folder (holding ``train/`` and ``val/``).
        split: ``"train"`` or ``"val"``.
        folders: the field folders, from ``image``, ``label``, ``depth``, ``normal`` (``image`` first).
        num_classes: C, the number of segmentation classes (labels in -1..C-1).
        layout: the expected layout in words, quoted by the errors about missing folders.

    Returns:
        ``{FIELD_KEYS[folder]: array}``: ``images [N, H, W, 3]`` float32, ``segmentation [N, H, W]`` int32,
        ``depth [N, H, W, 1]`` float32, ``normal [N, H, W, 3]`` float32.

    Raises:
        DataError: for the first problem found, naming its path.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; expected {layout}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder not found; expected {layout}")
    counts = {}
    for folder in folders:
        directory = split_dir / folder
        if not directory.is_dir():
            hint = ""
            if folder == "label" and (split_dir / "label_7").is_dir():
                hint = " (MTAN's package has label_7/: rename it to label/)"
            raise DataError(f"{directory}: folder not found{hint}; expected {layout}")
        counts[folder] = _count_indexed_files(directory)
    first = folders[0]
    for folder in folders[1:]:
        if counts[folder] != counts[first]:
            raise DataError(f"{split_dir / folder}: holds {counts[folder]} files but {split_dir / first} holds "
                            f"{counts[first]}; every folder must hold <i>.npy for the same i = 0..N-1")
    count = counts[first]

    # Example 0's image fixes the split's height x width and the output buffers.
    reference = split_dir / first / "0.npy"
    image = _load(reference)
    if image.ndim < 2:
        raise DataError(f"{reference}: image of shape {image.shape}; expected [H, W, 3]")
    spatial = tuple(image.shape[:2])
    trailing = {"image": (3,), "label": (), "depth": (1,), "normal": (3,)}
    dtypes = {"image": np.float32, "label": np.int32, "depth": np.float32, "normal": np.float32}
    out = {folder: np.empty((count, *spatial, *trailing[folder]), dtypes[folder]) for folder in folders}

    def read_example(index: int, preloaded: np.ndarray | None = None) -> None:
        for folder in folders:
            path = split_dir / folder / f"{index}.npy"
            array = preloaded if (preloaded is not None and folder == first) else _load(path)
            _check_spatial(array, path, folder, spatial, reference)
            _check_values(array, path, folder, num_classes)
            out[folder][index] = array.reshape(out[folder].shape[1:])

    read_example(0, image)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        try:
            # map yields in index order, so the error raised is the one of the lowest failing index.
            for _ in pool.map(read_example, range(1, count)):
                pass
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return {FIELD_KEYS[folder]: out[folder] for folder in folders}

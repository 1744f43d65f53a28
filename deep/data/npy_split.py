"""The reader shared by the LibMTL/MTAN ``.npy`` layouts (NYUv2 and Cityscapes): one folder per field, ``<i>.npy``.

``root/{split}/{folder}/<i>.npy`` for i = 0..N-1 in every folder. Each file is validated before it is used, and the
first problem found raises a :class:`~deep.data.errors.DataError` whose one-line message names the file (or the
folder) and says what is allowed. Checks, in order: the root, the split and every folder exist; each folder holds
exactly ``0.npy .. (N-1).npy`` (no gap, no other ``.npy`` name) and all folders hold the same N; then per file: it is
a readable ``.npy`` of integers or floats, of the field's shape and of the split's height x width, finite, and
within the field's range.

Fields (``kind``) and what each one accepts:

* ``image``: ``[H, W, 3]`` in [0, 1] (LibMTL never normalises with ImageNet statistics) -> float32.
* ``label``: ``[H, W]`` integers in -1..C-1 (-1 = ignore); integer-valued floats are accepted, as MTAN stores
  labels as floats -> int32.
* ``depth``: ``[H, W]`` or ``[H, W, 1]``, >= 0 (0 = invalid) -> float32 ``[H, W, 1]``.
* ``normal``: ``[H, W, 3]`` of length at most 1 + :data:`NORMAL_LENGTH_TOLERANCE` (0 = invalid) -> float32. Unit
  length is not required: MTAN rescaled the pre-computed normals, and interpolated unit vectors are shorter than 1
  near creases (LibMTL's metric normalises only the prediction, so that is the data as the benchmark sees it).

Loading runs on a few threads (``np.load`` releases the GIL while it reads); validation is vectorised per file.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from deep.data.errors import DataError

__all__ = ["SPLITS", "FIELD_KEYS", "NORMAL_LENGTH_TOLERANCE", "read_split"]

SPLITS = ("train", "val")
# Folder (as on disk) -> the key of the returned dict, which is also the task name the model and losses use.
FIELD_KEYS = {"image": "images", "label": "segmentation", "depth": "depth", "normal": "normal"}
NORMAL_LENGTH_TOLERANCE = 1e-2
_INDEX_NAME = re.compile(r"(0|[1-9][0-9]*)\.npy")
_READ_THREADS = 4


def _count_indexed_files(directory: Path) -> int:
    """N, after checking that ``directory`` holds exactly ``0.npy .. (N-1).npy`` among its ``.npy`` files."""
    indices = set()
    for entry in os.scandir(directory):
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


def _load(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, ValueError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a readable .npy array ({reason})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive loads as a mapping
        raise DataError(f"{path}: not a single .npy array")
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
            raise DataError(f"{path}: label value {bad:.6g} is out of range; labels must be in -1..{num_classes - 1} "
                            f"({num_classes} classes, -1 = ignore)")
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

"""Cityscapes in LibMTL's ``.npy`` layout, and GTA5 (PNG + ``.npy``) mapped onto Cityscapes' 7 categories.

Both follow ``reference/official_implementation.md`` ("Cityscapes", "GTA5"):

* **Cityscapes** (MTAN/LibMTL's "cityscapes2" package): ``root/{train,val}/{image,label,depth}/<i>.npy``, 2975
  train and 500 val examples at 128x256; 7 classes (flat, construction, object, nature, sky, human, vehicle) with -1
  = void; depth is Cityscapes' *disparity* (inverse depth, about 0-0.49), 0 = invalid; no normals.
* **GTA5**: ``root/images/*.png`` (or ``Images``), ``root/labels/<same name>.png`` (or ``Labels``) of Cityscapes
  labelIds, ``root/depth/<stem>.npy`` (0-255). Images are resized with PIL's bilinear filter (antialiased, as the
  authors' ``PIL.Image.resize``), labels with PIL's nearest rule, then mapped to the 7 categories by
  :data:`GTA5_LABEL_MAP`; depth is divided by 255.

Two deliberate departures from the authors' GTA5 loader, both documented in :func:`load_gta5`: depth is resized by
nearest neighbour (theirs is bilinear, which blends invalid zeros into valid neighbours), and a missing depth file
is an error unless ``allow_missing_depth=True`` (theirs silently substitutes zeros).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deep.data.errors import DataError
from deep.data.npy_split import os_error, read_npy, read_split
from deep.data.resample import pil_nearest_indices, pil_resize

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_CLASS_NAMES", "GTA5_LABEL_MAP", "load_cityscapes", "load_gta5",
           "labelids_to_categories"]

CITYSCAPES_CLASSES = 7
CITYSCAPES_CLASS_NAMES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
_LAYOUT = "root/{train,val}/{image,label,depth}/<i>.npy (LibMTL's Cityscapes layout)"

# Cityscapes labelId -> 7-category index, the table of the authors' GTA5 loader; every other id is void (-1).
_CATEGORY_IDS = {0: (7, 8), 1: (11, 12, 13), 2: (17, 19, 20), 3: (21, 22), 4: (23,), 5: (24, 25),
                 6: (26, 27, 28, 31, 32, 33)}
GTA5_LABEL_MAP = np.full(256, -1, np.int32)
for _category, _ids in _CATEGORY_IDS.items():
    GTA5_LABEL_MAP[list(_ids)] = _category
GTA5_LABEL_MAP.setflags(write=False)
del _category, _ids


def load_cityscapes(root: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Reads one split of LibMTL's Cityscapes and validates every file.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.

    Returns:
        ``images [N, H, W, 3]`` float32 in [0, 1]; ``segmentation [N, H, W]`` int32 in -1..6 (-1 = ignore);
        ``depth [N, H, W, 1]`` float32 disparity (0 = invalid).

    Raises:
        DataError: one line naming the first offending folder or file (the checks of :func:`load_nyuv2`, with
            labels in -1..6 and no ``normal`` folder).
    """
    return read_split(root, split, ("image", "label", "depth"), CITYSCAPES_CLASSES, _LAYOUT)


def labelids_to_categories(label_ids: np.ndarray) -> np.ndarray:
    """Maps Cityscapes labelIds (any integer array) to the 7 categories, int32 with -1 for every other id."""
    label_ids = np.asarray(label_ids)
    inside = (label_ids >= 0) & (label_ids < GTA5_LABEL_MAP.size)
    return np.where(inside, GTA5_LABEL_MAP[np.clip(label_ids, 0, GTA5_LABEL_MAP.size - 1)], -1).astype(np.int32)


def _subfolder(root: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root / names[0]}: folder not found (nor {', '.join(names[1:])}); expected root/images/*.png, "
                    f"root/labels/<same name>.png and root/depth/<stem>.npy (the GTA5 layout)")


def _open_png(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise os_error(path, error, "a PNG image") from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a readable image ({reason})") from None
    return image


def _read_depth(path: Path) -> np.ndarray:
    depth = read_npy(path)
    if depth.dtype.kind not in "iuf":
        raise DataError(f"{path}: depth must be a numeric .npy array; got {depth.dtype}")
    if not (depth.ndim == 2 or (depth.ndim == 3 and depth.shape[2] == 1)):
        raise DataError(f"{path}: depth of shape {depth.shape}; expected [H, W] or [H, W, 1]")
    if depth.size == 0:
        raise DataError(f"{path}: empty depth of shape {depth.shape}; expected [H, W] or [H, W, 1] with H, W >= 1")
    if depth.dtype.kind == "f" and not np.isfinite(depth).all():
        raise DataError(f"{path}: holds NaN or infinite values; every value must be finite")
    if depth.min() < 0:
        raise DataError(f"{path}: depth value {depth.min():.4g} is negative; depth must be >= 0 (0 = invalid)")
    return depth.reshape(depth.shape[:2])


def load_gta5(root: str | os.PathLike, size: tuple[int, int] = (128, 256),
              allow_missing_depth: bool = False) -> dict[str, np.ndarray]:
    """Reads a GTA5 folder (one split), resized to ``size`` and mapped to Cityscapes' 7 categories.

    Examples are the PNGs of ``images/`` in name order. The image is converted to RGB and resized with PIL's
    antialiased bilinear filter; the labelId PNG (single-channel, mode ``L``, ``P`` or ``I``) is resized with PIL's
    nearest rule and mapped with :data:`GTA5_LABEL_MAP`; the depth ``.npy`` (any resolution, 0-255) is divided by
    255 and resized by nearest neighbour, so invalid zeros are never blended into valid depth (the authors resize
    bilinearly).

    Args:
        root: the folder holding ``images/``, ``labels/`` and ``depth/``.
        size: ``(height, width)`` of the returned arrays; the authors' 128x256.
        allow_missing_depth: the authors' loader silently uses zeros for a missing depth file. Here a missing file
            is an error unless this is True, in which case that example's depth is all 0, which every depth loss
            and metric treats as invalid (the example still trains segmentation).

    Returns:
        ``images [N, h, w, 3]`` float32 in [0, 1]; ``segmentation [N, h, w]`` int32 in -1..6; ``depth [N, h, w, 1]``
        float32 (0 = invalid).

    Raises:
        DataError: one line naming the first offending folder or file.
    """
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise DataError(f"size must be two positive integers (height, width); got {size!r}")
    height, width = int(size[0]), int(size[1])
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; expected root/images/*.png, root/labels/<same name>.png and "
                        f"root/depth/<stem>.npy (the GTA5 layout)")
    image_dir = _subfolder(root, ("images", "Images"))
    label_dir = _subfolder(root, ("labels", "Labels"))
    depth_dir = root / "depth"
    if not depth_dir.is_dir() and not allow_missing_depth:
        raise DataError(f"{depth_dir}: folder not found; expected root/depth/<stem>.npy (or pass "
                        f"allow_missing_depth=True to train without depth)")
    try:
        names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() == ".png")
    except OSError as error:
        raise os_error(image_dir, error, "a folder of .png images") from None
    if not names:
        raise DataError(f"{image_dir}: no .png images")

    out = {"images": np.empty((len(names), height, width, 3), np.float32),
           "segmentation": np.empty((len(names), height, width), np.int32),
           "depth": np.zeros((len(names), height, width, 1), np.float32)}
    for index, name in enumerate(names):
        image = _open_png(image_dir / name).convert("RGB")
        out["images"][index] = np.clip(pil_resize(np.asarray(image, np.float32) / 255.0, (height, width)), 0, 1)

        label_path = label_dir / name
        label = _open_png(label_path)
        if label.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{label_path}: label image of mode {label.mode}; expected single-channel Cityscapes "
                            f"labelIds (mode L, P or I)")
        label = np.asarray(label)
        rows, columns = pil_nearest_indices(label.shape[0], height), pil_nearest_indices(label.shape[1], width)
        out["segmentation"][index] = labelids_to_categories(label[rows][:, columns])

        depth_path = depth_dir / f"{Path(name).stem}.npy"
        if not depth_path.exists():  # a folder or an unreadable file is reported by _read_depth
            if allow_missing_depth:
                continue  # stays all-zero: invalid everywhere
            raise DataError(f"{depth_path}: missing depth file (pass allow_missing_depth=True to use invalid depth "
                            f"for such examples)")
        depth = _read_depth(depth_path) / 255.0
        rows, columns = pil_nearest_indices(depth.shape[0], height), pil_nearest_indices(depth.shape[1], width)
        out["depth"][index, ..., 0] = depth[rows][:, columns]
    return out

"""NYUv2 in the layout LibMTL and MTAN use (``reference/ecosystem.md`` §1.3).

``root/{train,val}/{image,label,depth,normal}/<i>.npy`` with i = 0..N-1: 795 train and 654 val examples at
288x384. "val" is the standard NYUv2 *test* split (LibMTL has no separate validation split).
"""

from __future__ import annotations

import os

import numpy as np

from deep.data.npy_split import read_split

__all__ = ["NYUV2_CLASSES", "NYUV2_CLASS_NAMES", "load_nyuv2"]

NYUV2_CLASSES = 13
# The 13-class mapping of MTAN's package (SceneNet / nyuv2-meta-data order); label -1 is void.
NYUV2_CLASS_NAMES = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
                     "tv", "wall", "window")
_LAYOUT = "root/{train,val}/{image,label,depth,normal}/<i>.npy (the LibMTL/MTAN NYUv2 layout)"


def load_nyuv2(root: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Reads one NYUv2 split and validates every file.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.

    Returns:
        ``images [N, H, W, 3]`` float32 in [0, 1]; ``segmentation [N, H, W]`` int32 in -1..12 (-1 = ignore);
        ``depth [N, H, W, 1]`` float32 metres (0 = invalid); ``normal [N, H, W, 3]`` float32 unit vectors (all-zero
        = invalid).

    Raises:
        DataError: one line naming the first offending folder or file: a missing folder or file, gaps in the
            numbering, folders of different sizes, a file that is not a complete .npy array (text, empty,
            truncated, a folder, unreadable, a pickle or a pickled object array), an empty array, a wrong shape
            or height x width, a non-numeric dtype, NaN or infinite values, labels outside -1..12 or not
            integer-valued, images outside [0, 1], negative depth, normals longer than 1.01.
    """
    return read_split(root, split, ("image", "label", "depth", "normal"), NYUV2_CLASSES, _LAYOUT)

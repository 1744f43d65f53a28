r"""The paper's Colored-Cityscapes stress test (its Appendix I, Table 11): a colour shortcut built into the source
domain and broken in the target.

In the source domain every pixel of a class takes that class's fixed artificial colour, so colour alone tells the
class; the target domain is the same images, labels and depths with the class-colour mapping permuted. A model that
learned the shortcut reads the permuted colours as the wrong classes; one whose predictions rest on the scene's
layout does not. The paper evaluates on Cityscapes' 7 categories: the source metrics on the val split in the source
colours, the target metrics on the same split in the permuted ones.

The paper gives neither the colours nor the recolouring rule; this module's are a choice, stated here. A pixel of
class :math:`c` becomes its luma (the grey of PIL's and torchvision's ``rgb_to_grayscale``) times the class colour,
blended with the original pixel by the shortcut's strength :math:`s \in [0, 1]`:

.. math::
    x' = (1 - s)\, x + s\, \mathrm{luma}(x)\, \mathrm{colour}_c

so the shading and texture (the depth cues) stay and only the hue and saturation are replaced: at :math:`s = 1` the
colour is a perfect cue in the source domain. Pixels without a class (label −1) are blended towards their grey, with
no colour cue. The target palette gives each class the colour of the next one (:data:`TARGET_PERMUTATION`, a cyclic
shift): no class keeps its own colour, and every colour still appears.
"""

from __future__ import annotations

import numpy as np

from deep.data.cityscapes import CITYSCAPES_CLASSES
from deep.data.color import GRAY_WEIGHTS

__all__ = ["SOURCE_PALETTE", "TARGET_PERMUTATION", "target_palette", "recolor", "colored_cityscapes"]

# flat, construction, object, nature, sky, human, vehicle: seven saturated colours far apart in hue.
SOURCE_PALETTE = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
                           [0.0, 1.0, 1.0], [1.0, 0.5, 0.0]], np.float32)
# Class c takes the source colour of class c + 1 (mod 7) in the target domain.
TARGET_PERMUTATION = tuple((c + 1) % CITYSCAPES_CLASSES for c in range(CITYSCAPES_CLASSES))


def target_palette(palette: np.ndarray = SOURCE_PALETTE,
                   permutation: tuple[int, ...] = TARGET_PERMUTATION) -> np.ndarray:
    """The target domain's palette: class ``c`` gets ``palette[permutation[c]]``."""
    if sorted(permutation) != list(range(len(palette))):
        raise ValueError(f"the permutation must reorder the classes 0..{len(palette) - 1}; got {permutation}")
    return np.asarray(palette)[list(permutation)]


def recolor(images: np.ndarray, segmentation: np.ndarray, palette: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """``images [N, H, W, 3]`` in [0, 1] recoloured by their ``segmentation [N, H, W]`` (−1 = no class) with
    ``palette [C, 3]``: each pixel's luma times its class's colour, blended with the pixel by ``strength``
    (0: the images unchanged; 1: the colour is the class's alone). float32, in [0, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"the shortcut's strength must lie in [0, 1]; got {strength}")
    images = np.asarray(images, np.float32)
    segmentation = np.asarray(segmentation)
    if images.shape[:-1] != segmentation.shape or images.shape[-1] != 3:
        raise ValueError(f"images [N, H, W, 3] and segmentation [N, H, W] must match; got {images.shape} and "
                         f"{segmentation.shape}")
    if segmentation.size and (segmentation.min() < -1 or segmentation.max() >= len(palette)):
        raise ValueError(f"segmentation labels must lie in -1..{len(palette) - 1}; got {segmentation.min()}.."
                         f"{segmentation.max()}")
    # Grey (1, 1, 1) for the pixels without a class (index -1: the last row), the class colour elsewhere.
    colours = np.concatenate([np.asarray(palette, np.float32), np.ones((1, 3), np.float32)])
    weights = np.asarray(GRAY_WEIGHTS, np.float32)
    out = np.empty_like(images)
    for start in range(0, len(images), 64):  # a few images at a time: Cityscapes' train split is 1.2 GB as float32
        chunk = images[start:start + 64]
        recolored = (chunk @ weights)[..., None] * colours[segmentation[start:start + 64]]
        out[start:start + 64] = np.clip((1.0 - strength) * chunk + strength * recolored, 0.0, 1.0)
    return out


def colored_cityscapes(train: dict, val: dict, strength: float = 1.0,
                       permutation: tuple[int, ...] = TARGET_PERMUTATION) -> tuple[dict, dict, dict]:
    """``(source_train, target_val, source_val)`` from Cityscapes' ``train`` and ``val`` splits (``images``,
    ``segmentation``, ``depth``): the training split and the source metrics' split in :data:`SOURCE_PALETTE`, the
    target's in the permuted palette. Labels and depths are the originals."""
    def colored(split, palette):
        return {**split, "images": recolor(split["images"], split["segmentation"], palette, strength)}

    return (colored(train, SOURCE_PALETTE), colored(val, target_palette(SOURCE_PALETTE, permutation)),
            colored(val, SOURCE_PALETTE))

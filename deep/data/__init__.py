"""Data: readers of the benchmark layouts, augmentations, Cityscapes-C style corruptions, batching, generated sets.

* :func:`load_nyuv2`, :func:`load_cityscapes`, :func:`load_gta5`: validated readers returning
  ``{"images", "segmentation", "depth"[, "normal"]}`` numpy arrays (the I/O edge); bad data raises
  :class:`DataError` with a one-line message naming the file.
* :func:`load_celeba`: CelebA's Align&Cropped release as ``{"images" (uint8), "attributes" (0/1)}``, the attributes
  chosen by :func:`resolve_attributes` among :data:`CELEBA_ATTRIBUTES`, one of :data:`CELEBA_SPLITS`.
* :func:`augment` with :class:`AugmentConfig`: the authors' NYUv2 training augmentations, jittable, per example.
* :func:`corrupt` over :data:`CORRUPTIONS`: ImageNet-C definitions, severities 1..5 (:data:`PAPER_CORRUPTIONS`:
  the four the paper reports).
* :mod:`deep.data.colored`: the Colored-Cityscapes stress test (one colour per class in the source domain, the
  colours permuted in the target).
* :class:`Loader`: batches in an order fixed by ``(seed, epoch)``, on the host or on the device.
* :func:`write_nyuv2`, :func:`write_cityscapes`, :func:`write_gta5`, :func:`write_celeba` (and :func:`nyuv2_arrays`,
  :func:`cityscapes_arrays`, :func:`celeba_arrays` in memory): small generated sets that a model can fit, for tests
  and smoke runs.
"""

from deep.data.augmentation import AugmentConfig, augment, color_jitter, hflip, random_scale_crop
from deep.data.celeba import CELEBA_ATTRIBUTES, CELEBA_SPLITS, load_celeba, resolve_attributes
from deep.data.cityscapes import GTA5_LABEL_MAP, load_cityscapes, load_gta5
from deep.data.corruptions import CORRUPTIONS, PAPER_CORRUPTIONS, corrupt
from deep.data.errors import DataError
from deep.data.loader import Loader
from deep.data.nyuv2 import NYUV2_CLASS_NAMES, load_nyuv2
from deep.data.synthetic import (celeba_arrays, cityscapes_arrays, nyuv2_arrays, write_celeba, write_cityscapes,
                                 write_gta5, write_nyuv2)

__all__ = ["load_nyuv2", "load_cityscapes", "load_gta5", "DataError", "AugmentConfig", "augment", "hflip",
           "random_scale_crop", "color_jitter", "corrupt", "CORRUPTIONS", "PAPER_CORRUPTIONS", "Loader", "write_nyuv2",
           "write_cityscapes", "write_gta5", "nyuv2_arrays", "cityscapes_arrays", "GTA5_LABEL_MAP",
           "NYUV2_CLASS_NAMES", "load_celeba", "resolve_attributes", "CELEBA_ATTRIBUTES", "CELEBA_SPLITS",
           "write_celeba", "celeba_arrays"]

r"""Small generated data sets in each on-disk layout, for tests and smoke runs, that a model can actually fit.

Every example is a piecewise-planar scene ray-cast from a pinhole camera, so the tasks agree with each other the
way real ones do: each pixel sees one planar face of a box, whose **class** gives the label and the albedo
(a per-class colour with a small per-instance and per-pixel variation), whose **plane** gives the depth (the
distance along the optical axis, as NYUv2's) and whose orientation gives the **normal** (in the camera frame:
x right, y up, z towards the viewer, so visible faces have :math:`n_z > 0` when facing the camera). The image is
rendered with the hard-grounding model of :mod:`deep.shading`: albedo times Lambertian shading under second-order
spherical-harmonic lighting (an ambient term plus one directional light, slightly tinted),

.. math:: I = \mathrm{clip}(A \odot \max(0, L\,Y(\mathbf n)), 0, 1),

and a couple of pixels per example are marked invalid (label -1, depth 0, normal 0), as real sensors leave holes.

* NYUv2 (:func:`write_nyuv2`): a room (floor, ceiling, walls) with furniture boxes and pictures, windows or a TV
  on the back wall; 13 classes with NYUv2's names; depth in metres.
* Cityscapes (:func:`write_cityscapes`): a street (road, sidewalks, building blocks, trees, poles, people, cars);
  7 categories; depth is disparity :math:`1/z` (m^-1), 0 (invalid) for the sky.
* GTA5 (:func:`write_gta5`): the street scenes as PNGs of Cityscapes labelIds plus 0-255 depth ``.npy``.
* CelebA (:func:`write_celeba`, :func:`celeba_arrays`): not a scene but a card. The 40 attributes, each 1 with
  probability 1/2 independently, are a 5x8 grid of cells in file order (row-major): cell :math:`k` has albedo 0.9
  when attribute :math:`k` is 1 and 0.1 when it is 0, on a background of albedo 0.5. The nuisance, independent of
  the attributes, is the light: a random brightness :math:`b`, channel tint :math:`t_c` and linear gradient
  :math:`(g_u, g_v)`, :math:`I_c = \mathrm{clip}(A\, b\, t_c (1 + g_u u + g_v v) + \epsilon, 0, 1)` with
  :math:`u, v \in [-1, 1]` across the image and mild Gaussian noise :math:`\epsilon`. A cell's pixels are at least
  0.36 when on and at most 0.17 when off (before noise), so every attribute is learnable from a local patch.

Everything is deterministic from ``seed``: example i of a split uses the generator
``numpy.random.default_rng((seed, split, i))``, so a larger set extends a smaller one. Each writer writes a new
set: it refuses a folder that already holds the set's files (the readers would take both sets' files).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from deep.data.celeba import CELEBA_ATTRIBUTES, CELEBA_SPLITS, resolve_attributes
from deep.shading import NUM_SH, SH_C0, SH_C1, lambertian_shading
from scm.linear_gaussian import check_count

__all__ = ["nyuv2_arrays", "cityscapes_arrays", "celeba_arrays", "write_nyuv2", "write_cityscapes", "write_gta5",
           "write_celeba"]

# Base albedo per NYUv2 class (bed, books, ceiling, chair, floor, furniture, objects, picture, sofa, table, tv,
# wall, window): distinct enough that colour alone separates most classes.
_NYUV2_ALBEDO = np.array([[0.80, 0.75, 0.65], [0.70, 0.25, 0.20], [0.92, 0.92, 0.90], [0.55, 0.35, 0.20],
                          [0.45, 0.32, 0.22], [0.60, 0.45, 0.30], [0.30, 0.55, 0.60], [0.85, 0.65, 0.25],
                          [0.30, 0.35, 0.60], [0.50, 0.40, 0.25], [0.10, 0.10, 0.12], [0.80, 0.78, 0.70],
                          [0.65, 0.80, 0.95]])
# Cityscapes categories: flat, construction, object, nature, sky, human, vehicle.
_CITYSCAPES_ALBEDO = np.array([[0.35, 0.35, 0.37], [0.60, 0.48, 0.40], [0.75, 0.70, 0.20], [0.25, 0.50, 0.20],
                               [0.60, 0.75, 0.95], [0.75, 0.35, 0.35], [0.20, 0.25, 0.65]])
_SKY = 4
# Furniture of the rooms: class -> (width, height, depth) in metres.
_FURNITURE = {0: (1.6, 0.55, 2.0), 3: (0.5, 0.9, 0.5), 5: (1.0, 1.3, 0.5), 8: (1.8, 0.8, 0.9), 9: (1.2, 0.75, 0.8),
              6: (0.35, 0.35, 0.35)}
_WALL_ITEMS = (7, 10, 12)  # picture, tv, window
# Cityscapes labelIds per category (the inverse of deep.data.cityscapes.GTA5_LABEL_MAP) and some void ids.
_LABEL_IDS = ((7, 8), (11, 12, 13), (17, 19, 20), (21, 22), (23,), (24, 25), (26, 27, 28, 31, 32, 33))
_VOID_IDS = (0, 1, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)
# CelebA cards: (rows, columns) of the attribute grid, the span of each block a cell covers (along each axis) and the
# albedo of a cell that is on, a cell that is off and the background.
_CELEBA_GRID = (5, 8)
_CELEBA_CELL_SPAN = (0.2, 0.8)
_CELEBA_ON, _CELEBA_OFF, _CELEBA_BACKGROUND = 0.9, 0.1, 0.5


@dataclasses.dataclass
class _Box:
    low: np.ndarray       # [3] world coordinates
    high: np.ndarray      # [3]
    label: int
    albedo: np.ndarray    # [3]


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation: pitch about x, then yaw about y."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    yaw_matrix = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    pitch_matrix = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return yaw_matrix @ pitch_matrix


def _rays(height: int, width: int, fov_x: float, rotation: np.ndarray) -> np.ndarray:
    """World directions ``[H, W, 3]`` whose camera-frame z component is -1 (so the hit distance t is the depth)."""
    focal = 0.5 * width / math.tan(0.5 * fov_x)
    u = (np.arange(width) + 0.5 - 0.5 * width) / focal
    v = -(np.arange(height) + 0.5 - 0.5 * height) / focal
    camera = np.stack(np.broadcast_arrays(u[None, :], v[:, None], -np.ones((height, width))), axis=-1)
    directions = camera @ rotation.T
    # Keep every component away from 0 so the slab test never divides by zero.
    return np.where(np.abs(directions) < 1e-9, 1e-9, directions)


def _slabs(directions: np.ndarray, box: _Box):
    inverse = 1.0 / directions
    t_low, t_high = box.low * inverse, box.high * inverse
    return np.minimum(t_low, t_high), np.maximum(t_low, t_high)


def _face_normals(directions: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """The world normal of the face crossed along ``axis``, facing the ray: :math:`-\\mathrm{sign}(d_a) e_a`."""
    normals = np.zeros_like(directions)
    component = np.take_along_axis(directions, axis[..., None], axis=-1)
    np.put_along_axis(normals, axis[..., None], -np.sign(component), axis=-1)
    return normals


class _Canvas:
    """A z-buffer of labels, depth, world normals and albedo over the camera's rays."""

    def __init__(self, directions: np.ndarray, background_label: int, background_albedo: np.ndarray):
        shape = directions.shape[:2]
        self.directions = directions
        self.depth = np.full(shape, np.inf)
        self.label = np.full(shape, background_label, np.int32)
        self.normal = np.zeros((*shape, 3))
        self.albedo = np.broadcast_to(background_albedo, (*shape, 3)).copy()

    def _paint(self, hit, distance, axis, labels, albedo):
        closer = hit & (distance < self.depth)
        self.depth = np.where(closer, distance, self.depth)
        self.label = np.where(closer, labels, self.label)
        self.normal = np.where(closer[..., None], _face_normals(self.directions, axis), self.normal)
        self.albedo = np.where(closer[..., None], albedo, self.albedo)

    def solid(self, box: _Box) -> None:
        """A box seen from outside: the ray enters through the face of its last slab entry."""
        t_enter, t_exit = _slabs(self.directions, box)
        near, far = t_enter.max(axis=-1), t_exit.min(axis=-1)
        self._paint((near <= far) & (near > 1e-6), near, t_enter.argmax(axis=-1), box.label, box.albedo)

    def room(self, box: _Box, floor: tuple[int, np.ndarray], ceiling: tuple[int, np.ndarray]) -> None:
        """The inside of a box around the camera: the ray leaves through the face of its first slab exit."""
        _, t_exit = _slabs(self.directions, box)
        axis = t_exit.argmin(axis=-1)
        going_up = self.directions[..., 1] > 0
        vertical = axis == 1
        labels = np.where(vertical, np.where(going_up, ceiling[0], floor[0]), box.label)
        albedo = np.where((vertical & going_up)[..., None], ceiling[1],
                          np.where((vertical & ~going_up)[..., None], floor[1], box.albedo))
        self._paint(np.ones(axis.shape, bool), t_exit.min(axis=-1), axis, labels, albedo)


def _jitter(rng: np.random.Generator, albedo: np.ndarray, amount: float = 0.06) -> np.ndarray:
    return np.clip(albedo + rng.uniform(-amount, amount, 3), 0.02, 0.98)


def _lighting(rng: np.random.Generator) -> np.ndarray:
    """SH coefficients ``[3, 9]`` of :math:`a + k\\,\\langle \\mathbf n, \\mathbf l\\rangle` per channel, >= 0 for
    every unit normal (a >= k)."""
    ambient, strength = rng.uniform(0.5, 0.65), rng.uniform(0.3, 0.45)
    direction = np.array([rng.normal(0, 0.5), 1.0, rng.uniform(0.3, 1.0)])
    direction /= np.linalg.norm(direction)
    tint = 1.0 + rng.uniform(-0.08, 0.08, 3)
    lighting = np.zeros((3, NUM_SH))
    lighting[:, 0] = ambient / SH_C0
    # The SH basis orders the linear terms (y, z, x).
    lighting[:, 1:4] = strength * direction[[1, 2, 0]] / SH_C1
    return lighting * tint[:, None]


def _render(rng: np.random.Generator, canvas: _Canvas, rotation: np.ndarray, lit: np.ndarray):
    """Image ``[H, W, 3]`` and camera-frame normals from the canvas; unlit pixels (``~lit``) show their albedo."""
    normals = canvas.normal @ rotation  # world -> camera: R^T n, written for row vectors
    albedo = np.clip(canvas.albedo + rng.uniform(-0.02, 0.02, canvas.albedo.shape), 0.0, 1.0)
    shading = lambertian_shading(jnp.asarray(normals[None], jnp.float32),
                                 jnp.asarray(_lighting(rng)[None], jnp.float32))[0]
    image = np.where(lit[..., None], albedo * np.asarray(shading, np.float64), albedo)
    return np.clip(image, 0.0, 1.0), normals


def _holes(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two to four pixels with no ground truth."""
    count = int(rng.integers(2, 5))
    flat = rng.choice(shape[0] * shape[1], size=count, replace=False)
    return np.unravel_index(flat, shape)


def _nyuv2_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    rotation = _rotation(rng.uniform(-0.35, 0.35), rng.uniform(-0.25, 0.05))
    canvas = _Canvas(_rays(height, width, math.radians(60), rotation), 11, _NYUV2_ALBEDO[11])
    left, right = -rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)
    floor, ceiling, back = -rng.uniform(1.1, 1.5), rng.uniform(1.0, 1.6), -rng.uniform(3.5, 6.5)
    room = _Box(np.array([left, floor, back]), np.array([right, ceiling, 1.5]), 11, _jitter(rng, _NYUV2_ALBEDO[11]))
    canvas.room(room, (4, _jitter(rng, _NYUV2_ALBEDO[4])), (2, _jitter(rng, _NYUV2_ALBEDO[2])))
    classes = list(_FURNITURE)
    for _ in range(int(rng.integers(2, 6))):
        label = classes[int(rng.integers(len(classes)))]
        size = np.array(_FURNITURE[label]) * rng.uniform(0.8, 1.2, 3)
        x = rng.uniform(left + 0.5 * size[0], right - 0.5 * size[0])
        z = rng.uniform(back + 0.5 * size[2], -1.5)
        low = np.array([x - 0.5 * size[0], floor, z - 0.5 * size[2]])
        canvas.solid(_Box(low, low + size, label, _jitter(rng, _NYUV2_ALBEDO[label])))
        if label in (5, 9) and rng.uniform() < 0.6:  # books on a cupboard or a table
            top = np.array([x - 0.15, floor + size[1], z - 0.1])
            canvas.solid(_Box(top, top + np.array([0.3, 0.25, 0.2]), 1, _jitter(rng, _NYUV2_ALBEDO[1])))
    for _ in range(int(rng.integers(1, 3))):
        label = _WALL_ITEMS[int(rng.integers(len(_WALL_ITEMS)))]
        item_width, item_height = rng.uniform(0.6, 1.4), rng.uniform(0.5, 1.0)
        x, y = rng.uniform(left + 0.8, right - 0.8), rng.uniform(floor + 1.0, ceiling - 0.4)
        low = np.array([x - 0.5 * item_width, y - 0.5 * item_height, back])
        canvas.solid(_Box(low, low + np.array([item_width, item_height, 0.03]), label,
                          _jitter(rng, _NYUV2_ALBEDO[label])))
    image, normals = _render(rng, canvas, rotation, np.ones(canvas.label.shape, bool))
    label, depth = canvas.label.copy(), canvas.depth.copy()
    holes = _holes(rng, label.shape)
    label[holes], depth[holes], normals[holes] = -1, 0.0, 0.0
    return {"images": image.astype(np.float32), "segmentation": label.astype(np.int32),
            "depth": depth[..., None].astype(np.float32), "normal": normals.astype(np.float32)}


def _street_scene(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    rotation = _rotation(rng.uniform(-0.15, 0.15), rng.uniform(-0.08, 0.02))
    canvas = _Canvas(_rays(height, width, math.radians(50), rotation), _SKY,
                     _jitter(rng, _CITYSCAPES_ALBEDO[_SKY], 0.04))
    ground = -rng.uniform(1.2, 1.5)
    canvas.solid(_Box(np.array([-60.0, ground - 1.0, -300.0]), np.array([60.0, ground, 10.0]), 0,
                      _jitter(rng, _CITYSCAPES_ALBEDO[0], 0.03)))
    half_road = rng.uniform(3.5, 6.0)
    for side in (-1, 1):
        kerb = side * half_road
        sidewalk = (min(kerb, kerb + side * 3.0), max(kerb, kerb + side * 3.0))
        canvas.solid(_Box(np.array([sidewalk[0], ground, -300.0]), np.array([sidewalk[1], ground + 0.12, 10.0]), 0,
                          _jitter(rng, _CITYSCAPES_ALBEDO[0] + 0.15, 0.03)))
        facade, z = side * (half_road + 3.0), 12.0
        while z > -150.0:  # a row of buildings of random length and height, with gaps of sky above them
            length = rng.uniform(10.0, 30.0)
            x_range = (facade, facade + side * 15.0)
            canvas.solid(_Box(np.array([min(x_range), ground, z - length]),
                              np.array([max(x_range), ground + rng.uniform(6.0, 22.0), z]), 1,
                              _jitter(rng, _CITYSCAPES_ALBEDO[1], 0.1)))
            z -= length + rng.uniform(0.0, 4.0)
        for _ in range(int(rng.integers(0, 4))):  # trees, poles and people on the sidewalk
            label = (3, 2, 5)[int(rng.integers(3))]
            size = {3: (1.6, 4.0, 1.6), 2: (0.15, 4.5, 0.15), 5: (0.5, 1.75, 0.4)}[label]
            x, z = side * (half_road + rng.uniform(0.5, 2.5)), rng.uniform(-45.0, -5.0)
            low = np.array([x - 0.5 * size[0], ground + 0.12, z])
            canvas.solid(_Box(low, low + np.array(size), label, _jitter(rng, _CITYSCAPES_ALBEDO[label])))
    for _ in range(int(rng.integers(1, 5))):  # cars in the two lanes
        x, z = rng.choice([-0.5, 0.5]) * half_road, rng.uniform(-50.0, -6.0)
        low = np.array([x - 0.9, ground, z - 2.1])
        canvas.solid(_Box(low, low + np.array([1.8, 1.5, 4.2]), 6, _jitter(rng, _CITYSCAPES_ALBEDO[6], 0.15)))
    sky = ~np.isfinite(canvas.depth)
    image, _ = _render(rng, canvas, rotation, ~sky)
    label = canvas.label.copy()
    disparity = np.where(sky, 0.0, 1.0 / np.where(sky, 1.0, canvas.depth))
    holes = _holes(rng, label.shape)
    label[holes], disparity[holes] = -1, 0.0
    return {"images": image.astype(np.float32), "segmentation": label.astype(np.int32),
            "depth": disparity[..., None].astype(np.float32)}


def _check_sizes(**sizes: int) -> tuple[int, ...]:
    return tuple(check_count(name, value, 1) for name, value in sizes.items())


def _generate(scene, count: int, height: int, width: int, seed: int, split: int) -> dict[str, np.ndarray]:
    count, height, width = _check_sizes(count=count, height=height, width=width)
    seed = check_count("seed", seed, 0)
    examples = [scene(np.random.default_rng((seed, split, index)), height, width) for index in range(count)]
    return {name: np.stack([example[name] for example in examples]) for name in examples[0]}


def nyuv2_arrays(count: int, height: int = 288, width: int = 384, seed: int = 0,
                 split: int = 0) -> dict[str, np.ndarray]:
    """``count`` generated NYUv2-like examples in memory, as :func:`deep.data.load_nyuv2` returns them.

    Returns:
        ``images [N, H, W, 3]`` float32 in [0, 1], ``segmentation [N, H, W]`` int32 in -1..12,
        ``depth [N, H, W, 1]`` float32 metres (0 = invalid), ``normal [N, H, W, 3]`` float32 unit or 0.
    """
    return _generate(_nyuv2_scene, count, height, width, seed, split)


def cityscapes_arrays(count: int, height: int = 128, width: int = 256, seed: int = 0,
                      split: int = 0) -> dict[str, np.ndarray]:
    """``count`` generated street scenes in memory, as :func:`deep.data.load_cityscapes` returns them.

    Returns:
        ``images [N, H, W, 3]`` float32, ``segmentation [N, H, W]`` int32 in -1..6, ``depth [N, H, W, 1]`` float32
        disparity (0 = invalid, e.g. the sky).
    """
    return _generate(_street_scene, count, height, width, seed, split)


def _new_set_root(root: str | os.PathLike, entries: Sequence[str]) -> Path:
    """``root`` as a ``Path``, refused if one of the set's ``entries`` (folders or files under it) is there already
    and not an empty folder: the readers take every file they find, so a set written over another would keep the
    other's extra examples beside its own."""
    root = Path(root)
    for entry in entries:
        path = root / entry
        if path.exists() and not (path.is_dir() and not any(path.iterdir())):
            raise FileExistsError(f"{path} already exists: a generated set goes into a new folder (or one without "
                                  f"{', '.join(entries)})")
    return root


def _write_npy_split(directory: Path, arrays: dict[str, np.ndarray], formats: dict[str, tuple[str, object]]) -> None:
    for key, (folder, convert) in formats.items():
        (directory / folder).mkdir(parents=True, exist_ok=True)
        for index, value in enumerate(arrays[key]):
            np.save(directory / folder / f"{index}.npy", convert(value))


def write_nyuv2(root: str | os.PathLike, train: int = 8, val: int = 4, height: int = 32, width: int = 48,
                seed: int = 0) -> Path:
    """Writes a generated NYUv2 set in the LibMTL/MTAN layout under ``root`` and returns ``root``.

    Files as MTAN's: image ``[H, W, 3]`` float32, label ``[H, W]`` float32 (integer-valued, as MTAN stores labels),
    depth ``[H, W, 1]`` float32, normal ``[H, W, 3]`` float32.
    """
    _check_sizes(train=train, val=val)
    root = _new_set_root(root, ("train", "val"))
    formats = {"images": ("image", lambda v: v), "segmentation": ("label", lambda v: v.astype(np.float32)),
               "depth": ("depth", lambda v: v), "normal": ("normal", lambda v: v)}
    for split_index, (split, count) in enumerate((("train", train), ("val", val))):
        _write_npy_split(root / split, nyuv2_arrays(count, height, width, seed, split_index), formats)
    return root


def write_cityscapes(root: str | os.PathLike, train: int = 8, val: int = 4, height: int = 32, width: int = 64,
                     seed: int = 0) -> Path:
    """Writes a generated Cityscapes set in LibMTL's layout under ``root`` and returns ``root``.

    Files: image ``[H, W, 3]`` float32, label ``[H, W]`` int32, depth (disparity) ``[H, W]`` float32.
    """
    _check_sizes(train=train, val=val)
    root = _new_set_root(root, ("train", "val"))
    formats = {"images": ("image", lambda v: v), "segmentation": ("label", lambda v: v),
               "depth": ("depth", lambda v: v[..., 0])}
    for split_index, (split, count) in enumerate((("train", train), ("val", val))):
        _write_npy_split(root / split, cityscapes_arrays(count, height, width, seed, split_index), formats)
    return root


def write_gta5(root: str | os.PathLike, count: int = 4, height: int = 64, width: int = 128, seed: int = 0) -> Path:
    """Writes generated street scenes in the GTA5 layout under ``root`` and returns ``root``.

    ``images/<i:05d>.png`` (RGB), ``labels/<i:05d>.png`` (mode L, Cityscapes labelIds: each category drawn from
    its ids, void pixels from unmapped ids) and ``depth/<i:05d>.npy`` (float32, 255 x disparity).
    """
    from PIL import Image

    (count,) = _check_sizes(count=count)
    seed = check_count("seed", seed, 0)
    root = _new_set_root(root, ("images", "labels", "depth"))
    arrays = cityscapes_arrays(count, height, width, seed, split=2)
    for folder in ("images", "labels", "depth"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng((seed, 3, index))
        category = arrays["segmentation"][index]
        label_ids = np.full(category.shape, _VOID_IDS[int(rng.integers(len(_VOID_IDS)))], np.uint8)
        for value, ids in enumerate(_LABEL_IDS):
            label_ids[category == value] = ids[int(rng.integers(len(ids)))]
        name = f"{index:05d}"
        image = np.round(arrays["images"][index] * 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(label_ids).save(root / "labels" / f"{name}.png")
        np.save(root / "depth" / f"{name}.npy", (255.0 * arrays["depth"][index, ..., 0]).astype(np.float32))
    return root


def _celeba_card(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """One CelebA-like card ``[H, W, 3]`` uint8 and its 40 attributes (see the module's docstring)."""
    attributes = (rng.random(len(CELEBA_ATTRIBUTES)) < 0.5).astype(np.int32)
    brightness, tint, gradient = rng.uniform(0.6, 1.2), 1.0 + rng.uniform(-0.15, 0.15, 3), rng.uniform(-0.1, 0.1, 2)
    rows, columns = _CELEBA_GRID
    # Pixel centres in units of grid blocks: the block index is the integer part, the place inside it the fraction.
    y, x = (np.arange(height) + 0.5) * rows / height, (np.arange(width) + 0.5) * columns / width
    low, high = _CELEBA_CELL_SPAN
    in_cell = ((y % 1 >= low) & (y % 1 < high))[:, None] & ((x % 1 >= low) & (x % 1 < high))[None, :]
    cell = np.floor(y).astype(np.int64)[:, None] * columns + np.floor(x).astype(np.int64)[None, :]
    albedo = np.where(in_cell, np.where(attributes[cell] == 1, _CELEBA_ON, _CELEBA_OFF), _CELEBA_BACKGROUND)
    u, v = 2.0 * x / columns - 1.0, 2.0 * y / rows - 1.0
    light = brightness * (1.0 + gradient[0] * u[None, :] + gradient[1] * v[:, None])
    image = albedo[..., None] * light[..., None] * tint + rng.normal(0.0, 0.02, (height, width, 3))
    return {"images": np.round(255.0 * np.clip(image, 0.0, 1.0)).astype(np.uint8), "attributes": attributes}


def celeba_arrays(count: int, height: int = 128, width: int = 128, attributes: int | Sequence[str] | None = 40,
                  seed: int = 0, split: int = 0) -> dict[str, np.ndarray]:
    """``count`` generated CelebA-like cards in memory, as :func:`deep.data.load_celeba` returns them.

    Args:
        attributes: the selection of :func:`deep.data.resolve_attributes` (None or 40 = all, T = the first T, or
            names); every card still shows all 40 cells, as a real face shows all its attributes.
        split: 0, 1, 2 for the cards :func:`write_celeba` writes as train, val, test (before JPEG and resizing).

    Returns:
        ``images [N, H, W, 3]`` uint8; ``attributes [N, T]`` int32 in {0, 1}.
    """
    columns = [CELEBA_ATTRIBUTES.index(name) for name in resolve_attributes(attributes)]
    arrays = _generate(_celeba_card, count, height, width, seed, split)
    return {"images": arrays["images"], "attributes": arrays["attributes"][:, columns]}


def write_celeba(root: str | os.PathLike, train: int = 8, val: int = 4, test: int = 4, height: int = 218,
                 width: int = 178, seed: int = 0, nested: bool = False, quality: int = 95) -> Path:
    """Writes generated cards in CelebA's Align&Cropped layout under ``root`` and returns ``root``.

    ``img_align_celeba/%06d.jpg`` (``img_align_celeba/img_align_celeba/`` when ``nested``), numbered from 000001
    across train, val and test in that order; ``list_attr_celeba.txt`` formatted as the official file (the count,
    the 40 names, then ``000001.jpg -1  1  1 -1 ...``: each value right-aligned in 2 characters) and
    ``list_eval_partition.txt`` (``000001.jpg 0``). Split ``s`` holds ``celeba_arrays(n, height, width, seed=seed,
    split=s)``, saved as JPEG at ``quality``.

    Args:
        train, val, test: examples per split, each >= 0 (0 leaves the split empty), at least one in all.
    """
    from PIL import Image

    counts = {"train": train, "val": val, "test": test}
    for name, value in counts.items():
        check_count(name, value, 0)
    if sum(counts.values()) < 1:
        raise ValueError("train + val + test must be at least 1; got 0")
    check_count("quality", quality, 1, 100)
    _check_sizes(height=height, width=width)
    seed = check_count("seed", seed, 0)  # all checked before anything is written
    root = _new_set_root(root, ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"))
    folder = root / "img_align_celeba" / "img_align_celeba" if nested else root / "img_align_celeba"
    folder.mkdir(parents=True, exist_ok=True)
    attribute_lines = [str(sum(counts.values())), " ".join(CELEBA_ATTRIBUTES) + " "]
    partition_lines = []
    for code, split in enumerate(CELEBA_SPLITS):
        if counts[split] == 0:
            continue
        arrays = celeba_arrays(counts[split], height, width, seed=seed, split=code)
        for image, attributes in zip(arrays["images"], arrays["attributes"]):
            name = f"{len(partition_lines) + 1:06d}.jpg"
            Image.fromarray(image).save(folder / name, quality=int(quality))
            attribute_lines.append(f"{name} " + " ".join(f"{2 * value - 1:2d}" for value in attributes))
            partition_lines.append(f"{name} {code}")
    (root / "list_attr_celeba.txt").write_text("\n".join(attribute_lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partition_lines) + "\n")
    return root

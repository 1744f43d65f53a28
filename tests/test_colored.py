"""The Colored-Cityscapes stress test (deep.data.colored): the colour is the class's in the source domain and
another class's in the target, while the labels, depths and shading stay."""

import numpy as np
import pytest

from deep.data import cityscapes_arrays
from deep.data.color import GRAY_WEIGHTS
from deep.data.colored import SOURCE_PALETTE, TARGET_PERMUTATION, colored_cityscapes, recolor, target_palette


@pytest.fixture(scope="module")
def scenes():
    return cityscapes_arrays(count=6, seed=3)


def luma(images):
    return images @ np.asarray(GRAY_WEIGHTS, np.float32)


def test_each_pixel_becomes_its_luma_times_its_class_colour(scenes):
    images, labels = scenes["images"], scenes["segmentation"]
    assert (labels == -1).any() and len(np.unique(labels[labels >= 0])) >= 4  # the check covers unlabelled pixels
    recolored = recolor(images, labels, SOURCE_PALETTE)
    expected = np.where((labels >= 0)[..., None], luma(images)[..., None] * SOURCE_PALETTE[np.maximum(labels, 0)],
                        luma(images)[..., None])  # no class: its grey
    np.testing.assert_allclose(recolored, expected, atol=1e-6)
    assert recolored.dtype == np.float32 and recolored.shape == images.shape
    # The strength blends linearly between the image (0) and its recolouring (1).
    np.testing.assert_array_equal(recolor(images, labels, SOURCE_PALETTE, strength=0.0), images)
    np.testing.assert_allclose(recolor(images, labels, SOURCE_PALETTE, strength=0.25),
                               0.75 * images + 0.25 * recolored, atol=1e-6)


def nearest_colour_class(images, palette):
    """The class whose colour is nearest each pixel's chromaticity (the colour divided by its brightness): the
    shortcut a model could learn."""
    chroma = images / np.maximum(images.max(axis=-1, keepdims=True), 1e-6)
    reference = palette / palette.max(axis=-1, keepdims=True)
    return np.argmin(((chroma[..., None, :] - reference) ** 2).sum(-1), axis=-1)


def test_colour_tells_the_class_in_the_source_and_another_class_in_the_target(scenes):
    source_train, target, source = colored_cityscapes(scenes, scenes)
    labels = scenes["segmentation"]
    visible = (labels >= 0) & (scenes["images"].max(axis=-1) > 0.02)  # a black pixel has no colour
    assert visible.mean() > 0.5
    guessed_source = nearest_colour_class(source["images"], SOURCE_PALETTE)[visible]
    guessed_target = nearest_colour_class(target["images"], SOURCE_PALETTE)[visible]
    assert np.mean(guessed_source == labels[visible]) == 1.0  # a perfect shortcut where it was learned
    assert np.mean(guessed_target == labels[visible]) == 0.0  # wrong everywhere once the colours are permuted
    np.testing.assert_array_equal(guessed_target, np.asarray(TARGET_PERMUTATION)[labels[visible]])
    # Labels, depths and shading are the same in both domains; only the colours differ.
    for split in (source_train, target, source):
        assert split["segmentation"] is scenes["segmentation"] and split["depth"] is scenes["depth"]
    np.testing.assert_array_equal(source_train["images"], source["images"])
    np.testing.assert_array_equal(target["images"][labels == -1], source["images"][labels == -1])  # grey in both
    np.testing.assert_allclose(target["images"].max(-1), source["images"].max(-1), atol=1e-6)  # the same shading


def test_the_target_palette_gives_every_class_another_classs_colour():
    palette = target_palette()
    assert sorted(map(tuple, palette)) == sorted(map(tuple, SOURCE_PALETTE))
    assert not np.any(np.all(palette == SOURCE_PALETTE, axis=-1))
    assert len({tuple(colour) for colour in SOURCE_PALETTE}) == len(SOURCE_PALETTE)


@pytest.mark.parametrize("call, message", [
    (lambda s: recolor(s["images"], s["segmentation"], SOURCE_PALETTE, strength=1.5), "must lie in [0, 1]; got 1.5"),
    (lambda s: recolor(s["images"][:2], s["segmentation"], SOURCE_PALETTE), "must match"),
    (lambda s: recolor(s["images"], s["segmentation"] + 1, SOURCE_PALETTE), "labels must lie in -1..6; got 0..7"),
    (lambda s: target_palette(SOURCE_PALETTE, (0, 0, 1, 2, 3, 4, 5)), "must reorder the classes 0..6"),
    # Seven distinct indices are not enough: they must be the classes 0..6 themselves.
    (lambda s: target_palette(SOURCE_PALETTE, (1, 2, 3, 4, 5, 6, 7)), "must reorder the classes 0..6"),
])
def test_bad_input_is_refused(scenes, call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        call(scenes)


def test_the_target_palette_gives_each_class_the_next_classs_colour():
    """As documented (TARGET_PERMUTATION, a cyclic shift): class c takes the source colour of class c + 1 mod 7."""
    palette = target_palette()
    for c in range(len(SOURCE_PALETTE)):
        np.testing.assert_array_equal(palette[c], SOURCE_PALETTE[(c + 1) % len(SOURCE_PALETTE)])


def test_a_set_larger_than_one_chunk_is_recoloured_image_by_image():
    """recolor works through 64 images at a time: 150 tiny images (three chunks, the last partial) must each be
    their luma times their own classes' colours, as the formula gives them one by one."""
    rng = np.random.default_rng(0)
    images = rng.random((150, 2, 3, 3)).astype(np.float32)
    labels = rng.integers(-1, 7, (150, 2, 3))
    expected = np.where((labels >= 0)[..., None], luma(images)[..., None] * SOURCE_PALETTE[np.maximum(labels, 0)],
                        luma(images)[..., None])
    np.testing.assert_allclose(recolor(images, labels, SOURCE_PALETTE), expected, atol=1e-6)


def test_a_negative_strength_is_refused(scenes):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; got -0.5"):
        recolor(scenes["images"], scenes["segmentation"], SOURCE_PALETTE, strength=-0.5)

"""The data package: readers against the generated layouts and every malformed case, augmentation invariants,
corruption properties, the GTA5 label mapping, the loader's determinism and the generated scenes' coherence.

Shapes are tiny; each compiled function is built once per module (fixtures) or reused through JAX's cache.
"""

import colorsys
import pickle
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, stats

from deep import devices
from deep.data import (CORRUPTIONS, GTA5_LABEL_MAP, AugmentConfig, DataError, Loader, augment, cityscapes_arrays,
                       corrupt, hflip, load_cityscapes, load_gta5, load_nyuv2, nyuv2_arrays, random_scale_crop,
                       write_celeba, write_cityscapes, write_gta5, write_nyuv2)
from deep.data.color import hsv_to_rgb, rgb_to_hsv
from deep.data.corruptions import defocus_kernel, gaussian_kernel, plasma_fractal
from deep.data.resample import pil_nearest_indices, pil_resize
from deep.resize import resize_bilinear

HEIGHT, WIDTH = 8, 12


# ------------------------------------------------------------------------------------------------- readers


@pytest.fixture(scope="module")
def nyuv2_root(tmp_path_factory):
    return write_nyuv2(tmp_path_factory.mktemp("nyuv2"), train=3, val=2, height=HEIGHT, width=WIDTH, seed=3)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"), train=3, val=2, height=HEIGHT, width=2 * WIDTH,
                            seed=4)


def test_nyuv2_reader_round_trips_the_writer(nyuv2_root):
    for split_index, (split, count) in enumerate((("train", 3), ("val", 2))):
        loaded = load_nyuv2(nyuv2_root, split)
        expected = nyuv2_arrays(count, HEIGHT, WIDTH, seed=3, split=split_index)
        assert list(loaded) == ["images", "segmentation", "depth", "normal"]
        for name, value in expected.items():
            assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
            np.testing.assert_array_equal(loaded[name], value)
    assert loaded["images"].dtype == np.float32 and loaded["segmentation"].dtype == np.int32


def test_cityscapes_reader_round_trips_the_writer(cityscapes_root):
    loaded = load_cityscapes(cityscapes_root, "train")
    expected = cityscapes_arrays(3, HEIGHT, 2 * WIDTH, seed=4)
    assert list(loaded) == ["images", "segmentation", "depth"]
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert loaded["depth"].shape == (3, HEIGHT, 2 * WIDTH, 1)  # stored [H, W], returned [H, W, 1]


def _save(path, value):
    np.save(path, value)


def _image(value=0.5, shape=(HEIGHT, WIDTH, 3)):
    return np.full(shape, value, np.float32)


def _corrupt_header(path):
    """Garbage in the header's dictionary, at the file's own length (numpy's parser fails with a TokenError)."""
    data = path.read_bytes()
    path.write_bytes(data[:10] + b"{'descr': ((((" + data[24:])


def _truncate(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _huge_header(path):
    """A valid header declaring 120 GB of float32 data, followed by 100 bytes: must not try to allocate it."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False,
                                                    "shape": (100000, 100000, 3)})
        file.write(bytes(100))


def _cut_2_0_header(path):
    """A format 2.0 file (4-byte header length) cut one byte short of its declared header: read with format 1.0's
    2-byte length field, the header would look complete."""
    with open(path, "wb") as file:
        np.lib.format.write_array(file, np.zeros((HEIGHT, WIDTH), np.int32), version=(2, 0))
    data = path.read_bytes()
    path.write_bytes(data[:12 + int.from_bytes(data[8:12], "little") - 1])


def _number_from_one(folder):
    """Renames 0.npy .. (N-1).npy to 1.npy .. N.npy (a one-based numbering)."""
    for index in sorted((int(path.stem) for path in folder.glob("*.npy")), reverse=True):
        (folder / f"{index}.npy").replace(folder / f"{index + 1}.npy")


def _replace_with_folder(path):
    path.unlink()
    path.mkdir()


# (case, mutation of root/train, the path the message must name relative to root, a phrase it must contain)
MALFORMED = [
    ("missing split", lambda t: shutil.rmtree(t), "train", "split folder not found"),
    ("missing folder", lambda t: shutil.rmtree(t / "normal"), "train/normal", "folder not found"),
    ("missing file", lambda t: (t / "label" / "1.npy").unlink(), "train/label/1.npy", "missing"),
    ("numbered from 1", lambda t: _number_from_one(t / "depth"), "train/depth/0.npy", "numbered 0..N-1 without gaps"),
    ("mismatched count", lambda t: (t / "depth" / "2.npy").unlink(), "train/depth", "holds 2 files"),
    ("bad file name", lambda t: _save(t / "image" / "01.npy", _image()), "train/image/01.npy", "file name"),
    ("bad image shape", lambda t: _save(t / "image" / "1.npy", _image(shape=(HEIGHT, WIDTH, 4))),
     "train/image/1.npy", "expected [H, W, 3]"),
    ("bad label shape", lambda t: _save(t / "label" / "0.npy", np.zeros((HEIGHT, WIDTH, 2))),
     "train/label/0.npy", "expected [H, W]"),
    ("different size", lambda t: _save(t / "depth" / "2.npy", np.ones((HEIGHT, WIDTH + 1, 1))),
     "train/depth/2.npy", f"must be {HEIGHT}x{WIDTH}"),
    ("text dtype", lambda t: _save(t / "label" / "1.npy", np.full((HEIGHT, WIDTH), "a")), "train/label/1.npy",
     "not allowed"),
    ("object dtype", lambda t: np.save(t / "normal" / "1.npy", np.array([{}], dtype=object), allow_pickle=True),
     "train/normal/1.npy", "pickled object array"),
    ("garbage bytes", lambda t: (t / "depth" / "0.npy").write_bytes(b"not numpy"), "train/depth/0.npy",
     "not a valid .npy file"),
    ("text file", lambda t: (t / "label" / "2.npy").write_text("0 1 2\n3 4 5\n"), "train/label/2.npy",
     "not a valid .npy file"),
    ("python pickle", lambda t: (t / "depth" / "1.npy").write_bytes(pickle.dumps(np.zeros((HEIGHT, WIDTH)))),
     "train/depth/1.npy", "a Python pickle, not a .npy file"),
    ("protocol 2 pickle", lambda t: (t / "label" / "1.npy").write_bytes(pickle.dumps(np.zeros(3), protocol=2)),
     "train/label/1.npy", "a Python pickle, not a .npy file"),
    ("empty file", lambda t: (t / "image" / "1.npy").write_bytes(b""), "train/image/1.npy", "empty file (0 bytes)"),
    ("npz archive", lambda t: np.savez(t / "normal" / "2.npz", a=_image()) or (t / "normal" / "2.npz").replace(
        t / "normal" / "2.npy"), "train/normal/2.npy", ".npz archive"),
    ("truncated data", lambda t: _truncate(t / "image" / "2.npy", 200), "train/image/2.npy", "truncated .npy file"),
    ("truncated header", lambda t: _truncate(t / "label" / "1.npy", 30), "train/label/1.npy",
     "truncated .npy file, cut short in its header"),
    ("truncated 2.0 header", lambda t: _cut_2_0_header(t / "label" / "2.npy"), "train/label/2.npy",
     "truncated .npy file, cut short in its header"),
    ("corrupt header", lambda t: _corrupt_header(t / "depth" / "2.npy"), "train/depth/2.npy",
     "header cannot be read"),
    ("huge header", lambda t: _huge_header(t / "depth" / "1.npy"), "train/depth/1.npy", "truncated .npy file"),
    ("folder named .npy", lambda t: _replace_with_folder(t / "normal" / "1.npy"), "train/normal/1.npy",
     "is a folder; expected a .npy file"),
    ("empty image", lambda t: _save(t / "image" / "0.npy", _image(shape=(0, 0, 3))), "train/image/0.npy",
     "empty image of shape (0, 0, 3); expected [H, W, 3] with H, W >= 1"),
    ("empty label", lambda t: _save(t / "label" / "1.npy", np.zeros((0, 0), np.int32)), "train/label/1.npy",
     "empty label of shape (0, 0); expected [H, W] with H, W >= 1"),
    ("empty depth", lambda t: _save(t / "depth" / "2.npy", np.zeros((0, WIDTH, 1), np.float32)), "train/depth/2.npy",
     "empty depth of shape (0, 12, 1)"),
    ("label 13", lambda t: _save(t / "label" / "2.npy", np.full((HEIGHT, WIDTH), 13.0, np.float32)),
     "train/label/2.npy", "-1..12"),
    ("label -2", lambda t: _save(t / "label" / "1.npy", np.full((HEIGHT, WIDTH), -2, np.int64)),
     "train/label/1.npy", "-1..12"),
    # One bad value among valid ones: the message names the value out of range, not the file's maximum.
    ("one label -3", lambda t: _save(t / "label" / "2.npy", np.pad([[-3]], ((0, HEIGHT - 1), (0, WIDTH - 1)),
                                                                   constant_values=5)),
     "train/label/2.npy", "label value -3 is out of range; labels must be in -1..12"),
    ("fractional label", lambda t: _save(t / "label" / "1.npy", np.full((HEIGHT, WIDTH), 2.5)), "train/label/1.npy",
     "not an integer"),
    ("NaN depth", lambda t: _save(t / "depth" / "1.npy", np.full((HEIGHT, WIDTH, 1), np.nan, np.float32)),
     "train/depth/1.npy", "NaN"),
    ("infinite normal", lambda t: _save(t / "normal" / "2.npy", np.full((HEIGHT, WIDTH, 3), np.inf, np.float32)),
     "train/normal/2.npy", "NaN or infinite"),
    ("image above 1", lambda t: _save(t / "image" / "2.npy", _image(1.5)), "train/image/2.npy", "[0, 1]"),
    ("image below 0", lambda t: _save(t / "image" / "1.npy", _image(-0.1)), "train/image/1.npy", "[0, 1]"),
    ("negative depth", lambda t: _save(t / "depth" / "1.npy", -np.ones((HEIGHT, WIDTH))), "train/depth/1.npy",
     ">= 0"),
    ("long normal", lambda t: _save(t / "normal" / "0.npy", np.ones((HEIGHT, WIDTH, 3), np.float32)),
     "train/normal/0.npy", "length"),
    # Just past each edge (test_values_at_the_edges_of_each_range_are_read has the edges themselves): the normal
    # tolerance is 1 %, a depth of -1e-6 is negative; and a depth of three channels or a boolean array is no field's.
    ("normal 2 % long", lambda t: _save(t / "normal" / "1.npy", np.full((HEIGHT, WIDTH, 3), 1.02 / np.sqrt(3),
                                                                        np.float32)), "train/normal/1.npy", "length"),
    ("tiny negative depth", lambda t: _save(t / "depth" / "2.npy", np.full((HEIGHT, WIDTH, 1), -1e-6, np.float32)),
     "train/depth/2.npy", ">= 0"),
    ("depth of three channels", lambda t: _save(t / "depth" / "1.npy", np.ones((HEIGHT, WIDTH, 3), np.float32)),
     "train/depth/1.npy", "expected [H, W] or [H, W, 1]"),
    ("boolean label", lambda t: _save(t / "label" / "2.npy", np.zeros((HEIGHT, WIDTH), bool)), "train/label/2.npy",
     "dtype bool is not allowed"),
]


@pytest.mark.parametrize("case, mutate, where, phrase", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_each_malformed_case_is_one_clear_line_naming_the_path(nyuv2_root, tmp_path, case, mutate, where, phrase):
    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    mutate(root / "train")
    with pytest.raises(DataError) as raised:
        load_nyuv2(root, "train")
    message = str(raised.value)
    assert "\n" not in message
    assert str(root / where) in message, message
    assert phrase in message, message
    assert isinstance(raised.value, ValueError)


def test_values_at_the_edges_of_each_range_are_read(nyuv2_root, tmp_path):
    """The documented ranges include their edges: image values exactly 0 and 1, depth exactly 0 (invalid) and a
    normal 1 % longer than a unit vector (MTAN's normals are rescaled, not exactly unit) are read, unchanged."""
    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    image = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    image[:, : WIDTH // 2] = 1.0
    normal = np.full((HEIGHT, WIDTH, 3), 1.01 / np.sqrt(3), np.float32)
    assert np.linalg.norm(normal[0, 0].astype(np.float64)) <= 1.01  # within the tolerance after float32 rounding
    edges = {"image": image, "depth": np.zeros((HEIGHT, WIDTH, 1), np.float32), "normal": normal}
    for folder, value in edges.items():
        _save(root / "train" / folder / "1.npy", value)
    loaded = load_nyuv2(root, "train")
    for key, value in zip(("images", "depth", "normal"), edges.values()):
        np.testing.assert_array_equal(loaded[key][1], value)


def test_the_class_names_are_in_label_order():
    """Label c is NYUV2_CLASS_NAMES[c]: nyuv2-meta-data's 13-class mapping (its ids 1..13, MTAN's 0..12), an
    alphabetical list; and the synthetic rooms draw their floor as label 4, ceiling as 2 and walls as 11."""
    from deep.data import NYUV2_CLASS_NAMES

    assert len(NYUV2_CLASS_NAMES) == 13 and list(NYUV2_CLASS_NAMES) == sorted(NYUV2_CLASS_NAMES)
    assert (NYUV2_CLASS_NAMES[2], NYUV2_CLASS_NAMES[4], NYUV2_CLASS_NAMES[11]) == ("ceiling", "floor", "wall")


def test_a_text_file_is_not_reported_as_pickled_data(nyuv2_root, tmp_path):
    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    (root / "train" / "image" / "2.npy").write_text("this is not an array\n")
    with pytest.raises(DataError) as raised:
        load_nyuv2(root, "train")
    message = str(raised.value)
    assert message.startswith(f"{root / 'train' / 'image' / '2.npy'}: not a valid .npy file"), message
    assert "pickle" not in message and "allow_pickle" not in message, message


def test_an_unreadable_file_is_one_line_naming_it(nyuv2_root, tmp_path, monkeypatch):
    # chmod 000 does not stop root, so the refusal is simulated where the reader opens the file.
    import builtins

    import deep.data.npy_split as npy_split

    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    locked = root / "train" / "depth" / "1.npy"

    def open_(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(npy_split, "open", open_, raising=False)
    with pytest.raises(DataError) as raised:
        load_nyuv2(root, "train")
    message = str(raised.value)
    assert message.startswith(f"{locked}: cannot be read (permission denied)"), message
    assert "\n" not in message and "Errno" not in message, message


def test_missing_root_and_unknown_split(tmp_path, nyuv2_root):
    with pytest.raises(DataError, match="data folder not found"):
        load_nyuv2(tmp_path / "absent", "train")
    with pytest.raises(DataError, match="split must be one of train, val"):
        load_nyuv2(nyuv2_root, "test")


def test_cityscapes_label_range_and_the_mtan_folder_hint(cityscapes_root, tmp_path):
    root = tmp_path / "cityscapes"
    shutil.copytree(cityscapes_root, root)
    np.save(root / "train" / "label" / "1.npy", np.full((HEIGHT, 2 * WIDTH), 7, np.int32))
    with pytest.raises(DataError, match=r"label/1.npy: label value 7 is out of range; labels must be in -1..6 "
                                        r"\(7 classes, -1 = ignore\)$"):
        load_cityscapes(root, "train")
    np.save(root / "train" / "label" / "1.npy", np.full((HEIGHT, 2 * WIDTH), 255, np.int32))
    with pytest.raises(DataError, match=r"label value 255 is out of range; .* -1 = ignore\); 255 is a common 'no "
                                        r"label' value elsewhere: map it to -1$"):
        load_cityscapes(root, "train")
    (root / "val" / "label").rename(root / "val" / "label_7")
    with pytest.raises(DataError, match="rename it to label"):
        load_cityscapes(root, "val")


# -------------------------------------------------------------------------------------------------- GTA5


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_gta5_label_mapping_on_a_hand_made_png(tmp_path):
    label_ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    _write_png(tmp_path / "images" / "a.png", image)
    _write_png(tmp_path / "labels" / "a.png", label_ids)
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth" / "a.npy", np.full((16, 16), 51.0, np.float32))
    loaded = load_gta5(tmp_path, size=(16, 16))
    expected = {7: 0, 8: 0, 11: 1, 12: 1, 13: 1, 17: 2, 19: 2, 20: 2, 21: 3, 22: 3, 23: 4, 24: 5, 25: 5, 26: 6, 27: 6,
                28: 6, 31: 6, 32: 6, 33: 6}
    mapped = loaded["segmentation"][0].ravel()
    for label_id in range(256):
        assert mapped[label_id] == expected.get(label_id, -1), label_id
    np.testing.assert_array_equal(GTA5_LABEL_MAP[label_ids], loaded["segmentation"][0])
    np.testing.assert_allclose(loaded["images"][0], image / 255.0, atol=1e-6)
    np.testing.assert_allclose(loaded["depth"][0], 0.2)
    assert {k: v.dtype for k, v in loaded.items()} == {"images": np.float32, "segmentation": np.int32,
                                                       "depth": np.float32}


def test_gta5_resizing_follows_pil_and_missing_files_are_errors(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 50, 3)).astype(np.uint8)
    label_ids = rng.integers(0, 40, (30, 50)).astype(np.uint8)
    _write_png(tmp_path / "Images" / "x.png", image)
    _write_png(tmp_path / "Labels" / "x.png", label_ids)
    (tmp_path / "depth").mkdir()
    with pytest.raises(DataError, match=r"depth/x.npy: missing depth file"):
        load_gta5(tmp_path, size=(8, 16))
    loaded = load_gta5(tmp_path, size=(8, 16), allow_missing_depth=True)
    assert not loaded["depth"].any()
    pil_labels = np.asarray(Image.fromarray(label_ids).resize((16, 8), Image.NEAREST))
    np.testing.assert_array_equal(loaded["segmentation"][0], GTA5_LABEL_MAP[pil_labels])
    channel = np.asarray(Image.fromarray(image[..., 0].astype(np.float32) / 255).resize((16, 8),
                                                                                                  Image.BILINEAR))
    np.testing.assert_allclose(loaded["images"][0, ..., 0], channel, atol=1e-5)
    _write_png(tmp_path / "Labels" / "x.png", np.zeros((30, 50, 3), np.uint8))
    with pytest.raises(DataError, match=r"Labels/x.png: label image of mode RGB"):
        load_gta5(tmp_path, size=(8, 16), allow_missing_depth=True)
    (tmp_path / "Labels" / "x.png").unlink()
    with pytest.raises(DataError, match=r"Labels/x.png: missing"):
        load_gta5(tmp_path, size=(8, 16), allow_missing_depth=True)


@pytest.mark.parametrize("write, phrase", [
    (lambda p: p.write_text("1 2 3\n"), "not a valid .npy file"),
    (lambda p: np.save(p, np.zeros((0, 0), np.float32)), "empty depth of shape (0, 0); expected [H, W] or [H, W, 1]"),
    (lambda p: _truncate(p, 300) if np.save(p, np.zeros((30, 50), np.float32)) is None else None,
     "truncated .npy file: its header declares a float32 array of shape (30, 50)"),
    (lambda p: p.mkdir(), "is a folder; expected a .npy file"),
    (lambda p: np.save(p, np.array([None, 1]), allow_pickle=True), "pickled object array"),
    # Values, as the .npy reader checks them: depth is >= 0 (0 = invalid) and finite.
    (lambda p: np.save(p, np.full((30, 50), -0.5, np.float32)), "depth value -0.5 is negative; depth must be >= 0"),
    (lambda p: np.save(p, np.full((30, 50), np.nan, np.float32)), "holds NaN or infinite values"),
], ids=["text", "empty", "truncated", "folder", "object", "negative", "NaN"])
def test_gta5_malformed_depth_is_one_line_naming_the_file(tmp_path, write, phrase):
    _write_png(tmp_path / "images" / "x.png", np.zeros((30, 50, 3), np.uint8))
    _write_png(tmp_path / "labels" / "x.png", np.zeros((30, 50), np.uint8))
    (tmp_path / "depth").mkdir()
    write(tmp_path / "depth" / "x.npy")
    for allow_missing_depth in (False, True):  # a depth file that is there but bad is never taken for a missing one
        with pytest.raises(DataError) as raised:
            load_gta5(tmp_path, size=(8, 16), allow_missing_depth=allow_missing_depth)
        message = str(raised.value)
        assert message.startswith(f"{tmp_path / 'depth' / 'x.npy'}: "), message
        assert phrase in message and "\n" not in message, message


def test_gta5_writer_round_trip(tmp_path):
    write_gta5(tmp_path, count=2, height=HEIGHT, width=2 * WIDTH, seed=5)
    loaded = load_gta5(tmp_path, size=(HEIGHT, 2 * WIDTH))
    expected = cityscapes_arrays(2, HEIGHT, 2 * WIDTH, seed=5, split=2)
    np.testing.assert_array_equal(loaded["segmentation"], expected["segmentation"])
    np.testing.assert_allclose(loaded["depth"], expected["depth"], atol=1e-6)
    np.testing.assert_allclose(loaded["images"], expected["images"], atol=0.5 / 255 + 1e-6)


def test_pil_resampling_matches_pil_on_awkward_sizes():
    rng = np.random.default_rng(2)
    for size_in, size_out in [((37, 53), (8, 16)), ((8, 16), (37, 53)), ((77, 47), (72, 63))]:
        x = rng.random(size_in).astype(np.float32)
        for kernel, mode in (("bilinear", Image.BILINEAR), ("box", Image.BOX)):
            expected = np.asarray(Image.fromarray(x).resize(size_out[::-1], mode))
            np.testing.assert_allclose(pil_resize(x, size_out, kernel), expected, atol=1e-5)
        labels = rng.integers(0, 255, size_in).astype(np.uint8)
        expected = np.asarray(Image.fromarray(labels).resize(size_out[::-1], Image.NEAREST))
        rows, columns = pil_nearest_indices(size_in[0], size_out[0]), pil_nearest_indices(size_in[1], size_out[1])
        np.testing.assert_array_equal(labels[rows][:, columns], expected)


# ----------------------------------------------------------------------------------------------- augment


@pytest.fixture(scope="module")
def example():
    return {name: jnp.asarray(value[0]) for name, value in nyuv2_arrays(1, HEIGHT, WIDTH, seed=7).items()}


@pytest.fixture(scope="module")
def crop():
    return jax.jit(random_scale_crop, static_argnames="scales")


@pytest.fixture(scope="module")
def augment_nyuv2():
    return jax.jit(lambda key, batch: augment(key, batch, AugmentConfig()))


def test_flip_twice_is_the_identity_and_negates_normal_x(example):
    flipped = hflip(example)
    twice = hflip(flipped)
    for name in example:
        np.testing.assert_array_equal(twice[name], example[name])
    np.testing.assert_array_equal(flipped["images"], example["images"][:, ::-1])
    np.testing.assert_array_equal(flipped["normal"][..., 0], -example["normal"][:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normal"][..., 1:], example["normal"][:, ::-1, 1:])
    # Labels [H, W] and depth [H, W, 1] are mirrored along their columns too, whatever their rank.
    np.testing.assert_array_equal(flipped["segmentation"], example["segmentation"][:, ::-1])
    np.testing.assert_array_equal(flipped["depth"], example["depth"][:, ::-1])
    length = np.linalg.norm(np.asarray(flipped["normal"]), axis=-1)
    valid = np.asarray(example["segmentation"][:, ::-1]) >= 0
    np.testing.assert_allclose(length[valid], 1.0, atol=1e-6)


def test_scale_crop_with_scale_one_is_the_identity(example, crop):
    cropped = crop(jax.random.key(0), example, scales=(1.0,))
    for name in example:
        np.testing.assert_array_equal(cropped[name], example[name])


def _ramp_example():
    """Linear ramps are reproduced exactly by bilinear sampling, so a crop window (and a flip) can be read back from
    the image; labels and depth encode each pixel's (row, column), so the nearest rule can be checked pixel by
    pixel; the normals are other ramps (augmentation does not renormalise them)."""
    rows, columns = np.meshgrid(np.arange(HEIGHT), np.arange(WIDTH), indexing="ij")
    ramp = np.stack([rows / HEIGHT, columns / WIDTH, np.full(rows.shape, 0.5)], -1).astype(np.float32)
    normal = np.stack([0.1 + columns / WIDTH, 0.2 + rows / HEIGHT, (rows + columns) / (HEIGHT + WIDTH)], -1)
    return {"images": jnp.asarray(ramp), "segmentation": jnp.asarray(rows * WIDTH + columns, jnp.int32),
            "depth": jnp.asarray(1.0 + rows * WIDTH + columns, jnp.float32)[..., None],
            "normal": jnp.asarray(normal, jnp.float32)}


def _expected_crop(example, top, left, scale):
    """Crop-then-resize of every field of ``example`` for the window at ``(top, left)``, in numpy and
    ``deep.resize`` (image and normals bilinear with align_corners, labels and depth nearest, depth / scale)."""
    crop_height, crop_width = int(HEIGHT / scale), int(WIDTH / scale)
    expected = {name: resize_bilinear(example[name][None, top:top + crop_height, left:left + crop_width],
                                      (HEIGHT, WIDTH), align_corners=True)[0] for name in ("images", "normal")}
    source_rows = top + np.floor(np.arange(HEIGHT) * crop_height / HEIGHT).astype(int)
    source_columns = left + np.floor(np.arange(WIDTH) * crop_width / WIDTH).astype(int)
    for name in ("segmentation", "depth"):
        expected[name] = np.asarray(example[name])[source_rows[:, None], source_columns[None, :]]
    expected["depth"] = expected["depth"] / scale
    return expected


def test_scale_crop_is_crop_then_resize_with_depth_divided_by_the_scale(crop):
    example = _ramp_example()
    for seed in range(3):
        out = crop(jax.random.key(seed), example, scales=(1.5,))
        top = int(round(float(out["images"][0, 0, 0]) * HEIGHT))
        left = int(round(float(out["images"][0, 0, 1]) * WIDTH))
        expected = _expected_crop(example, top, left, 1.5)
        for name in ("images", "normal"):
            np.testing.assert_allclose(out[name], expected[name], atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(out["segmentation"], expected["segmentation"])
        np.testing.assert_allclose(out["depth"], expected["depth"], rtol=1e-6)
        assert out["depth"].dtype == jnp.float32


def test_a_flip_during_the_crop_mirrors_every_field_and_negates_normal_x():
    """With the scale-crop on, the flip is folded into the crop's sampling (``_scale_crop``): every field must be
    the crop-then-resize of the same window, mirrored together, with the normals' x component negated."""
    example = _ramp_example()
    batch = {name: jnp.stack([value] * 8) for name, value in example.items()}
    config = AugmentConfig(scales=(1.5,), color_jitter=(0, 0, 0, 0))
    out = jax.jit(lambda key, batch_: augment(key, batch_, config))(jax.random.key(4), batch)
    flipped = []
    for index in range(8):
        image = np.asarray(out["images"][index])
        flipped.append(bool(image[0, 0, 1] > image[0, -1, 1]))  # the column ramp runs right to left
        top, left = (int(round(float(image[..., channel].min()) * size)) for channel, size in ((0, HEIGHT),
                                                                                              (1, WIDTH)))
        expected = _expected_crop(example, top, left, 1.5)
        if flipped[-1]:
            expected = {name: value[:, ::-1] for name, value in expected.items()}
            expected["normal"] = expected["normal"] * np.array([-1, 1, 1], np.float32)
        for name in ("images", "normal"):
            np.testing.assert_allclose(out[name][index], expected[name], atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(out["segmentation"][index], expected["segmentation"])
        np.testing.assert_allclose(out["depth"][index], expected["depth"], rtol=1e-6)
    assert any(flipped) and not all(flipped), flipped  # both paths checked (this key flips some of the 8)


def test_a_zoom_multiplies_a_disparity_by_the_scale(example):
    """Cityscapes' depth is a disparity (inverse depth): zooming in by s makes the scene s times closer."""
    batch = {"images": jnp.stack([example["images"]] * 4), "depth": jnp.full((4, HEIGHT, WIDTH, 1), 0.2)}
    config = AugmentConfig(scales=(1.5,), color_jitter=(0, 0, 0, 0), depth_is_disparity=True)
    np.testing.assert_allclose(augment(jax.random.key(0), batch, config)["depth"], 0.2 * 1.5, rtol=1e-6)
    cropped = random_scale_crop(jax.random.key(0), {"images": example["images"], "depth": batch["depth"][0]},
                                (1.2,), depth_is_disparity=True)
    np.testing.assert_allclose(cropped["depth"], 0.2 * 1.2, rtol=1e-6)


def test_augment_keeps_shapes_dtypes_and_label_set_and_is_per_example(example, augment_nyuv2):
    batch = {name: jnp.stack([value] * 4) for name, value in example.items()}
    out = augment_nyuv2(jax.random.key(1), batch)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert set(np.unique(out["segmentation"])) <= set(np.unique(example["segmentation"]))
    assert 0.0 <= float(out["images"].min()) and float(out["images"].max()) <= 1.0
    # Each example's depth values are original values divided by one of the scales (nearest sampling).
    original = np.unique(np.asarray(example["depth"]))
    for depth in np.asarray(out["depth"]):
        assert any(np.abs(depth.reshape(-1, 1) * scale - original).min(axis=1).max() < 1e-5
                   for scale in (1.0, 1.2, 1.5))
    assert not all(np.array_equal(out["images"][0], out["images"][i]) for i in range(1, 4))
    again = augment_nyuv2(jax.random.key(1), batch)
    for name in out:
        np.testing.assert_array_equal(out[name], again[name])


def test_augment_without_normals_flip_only(example):
    batch = {name: jnp.stack([example[name]] * 2) for name in ("images", "segmentation", "depth")}
    config = AugmentConfig(scales=(1.0,), color_jitter=(0, 0, 0, 0))
    out = jax.jit(lambda key, batch_: augment(key, batch_, config))(jax.random.key(2), batch)
    for index in range(2):
        kept = np.array_equal(out["images"][index], batch["images"][index])
        mirrored = np.array_equal(out["images"][index], batch["images"][index][:, ::-1])
        assert kept or mirrored
        expected = batch["depth"][index] if kept else batch["depth"][index][:, ::-1]
        np.testing.assert_array_equal(out["depth"][index], expected)
    with pytest.raises(ValueError, match="batch keys must be images"):
        augment(jax.random.key(2), dict(batch, mask=batch["depth"]), config)


def _jitter_reference(image, factors, hue_shift, order):
    """torchvision's ColorJitter written out sequentially in numpy (colorsys for the hue)."""
    import colorsys

    gray_weights = np.array([0.2989, 0.587, 0.114])
    x = image.astype(np.float64)
    for adjustment in order:
        gray = (x * gray_weights).sum(-1, keepdims=True)
        if adjustment == 0:
            x = np.clip(factors[0] * x, 0, 1)
        elif adjustment == 1:
            x = np.clip(factors[1] * x + (1 - factors[1]) * gray.mean(), 0, 1)
        elif adjustment == 2:
            x = np.clip(factors[2] * x + (1 - factors[2]) * gray, 0, 1)
        else:
            hsv = [colorsys.rgb_to_hsv(*pixel) for pixel in x.reshape(-1, 3)]
            x = np.array([colorsys.hsv_to_rgb((h + hue_shift) % 1.0, s, v) for h, s, v in hsv]).reshape(x.shape)
    return x


# All four on (the default); the hue alone and the blends alone, which _jitter runs by branches of their own; one
# blend alone, with and without the hue; a brightness above 1, whose factors start at 0.
@pytest.mark.parametrize("strengths", [(0.4, 0.4, 0.4, 0.1), (0, 0, 0, 0.1), (0.4, 0.4, 0.4, 0), (0.4, 0, 0, 0),
                                       (0, 0, 0.4, 0.1), (1.5, 0, 0, 0)],
                         ids=["all", "hue", "blends", "brightness", "saturation-hue", "brightness-above-1"])
def test_color_jitter_equals_the_sequential_definition_in_every_order(strengths):
    from deep.data.augmentation import _jitter

    jitter = jax.jit(lambda image, uniforms: _jitter(image, strengths, uniforms))
    rng = np.random.default_rng(8)
    image = rng.random((4, 5, 3)).astype(np.float32)
    blend_strengths = np.array(strengths[:3], np.float64)
    lows = np.maximum(0.0, 1.0 - blend_strengths)  # factors uniform in [max(0, 1 - b), 1 + b]; b = 0 gives 1
    for _ in range(6):
        uniforms = rng.random(8).astype(np.float32)
        factors = lows + (1.0 + blend_strengths - lows) * uniforms[:3].astype(np.float64)
        hue_shift = strengths[3] * (2 * float(uniforms[3]) - 1)  # uniform in [-h, h]
        expected = _jitter_reference(image, factors, hue_shift, np.argsort(uniforms[4:]))
        np.testing.assert_allclose(jitter(image, uniforms), expected, atol=2e-5)


def test_augment_config_validation():
    assert AugmentConfig(scales=[1, 2]).scales == (1.0, 2.0)
    for bad in ({"scales": ()}, {"scales": (0.5,)}, {"color_jitter": (0.1, 0.1)}, {"color_jitter": (0, 0, 0, 0.7)},
                {"color_jitter": (-1, 0, 0, 0)}, {"flip": "yes"}, {"depth_is_disparity": 1}, {"scales": (1.0, np.inf)},
                {"color_jitter": (0.4, np.inf, 0, 0)}):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


def test_hsv_round_trip_and_hue_keeps_value_and_saturation():
    @jax.jit
    def round_trips(rgb):
        hsv = rgb_to_hsv(rgb)
        return hsv, hsv_to_rgb(hsv), rgb_to_hsv(hsv_to_rgb(hsv.at[:, 0].add(0.3)))

    rgb = np.random.default_rng(3).random((64, 3)).astype(np.float32)
    hsv, back, shifted = round_trips(rgb)
    np.testing.assert_allclose(back, rgb, atol=1e-6)
    np.testing.assert_allclose(shifted[:, 1:], hsv[:, 1:], atol=1e-5)


# ------------------------------------------------------------------------------------------- corruptions


@pytest.fixture(scope="module")
def clean_images():
    return jnp.asarray(np.random.default_rng(4).uniform(0.1, 0.9, (8, 16, 24, 3)).astype(np.float32))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_range_monotone_severity_and_determinism(clean_images, name):
    key = jax.random.key(5)
    distances = []
    for severity in range(1, 6):
        corrupted = corrupt(clean_images, name, severity, key)
        assert corrupted.shape == clean_images.shape and corrupted.dtype == jnp.float32
        assert 0.0 <= float(corrupted.min()) and float(corrupted.max()) <= 1.0
        distances.append(float(jnp.mean(jnp.abs(corrupted - clean_images))))
    for severity, (low, high) in enumerate(zip(distances, distances[1:]), start=1):
        if name == "fog" and severity == 3:
            # Fog's severities 3 and 4 share the strength 2.5 and differ only in roughness: in expectation they
            # are equally far from the clean image, so only near-equality holds there.
            assert high >= 0.97 * low, distances
        else:
            assert high > low, distances
    np.testing.assert_array_equal(corrupt(clean_images, name, 3, key), corrupt(clean_images, name, 3, key))


def test_corruption_is_jittable_and_random_ones_follow_the_key(clean_images):
    jitted = jax.jit(corrupt, static_argnames=("name", "severity"))
    key = jax.random.key(6)
    np.testing.assert_allclose(jitted(clean_images, "contrast", 2, key), corrupt(clean_images, "contrast", 2, key),
                               atol=1e-6)
    assert not np.array_equal(corrupt(clean_images, "gaussian_noise", 1, key),
                              corrupt(clean_images, "gaussian_noise", 1, jax.random.key(7)))


def test_corruption_arguments_are_validated(clean_images):
    with pytest.raises(ValueError, match="corruption must be one of gaussian_noise"):
        corrupt(clean_images, "snow", 1, jax.random.key(0))
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
            corrupt(clean_images, "contrast", severity, jax.random.key(0))


# ImageNet-C's parameters by severity 1..5 (Hendrycks & Dietterich, ICLR 2019; its make_imagenet_c.py), as published.
PUBLISHED = {"gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38), "gaussian_blur": (1, 2, 3, 4, 6),
             "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
             "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
             "fog": ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))}


def test_contrast_blends_each_channel_with_its_own_mean(clean_images):
    """(x - m) c + m with m the mean of each channel of each image. Channels and images are given different levels,
    so one mean over the channels, or over the batch, would not match."""
    levels = np.linspace(0.5, 1.0, clean_images.shape[0])[:, None, None, None] * np.array([0.3, 0.6, 1.0])
    images = (np.asarray(clean_images) * levels).astype(np.float32)
    means = images.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    for severity, c in enumerate(PUBLISHED["contrast"], start=1):
        corrupted = corrupt(jnp.asarray(images), "contrast", severity, jax.random.key(0))
        np.testing.assert_allclose(corrupted, np.clip((images - means) * c + means, 0, 1), atol=1e-6)


def test_gaussian_blur_is_scipys_gaussian_filter_with_edge_padding():
    """A Gaussian of std c pixels truncated at 4c, with the borders extended by their edge values (scipy's
    "nearest"). The image is smaller than the largest kernel (radius 24), so the padding repeats beyond it."""
    images = np.random.default_rng(5).random((2, 20, 28, 3))
    for severity, sigma in enumerate(PUBLISHED["gaussian_blur"], start=1):
        expected = ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)
        corrupted = corrupt(jnp.asarray(images, jnp.float32), "gaussian_blur", severity, jax.random.key(0))
        np.testing.assert_allclose(corrupted, expected, atol=1e-5, err_msg=f"severity {severity}")


def _defocus_kernel_reference(radius, alias_blur):
    """ImageNet-C's ``disk``: the aliased disk x^2 + y^2 <= r^2 on the grid -max(8, r)..max(8, r), normalised, then
    OpenCV's ``GaussianBlur`` with std ``alias_blur`` over 3 taps (5 when r > 8) and reflect-101 borders (scipy's
    "mirror"); renormalised, as the module documents."""
    extent = max(8, radius)
    rows, columns = np.mgrid[-extent:extent + 1, -extent:extent + 1]
    disk = (rows**2 + columns**2 <= radius**2).astype(np.float64)
    half = 1 if radius <= 8 else 2
    taps = stats.norm.pdf(np.arange(-half, half + 1), scale=alias_blur)
    smooth = disk / disk.sum()
    for axis in (0, 1):
        smooth = ndimage.correlate1d(smooth, taps / taps.sum(), axis=axis, mode="mirror")
    return smooth / smooth.sum()


def test_defocus_blur_is_the_smoothed_disk_with_reflect_101_borders():
    for radius, alias_blur in PUBLISHED["defocus_blur"]:
        kernel = defocus_kernel(radius, alias_blur)
        assert kernel.shape == (2 * max(8, radius) + 1,) * 2 and kernel.dtype == np.float32
        np.testing.assert_allclose(kernel, _defocus_kernel_reference(radius, alias_blur), atol=1e-7)
        assert abs(float(kernel.sum(dtype=np.float64)) - 1) < 1e-6
    # Severity 1 smooths with a std of 0.1 pixel, which leaves the disk itself: the 29 grid points within radius 3.
    rows, columns = np.mgrid[-8:9, -8:9]
    inside = rows**2 + columns**2 <= 9
    assert inside.sum() == 29
    kernel = defocus_kernel(3, 0.1)
    np.testing.assert_allclose(kernel[inside], 1 / 29, rtol=1e-6)
    assert kernel[~inside].max() < 1e-12
    # The image is filtered with reflect-101 borders (OpenCV's filter2D); 24 x 28 exceeds the largest radius, 10.
    images = np.random.default_rng(6).random((2, 24, 28, 3))
    for severity, (radius, alias_blur) in enumerate(PUBLISHED["defocus_blur"], start=1):
        reference = _defocus_kernel_reference(radius, alias_blur)[None, :, :, None]
        expected = ndimage.correlate(images, reference, mode="mirror")
        corrupted = corrupt(jnp.asarray(images, jnp.float32), "defocus_blur", severity, jax.random.key(0))
        np.testing.assert_allclose(corrupted, expected, atol=1e-5, err_msg=f"severity {severity}")


def test_gaussian_noise_has_the_published_spread_and_is_clipped():
    """x + c eps, clipped, on a grey image of 0.5: a normal of std c censored at 0 and 1, with a = 0.5 / c, puts
    2 Phi(-a) of the values on the bounds and has the variance c^2 (2 Phi(a) - 1 - 2 a phi(a)) + Phi(-a) / 2. Each
    estimate from the 49,152 values must be within 5 of its standard errors (the variance's is under 0.7 % of it,
    while neighbouring severities' variances differ by a factor 1.6 or more; over 300 keys the largest deviation
    was 3.7 of them); the channels' noises must be uncorrelated, as independent draws."""
    grey = jnp.full((2, 64, 128, 3), 0.5, jnp.float32)
    count = grey.size
    for severity, c in enumerate(PUBLISHED["gaussian_noise"], start=1):
        noise = np.asarray(corrupt(grey, "gaussian_noise", severity, jax.random.key(severity)), np.float64) - 0.5
        a = 0.5 / c
        on_bounds = 2 * stats.norm.cdf(-a)
        variance = c**2 * (2 * stats.norm.cdf(a) - 1 - 2 * a * stats.norm.pdf(a)) + on_bounds / 4
        squares = noise**2  # the censored normal is symmetric about 0.5: its mean is known
        assert abs(squares.mean() - variance) < 5 * squares.std() / np.sqrt(count), (severity, squares.mean(), variance)
        clipped = np.mean(np.abs(noise) == 0.5)
        # Plus one value: at severity 1 fewer than one is expected on the bounds, and one may still land there.
        assert abs(clipped - on_bounds) < 5 * np.sqrt(on_bounds * (1 - on_bounds) / count) + 1 / count, (
            severity, clipped, on_bounds)
        channels = noise.reshape(-1, 3).T
        assert abs(np.corrcoef(channels)[0, 1]) < 5 / np.sqrt(count / 3), severity


def test_fog_adds_the_plasma_fractal_and_rescales_by_each_images_peak(clean_images):
    """(x + c P) m / (m + c), with m the image's largest value and P the plasma fractal of roughness d, in [0, 1],
    drawn on the smallest power-of-two square covering the image (32 for 16 x 24) from the image's own key of
    ``split(key, N)`` and cropped. The images are given different peaks, so a peak over the batch would not match."""
    images = np.asarray(clean_images) * np.linspace(0.4, 1.0, clean_images.shape[0])[:, None, None, None]
    images = images.astype(np.float32)
    peaks = images.max(axis=(1, 2, 3), keepdims=True).astype(np.float64)
    height, width = images.shape[1:3]
    key = jax.random.key(9)
    fractal = jax.jit(plasma_fractal, static_argnames="mapsize")
    for severity, (strength, roughness) in enumerate(PUBLISHED["fog"], start=1):
        fractals = np.stack([np.asarray(fractal(image_key, mapsize=32, roughness=roughness))
                             for image_key in jax.random.split(key, images.shape[0])])
        np.testing.assert_allclose(fractals.min(axis=(1, 2)), 0, atol=1e-6)
        np.testing.assert_allclose(fractals.max(axis=(1, 2)), 1, atol=1e-6)
        fog = fractals[:, :height, :width, None]
        expected = np.clip((images + strength * fog) * peaks / (peaks + strength), 0, 1)
        corrupted = corrupt(jnp.asarray(images), "fog", severity, key)
        np.testing.assert_allclose(corrupted, expected, atol=1e-6, err_msg=f"severity {severity}")


# ------------------------------------------------------------------------------------------------ loader


def _indexed(count=10):
    return {"index": np.arange(count), "images": np.arange(count * 2, dtype=np.float32).reshape(count, 2)}


def test_loader_order_depends_only_on_seed_and_epoch():
    first = [batch["index"] for batch in Loader(_indexed(), 3, seed=5).epoch(2)]
    second = [batch["index"] for batch in Loader(_indexed(), 3, seed=5).epoch(2)]
    np.testing.assert_array_equal(first, second)
    other_epoch = [batch["index"] for batch in Loader(_indexed(), 3, seed=5).epoch(3)]
    assert not np.array_equal(first, other_epoch)
    assert not np.array_equal(first, [batch["index"] for batch in Loader(_indexed(), 3, seed=6).epoch(2)])
    ordered = Loader(_indexed(), 3, seed=5, shuffle=False)
    np.testing.assert_array_equal(np.concatenate(list(b["index"] for b in ordered.epoch(4))), np.arange(9))


def test_an_evaluation_pass_of_a_divisible_set_has_no_empty_batch():
    """12 examples in batches of 4: three batches, all full, with or without fill_last (nothing to fill), and
    no fourth, empty one."""
    for fill_last in (None, {"index": -1}):
        loader = Loader(_indexed(12), 4, seed=0, drop_last=False, fill_last=fill_last)
        batches = list(loader.epoch(0))
        assert len(loader) == 3 and [len(batch["index"]) for batch in batches] == [4, 4, 4]
        np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in batches])), np.arange(12))


def test_a_training_batch_may_hold_the_whole_data_set():
    """batch_size == N is one full batch per epoch (only a larger one leaves an epoch empty)."""
    loader = Loader(_indexed(10), 10, seed=0)
    (batch,) = list(loader.epoch(0))
    np.testing.assert_array_equal(np.sort(batch["index"]), np.arange(10))


def test_drop_last_drops_other_examples_each_epoch():
    """The dropped remainder is the tail of each epoch's permutation, so over a few epochs every example is
    trained on (10 examples, batches of 3: one dropped per epoch, at random)."""
    loader = Loader(_indexed(10), 3, seed=0)
    seen = {int(i) for epoch in range(10) for batch in loader.epoch(epoch) for i in batch["index"]}
    assert seen == set(range(10))


def test_loader_covers_each_example_once_per_epoch():
    loader = Loader(_indexed(), 3, seed=1, drop_last=False)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 4 and [len(b["index"]) for b in batches] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate([b["index"] for b in batches])), np.arange(10))
    for batch in batches:  # the fields of an example travel together
        np.testing.assert_array_equal(batch["images"][:, 0], 2 * batch["index"])
    dropping = Loader(_indexed(), 3, seed=1)
    indices = np.concatenate([b["index"] for b in dropping.epoch(0)])
    assert len(dropping) == 3 and len(np.unique(indices)) == 9


def test_loader_on_device_gives_the_same_batches():
    """On the default device, and on a mesh's devices (here the one CPU device; four in test_deep_sharding)."""
    mesh = devices.data_mesh()
    for drop_last in (True, False):
        host = list(Loader(_indexed(), 4, seed=2, drop_last=drop_last).epoch(1))
        for placement in ({"on_device": True}, {"on_device": True, "mesh": mesh}):
            device = list(Loader(_indexed(), 4, seed=2, drop_last=drop_last, **placement).epoch(1))
            assert len(host) == len(device)
            for host_batch, device_batch in zip(host, device):
                assert isinstance(device_batch["images"], jax.Array)
                for name in host_batch:
                    np.testing.assert_array_equal(host_batch[name], device_batch[name])


def test_a_filled_last_batch_has_the_full_size_and_only_filler_rows_added():
    """Evaluation's loader: every batch has the batch size, the examples come once each in the same order as without
    filling, and the rows added to the last batch hold the fill values (0 for arrays not named), on the host, on
    the default device and on a mesh."""
    mesh = devices.data_mesh()
    plain = list(Loader(_indexed(), 4, seed=2, drop_last=False).epoch(1))
    for placement in ({}, {"on_device": True}, {"on_device": True, "mesh": mesh}):
        filled = list(Loader(_indexed(), 4, seed=2, drop_last=False, fill_last={"index": -1}, **placement).epoch(1))
        assert [len(batch["index"]) for batch in filled] == [4, 4, 4]
        for plain_batch, filled_batch in zip(plain, filled):
            rows = len(plain_batch["index"])
            for name in plain_batch:
                np.testing.assert_array_equal(np.asarray(filled_batch[name])[:rows], plain_batch[name])
        np.testing.assert_array_equal(np.asarray(filled[-1]["index"])[2:], [-1, -1])
        np.testing.assert_array_equal(np.asarray(filled[-1]["images"])[2:], np.zeros((2, 2)))
        assert np.asarray(filled[-1]["images"]).dtype == np.float32
    with pytest.raises(ValueError, match="fill_last fills the last incomplete batch, which drop_last drops"):
        Loader(_indexed(), 4, seed=0, fill_last={"index": -1})
    with pytest.raises(ValueError, match="fill_last names arrays the data set does not have: depht"):
        Loader(_indexed(), 4, seed=0, drop_last=False, fill_last={"depht": 0})
    with pytest.raises(ValueError, match="fill_last\\['labels'\\] = -1 does not fit labels's dtype uint8"):
        Loader({"labels": np.zeros(5, np.uint8)}, 4, seed=0, drop_last=False, fill_last={"labels": -1})


def test_loader_validation():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        Loader(_indexed(), 0, seed=0)
    with pytest.raises(ValueError) as raised:
        Loader(_indexed(), 11, seed=0)
    assert str(raised.value).startswith("batch size 11 is larger than the data set (10 examples)"), raised.value
    assert "drop_last" not in str(raised.value) and "batch_size" not in str(raised.value)
    assert len(Loader(_indexed(), 11, seed=0, drop_last=False)) == 1
    with pytest.raises(ValueError, match="share a first axis"):
        Loader({"a": np.zeros(3), "b": np.zeros(4)}, 1, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        Loader(_indexed(), 2, seed=-1)
    with pytest.raises(ValueError, match="a mesh places the data set on its devices, so it needs on_device=True"):
        Loader(_indexed(), 2, seed=0, mesh=devices.data_mesh())


# --------------------------------------------------------------------------------------------- synthetic


def test_the_generators_take_counts_and_seeds_of_any_integer_type(tmp_path):
    """The project's integer rule (scm.linear_gaussian.check_count) takes a JAX or NumPy integer as a count or seed:
    the generators then use the checked Python int, so the files are those of the same plain integers."""
    write_gta5(tmp_path / "jax", count=jnp.int32(2), height=16, width=32, seed=jnp.int32(3))
    write_gta5(tmp_path / "plain", count=2, height=16, width=32, seed=3)
    for name in ("images/00001.png", "labels/00001.png", "depth/00001.npy"):
        assert (tmp_path / "jax" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    np.testing.assert_array_equal(nyuv2_arrays(np.int64(2), 8, 8, jnp.int32(3))["images"],
                                  nyuv2_arrays(2, 8, 8, 3)["images"])


def test_generated_scenes_are_coherent_and_deterministic():
    scenes = nyuv2_arrays(3, 24, 32, seed=1)
    np.testing.assert_array_equal(scenes["images"], nyuv2_arrays(3, 24, 32, seed=1)["images"])
    assert not np.array_equal(scenes["images"], nyuv2_arrays(3, 24, 32, seed=2)["images"])
    valid = scenes["segmentation"] >= 0
    assert 2 <= (~valid).sum(axis=(1, 2)).min() and (~valid).sum(axis=(1, 2)).max() <= 4
    np.testing.assert_array_equal(scenes["depth"][..., 0] > 0, valid)  # holes are the only invalid pixels
    length = np.linalg.norm(scenes["normal"], axis=-1)
    np.testing.assert_allclose(length[valid], 1.0, atol=1e-5)
    assert (length[~valid] == 0).all()
    # Every visible face looks back at the camera: <n, d> < 0 for the ray d = (u, v, -1) of its pixel (60° fov).
    focal = 0.5 * 32 / np.tan(np.radians(30))
    u = (np.arange(32) + 0.5 - 16) / focal
    v = -(np.arange(24) + 0.5 - 12) / focal
    rays = np.stack(np.broadcast_arrays(u[None, :], v[:, None], -np.ones((24, 32))), axis=-1)
    assert (np.sum(scenes["normal"] * rays, axis=-1)[valid] < 0).all()
    assert len(np.unique(scenes["segmentation"])) >= 4
    assert 0.0 <= scenes["images"].min() and scenes["images"].max() <= 1.0
    streets = cityscapes_arrays(2, 16, 32, seed=1)
    sky = streets["segmentation"] == 4
    assert sky.any() and (streets["depth"][..., 0][sky] == 0).all()
    assert set(np.unique(streets["segmentation"])) <= set(range(-1, 7))


# ------------------------------------------------------------------ definitions against independent references
# Corruptions as ImageNet-C defines them, colour conversion, augmentation rates, and the readers' edge cases.


def test_gta5_depth_of_another_resolution_is_resized_from_its_own_size(tmp_path):
    """load_gta5 takes depth of any resolution: its nearest-neighbour indices must come from the depth's own shape.
    Here the depth is twice the label's size, so indices computed from the label's size would read the wrong
    (top-left) pixels. Reference: PIL's NEAREST resize of the depth as a float image, divided by 255."""
    rng = np.random.default_rng(11)
    _write_png(tmp_path / "images" / "x.png", rng.integers(0, 256, (30, 50, 3)).astype(np.uint8))
    _write_png(tmp_path / "labels" / "x.png", rng.integers(0, 40, (30, 50)).astype(np.uint8))
    depth = rng.integers(1, 256, (60, 100)).astype(np.float32)
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth" / "x.npy", depth)
    loaded = load_gta5(tmp_path, size=(8, 16))
    expected = np.asarray(Image.fromarray(depth).resize((16, 8), Image.NEAREST)) / 255.0
    np.testing.assert_allclose(loaded["depth"][0, ..., 0], expected, rtol=1e-6)


def test_rgb_to_hsv_matches_colorsys_and_its_hue_lies_in_0_1():
    """The docstring promises H, S, V each in [0, 1], as colorsys and torchvision define them. Red-dominant pixels
    with blue > green have a hue just below 1 (a negative sector before the modulo); they are included on purpose."""
    rng = np.random.default_rng(5)
    rgb = rng.random((256, 3)).astype(np.float32)
    rgb[:64] = np.stack([rng.uniform(0.6, 1.0, 64), rng.uniform(0.0, 0.2, 64), rng.uniform(0.2, 0.5, 64)], -1)
    hsv = np.asarray(rgb_to_hsv(jnp.asarray(rgb)), np.float64)
    expected = np.array([colorsys.rgb_to_hsv(*map(float, pixel)) for pixel in rgb])
    assert hsv[:, 0].min() >= 0.0 and hsv[:, 0].max() < 1.0 + 1e-6
    np.testing.assert_allclose(hsv[:, 1:], expected[:, 1:], atol=1e-5)
    hue_error = np.abs(hsv[:, 0] - expected[:, 0])
    np.testing.assert_array_less(np.minimum(hue_error, 1.0 - hue_error), 1e-5)  # no pixel an exact turn off either
    np.testing.assert_allclose(hsv[:, 0], expected[:, 0], atol=1e-5)


def test_brightness_is_imagenet_cs_hsv_value_shift_clipped_at_one():
    """ImageNet-C's brightness: to HSV, V -> clip(V + c, 0, 1), back to RGB (so the hue and saturation stay even
    where V + c > 1). Reference: colorsys per pixel. Severities 1 and 5; most pixels at severity 5 reach the clip."""
    rng = np.random.default_rng(7)
    images = rng.uniform(0.0, 0.9, (2, 8, 8, 3)).astype(np.float32)
    images[0, 0, 0] = 0.0  # a black pixel becomes grey V'
    for severity, c in ((1, 0.1), (5, 0.5)):
        corrupted = np.asarray(corrupt(jnp.asarray(images), "brightness", severity, jax.random.key(0)))
        expected = []
        for pixel in images.reshape(-1, 3).astype(np.float64):
            h, s, v = colorsys.rgb_to_hsv(*pixel)
            expected.append(colorsys.hsv_to_rgb(h, s, min(max(v + c, 0.0), 1.0)))
        np.testing.assert_allclose(corrupted.reshape(-1, 3), np.array(expected), atol=1e-5, err_msg=f"{severity}")


def test_speckle_noise_is_multiplicative():
    """Speckle is x + x c eps (ImageNet-C), so black stays black and the spread at grey level g is g c:
    at severity 1 (c = 0.15) and g = 0.5 the standard deviation is 0.075 (no clipping: 0.5 +- 0.075 * 6 is inside
    [0, 1]); additive noise (x + c eps) would give 0.15 and disturb the black half."""
    images = np.zeros((1, 64, 64, 3), np.float32)
    images[:, 32:] = 0.5
    corrupted = np.asarray(corrupt(jnp.asarray(images), "speckle_noise", 1, jax.random.key(3)), np.float64)
    np.testing.assert_array_equal(corrupted[:, :32], 0.0)
    spread = (corrupted[:, 32:] - 0.5).std()
    assert abs(spread - 0.075) < 0.004, spread


def test_shot_noise_is_poisson_counts_over_c_with_mean_x_and_variance_x_over_c():
    """ImageNet-C's shot noise is Poisson(c x) / c: unbiased (mean x) with variance x / c. Severity 1, c = 60, at
    x = 0.5: mean 0.5 +- 0.0008 (one std over 12288 values) and variance 0.5 / 60 = 0.00833."""
    images = np.full((1, 64, 64, 3), 0.5, np.float32)
    corrupted = np.asarray(corrupt(jnp.asarray(images), "shot_noise", 1, jax.random.key(4)), np.float64)
    assert abs(corrupted.mean() - 0.5) < 0.004, corrupted.mean()
    assert abs(corrupted.var() / (0.5 / 60) - 1) < 0.1, corrupted.var()
    counts = corrupted * 60  # values are whole counts over c
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)


def test_impulse_noise_sets_a_fraction_c_to_salt_and_pepper_in_equal_parts():
    """Salt-and-pepper with amount c (ImageNet-C's sp, salt_vs_pepper = 0.5): a fraction c of the values becomes 0
    or 1, half each. Severity 3, c = 0.09, on 12288 values of grey 0.5: about 553 each (std about 23)."""
    images = np.full((1, 64, 64, 3), 0.5, np.float32)
    corrupted = np.asarray(corrupt(jnp.asarray(images), "impulse_noise", 3, jax.random.key(8)))
    salt, pepper = (corrupted == 1.0).sum(), (corrupted == 0.0).sum()
    assert ((corrupted == 0.5) | (corrupted == 0.0) | (corrupted == 1.0)).all()
    expected = 0.09 * corrupted.size / 2
    for count in (salt, pepper):
        assert abs(count - expected) < 6 * np.sqrt(expected), (salt, pepper)


def test_augment_flips_about_half_of_the_examples():
    """The flip happens with probability 1/2 per example. A flip-only config on 256 copies of one asymmetric image:
    each output is either the image or its mirror; the mirrored count is Binomial(256, 1/2), 128 +- 8."""
    row = np.linspace(0.0, 1.0, 6, dtype=np.float32)
    image = np.broadcast_to(row[None, :, None], (4, 6, 3))
    batch = {"images": jnp.asarray(np.broadcast_to(image, (256, 4, 6, 3)))}
    config = AugmentConfig(scales=(1.0,), color_jitter=(0, 0, 0, 0))
    out = np.asarray(augment(jax.random.key(2), batch, config)["images"])
    mirrored = np.all(out == image[:, ::-1], axis=(1, 2, 3))
    unchanged = np.all(out == image, axis=(1, 2, 3))
    assert (mirrored | unchanged).all()
    assert abs(mirrored.sum() - 128) < 4 * 8, mirrored.sum()


def test_gaussian_kernel_is_scipys_for_a_fractional_radius():
    """gaussian_kernel promises scipy.ndimage's Gaussian, radius int(4 sigma + 0.5). The published severities
    (sigma 1, 2, 3, 4, 6) all give a whole 4 sigma, where rounding cannot show; sigma = 0.65 (4 sigma = 2.6, radius
    3, not 2) does. Reference: scipy's filter of a unit impulse is its kernel."""
    impulse = np.zeros(21)
    impulse[10] = 1.0
    expected = ndimage.gaussian_filter1d(impulse, 0.65, truncate=4.0, mode="constant")
    taps = gaussian_kernel(0.65)
    assert taps.shape == (7,)
    np.testing.assert_allclose(taps, expected[7:14], atol=1e-7)
    np.testing.assert_allclose(expected[:7].sum() + expected[14:].sum(), 0.0, atol=1e-12)


def test_normal_length_check_catches_one_long_normal(tmp_path):
    """Normals may be at most 1.01 long at *every* pixel: one normal of length 2 among unit ones must be refused
    (a file of long normals only would also be caught by a check of their mean or of a sample of pixels)."""
    root = write_nyuv2(tmp_path / "nyuv2", train=2, val=1, height=8, width=12, seed=3)
    path = root / "train" / "normal" / "1.npy"
    normal = np.zeros((8, 12, 3), np.float32)
    normal[..., 2] = 1.0           # unit normals everywhere ...
    normal[3, 5] = (0.0, 0.0, 2.0)  # ... but one of length 2
    np.save(path, normal)
    with pytest.raises(DataError, match=r"train/normal/1.npy: a normal of length 2"):
        load_nyuv2(root, "train")


def test_pixelate_is_pil_box_down_to_int_size_and_back():
    """ImageNet-C's pixelate: PIL BOX resize to (int(W c), int(H c)), then BOX back to (W, H). At 16x24 and
    severity 1 (c = 0.6) the small size is 9x14 (int truncates 9.6 and 14.4), which rounding up would make 10x15.
    Reference: PIL on each channel as a float image."""
    rng = np.random.default_rng(9)
    images = rng.random((1, 16, 24, 3)).astype(np.float32)
    corrupted = np.asarray(corrupt(jnp.asarray(images), "pixelate", 1, jax.random.key(0)))
    for channel in range(3):
        small = Image.fromarray(images[0, ..., channel]).resize((14, 9), Image.BOX)
        expected = np.asarray(small.resize((24, 16), Image.BOX))
        np.testing.assert_allclose(corrupted[0, ..., channel], np.clip(expected, 0, 1), atol=1e-5)


def test_plasma_displacements_shrink_by_roughness_squared_per_level():
    """ImageNet-C's diamond-square: the displacement amplitude is w_k^2 with w_{k+1} = w_k / d, so each level's is
    d^2 times smaller. On a 4x4 map with d = 4: the centre (1, 1) is the mean of its four level-0 corners plus a
    displacement uniform in +-w_0^2 / 16, while the level-0 values spread over about w_0^2. The median of
    |residual| / spread is then about 1/32 (1/8 if the decay were d per level, 1/128 if d^3); the rescaling to
    [0, 1] is affine and leaves the ratio unchanged."""
    fractals = jax.jit(jax.vmap(lambda k: plasma_fractal(k, 4, 4.0)))(jax.random.split(jax.random.key(0), 1000))
    grid = np.asarray(fractals, np.float64)
    corners = grid[:, 0::2, 0::2]
    spread = corners.max(axis=(1, 2)) - corners.min(axis=(1, 2))
    ratio = np.median(np.abs(grid[:, 1, 1] - corners.mean(axis=(1, 2))) / spread)
    assert 1 / 64 < ratio < 1 / 16, ratio


def test_gta5_reads_png_names_in_upper_case(tmp_path):
    """Examples are the PNGs of images/ whatever the case of the suffix (X.PNG, as some Windows tools save them);
    the label keeps the image's name and the depth its stem."""
    _write_png(tmp_path / "images" / "X.PNG", np.zeros((3, 4, 3), np.uint8))
    _write_png(tmp_path / "labels" / "X.PNG", np.full((3, 4), 26, np.uint8))
    (tmp_path / "depth").mkdir()
    np.save(tmp_path / "depth" / "X.npy", np.full((3, 4), 51.0, np.float32))
    loaded = load_gta5(tmp_path, size=(3, 4))
    np.testing.assert_array_equal(loaded["segmentation"], np.full((1, 3, 4), 6))
    np.testing.assert_allclose(loaded["depth"], 0.2)


def test_gta5_images_of_pure_white_stay_at_most_1(tmp_path):
    """Images are float32 in [0, 1] as documented: PIL's bilinear weights sum to 1 only up to rounding (a white
    30x50 image resized to 8x16 reaches 1 + 1.2e-7 in float32), so the resize is clipped."""
    _write_png(tmp_path / "images" / "a.png", np.full((30, 50, 3), 255, np.uint8))
    _write_png(tmp_path / "labels" / "a.png", np.zeros((30, 50), np.uint8))
    images = load_gta5(tmp_path, size=(8, 16), allow_missing_depth=True)["images"]
    assert images.max() == 1.0 and images.min() > 0.999, (images.min(), images.max())


def test_gta5_reads_16_bit_label_pngs(tmp_path):
    """load_gta5 accepts single-channel labelIds of mode L, P, I or I;16 (16-bit PNGs are common for label maps).
    Ids above 255 are void. Expected categories from the authors' table, written out here."""
    ids = np.array([[7, 8, 11, 17], [21, 23, 24, 26], [33, 0, 9, 300]], np.uint16)
    _write_png(tmp_path / "images" / "a.png", np.zeros((3, 4, 3), np.uint8))
    _write_png(tmp_path / "labels" / "a.png", ids)
    assert Image.open(tmp_path / "labels" / "a.png").mode.startswith("I")
    loaded = load_gta5(tmp_path, size=(3, 4), allow_missing_depth=True)
    np.testing.assert_array_equal(loaded["segmentation"][0], [[0, 0, 1, 2], [3, 4, 5, 6], [6, -1, -1, -1]])


def test_augment_draws_every_scale():
    """Each scale of AugmentConfig.scales is drawn with probability 1/len(scales). With scales (1, 2) and no flip
    or jitter, an example is unchanged exactly when scale 1 was drawn (a crop at 2 is a zoom); over 64 examples
    the unchanged count is Binomial(64, 1/2), 32 +- 4."""
    rows, columns = np.mgrid[0:8, 0:12].astype(np.float32)
    image = np.stack([rows / 7, columns / 11, (rows * columns) / 77], -1)
    batch = {"images": jnp.asarray(np.broadcast_to(image, (64, 8, 12, 3)))}
    config = AugmentConfig(scales=(1.0, 2.0), flip=False, color_jitter=(0, 0, 0, 0))
    out = np.asarray(augment(jax.random.key(1), batch, config)["images"])
    unchanged = np.all(np.abs(out - image) < 1e-6, axis=(1, 2, 3))
    assert 32 - 16 < unchanged.sum() < 32 + 16, unchanged.sum()


def test_the_nyuv2_files_are_mtans_arrays(nyuv2_root):
    """The files themselves, read with numpy alone (the reader casts and reshapes, so only this sees what is on
    disk): MTAN's float32 image [H, W, 3], label [H, W] (integer-valued floats, -1 = ignore), depth [H, W, 1] and
    normal [H, W, 3], numbered 0..N-1 in every folder of both splits."""
    shapes = {"image": (HEIGHT, WIDTH, 3), "label": (HEIGHT, WIDTH), "depth": (HEIGHT, WIDTH, 1),
              "normal": (HEIGHT, WIDTH, 3)}
    for split, count in (("train", 3), ("val", 2)):
        for folder, shape in shapes.items():
            names = sorted(path.name for path in (nyuv2_root / split / folder).iterdir())
            assert names == sorted(f"{i}.npy" for i in range(count)), (split, folder, names)
            for name in names:
                array = np.load(nyuv2_root / split / folder / name)
                assert (array.dtype, array.shape) == (np.float32, shape), (split, folder, name)
        labels = np.stack([np.load(nyuv2_root / split / "label" / f"{i}.npy") for i in range(count)])
        assert (labels == np.round(labels)).all() and labels.min() == -1 and labels.max() <= 12


def test_the_cityscapes_files_are_libmtls_arrays_and_val_is_its_own_split(cityscapes_root):
    """On disk (numpy alone): float32 image [H, W, 3], int32 label [H, W], float32 disparity [H, W]. The val split
    is the generator's split 1, not a copy of train's first examples."""
    kinds = {"image": ((HEIGHT, 2 * WIDTH, 3), np.float32), "label": ((HEIGHT, 2 * WIDTH), np.int32),
             "depth": ((HEIGHT, 2 * WIDTH), np.float32)}
    for split, count in (("train", 3), ("val", 2)):
        for folder, (shape, dtype) in kinds.items():
            names = sorted(path.name for path in (cityscapes_root / split / folder).iterdir())
            assert names == sorted(f"{i}.npy" for i in range(count)), (split, folder, names)
            for name in names:
                array = np.load(cityscapes_root / split / folder / name)
                assert (array.dtype, array.shape) == (dtype, shape), (split, folder, name)
    val = load_cityscapes(cityscapes_root, "val")
    for name, value in cityscapes_arrays(2, HEIGHT, 2 * WIDTH, seed=4, split=1).items():
        np.testing.assert_array_equal(val[name], value)
    assert not np.array_equal(val["images"], load_cityscapes(cityscapes_root, "train")["images"][:2])


def test_generated_streets_mark_holes_and_sky_invalid_and_store_disparity():
    """cityscapes_arrays as documented: float32 images [N, H, W, 3] in [0, 1], int32 segmentation with two to four
    -1 holes per example, float32 depth [N, H, W, 1] that is 0 exactly at the holes and the sky, and a disparity
    1/z (m^-1) elsewhere: the camera is over a metre above the road and every object several metres ahead, so no
    disparity reaches 1 (Cityscapes' own are about 0-0.49), where depths in metres would."""
    streets = cityscapes_arrays(8, 16, 32, seed=2)
    assert (streets["images"].dtype, streets["images"].shape) == (np.float32, (8, 16, 32, 3))
    assert (streets["segmentation"].dtype, streets["segmentation"].shape) == (np.int32, (8, 16, 32))
    assert (streets["depth"].dtype, streets["depth"].shape) == (np.float32, (8, 16, 32, 1))
    assert 0 <= streets["images"].min() and streets["images"].max() <= 1
    label, disparity = streets["segmentation"], streets["depth"][..., 0]
    holes = (label == -1).sum(axis=(1, 2))
    assert 2 <= holes.min() and holes.max() <= 4, holes
    np.testing.assert_array_equal(disparity == 0, (label == -1) | (label == 4))
    assert disparity.max() < 1


def _pixel_rays(height, width, fov_degrees):
    """The camera-frame (u, v) of each pixel centre for rays (u, v, -1): x right, y up, horizontal field of view."""
    focal = 0.5 * width / np.tan(np.radians(fov_degrees / 2))
    u = (np.arange(width) + 0.5 - 0.5 * width) / focal
    v = -(np.arange(height) + 0.5 - 0.5 * height) / focal
    return np.broadcast_to(u[None, :], (height, width)), np.broadcast_to(v[:, None], (height, width))


def test_nyuv2_depth_is_along_the_optical_axis_and_normals_are_the_planes_in_the_camera_frame():
    """The floor (class 4) and the ceiling (class 2) are planes <n, X> = c. With depth z along the optical axis (as
    NYUv2's), a pixel's point is X = z (u, v, -1), so 1/z = (n_x u + n_y v - n_z) / c is affine in (u, v), with
    coefficients along the camera-frame normal the file gives. The floor faces up, towards the camera above it, and
    the ceiling down (camera-frame n_y beyond 0.9 at these small pitches). Ray lengths in place of depths,
    world-frame normals, or the floor and ceiling labels swapped break one of these."""
    height, width = 24, 32
    scenes = nyuv2_arrays(4, height, width, seed=1)
    u, v = _pixel_rays(height, width, 60)
    checked = 0
    for label, depth, normal in zip(scenes["segmentation"], scenes["depth"][..., 0], scenes["normal"]):
        for face_class, up in ((4, 1), (2, -1)):
            face = label == face_class
            rows, columns = np.nonzero(face)
            if len(set(rows)) < 3 or len(set(columns)) < 3:  # too few pixels to fix a plane
                continue
            normals = normal[face].astype(np.float64)
            np.testing.assert_allclose(normals, np.broadcast_to(normals[0], normals.shape), atol=1e-6)
            assert up * normals[0, 1] > 0.9, (face_class, normals[0])
            design = np.stack([u[face], v[face], np.ones(face.sum())], axis=-1)
            inverse = 1.0 / depth[face].astype(np.float64)
            coefficients = np.linalg.lstsq(design, inverse, rcond=None)[0]
            np.testing.assert_allclose(design @ coefficients, inverse, rtol=1e-4)
            direction = coefficients * np.array([1.0, 1.0, -1.0])
            assert abs(direction @ normals[0]) / np.linalg.norm(direction) > 0.9999, (face_class, direction)
            checked += 1
    assert checked >= 4


def test_nyuv2_images_are_shaded_by_each_faces_orientation():
    """The image is albedo times Lambertian shading: the room's walls share one albedo (class 11), so in some scene
    two walls facing different ways differ in mean brightness by more than the per-pixel albedo noise (+-0.02)."""
    scenes = nyuv2_arrays(4, 24, 32, seed=1)
    ratios = []
    for image, label, normal in zip(scenes["images"], scenes["segmentation"], scenes["normal"]):
        wall = label == 11
        means = []
        for direction in {tuple(np.round(n, 3)) for n in normal[wall]}:
            pixels = wall & (np.abs(normal - np.array(direction)) < 1e-3).all(axis=-1)
            if pixels.sum() >= 5:
                means.append(image[pixels].mean())
        if len(means) >= 2:
            ratios.append(max(means) / min(means))
    assert ratios and max(ratios) > 1.05, ratios


def test_gta5_files_hold_labelids_of_each_category_and_255_times_disparity(tmp_path):
    """The GTA5 files read with PIL and numpy alone: 8-bit (mode L) labelId PNGs whose ids map, by the authors'
    table written out here, to the scenes' categories, void pixels to ids outside it; RGB PNGs; float32 [H, W]
    depth of 255 x disparity. Forty scenes, so that every void id and the ids of each category get drawn."""
    table = {7: 0, 8: 0, 11: 1, 12: 1, 13: 1, 17: 2, 19: 2, 20: 2, 21: 3, 22: 3, 23: 4, 24: 5, 25: 5, 26: 6, 27: 6,
             28: 6, 31: 6, 32: 6, 33: 6}
    count, height, width = 40, 16, 32
    write_gta5(tmp_path, count=count, height=height, width=width, seed=6)
    expected = cityscapes_arrays(count, height, width, seed=6, split=2)
    for index in range(count):
        name = f"{index:05d}"
        with Image.open(tmp_path / "labels" / f"{name}.png") as labels:
            assert labels.mode == "L"
            ids = np.asarray(labels)
        categories = np.array([table.get(int(i), -1) for i in ids.ravel()]).reshape(ids.shape)
        np.testing.assert_array_equal(categories, expected["segmentation"][index], err_msg=name)
        with Image.open(tmp_path / "images" / f"{name}.png") as image:
            assert (image.mode, image.size) == ("RGB", (width, height))
        depth = np.load(tmp_path / "depth" / f"{name}.npy")
        assert (depth.dtype, depth.shape) == (np.float32, (height, width))
        np.testing.assert_allclose(depth, 255 * expected["depth"][index, ..., 0], rtol=1e-6)


def test_bad_counts_are_refused_by_name_before_anything_is_written(tmp_path):
    for write in (write_nyuv2, write_cityscapes):
        with pytest.raises(ValueError, match="val must be an integer >= 1; got 0"):
            write(tmp_path / "set", train=2, val=0, height=8, width=8)
        assert not (tmp_path / "set").exists()


def test_the_package_exports_every_reader_and_writer():
    namespace = {}
    exec("from deep.data import *", namespace)
    for name in ("load_nyuv2", "load_cityscapes", "load_gta5", "load_celeba", "write_nyuv2", "write_cityscapes",
                 "write_gta5", "write_celeba", "nyuv2_arrays", "cityscapes_arrays", "celeba_arrays", "DataError"):
        assert name in namespace, name


@pytest.mark.parametrize("write, files", [
    (lambda root: write_nyuv2(root, train=3, val=1, height=HEIGHT, width=WIDTH), ("train", "image")),
    (lambda root: write_cityscapes(root, train=3, val=1, height=HEIGHT, width=WIDTH), ("train", "image")),
    (lambda root: write_gta5(root, count=3, height=HEIGHT, width=WIDTH), ("images",)),
    (lambda root: write_celeba(root, train=3, val=1, test=1, height=HEIGHT, width=WIDTH), ("img_align_celeba",)),
])
def test_a_set_is_never_written_over_another(tmp_path, write, files):
    """The readers take every file they find, so a smaller set written over a larger one would mix the two: the
    second write is refused, and the first set is left as it was. An existing empty folder is a new one."""
    root = tmp_path / "set"
    root.mkdir()
    write(root)
    before = sorted(path.relative_to(root) for path in root.rglob("*"))
    with pytest.raises(FileExistsError, match=f"^{re.escape(str(root / files[0]))} already exists: a generated set "
                                              f"goes into a new folder \\(or one without "):
        write(root)
    assert sorted(path.relative_to(root) for path in root.rglob("*")) == before
    assert len(list(root.joinpath(*files).iterdir())) >= 3


def test_no_two_seeds_and_epochs_share_an_order():
    """The order is drawn from (seed, epoch) as a pair: runs of neighbouring seeds never replay each other's epochs
    (an order drawn from seed + epoch would repeat seed s, epoch e + 1 as seed s + 1, epoch e)."""
    orders = {tuple(Loader(_indexed(), 3, seed=seed).order(epoch)) for seed in range(4) for epoch in range(4)}
    assert len(orders) == 16


# ---------------------------------- augmentation conventions, the loader's order, reader branches, corruption tables


@pytest.mark.parametrize("height, width, scale", [(288, 384, 1.2), (8, 12, 1.2), (8, 12, 1.5)])
def test_the_crop_is_libmtls_int_of_h_over_s_in_double_precision(crop, height, width, scale):
    """LibMTL's RandomScaleCrop crops int(H / s) x int(W / s), Python floats: 240 x 320 for NYUv2's 288 x 384 at
    s = 1.2 (in float32, 288 / 1.2 falls just below 240 and floors to 239), and 6 x 10 for 8 x 12 (rounding would
    give 7). Read back from the output: the image holds (row, column) indices, which align_corners sampling maps
    exactly onto the crop's first and last pixel (float32 error well under 1e-3 at these magnitudes); the nearest
    rule reads every row and column of the crop once at least."""
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    example = {"images": jnp.asarray(np.stack([rows, columns, np.zeros_like(rows)], -1), jnp.float32),
               "segmentation": jnp.asarray(rows * width + columns, jnp.int32)}
    out = crop(jax.random.key(0), example, scales=(scale,))
    crop_height, crop_width = int(height / scale), int(width / scale)
    image = np.asarray(out["images"], np.float64)
    assert abs(image[-1, 0, 0] - image[0, 0, 0] - (crop_height - 1)) < 1e-3, image[[0, -1], 0, 0]
    assert abs(image[0, -1, 1] - image[0, 0, 1] - (crop_width - 1)) < 1e-3, image[0, [0, -1], 1]
    labels = np.asarray(out["segmentation"])
    assert len(np.unique(labels // width)) == crop_height and len(np.unique(labels % width)) == crop_width


def _augmented_copies(image, count: int, config: AugmentConfig, seed: int) -> np.ndarray:
    """The images of a batch of ``count`` copies of ``image`` [H, W, 3] augmented with ``config`` under one jitted
    call (each copy draws its own crop, flip and jitter), as float64."""
    batch = {"images": jnp.asarray(np.broadcast_to(image, (count, *np.shape(image))))}
    out = jax.jit(lambda key, batch_: augment(key, batch_, config))(jax.random.key(seed), batch)
    return np.asarray(out["images"], np.float64)


def test_every_crop_window_is_drawn_with_its_row_and_column_independent():
    """The window's top row is uniform in 0..H-h and its left column, drawn independently, in 0..W-w. At 8 x 12 and
    s = 1.5 (crop 5 x 8) that is 4 x 5 = 20 windows; over 400 examples each is expected 20 times, so all appear
    (the chance that one is missed is about 20 (19/20)^400 < 1e-7). A column range taken from the rows, or one
    uniform for both offsets, leaves windows out. Offsets are read from the ramp image's first pixel."""
    config = AugmentConfig(scales=(1.5,), flip=False, color_jitter=(0, 0, 0, 0))
    out = _augmented_copies(_ramp_example()["images"], 400, config, seed=3)
    windows = set(zip(np.round(out[:, 0, 0, 0] * HEIGHT).astype(int), np.round(out[:, 0, 0, 1] * WIDTH).astype(int)))
    assert windows == {(top, left) for top in range(HEIGHT - 5 + 1) for left in range(WIDTH - 8 + 1)}, sorted(windows)


def test_the_flip_and_the_brightness_factor_are_drawn_independently():
    """Each example's flip and jitter factors come from their own uniforms. With the flip and a brightness of 0.4
    only, on 512 copies of a left-to-right ramp in [0.1, 0.7] (never clipped: 0.7 x 1.4 < 1), the factor is the
    output's sum over the input's; it must span [0.6, 1.4] and be uncorrelated with the flip (|r| < 0.25, over 5
    standard errors of 1/sqrt(512)). Reading the flip's uniform as the brightness's would make r about -0.87."""
    ramp = np.broadcast_to(np.linspace(0.1, 0.7, WIDTH, dtype=np.float32)[None, :, None], (HEIGHT, WIDTH, 3))
    config = AugmentConfig(scales=(1.0,), color_jitter=(0.4, 0, 0, 0))
    out = _augmented_copies(ramp, 512, config, seed=5)
    flipped = out[:, 0, 0, 0] > out[:, 0, -1, 0]
    factors = out.sum(axis=(1, 2, 3)) / ramp.sum(dtype=np.float64)
    assert factors.min() < 0.65 and factors.max() > 1.35, (factors.min(), factors.max())
    assert 0.3 < flipped.mean() < 0.7
    assert abs(np.corrcoef(flipped, factors)[0, 1]) < 0.25, np.corrcoef(flipped, factors)[0, 1]


def test_the_flip_and_the_scale_are_drawn_independently():
    """Each example's flip and crop scale come from their own uniforms. With scales (1, 1.5), the flip on and no
    jitter, on 512 copies of the ramp image: the column ramp's span tells the scale (12 columns or 8) and its
    direction the flip; the two must be uncorrelated (|r| < 0.25, over 5 standard errors of 1/sqrt(512)). Reading
    the scale's uniform as the flip's would make r = 1."""
    config = AugmentConfig(scales=(1.0, 1.5), color_jitter=(0, 0, 0, 0))
    out = _augmented_copies(_ramp_example()["images"], 512, config, seed=6)
    flipped = out[:, 0, 0, 1] > out[:, 0, -1, 1]
    zoomed = np.abs(out[:, 0, -1, 1] - out[:, 0, 0, 1]) * WIDTH < WIDTH - 1.5  # a span of 7 columns, not 11
    assert 0.3 < flipped.mean() < 0.7 and 0.3 < zoomed.mean() < 0.7, (flipped.mean(), zoomed.mean())
    assert abs(np.corrcoef(flipped, zoomed)[0, 1]) < 0.25, np.corrcoef(flipped, zoomed)[0, 1]


def test_the_hue_rotation_wraps_around_from_blue_to_red():
    """A hue shift of up to 1/2 turn moves a blue-violet hue (5/6 of a turn, sixths = 5) past red and round again
    (sixths up to 8): torchvision's adjust_hue takes the hue modulo 1. Reference: colorsys."""
    from deep.data.augmentation import _rotate_hue

    pixels = np.array([[0.5, 0.1, 0.9], [0.3, 0.2, 0.8], [0.9, 0.2, 0.7], [0.2, 0.4, 0.9]], np.float32)
    for shift in (0.3, 0.45, 0.5, -0.5):
        expected = [colorsys.hsv_to_rgb((h + shift) % 1.0, s, v) for h, s, v in
                    (colorsys.rgb_to_hsv(*pixel) for pixel in pixels.astype(np.float64))]
        np.testing.assert_allclose(_rotate_hue(jnp.asarray(pixels), jnp.float32(shift)), expected, atol=2e-6,
                                   err_msg=str(shift))


def test_the_scale_crop_keeps_a_half_precision_depths_dtype():
    """Dtypes are preserved: a float16 depth comes out float16 (divided by the scale), not promoted by the scale."""
    example = {"images": jnp.zeros((HEIGHT, WIDTH, 3)), "depth": jnp.full((HEIGHT, WIDTH, 1), 3.0, jnp.float16)}
    cropped = random_scale_crop(jax.random.key(0), example, (1.5,))
    assert cropped["depth"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(cropped["depth"], np.float32), 2.0)


def test_the_edges_of_the_augment_config_ranges_are_accepted():
    """torchvision's ColorJitter takes a hue strength up to 0.5 inclusive; a single scale of 1 turns the crop off."""
    assert AugmentConfig(color_jitter=(0, 0, 0, 0.5)).color_jitter == (0.0, 0.0, 0.0, 0.5)
    assert AugmentConfig(scales=(1,)).scales == (1.0,)


@pytest.mark.parametrize("name, shape", [("depth", (2, HEIGHT, WIDTH)), ("segmentation", (2, HEIGHT, WIDTH, 1)),
                                         ("normal", (2, HEIGHT, WIDTH, 2))])
def test_augment_refuses_a_field_whose_shape_does_not_match_the_images(name, shape):
    """depth is [B, H, W, 1], segmentation [B, H, W], normal [B, H, W, 3]: another shape is refused by name rather
    than flipped or cropped into something else."""
    batch = {"images": jnp.zeros((2, HEIGHT, WIDTH, 3)), name: jnp.zeros(shape)}
    with pytest.raises(ValueError, match=re.escape(f"batch[{name!r}] must have shape")):
        augment(jax.random.key(0), batch, AugmentConfig(scales=(1.0,), color_jitter=(0, 0, 0, 0)))


def test_the_epoch_order_is_the_documented_permutation_of_seed_and_epoch():
    """deep.data.loader documents epoch e's order as numpy.random.default_rng((seed, e)).permutation(N): a resumed
    run, or another tool, can recompute it. Checked for a few seeds and epochs, and the batches follow it."""
    for seed, epoch in ((0, 0), (5, 2), (123, 7)):
        expected = np.random.default_rng((seed, epoch)).permutation(10)
        loader = Loader(_indexed(), 3, seed=seed, drop_last=False)
        np.testing.assert_array_equal(loader.order(epoch), expected)
        np.testing.assert_array_equal(np.concatenate([b["index"] for b in loader.epoch(epoch)]), expected)


def test_loader_refuses_no_arrays_and_an_empty_data_set():
    with pytest.raises(ValueError, match="arrays must hold at least one array"):
        Loader({}, 1, seed=0)
    for drop_last in (True, False):
        with pytest.raises(ValueError, match=r"arrays must share a first axis of length N >= 1; got lengths \{'a': 0"):
            Loader({"a": np.zeros((0, 3))}, 1, seed=0, drop_last=drop_last)


def test_other_files_in_a_field_folder_are_ignored(nyuv2_root, tmp_path):
    """Only <i>.npy files make up the layout: a README or macOS's .DS_Store beside them is not an error."""
    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    (root / "train" / "image" / "README.txt").write_text("NYUv2 images\n")
    (root / "train" / "label" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    loaded, original = load_nyuv2(root, "train"), load_nyuv2(nyuv2_root, "train")
    for name in original:
        np.testing.assert_array_equal(loaded[name], original[name])


def test_an_empty_field_folder_and_the_lowest_bad_index_are_reported(nyuv2_root, tmp_path):
    """An empty folder is a DataError naming it (not a bare error from max of nothing); with two bad files the
    message names the lower index, whatever order the reading threads finish in (as the reader documents)."""
    root = tmp_path / "nyuv2"
    shutil.copytree(nyuv2_root, root)
    for index in (2, 1):
        (root / "train" / "depth" / f"{index}.npy").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{root / 'train' / 'depth' / '1.npy'}: an empty file")):
        load_nyuv2(root, "train")
    for path in (root / "val" / "normal").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=re.escape(f"{root / 'val' / 'normal'}: no <i>.npy files")):
        load_nyuv2(root, "val")


def test_gta5_refuses_a_size_below_one(tmp_path):
    _write_png(tmp_path / "images" / "x.png", np.zeros((4, 4, 3), np.uint8))
    _write_png(tmp_path / "labels" / "x.png", np.zeros((4, 4), np.uint8))
    for size in ((0, 16), (8, -1), (8.5, 16)):
        with pytest.raises(DataError, match=r"size must be two positive integers \(height, width\)"):
            load_gta5(tmp_path, size=size, allow_missing_depth=True)


# ImageNet-C's make_imagenet_c.py, every corruption the module implements, severities 1..5 as published.
IMAGENET_C = {"gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38), "shot_noise": (60, 25, 12, 5, 3),
              "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27), "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
              "gaussian_blur": (1, 2, 3, 4, 6), "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
              "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25), "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
              "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
              "fog": ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))}


def test_every_severity_table_is_imagenet_cs_and_the_paper_reports_four():
    """The behaviour tests above pin the formulas and, for some corruptions, the parameters of every severity; the
    others' severities 2..5 only have to grow, which a table copied from CIFAR-10-C or with a typo still does. So
    the whole table is compared with ImageNet-C's; and the paper's Cityscapes-C set is contrast, defocus blur, fog
    and Gaussian noise (its Appendix J)."""
    from deep.data.corruptions import PAPER_CORRUPTIONS, SEVERITY_PARAMETERS

    assert set(SEVERITY_PARAMETERS) == set(IMAGENET_C) == set(CORRUPTIONS)
    for name, published in IMAGENET_C.items():
        np.testing.assert_allclose(np.asarray(SEVERITY_PARAMETERS[name], np.float64), published, rtol=0, atol=0,
                                   err_msg=name)
    assert sorted(PAPER_CORRUPTIONS) == ["contrast", "defocus_blur", "fog", "gaussian_noise"]


def _diamond_square_means(corner, centre, row_edge, column_edge, mapsize):
    """Diamond-square on a torus with no displacement after level 0, point by point from the definition: a square's
    centre is the mean of its four corners, an edge's middle the mean of its two ends and the two centres beside it."""
    grid = np.zeros((mapsize, mapsize))
    half = mapsize // 2
    grid[0, 0], grid[half, half], grid[0, half], grid[half, 0] = corner, centre, row_edge, column_edge
    step = half
    while step >= 2:
        half = step // 2
        for i in range(0, mapsize, step):
            for j in range(0, mapsize, step):
                grid[i + half, j + half] = (grid[i, j] + grid[(i + step) % mapsize, j] + grid[i, (j + step) % mapsize]
                                            + grid[(i + step) % mapsize, (j + step) % mapsize]) / 4
        for i in range(0, mapsize, step):
            for j in range(0, mapsize, step):
                grid[i, j + half] = (grid[i, j] + grid[i, (j + step) % mapsize] + grid[(i - half) % mapsize, j + half]
                                     + grid[i + half, j + half]) / 4
                grid[i + half, j] = (grid[i, j] + grid[(i + step) % mapsize, j] + grid[i + half, (j - half) % mapsize]
                                     + grid[i + half, j + half]) / 4
        step = half
    return grid


def test_the_plasma_fractal_interpolates_each_point_from_its_own_square_and_diamond():
    """With a huge roughness (d = 1e4) every displacement after level 0 is 1e-8 of the first ones (below float32's
    resolution), so the map is the level-0 values interpolated by diamond-square's means alone. The reference
    re-computes those means point by point from the four level-0 values read off the map (the rescaling to [0, 1]
    is affine, so it commutes with means); a diamond that averages the wrong centres does not match. 16 x 16, four
    keys; tolerance 1e-5 for float32 rounding of values in [0, 1]."""
    fractal = jax.jit(plasma_fractal, static_argnames="mapsize")
    for seed in range(4):
        grid = np.asarray(fractal(jax.random.key(seed), mapsize=16, roughness=1e4), np.float64)
        expected = _diamond_square_means(grid[0, 0], grid[8, 8], grid[0, 8], grid[8, 0], 16)
        np.testing.assert_allclose(grid, expected, atol=1e-5, err_msg=f"key {seed}")


def test_corrupt_refuses_images_that_are_not_a_batch_of_rgb():
    for shape in ((2, 8, 8), (2, 8, 8, 4), (8, 8, 3)):
        with pytest.raises(ValueError, match=re.escape(f"images must have shape [N, H, W, 3]; got {shape}")):
            corrupt(jnp.zeros(shape), "contrast", 1, jax.random.key(0))

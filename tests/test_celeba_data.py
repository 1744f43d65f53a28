"""CelebA: the reader against generated sets in the official and Kaggle layouts, the attribute selection, every
malformed case, and the generated cards' signal (each attribute readable from its own cell, whatever the light).

The written files are checked by reading them here with a few lines of plain Python, and the images by decoding
the cells' brightness here, so that neither the writer nor the reader is trusted to check the other.
"""

import csv
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import deep.data.celeba as celeba
from deep.data import (CELEBA_ATTRIBUTES, CELEBA_SPLITS, DataError, celeba_arrays, load_celeba, resolve_attributes,
                       write_celeba)

COUNTS = {"train": 5, "val": 3, "test": 2}
HEIGHT, WIDTH = 60, 48  # as written (the official cards are 218x178, height x width)
SIZE = (40, 32)         # as loaded
SEED = 2
OFFICIAL_ORDER = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
                  "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
                  "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face "
                  "Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair "
                  "Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young")


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    return write_celeba(tmp_path_factory.mktemp("celeba"), **COUNTS, height=HEIGHT, width=WIDTH, seed=SEED)


@pytest.fixture
def copy(celeba_root, tmp_path):
    """A copy of the generated set to break."""
    return shutil.copytree(celeba_root, tmp_path / "celeba")


def _written(root):
    """``{split: (names, attributes [N, 40] in {0, 1})}`` read from the text files without the package."""
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    values = {line.split()[0]: [(int(v) + 1) // 2 for v in line.split()[1:]] for line in lines[2:]}
    out = {split: ([], []) for split in CELEBA_SPLITS}
    for line in (root / "list_eval_partition.txt").read_text().splitlines():
        name, code = line.split()
        out[CELEBA_SPLITS[int(code)]][0].append(name)
        out[CELEBA_SPLITS[int(code)]][1].append(values[name])
    return {split: (names, np.array(rows, np.int32).reshape(-1, 40)) for split, (names, rows) in out.items()}


def _decode_cells(images):
    """Attributes read back from the cards: cell k (row k // 8, column k % 8 of a 5x8 grid of equal blocks, the cell
    centred in its block) is on when its centre pixel is brighter than the image's median, which is background."""
    images = np.asarray(images, np.float64).mean(axis=-1)
    height, width = images.shape[1:]
    rows = ((np.arange(40) // 8 + 0.5) * height / 5).astype(int)
    columns = ((np.arange(40) % 8 + 0.5) * width / 8).astype(int)
    background = np.median(images.reshape(len(images), -1), axis=1)
    return (images[:, rows, columns] > background[:, None]).astype(np.int32)


# ------------------------------------------------------------------------------------- names and selection


def test_attribute_names_and_splits_are_the_official_ones():
    assert CELEBA_ATTRIBUTES == tuple(OFFICIAL_ORDER.split())
    assert CELEBA_SPLITS == ("train", "val", "test")
    assert resolve_attributes() == resolve_attributes(40) == CELEBA_ATTRIBUTES
    assert resolve_attributes(10) == tuple(OFFICIAL_ORDER.split()[:10])
    assert resolve_attributes(10)[-1] == "Blond_Hair"
    assert resolve_attributes(np.int64(1)) == ("5_o_Clock_Shadow",)
    assert resolve_attributes(["Young", "Male", "Smiling"]) == ("Young", "Male", "Smiling")
    # A numpy array of names (e.g. a column read from a config table) is a selection like a list.
    assert resolve_attributes(np.array(["Smiling", "Bald"])) == ("Smiling", "Bald")


@pytest.mark.parametrize("attributes, phrase", [
    (0, "integer in 1..40"), (41, "integer in 1..40"), (True, "got the bool True"),
    ("Male", "single string 'Male'"), (["Male", "Nose"], r"attributes\[1\] = 'Nose' is not a CelebA attribute"),
    (("Male", "Young", "Male"), r"attributes\[2\] = 'Male' repeats attributes\[0\]"), ([], "empty sequence"),
    (1.5, "got float 1.5"), ([3], r"attributes\[0\] = 3 is not a CelebA attribute"),
], ids=["zero", "41", "bool", "string", "unknown", "repeated", "empty", "float", "int in list"])
def test_bad_attribute_selections_are_refused(attributes, phrase):
    with pytest.raises(ValueError, match=phrase) as raised:
        resolve_attributes(attributes)
    assert "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------------ the round trip


def test_the_writer_writes_the_official_text_format(celeba_root):
    total = sum(COUNTS.values())
    lines = (celeba_root / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == str(total) and lines[1].split() == OFFICIAL_ORDER.split() and len(lines) == total + 2
    names = [f"{i:06d}.jpg" for i in range(1, total + 1)]
    for name, line in zip(names, lines[2:]):
        assert re.fullmatch(re.escape(name) + "( (-1| 1)){40}", line), line
    codes = [0] * COUNTS["train"] + [1] * COUNTS["val"] + [2] * COUNTS["test"]
    partition = (celeba_root / "list_eval_partition.txt").read_text().splitlines()
    assert partition == [f"{name} {code}" for name, code in zip(names, codes)]
    for name in names:
        with Image.open(celeba_root / "img_align_celeba" / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (WIDTH, HEIGHT))


@pytest.mark.parametrize("split", CELEBA_SPLITS)
def test_each_split_round_trips(celeba_root, split):
    loaded = load_celeba(celeba_root, split, size=SIZE)
    names, expected = _written(celeba_root)[split]
    count = COUNTS[split]
    assert list(loaded) == ["images", "attributes"] and len(names) == count
    assert loaded["images"].dtype == np.uint8 and loaded["images"].shape == (count, *SIZE, 3)
    assert loaded["attributes"].dtype == np.int32 and loaded["attributes"].shape == (count, 40)
    np.testing.assert_array_equal(loaded["attributes"], expected)
    np.testing.assert_array_equal(_decode_cells(loaded["images"]), expected)  # the pictures say the same
    in_memory = celeba_arrays(count, HEIGHT, WIDTH, seed=SEED, split=CELEBA_SPLITS.index(split))
    np.testing.assert_array_equal(in_memory["attributes"], expected)
    assert set(np.unique(loaded["attributes"])) == {0, 1}


def test_first_t_and_named_selections(celeba_root):
    full = load_celeba(celeba_root, "train", size=SIZE)
    first = load_celeba(celeba_root, "train", attributes=10, size=SIZE)
    np.testing.assert_array_equal(first["attributes"], full["attributes"][:, :10])
    np.testing.assert_array_equal(first["images"], full["images"])
    named = load_celeba(celeba_root, "train", attributes=["Young", "5_o_Clock_Shadow", "Male"], size=SIZE)
    np.testing.assert_array_equal(named["attributes"], full["attributes"][:, [39, 0, 20]])
    with pytest.raises(ValueError, match="not a CelebA attribute"):
        load_celeba(celeba_root, "train", attributes=["Beard"])


def test_limit_keeps_the_first_examples(celeba_root):
    full = load_celeba(celeba_root, "val", size=SIZE)
    two = load_celeba(celeba_root, "val", size=SIZE, limit=2)
    for key in full:
        np.testing.assert_array_equal(two[key], full[key][:2])
    more = load_celeba(celeba_root, "val", size=SIZE, limit=100)
    assert len(more["images"]) == COUNTS["val"]


def test_threads_and_chunks_keep_the_order(celeba_root, monkeypatch):
    alone = load_celeba(celeba_root, "train", size=SIZE, workers=1)
    monkeypatch.setattr(celeba, "_CHUNK", 2)
    reported = []
    together = load_celeba(celeba_root, "train", size=SIZE, workers=3, progress=reported.append)
    assert reported == [2, 2, 1]  # each chunk's images, once decoded
    for key in alone:
        np.testing.assert_array_equal(together[key], alone[key])


def test_the_nested_image_folder(celeba_root, tmp_path):
    root = write_celeba(tmp_path, **COUNTS, height=HEIGHT, width=WIDTH, seed=SEED, nested=True)
    assert (root / "img_align_celeba" / "img_align_celeba" / "000001.jpg").is_file()
    assert not (root / "img_align_celeba" / "000001.jpg").exists()
    nested, flat = load_celeba(root, "test", size=SIZE), load_celeba(celeba_root, "test", size=SIZE)
    for key in flat:
        np.testing.assert_array_equal(nested[key], flat[key])


def _to_csv(root):
    """Kaggle's variant, written from the .txt files, which are then removed."""
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    with open(root / "list_attr_celeba.csv", "w", newline="") as file:
        writer = csv.writer(file)  # lines end in \r\n
        writer.writerow(["image_id", *lines[1].split()])
        writer.writerows(line.split() for line in lines[2:])
    with open(root / "list_eval_partition.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image_id", "partition"])
        writer.writerows(line.split() for line in (root / "list_eval_partition.txt").read_text().splitlines())
    (root / "list_attr_celeba.txt").unlink()
    (root / "list_eval_partition.txt").unlink()


def test_the_kaggle_csv_variant(celeba_root, copy):
    _to_csv(copy)
    assert (copy / "list_attr_celeba.csv").read_text().startswith("image_id,5_o_Clock_Shadow,")
    for split in CELEBA_SPLITS:
        from_csv, from_txt = load_celeba(copy, split, size=SIZE), load_celeba(celeba_root, split, size=SIZE)
        for key in from_txt:
            np.testing.assert_array_equal(from_csv[key], from_txt[key])


def test_the_official_txt_files_win_over_csv_files_beside_them(celeba_root, copy):
    """The .csv files are read only where the .txt is absent: a folder holding both (the official files and a
    leftover Kaggle copy, here unreadable) loads from the .txt."""
    for name in ("list_attr_celeba.csv", "list_eval_partition.csv"):
        (copy / name).write_text("not,the,csv,that,belongs,here\n")
    loaded, expected = load_celeba(copy, "val", size=SIZE), load_celeba(celeba_root, "val", size=SIZE)
    for key in expected:
        np.testing.assert_array_equal(loaded[key], expected[key])


def test_images_are_resized_as_pil_bilinear(celeba_root):
    loaded = load_celeba(celeba_root, "val", size=(13, 7))
    assert loaded["images"].shape == (COUNTS["val"], 13, 7, 3)
    names, _ = _written(celeba_root)["val"]
    for image, name in zip(loaded["images"], names):
        with Image.open(celeba_root / "img_align_celeba" / name) as original:
            expected = np.asarray(original.convert("RGB").resize((7, 13), Image.BILINEAR))
        np.testing.assert_array_equal(image, expected)
    same = load_celeba(celeba_root, "val", size=(HEIGHT, WIDTH))
    with Image.open(celeba_root / "img_align_celeba" / names[0]) as original:
        np.testing.assert_array_equal(same["images"][0], np.asarray(original))


# ------------------------------------------------------------------------------------------ the generated cards


def test_cards_carry_a_learnable_signal_and_an_independent_nuisance():
    cards = celeba_arrays(64, 40, 32, seed=5)
    assert cards["images"].dtype == np.uint8 and cards["attributes"].dtype == np.int32
    attributes = cards["attributes"]
    grey = cards["images"].astype(np.float64).mean(axis=-1)
    rows = ((np.arange(40) // 8 + 0.5) * 40 / 5).astype(int)
    columns = ((np.arange(40) % 8 + 0.5) * 32 / 8).astype(int)
    centres = grey[:, rows, columns]
    # One threshold separates every on cell from every off cell, across 64 lights: each attribute is learnable.
    assert centres[attributes == 1].min() > centres[attributes == 0].max() + 40
    np.testing.assert_array_equal(_decode_cells(cards["images"]), attributes)
    # The light varies from card to card (the nuisance), but not with the attributes.
    background = grey[:, 0, :].mean(axis=1)  # the top row of pixels is all background
    assert background.max() - background.min() > 50
    assert abs(np.corrcoef(background, attributes.mean(axis=1))[0, 1]) < 0.4
    assert 0.4 < attributes.mean() < 0.6 and len({tuple(row) for row in attributes}) == 64


def test_cards_are_deterministic_and_extend():
    cards = celeba_arrays(6, 20, 16, seed=3)
    again = celeba_arrays(4, 20, 16, seed=3)
    for key in cards:
        np.testing.assert_array_equal(cards[key][:4], again[key])
    np.testing.assert_array_equal(celeba_arrays(6, 20, 16, attributes=10, seed=3)["attributes"],
                                  cards["attributes"][:, :10])
    assert not np.array_equal(celeba_arrays(6, 20, 16, seed=4)["attributes"], cards["attributes"])
    assert not np.array_equal(celeba_arrays(6, 20, 16, seed=3, split=1)["attributes"], cards["attributes"])


# ------------------------------------------------------------------------------------------ malformed data


def _edit(path, number, change):
    """Replaces line ``number`` (1-based) of a text file by ``change(line)``."""
    lines = path.read_text().splitlines()
    lines[number - 1] = change(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


ATTR, PART, IMAGES = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"

# (case, mutation of the root, the path the message must name relative to the root, a phrase it must contain)
MALFORMED = [
    ("no attribute file", lambda r: (r / ATTR).unlink(), ATTR, "not found (nor list_attr_celeba.csv)"),
    ("no partition file", lambda r: (r / PART).unlink(), PART, "not found (nor list_eval_partition.csv)"),
    ("no image folder", lambda r: shutil.rmtree(r / IMAGES), IMAGES, "image folder not found"),
    ("count not an integer", lambda r: _edit(r / ATTR, 1, lambda line: "ten"), f"{ATTR}, line 1",
     "expected the number of images (one integer >= 0)"),
    ("count with a suffix", lambda r: _edit(r / ATTR, 1, lambda line: line + "x"), f"{ATTR}, line 1",
     "expected the number of images (one integer >= 0)"),
    ("count missing", lambda r: _edit(r / ATTR, 1, lambda line: ""), f"{ATTR}, line 2",
     "expected the number of images"),
    ("count mismatch", lambda r: _edit(r / ATTR, 1, lambda line: "11"), f"{ATTR}, line 1",
     "declares 11 images but the file lists 10"),
    ("misspelt name", lambda r: _edit(r / ATTR, 2, lambda line: line.replace("Attractive", "Atractive")),
     f"{ATTR}, line 2", "column name 3 is 'Atractive' where 'Attractive' belongs"),
    ("reordered names", lambda r: _edit(r / ATTR, 2, lambda line: " ".join(reversed(line.split()))),
     f"{ATTR}, line 2", "column name 1 is 'Young' where '5_o_Clock_Shadow' belongs"),
    ("39 names", lambda r: _edit(r / ATTR, 2, lambda line: line.replace(" Young", "")), f"{ATTR}, line 2",
     "39 column names; expected the 40 CelebA attribute names in the official order"),
    ("short row", lambda r: _edit(r / ATTR, 5, lambda line: line[:-3]), f"{ATTR}, line 5",
     "39 values after the image name '000003.jpg'; expected 40"),
    ("long row", lambda r: _edit(r / ATTR, 6, lambda line: line + "  1"), f"{ATTR}, line 6", "41 values"),
    ("value 0", lambda r: _edit(r / ATTR, 4, lambda line: line[:-2] + " 0"), f"{ATTR}, line 4",
     "value '0' of Young for 000002.jpg; expected 1 or -1"),
    ("value 2", lambda r: _edit(r / ATTR, 3, lambda line: line.replace(" 1", " 2", 1)), f"{ATTR}, line 3",
     "expected 1 or -1"),
    ("duplicate image", lambda r: _edit(r / ATTR, 7, lambda line: "000002.jpg" + line[10:]), f"{ATTR}, line 7",
     "image 000002.jpg is listed twice (first on line 4)"),
    ("empty attribute file", lambda r: (r / ATTR).write_text(""), ATTR, "ends before its first line"),
    ("no rows", lambda r: (r / ATTR).write_text("0\n" + OFFICIAL_ORDER + "\n"), f"{PART}, line 1",
     f"image 000001.jpg is not in {{root}}/{ATTR}"),
    ("not UTF-8", lambda r: (r / ATTR).write_bytes(b"10\n\xff\xfe\n"), ATTR, "not a UTF-8 text file"),
    ("attribute file is a folder", lambda r: (r / ATTR).unlink() or (r / ATTR).mkdir(), ATTR, "is a folder"),
    ("code 3", lambda r: _edit(r / PART, 2, lambda line: line[:-1] + "3"), f"{PART}, line 2",
     "split code '3' for 000002.jpg; expected 0 (train), 1 (val) or 2 (test)"),
    ("code train", lambda r: _edit(r / PART, 4, lambda line: line[:-1] + "train"), f"{PART}, line 4",
     "split code 'train'"),
    ("three fields", lambda r: _edit(r / PART, 3, lambda line: line + " 1"), f"{PART}, line 3",
     "3 fields '000003.jpg 0 1'; expected an image name and a split code"),
    ("partition duplicate", lambda r: _edit(r / PART, 9, lambda line: "000001.jpg 1"), f"{PART}, line 9",
     "image 000001.jpg is listed twice (first on line 1)"),
    ("unknown image", lambda r: _edit(r / PART, 8, lambda line: "999999.jpg 1"), f"{PART}, line 8",
     f"image 999999.jpg is not in {{root}}/{ATTR}; every image of the partition must have attributes"),
    ("missing image", lambda r: (r / IMAGES / "000002.jpg").unlink(), f"{IMAGES}/000002.jpg",
     f"missing; every image of the partition file must be in {{root}}/{IMAGES}"),
    ("garbage image", lambda r: (r / IMAGES / "000003.jpg").write_bytes(b"not a jpeg"), f"{IMAGES}/000003.jpg",
     "not a readable image (unknown format); expected a JPEG image"),
    ("truncated image", lambda r: (r / IMAGES / "000004.jpg").write_bytes((r / IMAGES / "000004.jpg").read_bytes()[
        :300]), f"{IMAGES}/000004.jpg", "not a readable image ("),
    ("image is a folder", lambda r: (r / IMAGES / "000005.jpg").unlink() or (r / IMAGES / "000005.jpg").mkdir(),
     f"{IMAGES}/000005.jpg", "is a folder; expected a JPEG image"),
]


def _check(raised, root, where, phrase):
    message = str(raised.value)
    assert "\n" not in message, message
    assert f"{root / where}" in message, message
    assert phrase.replace("{root}", str(root)) in message, message
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("case, mutate, where, phrase", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_each_malformed_case_is_one_clear_line_naming_the_path(copy, case, mutate, where, phrase):
    mutate(copy)
    with pytest.raises(DataError, match=re.escape(str(copy / where))) as raised:
        load_celeba(copy, "train", size=(8, 8))
    _check(raised, copy, where, phrase)


def test_the_first_bad_image_in_order_is_reported(copy, monkeypatch):
    monkeypatch.setattr(celeba, "_CHUNK", 1)
    for name in ("000004.jpg", "000002.jpg", "000005.jpg"):
        (copy / IMAGES / name).unlink()
    for _ in range(3):
        with pytest.raises(DataError, match=r"000002\.jpg: missing; every image of the partition file must be in "):
            load_celeba(copy, "train", size=(8, 8), workers=4)


CSV_MALFORMED = [
    ("attribute header", lambda r: _edit(r / "list_attr_celeba.csv", 1, lambda line: line.replace("image_id", "id")),
     "list_attr_celeba.csv, line 1", "column name 1 is 'id' where 'image_id' belongs; expected image_id, then the 40"),
    ("value 1.0", lambda r: _edit(r / "list_attr_celeba.csv", 3, lambda line: line.rsplit(",", 1)[0] + ",1.0"),
     "list_attr_celeba.csv, line 3", "value '1.0' of Young for 000002.jpg; expected 1 or -1"),
    ("short row", lambda r: _edit(r / "list_attr_celeba.csv", 4, lambda line: line.rsplit(",", 1)[0]),
     "list_attr_celeba.csv, line 4", "39 values after the image name '000003.jpg'"),
    ("partition header", lambda r: _edit(r / "list_eval_partition.csv", 1, lambda line: "image_id,split"),
     "list_eval_partition.csv, line 1", "header 'image_id split'; expected 'image_id,partition'"),
    ("code 5", lambda r: _edit(r / "list_eval_partition.csv", 2, lambda line: line[:-1] + "5"),
     "list_eval_partition.csv, line 2", "split code '5' for 000001.jpg"),
]


@pytest.mark.parametrize("case, mutate, where, phrase", CSV_MALFORMED, ids=[case[0] for case in CSV_MALFORMED])
def test_malformed_csv_files_name_the_file_and_line(copy, case, mutate, where, phrase):
    _to_csv(copy)
    mutate(copy)
    with pytest.raises(DataError, match=re.escape(str(copy / where))) as raised:
        load_celeba(copy, "train", size=(8, 8))
    _check(raised, copy, where, phrase)


def test_missing_root_and_an_empty_split(tmp_path):
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'absent'))}: data folder not found; expected "
                                        f"root/img_align_celeba/<name>.jpg"):
        load_celeba(tmp_path / "absent", "train")
    root = write_celeba(tmp_path / "no_test", train=2, val=1, test=0, height=20, width=16)
    with pytest.raises(DataError, match=re.escape(f"{root / PART}: no image of split 'test' (code 2); the file lists "
                                                  f"2 train, 1 val, 0 test")):
        load_celeba(root, "test")


@pytest.mark.parametrize("arguments, phrase", [
    ({"split": "training"}, "split must be one of train, val, test; got 'training'"),
    ({"split": 0}, "split must be one of train, val, test; got 0"),
    ({"size": (0, 8)}, r"size must be two positive integers \(height, width\); got \(0, 8\)"),
    ({"size": 128}, "size must be two positive integers"),
    ({"size": (8, 8, 3)}, "size must be two positive integers"),
    ({"size": (8.0, 8)}, "size must be two positive integers"),
    ({"size": "ab"}, "size must be two positive integers"),
    ({"limit": 0}, "limit must be None or an integer >= 1; got 0"),
    ({"limit": 2.0}, "limit must be None or an integer >= 1; got 2.0"),
    ({"limit": True}, "limit must be None or an integer >= 1; got True"),
    ({"workers": 0}, "workers must be None or an integer >= 1; got 0"),
    ({"attributes": 41}, "integer in 1..40"),
], ids=["split", "split int", "size 0", "size int", "size 3", "size float", "size str", "limit 0", "limit float",
        "limit bool", "workers", "attributes"])
def test_bad_arguments_are_one_line_value_errors(celeba_root, arguments, phrase):
    with pytest.raises(ValueError, match=phrase) as raised:
        load_celeba(celeba_root, **{"split": "train", **arguments})
    assert "\n" not in str(raised.value)


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(ValueError, match="val must be an integer >= 0; got -1"):
        write_celeba(tmp_path, val=-1)
    with pytest.raises(ValueError, match="train \\+ val \\+ test must be at least 1"):
        write_celeba(tmp_path, train=0, val=0, test=0)
    with pytest.raises(ValueError, match="quality must be an integer in 1..100; got 0"):
        write_celeba(tmp_path, quality=0)
    with pytest.raises(ValueError, match="count must be an integer >= 1; got 0"):
        celeba_arrays(0)


def test_the_jpeg_quality_is_the_one_asked_for(tmp_path):
    """quality reaches PIL's JPEG encoder: the same card at quality 20 is a much smaller file than at 95."""
    sizes = []
    for quality in (20, 95):
        root = write_celeba(tmp_path / str(quality), train=1, val=0, test=0, height=HEIGHT, width=WIDTH, seed=SEED,
                            quality=quality)
        sizes.append((root / "img_align_celeba" / "000001.jpg").stat().st_size)
    assert sizes[0] < 0.8 * sizes[1], sizes


def test_a_named_selection_of_the_cards_is_those_columns():
    cards = celeba_arrays(6, 20, 16, seed=3)
    named = celeba_arrays(6, 20, 16, attributes=["Young", "5_o_Clock_Shadow", "Male"], seed=3)
    np.testing.assert_array_equal(named["attributes"], cards["attributes"][:, [39, 0, 20]])
    np.testing.assert_array_equal(named["images"], cards["images"])


def test_cards_have_mild_pixel_noise():
    """The mild Gaussian noise of the docstring (sigma 0.02, about 5 grey levels): neighbouring background pixels
    of the top row differ by a few levels, where the smooth light gradient alone changes them by under one."""
    cards = celeba_arrays(8, 40, 32, seed=5)
    steps = np.diff(cards["images"][:, 0].astype(np.float64), axis=1)
    assert 3 < steps.std() < 15, steps.std()


@pytest.mark.parametrize("arguments, message", [({"height": 0}, "height must be an integer >= 1; got 0"),
                                                ({"seed": -1}, "seed must be an integer >= 0; got -1")])
def test_bad_card_sizes_and_seeds_are_refused_before_anything_is_written(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        write_celeba(tmp_path / "set", train=2, val=0, test=0, **{"height": HEIGHT, "width": WIDTH, **arguments})
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("variant", ["byte-order mark", "spaces after commas", "rows of empty cells"])
def test_csv_files_saved_by_other_tools_are_read_alike(celeba_root, copy, variant):
    """Kaggle's CSV as a spreadsheet may save it: with a UTF-8 byte-order mark before the header (Excel's "CSV
    UTF-8"), with a space after each comma, or with rows of empty cells (",,," below the data, where cells were
    cleared). Each reads as the official .txt files do."""
    _to_csv(copy)
    for name in ("list_attr_celeba.csv", "list_eval_partition.csv"):
        path = copy / name
        if variant == "byte-order mark":
            path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        elif variant == "spaces after commas":
            path.write_text(path.read_text().replace(",", ", "))
        else:
            path.write_text(path.read_text() + ",,,\n , \n")
    from_csv, from_txt = load_celeba(copy, "val", size=SIZE), load_celeba(celeba_root, "val", size=SIZE)
    for key in from_txt:
        np.testing.assert_array_equal(from_csv[key], from_txt[key])


def test_a_greyscale_jpeg_is_converted_to_rgb(celeba_root, copy):
    """Every image comes out RGB: a single-channel JPEG is converted (its three channels equal) before the resize,
    as torchvision's pipeline on ``Image.open(...).convert("RGB")`` does. Reference: PIL's convert then resize."""
    names, _ = _written(celeba_root)["val"]
    path = copy / "img_align_celeba" / names[1]
    with Image.open(path) as image:
        image.convert("L").save(path, quality=95)
    loaded = load_celeba(copy, "val", size=SIZE)
    with Image.open(path) as image:
        assert image.mode == "L"
        expected = np.asarray(image.convert("RGB").resize(SIZE[::-1], Image.BILINEAR))
    np.testing.assert_array_equal(loaded["images"][1], expected)

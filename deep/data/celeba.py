r"""CelebA's "Align&Cropped" release: 40 binary face attributes per image, the authors' T-attribute benchmark.

The layout the authors' loader reads (``reference/official_implementation.md``, "CelebA"):

* ``root/img_align_celeba/<name>.jpg`` (or the nested ``root/img_align_celeba/img_align_celeba/<name>.jpg`` that
  some archives unpack to): 202,599 JPEGs of 178x218 (width x height).
* ``root/list_attr_celeba.txt``: line 1 the number of images, line 2 the 40 attribute names (:data:`CELEBA_ATTRIBUTES`,
  in this order), then one line per image, ``<name> v_1 ... v_40`` with each value 1 or -1, whitespace-separated.
* ``root/list_eval_partition.txt``: ``<name> <code>`` per line, code 0 = train, 1 = val, 2 = test
  (:data:`CELEBA_SPLITS`): 162,770 / 19,867 / 19,962 images.

Kaggle's copy of the data set ships CSV files instead, read when the ``.txt`` is absent: ``list_attr_celeba.csv``
(header ``image_id,<the 40 names>``, rows ``<name>,1,-1,...``) and ``list_eval_partition.csv`` (header
``image_id,partition``).

The authors keep the first T attributes in file order (T = 10 in their config: 5_o_Clock_Shadow ... Blond_Hair,
:func:`resolve_attributes`), map :math:`\pm 1 \mapsto \{1, 0\}` and resize every image to 128x128 with
torchvision's ``Resize`` on a PIL image, i.e. PIL's antialiased bilinear filter; :func:`load_celeba` does the same.
Their test split is never used.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from deep.data.errors import DataError
from deep.data.npy_split import os_error
from scm.linear_gaussian import as_count, check_count

__all__ = ["CELEBA_ATTRIBUTES", "CELEBA_SPLITS", "resolve_attributes", "load_celeba"]

CELEBA_ATTRIBUTES = ("5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
                     "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
                     "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
                     "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
                     "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
                     "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
                     "Wearing_Necktie", "Young")
CELEBA_SPLITS = ("train", "val", "test")  # partition codes 0, 1, 2

_IMAGE_FOLDER = "img_align_celeba"
_ATTRIBUTE_FILE = "list_attr_celeba"
_PARTITION_FILE = "list_eval_partition"
_LAYOUT = (f"root/{_IMAGE_FOLDER}/<name>.jpg, root/{_ATTRIBUTE_FILE}.txt (or .csv) and root/{_PARTITION_FILE}.txt "
           f"(or .csv) (the CelebA Align&Cropped layout)")
_VALUES = frozenset({"1", "-1"})  # an attribute present, absent
_CODES = {"0": 0, "1": 1, "2": 2}
_COUNT = re.compile(r"[0-9]+")
_CHUNK = 64  # images per task of the decoding threads: small, so that a bad image stops the load early


def resolve_attributes(attributes: int | Sequence[str] | None = None) -> tuple[str, ...]:
    """The attribute names a selection stands for, in the order of the returned columns.

    Args:
        attributes: ``None`` for all 40; an integer T in 1..40 for the first T in file order (the authors'
            convention: their config keeps T = 10, 5_o_Clock_Shadow ... Blond_Hair); or a sequence of names from
            :data:`CELEBA_ATTRIBUTES`, each at most once, kept in the given order.

    Raises:
        ValueError: for a count outside 1..40, an unknown or repeated name, an empty sequence, a bool, a single
            string or any other type.
    """
    allowed = (f"None, an integer T in 1..{len(CELEBA_ATTRIBUTES)} (the first T attributes) or a sequence of names "
               f"from {', '.join(CELEBA_ATTRIBUTES)}")
    if attributes is None:
        return CELEBA_ATTRIBUTES
    if isinstance(attributes, (bool, np.bool_)):
        raise ValueError(f"attributes must be {allowed}; got the bool {attributes!r}")
    if isinstance(attributes, (int, np.integer)):
        if not 1 <= attributes <= len(CELEBA_ATTRIBUTES):
            raise ValueError(f"attributes must be an integer in 1..{len(CELEBA_ATTRIBUTES)} (the first T attributes in "
                             f"file order); got {attributes}")
        return CELEBA_ATTRIBUTES[:int(attributes)]
    if isinstance(attributes, (str, bytes)):
        raise ValueError(f"attributes must be {allowed}; got the single string {attributes!r} (write "
                         f"[{attributes!r}] for one attribute)")
    if not isinstance(attributes, Sequence) and not isinstance(attributes, np.ndarray):
        raise ValueError(f"attributes must be {allowed}; got {type(attributes).__name__} {attributes!r}")
    names = tuple(attributes)
    if not names:
        raise ValueError(f"attributes must be {allowed}; got an empty sequence")
    for position, name in enumerate(names):
        if not isinstance(name, str) or name not in CELEBA_ATTRIBUTES:
            raise ValueError(f"attributes[{position}] = {name!r} is not a CelebA attribute; allowed names: "
                             f"{', '.join(CELEBA_ATTRIBUTES)}")
        if name in names[:position]:
            raise ValueError(f"attributes[{position}] = {name!r} repeats attributes[{names.index(name)}]; each "
                             f"attribute may be selected once")
    return names


def _check_arguments(split, size, limit, workers) -> tuple[int, int]:
    if not isinstance(split, str) or split not in CELEBA_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CELEBA_SPLITS)}; got {split!r}")
    if (isinstance(size, (str, bytes)) or not isinstance(size, (Sequence, np.ndarray)) or len(size) != 2
            or any(as_count(s, 1) is None for s in size)):
        raise ValueError(f"size must be two positive integers (height, width); got {size!r}")
    for name, value in (("limit", limit), ("workers", workers)):
        if value is not None:
            check_count(name, value, 1, or_none=True)
    return int(size[0]), int(size[1])


def _shown(fields: list[str], limit: int = 60) -> str:
    text = " ".join(fields)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _find_list(root: Path, stem: str) -> Path:
    """``root/<stem>.txt``, else ``root/<stem>.csv`` (Kaggle's copy)."""
    for suffix in (".txt", ".csv"):
        if (root / f"{stem}{suffix}").exists():
            return root / f"{stem}{suffix}"
    raise DataError(f"{root / f'{stem}.txt'}: not found (nor {stem}.csv); expected {_LAYOUT}")


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-blank line: whitespace-separated in a ``.txt``, comma-separated (and
    stripped) in a ``.csv``."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file (byte {error.start} cannot be decoded); expected the "
                        f"{path.name} of the CelebA release") from None
    except OSError as error:
        raise os_error(path, error, "a text file") from None
    if path.suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            for fields in reader:
                fields = [field.strip() for field in fields]
                if any(fields):
                    yield reader.line_num, fields
        except csv.Error as error:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({error})") from None
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if fields:
                yield number, fields


def _expect(records: Iterator[tuple[int, list[str]]], path: Path, what: str) -> tuple[int, list[str]]:
    record = next(records, None)
    if record is None:
        raise DataError(f"{path}: ends before {what}; expected the {path.name} of the CelebA release")
    return record


def _check_header(path: Path, number: int, names: list[str], prefix: tuple[str, ...]) -> None:
    """The attribute names of the header line (after ``prefix``, e.g. ``image_id``) are exactly CELEBA_ATTRIBUTES."""
    expected = prefix + CELEBA_ATTRIBUTES
    if names == list(expected):
        return
    where = f"{path}, line {number}"
    allowed = (f"expected {''.join(f'{name}, then ' for name in prefix)}the {len(CELEBA_ATTRIBUTES)} CelebA "
               f"attribute names in the official order ({CELEBA_ATTRIBUTES[0]} ... {CELEBA_ATTRIBUTES[-1]})")
    for position, (name, wanted) in enumerate(zip(names, expected)):
        if name != wanted:
            raise DataError(f"{where}: column name {position + 1} is {name!r} where {wanted!r} belongs; {allowed}")
    raise DataError(f"{where}: {len(names)} column names; {allowed}")


def _read_attributes(path: Path) -> tuple[dict[str, int], np.ndarray]:
    """``{image name: row}`` and the ``[N, 40]`` int8 table of 0/1 of the attribute file, validated."""
    records = _records(path)
    if path.suffix == ".csv":
        number, fields = _expect(records, path, "its header line")
        _check_header(path, number, fields, ("image_id",))
        declared = None
    else:
        number, fields = _expect(records, path, "its first line (the number of images)")
        if len(fields) != 1 or not _COUNT.fullmatch(fields[0]):
            raise DataError(f"{path}, line {number}: expected the number of images (one integer >= 0) as in the "
                            f"official file; got {_shown(fields)}")
        declared = (number, int(fields[0]))
        number, fields = _expect(records, path, "the line of attribute names")
        _check_header(path, number, fields, ())
    rows: dict[str, int] = {}
    lines: list[int] = []
    values: list[list[bool]] = []
    for number, fields in records:
        name, row = fields[0], fields[1:]
        if len(row) != len(CELEBA_ATTRIBUTES):
            raise DataError(f"{path}, line {number}: {len(row)} values after the image name {name!r}; expected "
                            f"{len(CELEBA_ATTRIBUTES)} (1 or -1 per attribute)")
        if not _VALUES.issuperset(row):
            position = next(i for i, value in enumerate(row) if value not in _VALUES)
            raise DataError(f"{path}, line {number}: value {row[position]!r} of {CELEBA_ATTRIBUTES[position]} for "
                            f"{name}; expected 1 or -1")
        if name in rows:
            raise DataError(f"{path}, line {number}: image {name} is listed twice (first on line "
                            f"{lines[rows[name]]}); each image must appear once")
        rows[name] = len(lines)
        lines.append(number)
        values.append([value == "1" for value in row])
    if declared is not None and declared[1] != len(rows):
        raise DataError(f"{path}, line {declared[0]}: declares {declared[1]} images but the file lists {len(rows)}; "
                        f"the first line must be the number of image lines")
    return rows, np.array(values, np.int8).reshape(len(rows), len(CELEBA_ATTRIBUTES))


def _read_partition(path: Path, attribute_rows: dict[str, int], attribute_path: Path) -> list[tuple[str, int]]:
    """``(image name, split code)`` of each line of the partition file, in file order, validated."""
    records = _records(path)
    if path.suffix == ".csv":
        number, fields = _expect(records, path, "its header line")
        if fields != ["image_id", "partition"]:
            raise DataError(f"{path}, line {number}: header {_shown(fields)}; expected 'image_id,partition'")
    partition: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for number, fields in records:
        if len(fields) != 2:
            raise DataError(f"{path}, line {number}: {len(fields)} fields {_shown(fields)}; expected an image name "
                            f"and a split code (0 = train, 1 = val, 2 = test)")
        name, code = fields
        if code not in _CODES:
            raise DataError(f"{path}, line {number}: split code {code!r} for {name}; expected 0 (train), 1 (val) or "
                            f"2 (test)")
        if name in seen:
            raise DataError(f"{path}, line {number}: image {name} is listed twice (first on line {seen[name]}); each "
                            f"image must appear once")
        if name not in attribute_rows:
            raise DataError(f"{path}, line {number}: image {name} is not in {attribute_path}; every image of the "
                            f"partition must have attributes")
        seen[name] = number
        partition.append((name, _CODES[code]))
    return partition


def _image_folder(root: Path) -> Path:
    folder = root / _IMAGE_FOLDER
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found; expected {_LAYOUT}")
    nested = folder / _IMAGE_FOLDER
    return nested if nested.is_dir() else folder


def _load_image(path: Path, height: int, width: int) -> np.ndarray:
    """The image at ``path`` as RGB, resized to ``height x width`` by PIL's antialiased bilinear filter, uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            resized = rgb.resize((width, height), Image.Resampling.BILINEAR)
    except FileNotFoundError as error:
        raise DataError(f"{os_error(path, error, 'a JPEG image')}; every image of the partition file must be in "
                        f"{path.parent}") from None
    except (IsADirectoryError, PermissionError) as error:
        raise os_error(path, error, "a JPEG image") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown format); expected a JPEG image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path}: not a readable image ({reason}); expected a JPEG image") from None
    return np.asarray(resized, np.uint8)


def load_celeba(root: str | os.PathLike, split: str, attributes: int | Sequence[str] | None = None,
                size: tuple[int, int] = (128, 128), limit: int | None = None,
                workers: int | None = None, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    r"""Reads one CelebA split: images resized as the authors do and the selected attributes as 0/1.

    Examples come in the order of the partition file, filtered to ``split``. Each image is converted to RGB and
    resized to ``size`` with PIL's bilinear filter (antialiased when shrinking), which is what the authors'
    ``torchvision.transforms.Resize((128, 128))`` does to a PIL image. An attribute value
    :math:`v \in \{1, -1\}` becomes :math:`y = (v + 1) / 2 \in \{1, 0\}`.

    Images stay ``uint8`` on purpose: the train split (162,770 images) at 128x128 is 8.0 GB as uint8 and 32 GB as
    float32. The training code converts a batch to float in [0, 1] on the device (divide by 255).

    Args:
        root: the folder holding ``img_align_celeba/``, ``list_attr_celeba.txt`` (or ``.csv``) and
            ``list_eval_partition.txt`` (or ``.csv``).
        split: one of :data:`CELEBA_SPLITS` (partition code 0, 1 or 2).
        attributes: which attributes, as :func:`resolve_attributes` takes them (None = all 40; T = the first T;
            or names, in the order of the returned columns).
        size: ``(height, width)`` of the returned images; the authors' 128x128.
        limit: keep only the first ``limit`` examples of the split (an integer >= 1; for quick runs).
        workers: threads decoding the JPEGs (PIL releases the GIL while decoding and resizing); None = min(8, the
            number of CPUs). The result does not depend on it.
        progress: called with the number of images just decoded, after each chunk of them (a progress bar's
            ``update``: the train split takes minutes).

    Returns:
        ``images [N, height, width, 3]`` uint8; ``attributes [N, T]`` int32 in {0, 1}, columns in the order of
        :func:`resolve_attributes`.

    Raises:
        ValueError: for a bad argument (split, size, limit, workers, attributes).
        DataError: one line naming the first offending folder or file (and line): a missing root, attribute or
            partition file (neither ``.txt`` nor ``.csv``) or image folder; in the attribute file, a first line
            that is not the number of image lines, column names other than :data:`CELEBA_ATTRIBUTES` in order, a
            row of the wrong length, a value other than 1 or -1 or an image listed twice; in the partition file, a
            line that is not ``<name> <code>``, a code other than 0, 1 or 2, an image listed twice or absent from
            the attribute file; a split with no image; a missing or unreadable image.
    """
    height, width = _check_arguments(split, size, limit, workers)
    names = resolve_attributes(attributes)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; expected {_LAYOUT}")
    attribute_path = _find_list(root, _ATTRIBUTE_FILE)
    partition_path = _find_list(root, _PARTITION_FILE)
    image_folder = _image_folder(root)

    rows, table = _read_attributes(attribute_path)
    partition = _read_partition(partition_path, rows, attribute_path)
    code = CELEBA_SPLITS.index(split)
    selected = [name for name, image_code in partition if image_code == code]
    if not selected:
        counts = np.bincount([image_code for _, image_code in partition], minlength=len(CELEBA_SPLITS))
        found = ", ".join(f"{counts[i]} {CELEBA_SPLITS[i]}" for i in range(len(CELEBA_SPLITS)))
        raise DataError(f"{partition_path}: no image of split {split!r} (code {code}); the file lists {found}")
    selected = selected[:limit]

    columns = [CELEBA_ATTRIBUTES.index(name) for name in names]
    labels = table[[rows[name] for name in selected]][:, columns].astype(np.int32)
    images = np.empty((len(selected), height, width, 3), np.uint8)

    def decode(start: int) -> None:
        for index in range(start, min(start + _CHUNK, len(selected))):
            images[index] = _load_image(image_folder / selected[index], height, width)

    workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
    workers = min(workers, math.ceil(len(selected) / _CHUNK))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
        # In order: the first failing chunk reported is the earliest, and map cancels the chunks not yet started.
        starts = range(0, len(selected), _CHUNK)
        for start, _ in zip(starts, executor.map(decode, starts)):
            if progress is not None:
                progress(min(_CHUNK, len(selected) - start))
    return {"images": images, "attributes": labels}

"""What every experiment and benchmark script shares: flags from dataclasses, one-line errors, atomic output.

Scripts are thin: parse flags into a frozen, validated config dataclass, call the library, write JSON and a PNG.
"""

from __future__ import annotations

import _thread
import argparse
import dataclasses
import datetime
import errno
import functools
import json
import math
import os
import platform
import sys
import tempfile
import threading
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from deep.cli import OneLineArgumentParser
from deep.files import write_atomically  # the scripts import it from here too


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help where it tells the reader something: not for switches (off unless
    given), for empty defaults, or for help that already says what its default is (``... (default: the dataset's)``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is False or action.default == "" or "(default" in help_text:
            return help_text
        return super()._get_help_string(action)


def flag(name: str) -> str:
    """The command-line flag of a config field: ``num_thetas`` -> ``--num-thetas``."""
    return "--" + name.replace("_", "-")


def require_integer(config: Any, name: str, least: int, why: str = "") -> None:
    """Refuses an integer field of ``config`` below ``least`` in one line naming its flag (``why`` in brackets)."""
    value = getattr(config, name)
    if value < least:
        raise ValueError(f"{flag(name)} must be an integer >= {least}{f' ({why})' if why else ''}; got {value}")


def require_folder(option: str, path: str) -> None:
    """Refuses a path flag's value (``""``: not given) that is not a folder, saying whether it is missing or a
    file."""
    if path and not Path(path).is_dir():
        raise FileNotFoundError(f"{option}: {'not a folder (a file)' if Path(path).exists() else 'no such folder'}: "
                                f"{path}")


def require_file(option: str, path: str) -> None:
    """Refuses a path flag's value (``""``: not given) that is not a file, saying whether it is missing or a
    folder."""
    if path and not Path(path).is_file():
        raise FileNotFoundError(f"{option}: {'not a file (a folder)' if Path(path).exists() else 'no such file'}: "
                                f"{path}")


def require_finite(config: Any, name: str, positive: bool = True) -> None:
    """Refuses a number field of ``config`` that is not finite and > 0 (``>= 0`` unless ``positive``)."""
    value = getattr(config, name)
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ValueError(f"{flag(name)} must be a finite number {'>' if positive else '>='} 0; got {value}")


def parser_for(config_class: type, description: str, prog: str | None = None) -> OneLineArgumentParser:
    """Builds a parser with one flag per field of ``config_class`` (a dataclass), defaults from the dataclass.

    Each field's ``metadata["help"]`` is its help text. Booleans become ``--flag``; tuples take comma-separated
    values (parsed and validated by the dataclass itself, so one place owns the rules). A field with
    ``metadata["positional"]`` is a positional argument of one or more values instead (a list, the dataclass's to
    convert).
    """
    parser = OneLineArgumentParser(description=description, prog=prog,
                                   formatter_class=DefaultsHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        help_text = field.metadata.get("help", "")
        default = field.default
        if field.metadata.get("positional"):
            parser.add_argument(field.name, nargs="+", help=help_text, metavar=field.name.upper())
            continue
        if hints[field.name] is bool:
            parser.add_argument(flag(field.name), action="store_true", default=default, help=help_text)
            continue
        kind = hints[field.name]
        if kind in (int, float):
            parse = _number_parser(kind, field.name)
        else:
            parse = str
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(flag(field.name), type=parse, default=shown, help=help_text, metavar=field.name.upper())
    return parser


def _number_parser(kind: type, name: str) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} is required, "
                                             f"got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


# What ``jax.random.key`` accepts (a C long: larger or smaller seeds raise OverflowError deep inside JAX).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def parse_config(config_class: type, parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                 out_kind: str | None = None):
    """Parses ``argv`` into ``config_class``; a ``ValueError`` from its validation becomes a one-line error.

    Integer fields named ``seed`` or ``*_seed`` must lie in the range JAX's random keys accept. A truthy ``out``
    field is checked with :func:`check_output_path` and ``out_kind`` (``"file"``, ``"folder"`` or ``None``: decided
    by a ``.json`` suffix).
    """
    namespace = parser.parse_args(argv)
    made_before = len(_MADE_FOLDERS)
    try:
        check_seeds(config_class, vars(namespace))
        config = config_class(**vars(namespace))
        if getattr(config, "out", ""):
            check_output_path(config.out, kind=out_kind)
        return config
    except ValueError as error:
        # Made by a check that passed (a --trace folder) before one that failed.
        _remove_if_empty(_MADE_FOLDERS[made_before:])
        parser.error(str(error))


def check_seeds(config_class: type, values: dict[str, Any]) -> None:
    """Refuses a seed (an ``int`` field named ``seed`` or ending in ``_seed``) outside ``[SEED_MIN, SEED_MAX]``."""
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if (field.name == "seed" or field.name.endswith("_seed")) and hints[field.name] is int:
            value = values.get(field.name, field.default)
            if isinstance(value, int) and not SEED_MIN <= value <= SEED_MAX:
                raise ValueError(f"{flag(field.name)} must be an integer in [-2^63, 2^63 - 1]; got {value}")


def check_output_path(out: str, kind: str | None = None, name: str = "--out") -> None:
    """Proves, before any work, that ``out`` (given as flag ``name``) can be written, or raises a one-line
    ``ValueError`` naming it.

    ``kind`` is what the script writes there: ``"file"`` (one JSON file at ``out``), ``"folder"`` (files inside
    ``out``) or ``None``, a file when ``out`` ends in ``.json`` and a folder otherwise. Refused: a file path that is
    a folder, a folder that is a file, either below a file, and a place where the folder cannot be made or a file
    cannot be created (checked by making the folder and a probe file in it; the file is removed again).
    """
    if kind not in (None, "file", "folder"):
        raise TypeError(f"kind must be 'file', 'folder' or None; got {kind!r}")
    path = Path(out)
    wants_file = path.suffix == ".json" if kind is None else kind == "file"
    if path.exists() and path.is_dir() == wants_file:
        what, other = ("a JSON file path", "folder") if wants_file else ("a folder", "file")
        raise ValueError(f"{name} must be {what}; {out} is an existing {other}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name} {out} lies below {parent}, which is a file, not a folder")
            break
    _probe_folder(out, path.parent if wants_file else path, name)


# The folders that checking an output path made: removed again, if still empty, when the script stops with bad input
# or an interrupt (parse_config, run_main), so that a failed command leaves no trace. (With several processes of one
# run, one that fails at once could remove --out while another still checks it; that one then fails too, saying it
# cannot write there.)
_MADE_FOLDERS: list[Path] = []


def _probe_folder(out: str, folder: Path, name: str) -> None:
    """Makes ``folder`` and a file in it, then removes the file. The folder stays (the script writes there next;
    removing it could pull it from under another process of the same run checking the same ``--out``), except
    the parts made here when the check fails, or when the script fails before it writes there (run_main)."""
    # Named without "..": in "a/../b", mkdir makes a, but b (the folder itself) may have been there before.
    named = dict.fromkeys(Path(os.path.normpath(os.path.abspath(path))) for path in (folder, *folder.parents))
    missing = [candidate for candidate in named if not os.path.lexists(candidate)]
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{name} {out} cannot be written: cannot create the folder {folder} "
                             f"({error.strerror or error}); choose a location you can write to") from None
        try:
            handle, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.")
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise ValueError(f"{name} {out} cannot be written: cannot create a file in {folder} "
                             f"({error.strerror or error}); choose a location you can write to") from None
    except ValueError:
        _remove_if_empty(missing)
        raise
    _MADE_FOLDERS.extend(missing)


def _remove_if_empty(folders: Sequence[Path]) -> None:
    for candidate in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):  # deepest first
        try:
            candidate.rmdir()
        except OSError:
            pass  # never made, or something was put there meanwhile: leave it


def parse_floats(name: str, value: Any) -> tuple[float, ...]:
    """A comma-separated string (or a sequence) of numbers as a tuple of floats, with a clear error."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be comma-separated numbers, e.g. 1.0,2.0; got {value!r}") from None
    if not numbers:
        raise ValueError(f"{name} must hold at least one number")
    return numbers


def parse_choices(flag: str, value: str, allowed: Sequence[str],
                  named: dict[str, Sequence[str]] | None = None) -> tuple[str, ...]:
    """``'all'``, a name of ``named`` (a set of names from ``allowed``) or comma-separated names from ``allowed`` as a
    tuple without duplicates, with a one-line error."""
    sets = {"all": tuple(allowed), **(named or {})}
    key = value.strip()
    names = tuple(sets[key]) if key in sets else tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        choices = ", ".join(f"'{name}'" for name in sets)
        raise ValueError(f"{flag} must be {choices} or comma-separated names from {', '.join(allowed)}; "
                         f"got {value!r}")
    return tuple(dict.fromkeys(names))


def parse_overrides(flag: str, text: str, base: Any) -> tuple[Any, str]:
    """``(replaced, canonical)``: the frozen dataclass ``base`` with the fields named in ``text`` (comma-separated
    ``name=value``) replaced, and ``text`` in one spelling (the fields' order, numbers as Python writes them, values
    equal to ``base``'s left out), so the same weights always read the same. Refused in one line naming ``flag``: an
    unknown field, a value that is not a number of the field's type, a field named twice, and whatever ``base``'s own
    checks refuse."""
    fields = {field.name: field for field in dataclasses.fields(base)}
    hints = typing.get_type_hints(type(base))
    values: dict[str, Any] = {}
    for part in (part.strip() for part in text.split(",") if part.strip()):
        name, sign, value = (piece.strip() for piece in part.partition("="))
        if not sign or name not in fields:
            raise ValueError(f"{flag} takes comma-separated name=value from {', '.join(fields)}; got {part!r}")
        if name in values:
            raise ValueError(f"{flag} names {name} twice")
        kind = hints[name]
        try:
            values[name] = kind(value)
        except ValueError:
            raise ValueError(f"{flag}: {name} must be {'an integer' if kind is int else 'a number'}; "
                             f"got {value!r}") from None
    try:
        replaced = dataclasses.replace(base, **values)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None
    canonical = ",".join(f"{name}={values[name]!r}" for name in fields
                         if name in values and values[name] != getattr(base, name))
    return replaced, canonical


def median_seconds(function: Callable[[], Any], repeats: int, warmup: bool = False) -> float:
    """Median wall time of ``repeats`` calls of ``function`` (after one untimed call when ``warmup``)."""
    import statistics
    import time

    if warmup:
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# A full disk, a read-only file system, an exhausted quota, a name too long: the user's to fix.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Runs ``main``; library ``ValueError`` s (bad input met late) and the errors of a path that cannot be read or
    written (any ``OSError`` that names a path: a missing file, a full disk...) become one line and exit status 2
    (other errors keep their traceback: they are bugs). Then, and on an interrupt, the folders that checking the
    output made are removed again if nothing was written there."""
    prog = Path(sys.argv[0]).name
    _MADE_FOLDERS.clear()
    previous_hook, sys.unraisablehook = sys.unraisablehook, functools.partial(_deliver_interrupts, sys.unraisablehook)
    try:
        status = main(argv)
    except (ValueError, OSError) as error:
        if isinstance(error, OSError) and not (isinstance(error, _PATH_ERRORS) or error.errno in _STORAGE_ERRNOS):
            raise  # not something the user can act on (EIO, EMFILE, EXDEV...): a traceback helps more
        print(f"{prog}: error: {error}", file=sys.stderr)
        _remove_if_empty(_MADE_FOLDERS)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        _remove_if_empty(_MADE_FOLDERS)
        # Ended at once, without the interpreter's teardown: a JAX computation still running on another thread
        # crashed it (signal 11 instead of 130). Every file is written atomically and every context manager (the
        # checkpoints') has closed on the way here, so nothing is lost.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    finally:
        sys.unraisablehook = previous_hook
    sys.exit(status or 0)


def _deliver_interrupts(hook: Callable[[Any], None], unraisable: Any) -> None:
    """sys.unraisablehook while a script runs: Python drops an exception raised in a garbage-collection callback or
    a destructor, and JAX runs a callback at every collection, so a Ctrl-C that lands there would be lost and the run
    would go on (seen under load: the KeyboardInterrupt ended in jax's _xla_gc_callback). It is delivered again from
    another thread a moment later, to be raised in the main thread's code (delivered from here, it would be raised in
    this hook and dropped again); anything else goes to ``hook``."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        timer = threading.Timer(0.01, _thread.interrupt_main)
        timer.daemon = True
        timer.start()
        return
    hook(unraisable)


def write_json(path: Path, payload: dict) -> None:
    """Writes ``payload`` as indented JSON, atomically. A NaN or infinity (which JSON cannot hold) is refused with
    one line naming where it is, and the file is left as it was."""
    try:
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    except ValueError as error:
        where = _first_non_finite(payload, "") if "Out of range float" in str(error) else None
        if where is None:
            raise  # a circular reference, say
        raise ValueError(f"{path}: {where or 'the value'} is not a finite number, which JSON cannot hold (did the "
                         f"computation diverge?)") from None
    write_atomically(path, lambda tmp: tmp.write_text(text))


def null_non_finite(value):
    """``value`` (nested dicts, lists and tuples) with every NaN or infinity replaced by ``None``, JSON's null.

    For the record of a run that diverged: the scripts flag it as diverged and keep the other runs' results, which
    :func:`write_json` would otherwise refuse along with it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: null_non_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [null_non_finite(item) for item in value]
    return value


def _first_non_finite(value, where: str) -> str | None:
    """The key path (``a.b[2]``) of the first NaN or infinity in nested dicts and lists, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if isinstance(key, str):
            path = f"{where}.{key}" if where else key
        else:
            path = f"{where}[{key}]"
        found = _first_non_finite(item, path)
        if found is not None:
            return found
    return None


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: the scripts write PNG files and never open a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int = 130) -> None:
    """Saves a matplotlib figure as PNG, atomically, and closes it."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    pyplot().close(figure)


def environment() -> dict[str, str]:
    """Versions and machine facts recorded with every result."""
    import jax
    import numpy
    import optax
    import scipy

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": ", ".join(d.device_kind for d in jax.devices()),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

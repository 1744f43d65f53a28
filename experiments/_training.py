"""What the training scripts share (``train_nyuv2.py``, ``train_celeba.py``): the run folder and its resumption, the
epoch's progress and divergence checks, the metrics history, generated data sets and weight files.

A run lives in ``--out``: ``run.json`` (the flags that define it, the sizes of its splits), ``checkpoints/`` (Orbax,
one per epoch), ``metrics.jsonl`` (one line per epoch). ``--resume`` continues it from the newest readable checkpoint
with the same flags (the data folders may have moved).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from _common import flag, write_atomically, write_json


# Flags that say where the data is and how it is placed, not what the run learns: a resume may change them (the data
# copied to a job's scratch disk, say), as long as a folder given before is given again; the splits' sizes are checked
# once read (record_run). Weight files are not among them: the perceptual loss's weights are read anew by every resume
# and nothing would tell another file from the one the run trained with.
_RELOCATABLE = frozenset({"data", "target_data", "source_data", "on_device"})


def check_run_folder(out: Path, identity: dict, resume: bool, config_class: type, path_fields: Sequence[str],
                     prog: str) -> dict | None:
    """Refuses an ``--out`` that already holds a run (unless ``resume``), and a resume whose run-defining flags
    (``identity``) differ from the run's own (its ``run.json``). A field an older version did not record had its
    default (``config_class``'s) then; the recorded paths (``path_fields``) are compared absolute. The data folders
    and their placement may change (said on stderr as ``prog``, also with ``--quiet``): only whether a folder is
    given must agree, and :func:`record_run` checks the sizes of the splits read from them.

    Returns:
        The run's record (its ``run.json``) on a resume, else None."""
    checkpoints_dir, identity_path = out / "checkpoints", out / "run.json"
    if resume:
        if not identity_path.exists():
            raise FileNotFoundError(f"--resume: no run to resume in {out} (run.json is missing)")
        try:
            saved = json.loads(identity_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = None
        if not isinstance(saved, dict):
            raise ValueError(f"--resume: {identity_path} is not this script's record of a run (a JSON object of its "
                             f"flags): restore it, or start a new --out")
        defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
        record = saved
        saved = {k: absolute(v) if k in path_fields and isinstance(v, str) else v for k, v in saved.items()}
        was = lambda k: saved.get(k, defaults.get(k))  # noqa: E731
        changed = [k for k, v in identity.items() if was(k) != v]
        refused = [k for k in changed if k not in _RELOCATABLE or isinstance(identity[k], str) and
                   bool(identity[k]) != bool(was(k))]
        if refused:
            raise ValueError("--resume must use the run's own flags: " +
                             "; ".join(f"{flag(k)} was {was(k)!r}, now {identity[k]!r}" for k in refused))
        if changed and _is_primary():
            print(f"{prog}: --resume: " + "; ".join(f"{flag(k)} is now {identity[k]!r} (was {was(k)!r})"
                                                    for k in changed), file=sys.stderr)
        return record
    if (checkpoints_dir.exists() and any(checkpoints_dir.iterdir())) or identity_path.exists():
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    return None


def record_run(out: Path, identity: dict, examples: dict[str, int], resumed: dict | None) -> None:
    """A new run (``resumed`` None): process 0 writes ``run.json``, the run's flags (``identity``) and the sizes of its
    splits (``examples``), once every input has been read. A resume (``resumed``: the run's record, as
    :func:`check_run_folder` returned it): refuses data whose splits' sizes differ from those the run recorded (data
    moved, or copied in part, would change the steps of an epoch and the schedule); a run.json of a version that did
    not record them is not checked."""
    if resumed is None:
        if _is_primary():
            write_json(out / "run.json", {**identity, "examples": examples})
        return
    recorded = resumed.get("examples")
    if isinstance(recorded, dict) and recorded != examples:
        differing = [f"{split} {examples.get(split)} (the run's: {recorded.get(split)})"
                     for split in dict.fromkeys([*recorded, *examples]) if recorded.get(split) != examples.get(split)]
        raise ValueError(f"--resume: the data holds other splits than the run was trained on: {', '.join(differing)} "
                         f"examples; resume with the run's data")


def data_mesh_for(batch_size: int):
    """The mesh of every device of every process (each batch split across them, the state replicated), once every
    process has checked ``--out``; refuses a batch size they cannot split evenly."""
    from deep import devices

    devices.barrier("checked --out")  # before process 0 writes run.json there
    mesh = devices.data_mesh()
    if batch_size % mesh.devices.size:
        raise ValueError(f"--batch-size must be a multiple of the {mesh.devices.size} devices the batch is split "
                         f"over; got {batch_size}")
    return mesh


def check_full_batch(batch_size: int, examples: int, devices: int, note: str = "") -> None:
    """Refuses a batch size larger than the training split (``examples``), which would leave no full batch; the
    remedy names the largest batch size that fits and splits over the ``devices``. ``note``: said after it."""
    if batch_size <= examples:
        return
    largest = examples // devices * devices
    remedy = (f"give --batch-size {largest} or less" if largest else
              f"it needs at least one example for each of the {devices} devices")
    raise ValueError(f"--batch-size {batch_size} is larger than the training split ({examples} examples), which would "
                     f"leave no full batch; {remedy}{note}")


def check_perceptual_weight(perceptual: str, appearance: float) -> None:
    """Refuses ``--perceptual`` with an appearance weight of 0: the LPIPS term is weighted by the appearance weight
    alone, so its weights would be read and recorded but never count."""
    if perceptual and appearance == 0:
        raise ValueError("--perceptual weights the appearance reconstruction, which --loss-weights appearance=0 "
                         "removes (leave out one of them)")


def reused_set_note(folder: Path) -> str:
    """Said after a batch-size refusal when ``--synthetic`` found its set in ``folder`` already (and did not write a
    new one of the size the flags ask for)."""
    return f" (--synthetic reuses the set already generated under {folder}: delete it for a new one)"


def evaluation_loader(split: dict, batch_size: int, seed: int, placement: dict):
    """A loader over ``split`` in its order, for evaluation: batches of at most ``batch_size``, the last one filled up
    with ignored labels (and black images), which change no metric, so evaluation compiles for one batch shape.
    ``placement``: the training loader's (on the host, or on every device with its mesh)."""
    from deep.data import Loader
    from deep.metrics import IGNORED_LABELS

    ignored = {name: value for name, value in IGNORED_LABELS.items() if name in split}
    return Loader(split, min(batch_size, len(split["images"])), seed=seed, shuffle=False, drop_last=False,
                  fill_last=ignored, **placement)


def record_epoch(line: dict, history: list[dict], splits: Sequence[str], out: Path, primary: bool, checkpoints,
                 tree, last_good_state: Callable[[], str]) -> None:
    """Ends an epoch: refuses non-finite evaluation metrics (finite steps can still predict NaN or infinity, an
    overflow in bfloat16, say; a resume would redo the same epoch and meet them again), then appends ``line`` to the
    history, rewrites ``metrics.jsonl`` (process 0) and checkpoints ``tree``, in that order: a run killed between
    the two redoes the epoch, and :func:`read_history` drops the line."""
    epoch = line["epoch"]
    bad = non_finite_metrics(line, splits)
    if bad:
        raise ValueError(f"the model diverged at epoch {epoch}: its evaluation gave a non-finite {', '.join(bad)}; "
                         f"{last_good_state()}")
    history.append(line)
    if primary:
        write_history(out / "metrics.jsonl", history)
    checkpoints.save(epoch, tree)


def restore_run(checkpoints, initial: dict, resume: bool, prog: str, history_path: Path, epochs: int,
                quiet: bool) -> tuple[int, dict, list[dict]]:
    """``(epochs done, tree, history)``: with ``resume``, the newest readable checkpoint laid out as ``initial`` (a
    damaged one is set aside with a warning) and the history of its epochs (:func:`read_history`), else (or with no
    checkpoint yet) ``(0, initial, [])``. A resume says where it goes on from (unless ``quiet``), and warns, even when
    quiet, when more than one epoch that ``history_path`` records is trained again (one is the epoch whose line was
    written when the run was killed before its checkpoint)."""
    if not resume:
        return 0, initial, []
    epoch, restored, set_aside = checkpoints.restore_latest(initial)
    for reason in set_aside if _is_primary() else ():
        print(f"{prog}: warning: a checkpoint could not be read and was renamed *.unreadable; resuming from an older "
              f"one ({reason})", file=sys.stderr)
    start, tree = (epoch, restored) if epoch else (0, initial)
    history = read_history(history_path, start)
    recorded = _recorded_epochs(history_path)
    if start == epochs:
        message = f"all {epochs} epochs were trained: evaluating the final model"
    else:
        message = (f"resuming after epoch {start} of {epochs}" if start else
                   f"no readable checkpoint in {checkpoints.directory}: training from epoch 1")
    again = recorded - start
    if again > 0:
        message += (f"; {history_path.name}'s epoch{'s' if again > 1 else ''} {start + 1}"
                    f"{f'-{recorded}' if again > 1 else ''} {'have' if again > 1 else 'has'} no readable checkpoint "
                    f"and {'are' if again > 1 else 'is'} trained again")
    if _is_primary() and (again > 1 or not quiet):
        print(f"{prog}: {'warning: ' if again > 1 else ''}--resume: {message}", file=sys.stderr)
    return start, tree, history


def _recorded_epochs(path: Path) -> int:
    """The last epoch ``metrics.jsonl`` records (0 if none), for :func:`restore_run`'s message; damaged lines are
    skipped (from epoch 1 on, nothing else reads the file, which the first epoch rewrites)."""
    try:
        texts = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0
    epochs = []
    for text in texts:
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if _epoch_of(line) is not None:
            epochs.append(line["epoch"])
    return max(epochs, default=0)


def _epoch_of(line) -> int | None:
    """The epoch number of a parsed metrics.jsonl line, or None when it has none (``true`` is no epoch)."""
    return line["epoch"] if isinstance(line, dict) and type(line.get("epoch")) is int else None  # noqa: E721


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def last_good_state_of(checkpoints, directory: Path) -> str:
    """Where a stopped run's last good state is, for its error message."""
    saved = checkpoints.latest_epoch()
    return (f"the last good state is the checkpoint of epoch {saved} in {directory}" if saved else
            "no epoch had completed, so there is no checkpoint")


def non_finite_metrics(line: dict, splits: Sequence[str]) -> list[str]:
    """The evaluation metrics of an epoch's line (under ``splits``) that are NaN or infinite, named."""
    return [f"{split} {name}" for split in splits for name, value in line.get(split, {}).items()
            if not math.isfinite(value)]


def train_epoch(dispatched: Iterable[tuple[int, dict]], total: int, epoch: int, epochs: int, quiet: bool,
                shown: Sequence[str], last_good_state: Callable[[], str]) -> tuple[dict[str, float], int]:
    """Runs epoch ``epoch`` (from 0) of ``epochs``: ``dispatched`` takes the steps, yielding each one's index and
    metrics once it is dispatched; they are read (a host sync) one step behind (:func:`deep.trainer.one_behind`), so
    the device never waits for the host. A progress bar of ``total`` steps shows the running means of ``shown``.

    Returns:
        The sums of each metric over the epoch's steps, and their count.

    Raises:
        ValueError: at a step whose loss or gradient norm is not finite (the step leaves the state unchanged), with
            ``last_good_state()`` saying where the last good state is.
    """
    import jax
    from tqdm import tqdm

    from deep import trainer

    sums, count = {}, 0
    bar = tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", disable=quiet, leave=False, file=sys.stderr)
    for index, metrics in trainer.one_behind(dispatched):
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # copied together, one wait
        if not metrics.pop("finite"):
            raise ValueError(f"training diverged at epoch {epoch + 1}, step {index + 1}: a non-finite loss or "
                             f"gradient norm (that step was not applied); {last_good_state()}")
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + value
        count += 1
        bar.set_postfix({name: f"{sums[name] / count:.3g}" for name in shown if name in sums}, refresh=False)
        bar.update()
    bar.close()
    return sums, count


def absolute(path: str) -> str:
    """``path`` absolute and normalised ("" stays ""): the same file however it was named."""
    return str(Path(path).resolve()) if path else path


def generated(root: Path, write) -> Path:
    """``root``, first written by ``write(folder)`` if it does not exist: into a sibling folder renamed at the end,
    so that a run killed while writing leaves no half-written set behind. With several processes, process 0 writes
    and the others wait for it."""
    import shutil

    import jax

    from deep import devices

    if not root.exists() and jax.process_index() == 0:
        partial = root.with_name(root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write(partial)
        partial.rename(root)
    devices.barrier(f"generated {root}")
    return root


def read_weights(option: str, load, *args):
    """``load(*args)``, its errors about the file named by the flag that gave it."""
    try:
        return load(*args)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None


def read_history(path: Path, before_epoch: int) -> list[dict]:
    """The JSON lines of the ``before_epoch`` epochs already checkpointed (a run killed between the line and the
    checkpoint redoes the epoch, so later lines are dropped). A file that does not hold exactly epochs
    1..before_epoch (lost, truncated or edited) is refused: the results would silently lack those epochs."""
    if before_epoch == 0:
        return []
    expected = f"{path} must hold the JSON line of each epoch from 1 to {before_epoch} (the checkpoints' epochs)"
    remedy = "restore it, or start a new --out"
    if not path.exists():
        raise ValueError(f"--resume: {expected}; it is missing: {remedy}")
    lines = []
    try:
        texts = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"--resume: {expected}; it is not text: {remedy}") from None
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--resume: {expected}; its line {number} is not JSON: {remedy}") from None
        if _epoch_of(line) is None:
            raise ValueError(f"--resume: {expected}; its line {number} has no epoch number: {remedy}")
        lines.append(line)
    kept = [line for line in lines if line["epoch"] <= before_epoch]
    epochs = [line["epoch"] for line in kept]
    if epochs != list(range(1, before_epoch + 1)):
        raise ValueError(f"--resume: {expected}; it holds epochs {epochs}: {remedy}")
    return kept


def write_history(path: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(line, allow_nan=False) + "\n" for line in history)
    write_atomically(path, lambda tmp: tmp.write_text(text))

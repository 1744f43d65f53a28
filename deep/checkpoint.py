"""Checkpoints of a training run: Orbax, one directory per completed epoch, written atomically.

Orbax writes each checkpoint into a temporary directory and renames it only once every array is on disk, so a run
killed at any moment leaves the previous checkpoint intact; :meth:`Checkpoints.latest_epoch` only ever sees
finished ones. :meth:`Checkpoints.restore_latest` resumes from the newest one that can be read, setting aside
newer ones damaged on disk (renamed ``<epoch>.unreadable``; delete them once inspected).

Saving is asynchronous by default: :meth:`Checkpoints.save` returns once the arrays are copied to host memory, and
Orbax writes them to disk in a background thread while training goes on (the next save, any read of the
checkpoints and :meth:`Checkpoints.close` wait for it). A run killed meanwhile loses only that checkpoint, as a run
killed during a synchronous save would.

Typed PRNG keys (NNX keeps its dropout streams as ``jax.random.key`` arrays) are stored as their raw key data and
re-wrapped on restore from the template's key implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from deep.devices import barrier


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree):
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _from_storable(template, tree):
    return jax.tree.map(lambda like, leaf: jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
                        if _is_key(like) else leaf, template, tree)


# How Orbax words a tree of another structure, or an array of another shape, than the one asked for.
_MISMATCH_MARKERS = ("tree structures do not match", "is not compatible with the stored shape")


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree has another structure than the template (another configuration or code version)."""


class Checkpoints:
    """The checkpoints of one run under ``directory`` (``<directory>/<epoch>``), keeping the newest ``keep``;
    ``asynchronous``: whether :meth:`save` returns before the files are written. :meth:`close` when done (or use it
    as a context manager), which waits for a save under way and ends Orbax's background machinery."""

    def __init__(self, directory: str | Path, keep: int = 2, asynchronous: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be an integer >= 1; got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_epoch(self) -> int | None:
        """The number of epochs the newest complete checkpoint holds (``None`` when there is none), once a save
        under way has finished."""
        kept = self.epochs()
        return kept[-1] if kept else None

    def epochs(self) -> list[int]:
        """The epochs of the complete checkpoints kept, oldest first, once a save under way has finished."""
        self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, epoch: int, tree: Any) -> None:
        """Save ``tree`` (any pytree of arrays and scalars) as the state after ``epoch`` completed epochs. The arrays
        are copied before it returns, so the caller may then donate or delete them."""
        self._manager.save(epoch, args=ocp.args.StandardSave(_to_storable(tree)), force=True)

    def wait(self) -> None:
        """Returns once the last save is on disk (at once when saving synchronously or when none is under way)."""
        self._manager.wait_until_finished()

    def restore(self, epoch: int, template: Any) -> Any:
        """The tree saved at ``epoch``, with the structure, shapes and dtypes of ``template``."""
        self.wait()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(template))
        try:
            restored = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except ValueError as error:
            if not any(marker in str(error) for marker in _MISMATCH_MARKERS):
                raise  # not a question of structure: unreadable (restore_latest tries the one before)
            # Orbax's message for a tree of another structure runs over many lines.
            raise CheckpointMismatch(
                f"the checkpoint of epoch {epoch} in {self.directory} does not match this model and optimiser "
                f"(written by another configuration or an older version of this code, whose optimiser state had "
                f"another structure); start a new run. Orbax: {str(error).splitlines()[0][:200]}") from None
        return _from_storable(template, restored)

    def restore_latest(self, template: Any) -> tuple[int | None, Any, list[str]]:
        """``(epoch, tree, set_aside)`` from the newest checkpoint that can be read (``(None, None, [])`` when there
        is none). Newer ones that cannot be read (damaged on disk: Orbax itself never leaves a partial one) are
        renamed ``<epoch>.unreadable``, kept for inspection but out of the run's way, and listed in ``set_aside``
        with the reason. When none can be read, nothing is renamed and a ``ValueError`` says why for the newest."""
        self.wait()
        self._manager.reload()
        failures = []
        for epoch in sorted(self._manager.all_steps(), reverse=True):
            try:
                tree = self.restore(epoch, template)
            except Exception as error:  # Orbax and TensorStore raise many kinds for a damaged directory
                if not _looks_damaged(error):
                    raise  # out of memory, a file system gone away...: nothing says this checkpoint is bad
                failures.append((epoch, error))
                continue
            if jax.process_index() == 0:  # one process renames; the others skip them as unreadable too
                for failed, _ in failures:
                    self._set_aside(failed)
            barrier("checkpoints set aside")  # every process sees the renames before it saves that epoch again
            self._manager.reload()
            return epoch, tree, [f"epoch {failed}: {_first_line(error)}" for failed, error in failures]
        if failures:
            epoch, error = failures[0]
            if isinstance(error, CheckpointMismatch):
                raise error  # whole, but of another configuration: restore's own one-line message
            raise ValueError(f"no checkpoint in {self.directory} can be read; the newest (epoch {epoch}): "
                             f"{_first_line(error)}") from None
        return None, None, []

    def _set_aside(self, epoch: int) -> None:
        """Renames the checkpoint of ``epoch`` to ``<epoch>.unreadable`` (``.unreadable.2``, ... when taken)."""
        target, copy = self.directory / f"{epoch}.unreadable", 1
        while target.exists():
            copy += 1
            target = self.directory / f"{epoch}.unreadable.{copy}"
        (self.directory / str(epoch)).rename(target)

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as error:  # the error that stopped the run is the one to report; this one goes with it
            exc.add_note(f"the checkpoint being written could not be finished either: {_first_line(error)}")


# TensorStore's status codes for missing or corrupt data, and its wording when an array cannot be read.
_DAMAGE_MARKERS = ("DATA_LOSS", "NOT_FOUND", "Encountered error while reading", "Error opening", "Error reading")


def _looks_damaged(error: BaseException) -> bool:
    """Whether a failed restore says the checkpoint's files are damaged or missing (a ValueError, JSON that does
    not decode, TensorStore's data-loss codes), rather than that something else failed (memory, I/O)."""
    return isinstance(error, ValueError) or any(marker in str(error) for marker in _DAMAGE_MARKERS)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"

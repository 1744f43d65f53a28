"""Checkpoints of a training run: Orbax, one directory per completed epoch, written atomically.

Orbax writes each checkpoint into a temporary directory and renames it only once every array is on disk, so a run
killed at any moment leaves the previous checkpoint intact; :meth:`Checkpoints.latest_epoch` only ever sees finished
ones. Saving is synchronous (a training loop here saves once an epoch, and waiting keeps the semantics simple).

Typed PRNG keys (NNX keeps its dropout streams as ``jax.random.key`` arrays) are stored as their raw key data and
re-wrapped on restore from the template's key implementation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_storable(tree):
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _from_storable(template, tree):
    return jax.tree.map(lambda like, leaf: jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
                        if _is_key(like) else leaf, template, tree)


class Checkpoints:
    """The checkpoints of one run under ``directory`` (``<directory>/<epoch>``), keeping the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be an integer >= 1; got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_epoch(self) -> int | None:
        """The number of epochs the newest complete checkpoint holds (``None`` when there is none)."""
        self._manager.reload()
        return self._manager.latest_step()

    def save(self, epoch: int, tree: Any) -> None:
        """Save ``tree`` (any pytree of arrays and scalars) as the state after ``epoch`` completed epochs."""
        self._manager.save(epoch, args=ocp.args.StandardSave(_to_storable(tree)), force=True)
        self._manager.wait_until_finished()

    def restore(self, epoch: int, template: Any) -> Any:
        """The tree saved at ``epoch``, with the structure, shapes and dtypes of ``template``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(template))
        try:
            restored = self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
        except ValueError as error:  # Orbax's message for a tree of another structure runs over many lines
            raise ValueError(f"the checkpoint of epoch {epoch} in {self.directory} does not match this model and "
                             f"optimiser (written by another configuration or an older version of this code, "
                             f"whose optimiser state had another structure); start a new run. Orbax: "
                             f"{str(error).splitlines()[0][:200]}") from None
        return _from_storable(template, restored)

    def close(self) -> None:
        self._manager.close()

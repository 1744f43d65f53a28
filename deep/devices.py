"""Where arrays live: a one-axis device mesh for data parallelism, batches split over it, values copied to every
device, and the multi-host set-up.

:func:`data_mesh` builds a ``Mesh`` named ``"data"`` over the visible devices; :func:`shard_batch` places a batch split
along it and :func:`replicate` a state (:func:`shard` does both), and ``jax.jit`` then runs a step as SPMD.
:func:`batch_sharding` says where a batch of a given size goes for data-parallel evaluation (split when it divides,
else copied) and :func:`place_batch` puts it there.
:func:`initialize_distributed` calls ``jax.distributed.initialize()`` when the standard coordinator variables are
set, for multi-host runs, where every process passes the same whole values and each keeps its own devices' pieces;
:func:`barrier` makes the processes wait for one another.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices=None) -> Mesh:
    """A one-axis mesh named ``"data"`` over ``devices`` (default: all visible devices)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def shard(mesh: Mesh, batch: dict, state):
    """``(batch, state)``: the batch split along the data axis (its size must divide by the device count), the
    state (any tree of arrays) replicated."""
    return shard_batch(mesh, batch), replicate(mesh, state)


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Each field split along its first (example) axis over the mesh's data axis; the size must divide by the
    device count. With several processes every process passes the whole global batch (the loaders here draw the
    same batches everywhere from the seed) and keeps the rows of its own devices."""
    count = mesh.devices.size
    for name, value in batch.items():
        if value.shape[0] % count:
            raise ValueError(f"batch field {name!r} has {value.shape[0]} examples, not divisible by the {count} "
                             f"devices of the mesh")
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {name: _global_array(value, sharding) for name, value in batch.items()}


def batch_sharding(mesh: Mesh, size: int) -> NamedSharding:
    """Where a batch of ``size`` examples goes for data-parallel work: split along the data axis when the size
    divides by the mesh's device count, else copied to every device (a split's last evaluation batch need not
    divide)."""
    return NamedSharding(mesh, PartitionSpec("data") if size % mesh.devices.size == 0 else PartitionSpec())


def place_batch(mesh: Mesh, batch: dict) -> dict:
    """A batch laid out as :func:`batch_sharding` says for its size: split when it divides, else copied."""
    sharding = batch_sharding(mesh, len(next(iter(batch.values()))))
    return {name: _global_array(value, sharding) for name, value in batch.items()}


def replicate(mesh: Mesh, tree):
    """Every array of ``tree`` (a state, a batch that does not split evenly) copied to every device of the mesh."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda value: _global_array(value, sharding), tree)


def _global_array(value, sharding: NamedSharding) -> jax.Array:
    """A global array laid out as ``sharding`` from a value that this process holds in full. In one process that is
    ``device_put``; across processes each one fills only its own devices' pieces (``make_array_from_callback``),
    typed PRNG keys through their raw key data."""
    if (isinstance(value, jax.Array) and isinstance(value.sharding, NamedSharding)
            and value.sharding.is_equivalent_to(sharding, value.ndim)):
        return value  # already laid out so (a restored state, a batch the loader gathered on the mesh): kept
    # Not kept: an array on one device, which on a one-device mesh is laid out the same. Its type would lack the mesh
    # that a jitted step's outputs carry, so the step's second call, given the first one's state, compiled again.
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    if hasattr(value, "dtype") and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = _global_array(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initialize_distributed() -> bool:
    """Multi-host set-up: ``jax.distributed.initialize()`` when ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of
    process 0) is set, with the process count and this process's index from ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` where set, else from the cluster (SLURM, Open MPI, ...) as JAX detects it. Returns whether it
    ran; call it before anything asks JAX for its devices."""
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    counts = {}
    for variable, argument in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(variable):
            try:
                counts[argument] = int(os.environ[variable])
            except ValueError:
                raise ValueError(f"{variable} must be an integer; got {os.environ[variable]!r}") from None
    jax.distributed.initialize(**counts)
    return True

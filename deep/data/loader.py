"""Batches of an in-memory data set, in an order that depends only on ``(seed, epoch)``.

A resumed run therefore sees exactly the batches the interrupted one would have seen: epoch e's order is the
permutation drawn from ``numpy.random.default_rng((seed, e))``, with no state carried between epochs.

Two placements:

* ``on_device=False``: the arrays stay in host memory; each batch is a numpy gather (the I/O edge), handed to the
  caller as numpy arrays for the training step to transfer.
* ``on_device=True``: the whole set is put on the device once; each batch is a jitted ``jnp.take`` of the epoch's
  permutation (itself put on the device once per epoch), so no image crosses the host-device link during
  training. NYUv2's train split takes about 2.8 GB in float32. With a ``mesh`` (data parallelism,
  :mod:`deep.devices`) every device of the mesh holds a copy and each batch comes out already split over them, each
  device gathering its own rows: no batch passes through one device or, with several processes, through the host.
"""

from __future__ import annotations

import functools
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from deep import devices
from scm.linear_gaussian import check_count

__all__ = ["Loader"]


@functools.partial(jax.jit, static_argnames=("batch_size", "sharding", "fill"))
def _device_batch(arrays: dict, order: jax.Array, start: int, batch_size: int, sharding=None,
                  fill: tuple | None = None) -> dict:
    """Rows ``order[start:start + batch_size]`` of every array; with ``fill`` (``((name, value), ...)`` for every
    array), an index past the end gives a row of the array's fill value."""
    indices = jax.lax.dynamic_slice_in_dim(order, start, batch_size)
    if fill is None:
        batch = {name: jnp.take(value, indices, axis=0) for name, value in arrays.items()}
    else:
        fill_values = dict(fill)
        batch = {name: jnp.take(value, indices, axis=0, mode="fill", fill_value=fill_values[name])
                 for name, value in arrays.items()}
    return batch if sharding is None else jax.lax.with_sharding_constraint(batch, sharding)


class Loader:
    """Iterates over ``arrays`` in batches of ``batch_size`` along their first axis.

    Args:
        arrays: ``{name: [N, ...]}``, every array with the same N >= 1.
        batch_size: examples per batch, >= 1 (and <= N when ``drop_last``, else there would be no batch).
        seed: an integer >= 0; with the epoch it fixes the order.
        shuffle: a new permutation per epoch (else the stored order, the same every epoch).
        drop_last: drop the last incomplete batch (training); else yield it, smaller (evaluation).
        fill_last: with ``drop_last=False``, fill the last batch up to ``batch_size`` with rows holding
            ``fill_last.get(name, 0)`` in each array (for evaluation: labels that every metric ignores,
            :data:`deep.metrics.IGNORED_LABELS`), so that every batch has one shape and the programs that read
            batches compile once (``MetricAccumulator.num_images`` counts those rows too; no metric does). None: the
            last batch is smaller.
        on_device: keep the whole set on the accelerator and gather batches there.
        mesh: with ``on_device``, the devices that hold the set: a copy on each, and every batch split over them
            when its size divides by their count, else copied to each (as :func:`deep.devices.batch_sharding`
            places it). None: the default device alone.

    Raises:
        ValueError: for no arrays, arrays of different lengths, a batch size or seed out of range, a mesh
            without ``on_device``, or with ``drop_last`` a batch size its devices cannot split.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True, on_device: bool = False, mesh: Mesh | None = None,
                 fill_last: Mapping[str, float] | None = None):
        if not arrays:
            raise ValueError("arrays must hold at least one array")
        lengths = {name: int(np.shape(value)[0]) if np.ndim(value) else 0 for name, value in arrays.items()}
        count = next(iter(lengths.values()))
        if count < 1 or any(length != count for length in lengths.values()):
            raise ValueError(f"arrays must share a first axis of length N >= 1; got lengths {lengths}")
        batch_size = check_count("batch_size", batch_size, 1)
        if drop_last and batch_size > count:
            raise ValueError(f"batch size {batch_size} is larger than the data set ({count} examples), so an epoch of "
                             f"full batches would be empty; the batch size must be at most {count}")
        seed = check_count("seed", seed, 0)
        if mesh is not None and not on_device:
            raise ValueError("a mesh places the data set on its devices, so it needs on_device=True")
        if fill_last is not None and drop_last:
            raise ValueError("fill_last fills the last incomplete batch, which drop_last drops; give one of them")
        if fill_last is not None and set(fill_last) - set(arrays):
            raise ValueError(f"fill_last names arrays the data set does not have: "
                             f"{', '.join(sorted(set(fill_last) - set(arrays)))}; it has {', '.join(arrays)}")
        if mesh is not None and drop_last and batch_size % mesh.devices.size:
            raise ValueError(f"training batches (drop_last) are split over the mesh's {mesh.devices.size} devices, so "
                             f"batch_size must be a multiple of {mesh.devices.size}; got {batch_size}")
        self.count = count
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.on_device = on_device
        self.mesh = mesh
        # The index count (one past the last example) stands for a filler row; none is stored, so the data set is
        # not copied: the host writes the fill values into the last batch, the device gathers them (jnp.take's fill).
        self.fill = None if fill_last is None else tuple(sorted((name, fill_last.get(name, 0)) for name in arrays))
        for name, value in self.fill or ():
            dtype = np.asarray(arrays[name]).dtype
            if np.asarray(value).astype(dtype) != value:
                raise ValueError(f"fill_last[{name!r}] = {value} does not fit {name}'s dtype {dtype}")
        if mesh is not None:
            self.arrays = devices.replicate(mesh, dict(arrays))
        elif on_device:
            self.arrays = {name: jax.device_put(value) for name, value in arrays.items()}
        else:
            self.arrays = {name: np.asarray(value) for name, value in arrays.items()}

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.count // self.batch_size
        return -(-self.count // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of epoch ``epoch`` in the order they are served, ``[N]`` int64."""
        epoch = check_count("epoch", epoch, 0)
        if not self.shuffle:
            return np.arange(self.count)
        return np.random.default_rng((self.seed, int(epoch))).permutation(self.count)

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of epoch ``epoch``: ``len(self)`` dicts ``{name: [batch, ...]}`` (numpy, or device arrays
        when ``on_device``)."""
        order = self.order(epoch)
        if self.fill is not None:
            order = np.concatenate([order, np.full(len(self) * self.batch_size - self.count, self.count)])
        return self._device_batches(order) if self.on_device else self._host_batches(order)

    def _host_batches(self, order: np.ndarray) -> Iterator[dict]:
        for index in range(len(self)):
            indices = order[index * self.batch_size:(index + 1) * self.batch_size]
            if self.fill is None:
                yield {name: value[indices] for name, value in self.arrays.items()}
                continue
            filler = indices == self.count
            batch = {name: value[np.where(filler, 0, indices)] for name, value in self.arrays.items()}
            for name, value in self.fill:
                batch[name][filler] = value
            yield batch

    def _device_batches(self, order: np.ndarray) -> Iterator[dict]:
        order = order.astype(np.int32)
        order_on_device = jax.device_put(order) if self.mesh is None else devices.replicate(self.mesh, order)
        for index in range(len(self)):
            start = index * self.batch_size
            size = min(self.batch_size, len(order) - start)  # the last batch of an evaluation pass may be smaller
            sharding = None if self.mesh is None else devices.batch_sharding(self.mesh, size)
            yield _device_batch(self.arrays, order_on_device, np.int32(start), size, sharding, self.fill)

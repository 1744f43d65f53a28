"""The convolution and dense layers of the port: ``nnx.Conv`` and ``nnx.Linear``, whose parameters, inside
:func:`drawn_later`, start as zeros instead of Flax's draws.

The models (:class:`deep.model.DualStreamModel`, :class:`deep.mtan.MTAN`) build their layers inside
:func:`drawn_later` and then draw every convolution's and dense layer's parameters as the authors' PyTorch models do
(:func:`deep.model.initialise_like_pytorch`), so Flax's own draws would be thrown away; eagerly they cost a compiled
program per parameter shape (23 of the 26 s the full NYUv2 model took to build on a 2-core CPU). Outside it (a layer
or block built on its own, as tests do) the layers start as Flax's do.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_DRAWN_LATER = contextvars.ContextVar("drawn_later", default=False)


@contextlib.contextmanager
def drawn_later() -> Iterator[None]:
    """Layers built inside start with zero parameters, for the caller to draw (the random streams advance as
    Flax's draws would advance them, so later draws from the same ``nnx.Rngs`` are unchanged)."""
    token = _DRAWN_LATER.set(True)
    try:
        yield
    finally:
        _DRAWN_LATER.reset(token)


def _zeros(key: jax.Array, shape, dtype=np.float32) -> jax.Array:
    if isinstance(key, jax.core.Tracer):  # built in a trace (nnx.eval_shape, jit): zeros of the trace, no memory
        return jnp.zeros(shape, dtype)
    return jax.device_put(np.zeros(shape, dtype))  # a transfer, where jnp.zeros would compile a program per shape


def _placeholders(kwargs: dict) -> dict:
    if _DRAWN_LATER.get():
        kwargs.setdefault("kernel_init", _zeros)
        kwargs.setdefault("bias_init", _zeros)
    return kwargs


def conv(*args, **kwargs) -> nnx.Conv:
    """``nnx.Conv(*args, **kwargs)``, with zero parameters inside :func:`drawn_later`."""
    return nnx.Conv(*args, **_placeholders(kwargs))


def dense(*args, **kwargs) -> nnx.Linear:
    """``nnx.Linear(*args, **kwargs)``, with zero parameters inside :func:`drawn_later`."""
    return nnx.Linear(*args, **_placeholders(kwargs))

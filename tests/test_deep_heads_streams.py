"""ASPP heads and the dual-stream projectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep.heads import ASPPHead
from deep.streams import DualStream


def test_aspp_head_shapes_and_modes():
    head = ASPPHead(16, 3, nnx.Rngs(0), channels=8, rates=(2, 4, 6))
    x = jax.random.normal(jax.random.key(0), (2, 9, 11, 16), jnp.float32)
    out = head(x)
    assert out.shape == (2, 9, 11, 3) and out.dtype == jnp.float32
    head.eval()
    np.testing.assert_array_equal(head(x), head(x))  # eval: no dropout, running statistics
    with pytest.raises(ValueError, match="dropout"):
        ASPPHead(4, 1, nnx.Rngs(0), dropout=1.0)


def test_aspp_image_pooling_branch_sees_the_whole_image():
    """A change at one corner moves the prediction at the opposite corner (through the pooled branch), even with
    dilations larger than the map, where the atrous branches only see their centre tap."""
    head = ASPPHead(4, 1, nnx.Rngs(1), channels=32, rates=(12, 24, 36))
    head.eval()
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4), jnp.float32)
    moved = head(x.at[0, 0, 0].add(5.0))[0, -1, -1] - head(x)[0, -1, -1]
    assert float(jnp.abs(moved).max()) > 1e-4


def test_dual_stream_shapes_and_the_residual_code_is_global():
    streams = DualStream(8, nnx.Rngs(0), semantic_channels=6, residual_channels=3)
    x = jax.random.normal(jax.random.key(2), (2, 5, 7, 8), jnp.float32)
    semantic, residual = streams(x)
    assert semantic.shape == (2, 5, 7, 6) and residual.shape == (2, 3)
    # Permuting pixels leaves the residual code unchanged (it is a spatial mean) but moves the semantic map.
    permuted = x.reshape(2, 35, 8)[:, ::-1].reshape(2, 5, 7, 8)
    np.testing.assert_allclose(streams(permuted)[1], residual, rtol=1e-5, atol=1e-6)
    assert not np.allclose(streams(permuted)[0], semantic)

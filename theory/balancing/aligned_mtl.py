r"""Aligned-MTL (Senushkin et al., *Independent Component Alignment for Multi-Task Learning*, CVPR 2023)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from theory.balancing.base import Balancer, check_num_tasks, check_positive, register, weighting_balancer

FLOAT32_EPS = float(np.finfo(np.float32).eps)


class AlignedMTLState(NamedTuple):
    """State of Aligned-MTL: what the last step's eigendecomposition found (replaced at every step).

    Attributes:
        rank: number of eigenvalues of :math:`G` kept (0 for all-zero gradients).
        sigma_min: the smallest kept singular value :math:`\\sigma_R = \\sqrt{\\lambda_R}` of the gradient matrix,
            the common singular value of the aligned gradients (float32; 0 when the rank is 0).
    """

    rank: jax.Array
    sigma_min: jax.Array


def balance_matrix(gram: jax.Array, eigenvalue_rtol: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``(B, rank, sigma_min)`` with :math:`B = \sigma_R\, V_R \Lambda_R^{-1/2} V_R^\top` (identity when rank 0)."""
    num_tasks = gram.shape[0]
    eigenvalues, vectors = jnp.linalg.eigh(gram)
    largest = jnp.max(eigenvalues)
    keep = (eigenvalues > eigenvalue_rtol * num_tasks * largest) & (eigenvalues > 0)
    rank = jnp.sum(keep)
    sigma = jnp.sqrt(jnp.where(keep, eigenvalues, 1.0))
    sigma_min = jnp.min(jnp.where(keep, sigma, jnp.inf))
    sigma_min = jnp.where(rank > 0, sigma_min, 0.0)
    balance = sigma_min * (vectors * jnp.where(keep, 1.0 / sigma, 0.0)) @ vectors.T
    balance = jnp.where(rank > 0, balance, jnp.eye(num_tasks, dtype=gram.dtype))
    return balance, rank, sigma_min


@register("aligned_mtl")
def aligned_mtl(eigenvalue_rtol: float = FLOAT32_EPS) -> Balancer:
    r"""Aligned-MTL: align the gradients' principal components so that the system has condition number 1.

    With the Gram matrix's eigendecomposition :math:`G = JJ^\top = V\Lambda V^\top` (so :math:`J = V\Sigma U^\top`,
    :math:`\Sigma = \Lambda^{1/2}`), keep the :math:`R` eigenvalues above
    ``eigenvalue_rtol`` :math:`\cdot K\cdot\lambda_{\max}`, and rescale every kept singular value to the smallest
    one, :math:`\sigma_R` (Algorithm 1 of the paper):

    .. math:: B = \sigma_R\, V_R \Sigma_R^{-1} V_R^\top, \qquad \hat J = B J = \sigma_R V_R U_R^\top, \qquad
              d = \hat J^\top \mathbf 1 = J^\top (B\mathbf 1), \qquad w = B\mathbf 1 .

    The aligned gradients (rows of :math:`\hat J`) are orthogonal with equal norms on the kept subspace
    (:math:`\hat J\hat J^\top = \sigma_R^2 V_R V_R^\top`). The task preferences are all ones, as in LibMTL
    (``alpha = B.sum(0)``); torchjd's default uses :math:`1/K`, which divides the direction by K. The default
    tolerance is LibMTL's, :math:`\lambda_{\max} K \epsilon_{\rm float32}` (``torch.finfo()`` is float32's even for
    float64 gradients). All-zero gradients (rank 0) give :math:`B = I` as in torchjd, so :math:`d = 0`.
    The state (:class:`AlignedMTLState`) reports the rank and :math:`\sigma_R` of the last step.
    """
    eigenvalue_rtol = check_positive("eigenvalue_rtol", eigenvalue_rtol)

    def init(num_tasks: int) -> AlignedMTLState:
        check_num_tasks(num_tasks)
        return AlignedMTLState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))

    def weigh(gram, losses, state, key):
        balance, rank, sigma_min = balance_matrix(gram, eigenvalue_rtol)
        weights = balance @ jnp.ones(gram.shape[0], gram.dtype)
        return weights, AlignedMTLState(rank.astype(jnp.int32), sigma_min.astype(jnp.float32))

    return weighting_balancer("aligned_mtl", init, weigh)

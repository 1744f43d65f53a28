r"""GradVac (Wang et al., ICLR 2021): raise each pair's gradient similarity to an adaptive target.

Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021 (https://openreview.net/forum?id=F1vEjWK-lH_), Algorithm 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import (Balancer, check_choice, check_num_tasks, register, safe_divide,
                                   weighting_balancer)

GROUP_TYPES = (0,)
TARGET_UPDATES = ("always", "on_conflict")


class GradVacState(NamedTuple):
    r"""State of GradVac.

    Attributes:
        targets: ``[K, K]`` the EMA targets :math:`\hat\phi_{ij}` of the cosine between the (modified)
            gradient of task i and the gradient of task j; zero at ``init`` and on the diagonal (never read).
            Each step replaces every off-diagonal entry it visits by :math:`(1-\beta)\hat\phi_{ij} +
            \beta\phi_{ij}` (only on conflicts when ``target_update="on_conflict"``).
    """

    targets: jax.Array


@register("gradvac")
def gradvac(beta: float = 0.5, group_type: int = 0, target_update: str = "always") -> Balancer:
    r"""GradVac: pull each task gradient towards the others until their cosine reaches an adaptive target.

    For each task :math:`i`, with :math:`\tilde g_i \leftarrow g_i` and the other tasks :math:`j` in a random
    order, let :math:`\phi_{ij} = \cos(\tilde g_i, g_j)`. If :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math:: \tilde g_i \leftarrow \tilde g_i + \frac{\|\tilde g_i\|\,\big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
              - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\|\sqrt{1-\hat\phi_{ij}^2}}\; g_j ,
              \qquad \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\,\phi_{ij},
              \qquad d = \sum_i \tilde g_i ,

    which sets :math:`\cos(\tilde g_i, g_j)` to exactly :math:`\hat\phi_{ij}` (the pre-update target). Targets
    start at 0, where the correction is PCGrad's projection; ``beta = 0`` with zero targets *is* PCGrad.

    Each :math:`\tilde g_i` stays a combination :math:`C_i J` of the rows, so the rule runs on the Gram matrix
    (:math:`\tilde g_i^\top g_j = C_i G_{:,j}`, :math:`\|\tilde g_i\|^2 = C_i G C_i^\top`), vectorised over
    :math:`i` with each task's visiting order drawn from the key as in :mod:`~theory.balancing.pcgrad`, and
    the returned weights :math:`w = \sum_i C_i` satisfy ``direction == weights @ jacobian`` exactly.

    Options:
        beta: EMA rate of the targets, in [0, 1] (LibMTL's ``GradVac_beta``, default 0.5).
        group_type: only 0 (one target per task pair for the whole model). LibMTL's per-layer (1) and
            per-matrix (2) targets need the parameter layout, which the ``[K, P]`` Jacobian does not carry.
        target_update: ``"always"`` (the paper's Algorithm 1 and Eq. (3), as torchjd reads them: every
            visited pair's target moves towards the observed cosine) or ``"on_conflict"`` (LibMTL: only pairs
            that were corrected move their target, so targets can only fall from 0).

    Deviations from LibMTL: the default ``target_update``; cosines and the correction are divided exactly (0
    where a norm or :math:`\sqrt{1-\hat\phi^2}` is 0) instead of adding 1e-8 to the denominators; cosines are
    clipped to [-1, 1].
    """
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1]; got {beta!r}")
    beta = float(beta)
    if group_type not in GROUP_TYPES:
        raise ValueError(f"group_type must be 0 (whole model; per-layer/per-matrix groups are not "
                         f"supported); got {group_type!r}")
    check_choice("target_update", target_update, TARGET_UPDATES)
    update_always = target_update == "always"

    def init(num_tasks: int) -> GradVacState:
        num_tasks = check_num_tasks(num_tasks)
        return GradVacState(jnp.zeros((num_tasks, num_tasks)))

    def weigh(g, losses, state, key):
        num_tasks = losses.shape[0]
        norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
        orders = jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(jax.random.split(key, num_tasks))

        def vaccinate(i, order, targets):
            def visit(position, carry):
                coefficients, targets = carry
                j = order[position]
                inner = coefficients @ g[:, j]
                norm_i = jnp.sqrt(jnp.maximum(coefficients @ g @ coefficients, 0.0))
                cosine = jnp.clip(safe_divide(inner, norm_i * norms[j]), -1.0, 1.0)
                target = targets[j]
                other = j != i
                below = other & (cosine < target)
                root_cosine = jnp.sqrt(jnp.maximum(1.0 - cosine**2, 0.0))
                root_target = jnp.sqrt(jnp.maximum(1.0 - target**2, 0.0))
                scale = safe_divide(norm_i * (target * root_cosine - cosine * root_target),
                                    norms[j] * root_target)
                coefficients = coefficients.at[j].add(jnp.where(below, scale, 0.0))
                moved = other if update_always else below
                targets = targets.at[j].set(jnp.where(moved, (1.0 - beta) * target + beta * cosine, target))
                return coefficients, targets

            start = jax.nn.one_hot(i, num_tasks, dtype=g.dtype)
            return jax.lax.fori_loop(0, num_tasks, visit, (start, targets))

        coefficients, targets = jax.vmap(vaccinate)(jnp.arange(num_tasks), orders,
                                                    state.targets.astype(g.dtype))  # row i: tilde g_i = C_i J
        return coefficients.sum(axis=0), GradVacState(targets.astype(state.targets.dtype))

    return weighting_balancer("gradvac", init, weigh)

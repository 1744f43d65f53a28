r"""UPGrad (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024; torchjd): the mean of each
task gradient's projection onto the dual cone of all of them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from theory.balancing.base import Balancer, check_num_tasks, check_positive, register, weighting_balancer
from theory.balancing.fairgrad import check_iterations


class BoxQPSolution(NamedTuple):
    """Solution of :math:`\\min_v v^\\top A v` s.t. :math:`v \\ge u` (each field has a leading batch axis when
    several programs are solved at once by :func:`box_qps`).

    Attributes:
        weights: ``[K]`` the minimiser :math:`v`.
        kkt_residual: :math:`\\max_i |\\min(v_i - u_i,\\ (Av)_i)|`, zero exactly at the optimum (the KKT conditions
            :math:`v \\ge u`, :math:`Av \\ge 0`, :math:`(v-u)\\cdot Av = 0`).
        iterations: active-set iterations used (one principal pivot each).
    """

    weights: jax.Array
    kkt_residual: jax.Array
    iterations: jax.Array


def _pivot(tableau: jax.Array, index: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Principal pivot of each tableau ``[N, K, K+1]`` on its ``index`` where ``active``, in O(K^2) each.

    Row :math:`j` of a tableau :math:`T` reads :math:`y_j = \sum_k T_{jk} x_k + T_{j,K}` (basic variables :math:`y`
    in terms of the non-basic :math:`x`; the last column is the constant). Exchanging :math:`y_r` and :math:`x_r`
    (Tucker's principal pivot; Cottle, Pang & Stone, *The Linear Complementarity Problem*, 1992, §2.3) is the
    rank-one update :math:`T' = T - (T_{:,r} + e_r)(T_{r,:} - e_r)^\top / T_{rr}`. A pivot :math:`T_{rr}` that is
    not positive (impossible when the tableau comes from a positive definite matrix, up to rounding) is not taken.

    Returns:
        The pivoted tableaus and ``[N]`` whether each pivot was taken.
    """
    num = tableau.shape[1]
    column = jnp.take_along_axis(tableau, index[:, None, None], axis=2)[..., 0]          # [N, K]
    row = jnp.take_along_axis(tableau, index[:, None, None], axis=1)[:, 0, :]            # [N, K+1]
    unit = jax.nn.one_hot(index, num + 1, dtype=tableau.dtype)
    pivot = jnp.sum(row * unit, axis=1)
    taken = active & (pivot > 0)
    scale = jnp.where(taken, 1.0 / jnp.where(taken, pivot, 1.0), 0.0)
    left = (column + unit[:, :num]) * scale[:, None]
    return tableau - left[:, :, None] * (row - unit)[:, None, :], taken


def box_qps(matrix: jax.Array, lowers: jax.Array, max_iterations: int = 100,
            tolerance: float = 1e-10) -> BoxQPSolution:
    r"""Exact solver of the N programs :math:`\min_v v^\top A v` s.t. :math:`v \ge u_n` (``lowers`` ``[N, K]``)
    that share one positive definite ``matrix`` :math:`A`, all at once.

    With :math:`v = u + z` each is the linear complementarity problem :math:`z \ge 0`, :math:`\mu = Az + Au \ge 0`,
    :math:`z^\top\mu = 0`, solved by the Lawson–Hanson active-set method (*Solving Least Squares Problems*, 1974,
    ch. 23, written on :math:`A` instead of a factor of it): from :math:`z = 0`, free variables are added one at a
    time, the one whose partial derivative :math:`\mu_j` is most negative; the problem restricted to the free set is
    solved exactly; if that leaves the feasible set, the method steps back to the boundary and releases the variable
    that reached it first (one per iteration; a tie is released at the next one, with a zero step). It terminates
    after finitely many steps at the exact optimum.

    The restricted problems are not refactorised: each program keeps the tableau of :math:`\mu = Az + Au` pivoted on
    its free set :math:`F` (:func:`_pivot`; its pivots are Schur complements of :math:`A` or diagonal entries of
    :math:`A_{FF}^{-1}`, all positive), whose last column holds the restricted solution
    :math:`z_F = -A_{FF}^{-1}(Au)_F` and the partial derivatives off :math:`F`, so adding or releasing a variable is
    one rank-one update, batched over the N programs. Each ``lax.while_loop`` iteration is one pivot of every
    program not yet finished; the loop stops when every program is optimal (every partial derivative of a bound
    variable :math:`\ge -` ``tolerance``, floored at 64 machine epsilons) or after ``max_iterations``. The rounding
    accumulated over the pivots is then removed by one step of iterative refinement,
    :math:`z_F \leftarrow z_F - A_{FF}^{-1}\,(A(u+z))_F`, with :math:`A_{FF}^{-1}` read from the tableau.
    """
    dtype = matrix.dtype
    count, num = lowers.shape
    tol = jnp.maximum(jnp.asarray(tolerance, dtype), 64 * jnp.finfo(dtype).eps)
    linear = lowers @ matrix.T                                                           # rows: A u_n
    tableau = jnp.concatenate([jnp.broadcast_to(matrix, (count, num, num)), linear[:, :, None]], axis=2)

    def cond(carry):
        *_, done, _, _, it = carry
        return (it < max_iterations) & ~jnp.all(done)

    def body(carry):
        tableau, free, z, entered, done, solved, iterations, it = carry
        last = tableau[:, :, num]
        s = jnp.where(free, last, 0.0)                   # the solution restricted to the free set
        blocking = free & (s <= 0)
        feasible = ~jnp.any(blocking, axis=1)
        # Feasible: z = s, and the bound variable with the most negative partial derivative enters (key: derivative).
        # Infeasible: step from z towards s up to the first free variable that reaches zero, which leaves (key: the
        # step to it). Rounding can leave the variable that just entered non-positive although its derivative was
        # negative: it leaves at once (key -1) and the program stops at the previous point.
        gap = z - s
        ratios = jnp.where(blocking, z / jnp.where(gap > 0, gap, 1.0), jnp.inf)
        key = jnp.where(feasible[:, None], jnp.where(free, jnp.inf, last), jnp.where(entered & blocking, -1.0, ratios))
        index = jnp.argmin(key, axis=1)
        one_hot = jax.nn.one_hot(index, num, dtype=bool)
        value = jnp.sum(jnp.where(one_hot, key, 0.0), axis=1)
        optimal = feasible & (value >= -tol)
        stalled = ~feasible & (value < 0)
        tableau, taken = _pivot(tableau, index, ~done & ~optimal)
        z_back = jnp.where(free & ~one_hot, jnp.maximum(z + value[:, None] * (s - z), 0.0), 0.0)
        broken = ~taken & ~optimal                       # a non-positive pivot: stop where it was
        z_new = jnp.where(feasible[:, None], s, jnp.where((stalled | broken)[:, None], z, z_back))
        return (tableau,
                free ^ (one_hot & taken[:, None]),
                jnp.where(done[:, None], z, z_new),
                one_hot & (feasible & taken)[:, None],
                done | optimal | stalled | broken,
                solved | (~done & (optimal | stalled)),
                iterations + (~done).astype(jnp.int32),
                it + 1)

    false, none = jnp.zeros((count, num), bool), jnp.zeros((count,), bool)
    tableau, free, z, _, _, solved, iterations, _ = jax.lax.while_loop(
        cond, body, (tableau, false, jnp.zeros((count, num), dtype), false, none, none,
                     jnp.zeros((count,), jnp.int32), jnp.zeros((), jnp.int32)))
    # Refinement, where z is the solution restricted to the free set (the programs that stopped at an optimum).
    gradient = (lowers + z) @ matrix.T
    correction = jnp.einsum("njk,nk->nj", tableau[:, :, :num], jnp.where(free, gradient, 0.0))
    z = jnp.where(solved[:, None] & free, jnp.maximum(z - correction, 0.0), z)
    kkt = jnp.max(jnp.abs(jnp.minimum(z, (lowers + z) @ matrix.T)), axis=1)
    return BoxQPSolution(lowers + z, kkt, iterations)


def box_qp(matrix: jax.Array, lower: jax.Array, max_iterations: int = 100,
           tolerance: float = 1e-10) -> BoxQPSolution:
    r"""Exact solver of :math:`\min_v v^\top A v` s.t. :math:`v \ge u`, for a positive definite ``matrix`` :math:`A`
    (:func:`box_qps` with one program; vmappable)."""
    solution = box_qps(matrix, lower[None], max_iterations, tolerance)
    return BoxQPSolution(*(field[0] for field in solution))


def upgrad_gram(gram: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
    r"""torchjd's regularised, normalised Gram matrix :math:`\tilde G = G/\mathrm{tr}(G) + \epsilon_{\rm reg} I`
    (:math:`G/\mathrm{tr}(G)` is replaced by 0 when :math:`\mathrm{tr}(G) <` ``norm_eps``)."""
    trace = jnp.trace(gram)
    normalised = jnp.where(trace >= norm_eps, gram / jnp.where(trace > 0, trace, 1.0), 0.0)
    return normalised + reg_eps * jnp.eye(gram.shape[0], dtype=gram.dtype)


class UPGradState(NamedTuple):
    """State of UPGrad: the report of the last step's K quadratic programs (replaced at every step).

    Attributes:
        kkt_residual: largest KKT residual (see :class:`BoxQPSolution`) over the K programs (float32).
        iterations: largest number of active-set iterations (pivots) over the K programs.
        converged: ``kkt_residual <= tolerance`` (floored at 64 machine epsilons of the Gram dtype's scale).
    """

    kkt_residual: jax.Array
    iterations: jax.Array
    converged: jax.Array


@register("upgrad")
def upgrad(norm_eps: float = 1e-4, reg_eps: float = 1e-4, max_iterations: int = 100,
           tolerance: float = 1e-10) -> Balancer:
    r"""UPGrad with torchjd's and LibMTL's ``norm_eps = reg_eps = 1e-4`` and the uniform preference vector.

    Each gradient :math:`g_t` is projected onto the dual cone :math:`\{d : Jd \ge 0\}` of all gradients; by
    Proposition 1 of the paper the projection is :math:`J^\top v_t` with

    .. math:: v_t = \arg\min_{v \ge e_t} v^\top \tilde G v, \qquad
              d = \frac1K \sum_t J^\top v_t, \qquad w = \frac1K \sum_t v_t,

    where :math:`\tilde G = G/\mathrm{tr}(G) + \epsilon_{\rm reg} I` (torchjd's normalisation by the squared
    Frobenius norm of :math:`J`, skipped when :math:`\mathrm{tr}(G) < \epsilon_{\rm norm}`, and its regularisation,
    which makes the programs strictly convex when gradients are linearly dependent). The direction is the **mean** of
    the projections (torchjd's default ``pref_vector`` :math:`1/K`; LibMTL's UPGrad too). The regularisation costs
    exactness by a known amount: at the optimum :math:`\tilde G v_t \ge 0`, so
    :math:`J d \ge -\epsilon_{\rm reg}\,\mathrm{tr}(G)\, w` (zero conflict as :math:`\epsilon_{\rm reg}\to 0`).

    The K programs have only lower bounds and share :math:`\tilde G`; they are solved exactly and together by an
    active-set method (:func:`box_qps`, which replaces torchjd's ``quadprog``; one rank-one tableau update per
    program and iteration, no factorisation), with a budget of ``max_iterations`` active-set iterations and the
    stopping ``tolerance`` on the partial derivatives of the normalised problem.
    The state (:class:`UPGradState`) is the report of the last step's programs.

    Quirk kept from torchjd: when :math:`\mathrm{tr}(G) = \sum_t\|g_t\|^2 <` ``norm_eps`` (an absolute threshold),
    :math:`\tilde G = \epsilon_{\rm reg} I`, every :math:`v_t = e_t` and the direction is the plain mean gradient,
    which may conflict. ``norm_eps=0`` disables the threshold.
    """
    norm_eps = check_positive("norm_eps", norm_eps, allow_zero=True)
    reg_eps = check_positive("reg_eps", reg_eps)
    max_iterations = check_iterations("max_iterations", max_iterations)
    tolerance = check_positive("tolerance", tolerance)

    def init(num_tasks: int) -> UPGradState:
        check_num_tasks(num_tasks)
        return UPGradState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.ones((), bool))

    def weigh(gram, losses, state, key):
        num_tasks = losses.shape[0]
        regularised = upgrad_gram(gram, norm_eps, reg_eps)
        solutions = box_qps(regularised, jnp.eye(num_tasks, dtype=gram.dtype), max_iterations, tolerance)
        weights = jnp.mean(solutions.weights, axis=0)
        kkt = jnp.max(solutions.kkt_residual)
        floor = 64 * jnp.finfo(gram.dtype).eps * jnp.maximum(1.0, jnp.max(solutions.weights))
        report = UPGradState(kkt.astype(jnp.float32), jnp.max(solutions.iterations).astype(jnp.int32),
                             kkt <= jnp.maximum(tolerance, floor))
        return weights, report

    return weighting_balancer("upgrad", init, weigh)

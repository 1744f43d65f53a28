r"""Small convex problems over the probability simplex :math:`\Delta^{K-1}`, solved in pure JAX so they jit.

Two problems appear in the balancing methods, both written on the Gram matrix :math:`G = J J^\top` so their cost
does not depend on the number of shared parameters:

* the **min-norm** problem of MGDA, :math:`\min_{\alpha \in \Delta} \alpha^\top G \alpha`, solved exactly by
  enumerating supports (:func:`min_norm_exact`, small K) or by an active-set method (:func:`min_norm_active_set`,
  any K), or approximately by Frank–Wolfe (:func:`min_norm_frank_wolfe`);
* the **conflict-averse** problem of CAGrad, :math:`\min_{w \in \Delta} w^\top a + c\sqrt{w^\top G w}`.

The active-set method (:func:`nonnegative_qps`, Lawson–Hanson) also solves UPGrad's programs.

Solvers run a fixed maximum number of iterations (``lax.while_loop``) and return the Frank–Wolfe duality gap
:math:`\max_{v \in \Delta} \nabla F(x)^\top (x - v) \ge F(x) - F^*`, a certificate of how far from optimal the
returned point is, so a caller can tell when the budget was not enough. Gram matrices are rescaled by their
largest diagonal entry first; every minimiser here is invariant to that scale, and the tolerances become relative.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SimplexSolution(NamedTuple):
    """A point of the simplex and its certificate.

    Attributes:
        weights: ``[K]`` the solution.
        duality_gap: Frank–Wolfe gap of the scale-normalised problem (an upper bound on its suboptimality).
        iterations: iterations used (0 for closed-form or enumerative solvers).
    """

    weights: jax.Array
    duality_gap: jax.Array
    iterations: jax.Array


MAX_EXACT_TASKS = 12


def _normalise(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    scale = jnp.max(jnp.diag(gram))
    safe = jnp.where(scale > 0, scale, 1.0)
    return gram / safe, scale


def _supports(num_tasks: int) -> np.ndarray:
    """All non-empty subsets of the tasks as a boolean array ``[2^K - 1, K]``."""
    rows = [mask for mask in itertools.product([False, True], repeat=num_tasks) if any(mask)]
    return np.array(rows, dtype=bool)


def min_norm_gap(gram: jax.Array, alpha: jax.Array) -> jax.Array:
    """Frank–Wolfe gap of the min-norm problem at ``alpha`` (on a normalised Gram matrix)."""
    grad = 2.0 * gram @ alpha
    return grad @ alpha - jnp.min(grad)


def min_norm_exact(gram: jax.Array) -> SimplexSolution:
    r"""Exact minimiser of :math:`\alpha^\top G \alpha` over the simplex by enumerating supports.

    For each non-empty support :math:`S` the equality-constrained problem has the KKT system
    :math:`\begin{pmatrix} G_{SS} & 1 \\ 1^\top & 0\end{pmatrix}\binom{\alpha_S}{\mu} = \binom{0}{1}`; the optimum
    is the feasible (:math:`\alpha_S \ge 0`) candidate of least value. All :math:`2^K - 1` systems are solved in one
    batched call, so this suits :math:`K \le 12` (it is exact, not iterative). A tiny ridge keeps the systems
    solvable when gradients are linearly dependent (identical tasks, zero gradients).
    """
    num_tasks = gram.shape[0]
    if num_tasks > MAX_EXACT_TASKS:
        raise ValueError(f"the exact min-norm solver enumerates 2^K supports and allows K <= {MAX_EXACT_TASKS}; "
                         f"got K={num_tasks} (use solver='active_set')")
    g, _ = _normalise(gram)
    ridge = 10 * jnp.finfo(g.dtype).eps * num_tasks
    g_reg = g + ridge * jnp.eye(num_tasks, dtype=g.dtype)
    masks = jnp.asarray(_supports(num_tasks))
    eye = jnp.eye(num_tasks, dtype=g.dtype)

    def solve_on(mask):
        inside = mask[:, None] & mask[None, :]
        top_left = jnp.where(inside, g_reg, eye)
        border = mask.astype(g.dtype)
        kkt = jnp.zeros((num_tasks + 1, num_tasks + 1), g.dtype)
        kkt = kkt.at[:num_tasks, :num_tasks].set(top_left)
        kkt = kkt.at[:num_tasks, num_tasks].set(border).at[num_tasks, :num_tasks].set(border)
        rhs = jnp.zeros(num_tasks + 1, g.dtype).at[num_tasks].set(1.0)
        alpha = jnp.linalg.solve(kkt, rhs)[:num_tasks] * border
        feasible = jnp.all(jnp.isfinite(alpha)) & jnp.all(alpha >= -1e-6)
        alpha = jnp.clip(jnp.where(jnp.isfinite(alpha), alpha, 0.0), 0.0)
        alpha = alpha / jnp.maximum(alpha.sum(), 1e-30)
        value = jnp.where(feasible & (alpha.sum() > 0), alpha @ g @ alpha, jnp.inf)
        return alpha, value

    candidates, values = jax.vmap(solve_on)(masks)
    best = candidates[jnp.argmin(values)]
    return SimplexSolution(best, min_norm_gap(g, best), jnp.zeros((), jnp.int32))


def _pairwise_direction(grad: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairwise Frank–Wolfe direction :math:`e_s - e_v` (towards the best vertex, away from the worst vertex in
    the support) and its largest step :math:`x_v`. Plain Frank–Wolfe zigzags when the optimum lies on a face and
    converges as :math:`O(1/k)`; pairwise steps converge linearly on the simplex (Lacoste-Julien & Jaggi, 2015).
    """
    num_tasks = x.shape[0]
    towards = jnp.argmin(grad)
    away = jnp.argmax(jnp.where(x > 0, grad, -jnp.inf))
    direction = jax.nn.one_hot(towards, num_tasks, dtype=x.dtype) - jax.nn.one_hot(away, num_tasks, dtype=x.dtype)
    return direction, x[away]


def min_norm_frank_wolfe(gram: jax.Array, max_iterations: int = 250, tolerance: float = 1e-5) -> SimplexSolution:
    r"""Frank–Wolfe for :math:`\min_{\alpha\in\Delta}\alpha^\top G\alpha` (the solver of Sener & Koltun, 2018),
    with pairwise steps so that it also converges when the optimum lies on a face of the simplex.

    Each iteration moves along :math:`d = e_s - e_v` (see :func:`_pairwise_direction`) with the exact line search
    :math:`\gamma = \mathrm{clip}(-\alpha^\top G d / d^\top G d,\ 0,\ \alpha_v)`, until the duality gap falls
    below ``tolerance`` (relative to the largest squared gradient norm) or ``max_iterations`` is reached.
    """
    g, _ = _normalise(gram)
    num_tasks = g.shape[0]
    alpha0 = jnp.full((num_tasks,), 1.0 / num_tasks, g.dtype)

    def cond(carry):
        _, gap, it = carry
        return (it < max_iterations) & (gap > tolerance)

    def body(carry):
        alpha, _, it = carry
        direction, gamma_max = _pairwise_direction(g @ alpha, alpha)
        curvature, slope = direction @ g @ direction, alpha @ g @ direction
        safe = jnp.where(curvature > 0, curvature, 1.0)
        flat_step = jnp.where(slope < 0, gamma_max, 0.0)  # no curvature: the objective is linear along d
        gamma = jnp.where(curvature > 0, jnp.clip(-slope / safe, 0.0, gamma_max), flat_step)
        alpha = jnp.clip(alpha + gamma * direction, 0.0)
        return alpha, min_norm_gap(g, alpha), it + 1

    alpha, gap, it = jax.lax.while_loop(cond, body, (alpha0, min_norm_gap(g, alpha0), jnp.zeros((), jnp.int32)))
    return SimplexSolution(alpha, gap, it)


class NonnegativeQPSolution(NamedTuple):
    r"""Solutions of :math:`\min_{z \ge 0} z^\top A z + 2 q^\top z` (each field has a leading batch axis: one row per
    linear term :math:`q_n`, see :func:`nonnegative_qps`).

    Attributes:
        weights: ``[N, K]`` the minimisers :math:`z`.
        kkt_residual: ``[N]`` :math:`\max_i |\min(z_i,\ (Az + q)_i)|`, zero exactly at the optimum (the KKT
            conditions :math:`z \ge 0`, :math:`Az + q \ge 0`, :math:`z^\top (Az + q) = 0`).
        iterations: ``[N]`` active-set iterations used: one per principal pivot, and one more that finds the
            optimum.
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


def nonnegative_qps(matrix: jax.Array, linear: jax.Array, max_iterations: int = 100,
                    tolerance: float = 1e-10) -> NonnegativeQPSolution:
    r"""Exact solver of the N programs :math:`\min_{z \ge 0} z^\top A z + 2 q_n^\top z` (``linear`` ``[N, K]``, rows
    :math:`q_n`) that share one positive semi-definite ``matrix`` :math:`A`, all at once.

    Each is the linear complementarity problem :math:`z \ge 0`, :math:`\mu = Az + q \ge 0`, :math:`z^\top\mu = 0`,
    solved by the Lawson–Hanson active-set method (*Solving Least Squares Problems*, 1974, ch. 23, written on
    :math:`A` instead of a factor of it): from :math:`z = 0`, free variables are added one at a time, the one whose
    partial derivative :math:`\mu_j` is most negative; the problem restricted to the free set is solved exactly; if
    that leaves the feasible set, the method steps back to the boundary and releases the variable that reached it
    first (one per iteration; a tie is released at the next one, with a zero step). It terminates after finitely
    many steps at the exact optimum. A variable enters only while its derivative is negative at the restricted
    optimum, so (as in Lawson–Hanson's nonnegative least squares) the free set's submatrix stays positive definite
    even where :math:`A` is only semi-definite, as long as the free columns of a factor stay independent.

    The restricted problems are not refactorised: each program keeps the tableau of :math:`\mu = Az + q` pivoted on
    its free set :math:`F` (:func:`_pivot`; its pivots are Schur complements of :math:`A` or diagonal entries of
    :math:`A_{FF}^{-1}`, all positive), whose last column holds the restricted solution
    :math:`z_F = -A_{FF}^{-1} q_F` and the partial derivatives off :math:`F`, so adding or releasing a variable is
    one rank-one update, batched over the N programs. Each ``lax.while_loop`` iteration is one pivot of every
    program not yet finished; the loop stops when every program is optimal (every partial derivative of a bound
    variable :math:`\ge -` ``tolerance``, floored at 64 machine epsilons) or after ``max_iterations``. The rounding
    accumulated over the pivots is then removed by one step of iterative refinement,
    :math:`z_F \leftarrow z_F - A_{FF}^{-1}\,(Az + q)_F`, with :math:`A_{FF}^{-1}` read from the tableau.
    """
    dtype = matrix.dtype
    count, num = linear.shape
    tol = jnp.maximum(jnp.asarray(tolerance, dtype), 64 * jnp.finfo(dtype).eps)
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
    gradient = z @ matrix.T + linear
    correction = jnp.einsum("njk,nk->nj", tableau[:, :, :num], jnp.where(free, gradient, 0.0))
    z = jnp.where(solved[:, None] & free, jnp.maximum(z - correction, 0.0), z)
    kkt = jnp.max(jnp.abs(jnp.minimum(z, z @ matrix.T + linear)), axis=1)
    return NonnegativeQPSolution(z, kkt, iterations)


def min_norm_active_set(gram: jax.Array, max_iterations: int = 250) -> SimplexSolution:
    r"""Exact minimiser of :math:`\alpha^\top G \alpha` over the simplex for any number of tasks, in finitely many
    active-set steps.

    The min-norm problem is a nonnegative least-squares problem in disguise: for :math:`u = t\alpha` with
    :math:`t \ge 0`, :math:`\alpha \in \Delta`,

    .. math:: u^\top (G + \mathbf 1\mathbf 1^\top) u - 2\,\mathbf 1^\top u = t^2 (\alpha^\top G\alpha + 1) - 2t,

    whose minimum over :math:`t`, :math:`-1/(\alpha^\top G \alpha + 1)`, is lowest where :math:`\alpha^\top G\alpha` is
    (any positive constant would do for the 1; the Gram matrix is normalised to a largest diagonal of 1). So
    :math:`\alpha^* = u^*/\mathbf 1^\top u^*` for the minimiser :math:`u^* \ge 0` of the left side (the nonnegative
    least-squares problem by which Lawson and Hanson solve least-distance programming, here :math:`\min \|x\|` s.t.
    :math:`Jx \ge \mathbf 1`), which :func:`nonnegative_qps` finds exactly. :math:`G + \mathbf 1\mathbf 1^\top` is the
    Gram matrix of the gradients each extended by a coordinate 1, so the method's free sets are affinely independent
    gradients, and repeated or affinely dependent gradients are allowed. Unlike Frank–Wolfe
    (:func:`min_norm_frank_wolfe`), whose convergence slows where the hull of the gradients is nearly flat, this
    typically takes about one pivot per task in its solution's support (a released task costs two more; there is no
    useful worst-case bound, so the returned gap says whether ``max_iterations`` sufficed).
    """
    g, _ = _normalise(gram)
    num_tasks = g.shape[0]
    extended = g + jnp.ones((num_tasks, num_tasks), g.dtype)
    # Tolerance 0: optimal once no derivative is below -64 machine epsilons (the solver's floor), so the duality gap
    # ends within a few hundred epsilons (1e-14 in float64, up to ~3e-5 in float32); a tolerance of 1e-10 left 1e-10
    # of the (unit) scale on the table where a gradient is 1e-5 of the largest.
    solution = nonnegative_qps(extended, -jnp.ones((1, num_tasks), g.dtype), max_iterations, tolerance=0.0)
    u = solution.weights[0]
    total = jnp.sum(u)  # > 0: at u = 0 every derivative is -1, so a task enters
    alpha = u / jnp.where(total > 0, total, 1.0)
    return SimplexSolution(alpha, min_norm_gap(g, alpha), solution.iterations[0])


def _conflict_averse_grad(g, a, c, w):
    q = w @ g @ w
    return a + jnp.where(q > 0, c * (g @ w) / jnp.sqrt(jnp.where(q > 0, q, 1.0)), 0.0)


def _conflict_averse_line_search(g, a, c, w, direction, gamma_max):
    r"""Exact minimiser over :math:`\gamma\in[0,\gamma_{\max}]` of :math:`\varphi(\gamma) = F(w + \gamma d)`.

    With :math:`A = a^\top d` and :math:`q(\gamma) = q_0 + 2\gamma q_1 + \gamma^2 q_2` (the squared norm along the
    segment), :math:`\varphi'(\gamma) = A + c(q_1 + \gamma q_2)/\sqrt{q(\gamma)}`. Writing :math:`u = q_1+\gamma q_2`
    and :math:`D = q_0 - q_1^2/q_2 \ge 0`, the root is :math:`u^* = -\mathrm{sign}(A)\sqrt{A^2 D/(c^2 - A^2/q_2)}`
    when :math:`c\sqrt{q_2} > |A|`; otherwise :math:`\varphi` is monotone and the minimiser is an end point.
    """
    slope = a @ direction
    q0, q1, q2 = w @ g @ w, w @ g @ direction, direction @ g @ direction
    flat = q2 <= 1e-12
    safe_q2 = jnp.where(flat, 1.0, q2)
    interior = (c**2 * safe_q2 > slope**2) & ~flat
    discriminant = jnp.maximum(q0 - q1**2 / safe_q2, 0.0)
    denom = jnp.where(interior, c**2 - slope**2 / safe_q2, 1.0)
    u_star = -jnp.sign(slope) * jnp.sqrt(slope**2 * discriminant / denom)
    gamma_interior = jnp.clip((u_star - q1) / safe_q2, 0.0, gamma_max)
    # Monotone cases: the derivative at 0 has the sign of the whole function's slope.
    derivative_at_0 = slope + jnp.where(q0 > 0, c * q1 / jnp.sqrt(jnp.where(q0 > 0, q0, 1.0)), 0.0)
    gamma_end = jnp.where(derivative_at_0 < 0, gamma_max, 0.0)
    return jnp.where(interior, gamma_interior, gamma_end)


def conflict_averse_frank_wolfe(gram: jax.Array, linear: jax.Array, radius: jax.Array,
                                max_iterations: int = 250, tolerance: float = 1e-6) -> SimplexSolution:
    r"""Pairwise Frank–Wolfe with exact line search for :math:`\min_{w\in\Delta} w^\top a + c\sqrt{w^\top G w}`.

    ``linear`` (:math:`a`) and ``radius`` (:math:`c`) must be given for the *unnormalised* ``gram``; the problem is
    rescaled internally (:math:`G\to G/s`, :math:`a\to a/s`, :math:`c\to c/\sqrt s` leave the minimiser unchanged).

    A vertex :math:`e_k` with :math:`G_{kk} = 0` (a task whose gradient is zero) is a kink of
    :math:`\sqrt{w^\top G w}`, and F can be least there (for CAGrad's F whenever ``calpha`` >= 1); the steps zigzag
    towards such a point without reaching it, so the best vertex is returned where its F is lower than the last
    iterate's. The gap reported is the last iterate's, still an upper bound on the suboptimality of what is returned.
    """
    g, scale = _normalise(gram)
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    a, c = linear / safe_scale, radius / jnp.sqrt(safe_scale)
    num_tasks = g.shape[0]
    w0 = jnp.full((num_tasks,), 1.0 / num_tasks, g.dtype)

    def gap_at(w):
        grad = _conflict_averse_grad(g, a, c, w)
        return grad @ w - jnp.min(grad)

    def cond(carry):
        _, gap, it = carry
        return (it < max_iterations) & (gap > tolerance)

    def body(carry):
        w, _, it = carry
        direction, gamma_max = _pairwise_direction(_conflict_averse_grad(g, a, c, w), w)
        w = jnp.clip(w + _conflict_averse_line_search(g, a, c, w, direction, gamma_max) * direction, 0.0)
        return w, gap_at(w), it + 1

    w, gap, it = jax.lax.while_loop(cond, body, (w0, gap_at(w0), jnp.zeros((), jnp.int32)))
    vertex_values = a + c * jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
    best = jnp.argmin(vertex_values)
    last_value = w @ a + c * jnp.sqrt(jnp.maximum(w @ g @ w, 0.0))
    w = jnp.where(vertex_values[best] < last_value, jax.nn.one_hot(best, num_tasks, dtype=w.dtype), w)
    return SimplexSolution(w, gap, it)


class SolverState(NamedTuple):
    """What a solver-based method reports about its last step.

    Attributes:
        duality_gap: Frank–Wolfe gap of the last solve (scale-normalised; an upper bound on suboptimality).
        iterations: iterations the last solve used.
        converged: whether the last solve met its tolerance within its iteration budget.
    """

    duality_gap: jax.Array
    iterations: jax.Array
    converged: jax.Array

    @classmethod
    def initial(cls) -> "SolverState":
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.ones((), bool))

    @classmethod
    def of(cls, solution: SimplexSolution, tolerance: float) -> "SolverState":
        gap = solution.duality_gap.astype(jnp.float32)
        return cls(gap, solution.iterations.astype(jnp.int32), gap <= tolerance)

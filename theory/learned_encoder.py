r"""A learned dual-stream encoder on observations of the SCM: does the training objective choose θ?

Theorem 2.3 is stated *given* an entanglement angle θ. Here θ is learned. An observation mixes the latent factors,
:math:`x = g(s, r) + \sigma_x\xi`, and an encoder maps it to a semantic code :math:`\hat z_s` and a residual code
:math:`\hat z_r`. The source domain gives the encoder a reason to stay entangled: the residual is correlated with the
semantic factor there (:math:`r = \sigma_{r,e}(\rho_e\, s/\sigma_s + \sqrt{1-\rho_e^2}\,\eta)`, with
:math:`\rho_S > 0` and :math:`\rho_T = 0`, as in the paper's coloured stress test), and ``x`` sees ``s`` only through
noise, so reading ``r`` helps on the source. Two ways to train:

* **a balancing method** of :mod:`theory.balancing` on the task losses alone (heads on the semantic code or on the
  full code), the encoder being the shared parameters;
* **the CORE-MTL objective at this scale** (Eq (16)): task loss on the semantic stream
  :math:`+\ \lambda_{\rm ind}\,\mathrm{CKA}(\hat Z_s,\hat Z_r)`
  :math:`+\ \lambda_{\rm geo}\|D_{\rm geo}(\hat z_s)-s\|^2`
  (geometric grounding: the semantic stream alone must reconstruct the geometry, as the paper's depth target)
  :math:`+\ \lambda_{\rm rec}\|D_{\rm app}(\hat z_s,\hat z_r)-x\|^2` (the reconstruction bottleneck)
  :math:`+\ \lambda_{\rm cfa}` × the task loss on counterfactuals: residual codes swapped within the batch, decoded,
  re-encoded, scored against the original labels (Eq (12)).

Measured along training: the learned angle :math:`\hat\theta` (the largest angle between a direction of the semantic
code's row space, in latent coordinates, and the true semantic subspace: the largest principal angle when the code
has full rank; see :func:`_largest_angle_to_semantic`), the predictor's angle (the same for the span of the task
predictors, which may have more rows than dimensions), the leakage κ (sup over samples of
:math:`\|\partial\hat z_s/\partial r\|_{op}`), linear and debiased CKA between the streams, and the OOD gap
:math:`R_T - R_S` of the task predictors (paired Monte Carlo with its standard error).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from theory import measures
from theory.balancing import Balancer
from theory.jacobians import task_jacobian

MIXINGS = ("linear", "nonlinear")
HEAD_INPUTS = ("semantic", "full")


@dataclasses.dataclass(frozen=True)
class EncoderWorld:
    """The data-generating process of the learned-encoder experiment.

    Attributes:
        dim: dimension ``d`` of each latent factor (the codes have ``d`` dimensions each).
        num_tasks: ``K``, labels :math:`y_t = \\beta_t^\\top s + \\varepsilon_t` with random unit-norm :math:`\\beta_t`.
        sigma_s, sigma_r_source, sigma_r_target: latent scales.
        rho_source, rho_target: per-coordinate correlation of ``r`` with ``s`` in each domain, in (-1, 1).
        observation_noise: :math:`\\sigma_x`, noise added to the observation.
        noise_std: label noise.
        mixing: "linear" (:math:`x = M[s;r]`) or "nonlinear" (:math:`x = M_2\\,\\phi(M_1[s;r])`,
            :math:`\\phi(h) = h + \\tanh(2h)/2`, invertible), with random orthogonal ``M``.
        seed: fixes the mixing matrices and the task coefficients.
    """

    dim: int = 2
    num_tasks: int = 2
    sigma_s: float = 1.0
    sigma_r_source: float = 1.0
    sigma_r_target: float = 2.0
    rho_source: float = 0.8
    rho_target: float = 0.0
    observation_noise: float = 0.5
    noise_std: float = 0.1
    mixing: str = "linear"
    seed: int = 0

    def __post_init__(self):
        if self.dim < 1 or self.num_tasks < 1:
            raise ValueError(f"dim and num_tasks must be integers >= 1; got {self.dim}, {self.num_tasks}")
        for name in ("sigma_s", "sigma_r_source", "sigma_r_target"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0; got {getattr(self, name)}")
        for name in ("rho_source", "rho_target"):
            if not -1 < getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in (-1, 1); got {getattr(self, name)}")
        for name in ("observation_noise", "noise_std"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number >= 0; got {getattr(self, name)}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {', '.join(MIXINGS)}; got {self.mixing!r}")

    __hash__ = object.__hash__

    @property
    def observation_dim(self) -> int:
        return 2 * self.dim

    def constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(betas [K, d], M_1 [2d, 2d], M_2 [2d, 2d])`` drawn from ``seed``."""
        rng = np.random.default_rng(self.seed)
        betas = rng.standard_normal((self.num_tasks, self.dim))
        betas /= np.linalg.norm(betas, axis=1, keepdims=True)
        m1, _ = np.linalg.qr(rng.standard_normal((2 * self.dim, 2 * self.dim)))
        m2, _ = np.linalg.qr(rng.standard_normal((2 * self.dim, 2 * self.dim)))
        return betas, m1, m2


class WorldSample(NamedTuple):
    s: jax.Array       # [n, d]
    r: jax.Array       # [n, d]
    x: jax.Array       # [n, 2d] observation (with noise)
    y: jax.Array       # [n, K]


def mix(world: EncoderWorld, s: jax.Array, r: jax.Array) -> jax.Array:
    """The noise-free observation map :math:`g(s, r)`, ``[..., 2d]``."""
    _, m1, m2 = world.constants()
    latent = jnp.concatenate([s, r], axis=-1)
    if world.mixing == "linear":
        return latent @ jnp.asarray(m1).T
    hidden = latent @ jnp.asarray(m1).T
    return (hidden + 0.5 * jnp.tanh(2.0 * hidden)) @ jnp.asarray(m2).T


def sample_world(world: EncoderWorld, key: jax.Array, num_samples: int, domain: str) -> WorldSample:
    """Samples of domain "source" or "target". One key gives paired draws across domains (same s, noise)."""
    if domain not in ("source", "target"):
        raise ValueError(f"domain must be 'source' or 'target'; got {domain!r}")
    rho = world.rho_source if domain == "source" else world.rho_target
    sigma_r = world.sigma_r_source if domain == "source" else world.sigma_r_target
    keys = jax.random.split(key, 4)
    unit_s = jax.random.normal(keys[0], (num_samples, world.dim))
    s = world.sigma_s * unit_s
    r = sigma_r * (rho * unit_s + math.sqrt(1 - rho**2) * jax.random.normal(keys[1], (num_samples, world.dim)))
    x = mix(world, s, r) + world.observation_noise * jax.random.normal(keys[2], (num_samples, 2 * world.dim))
    betas, _, _ = world.constants()
    y = s @ jnp.asarray(betas).T + world.noise_std * jax.random.normal(keys[3], (num_samples, world.num_tasks))
    return WorldSample(s, r, x, y)


# ------------------------------------------------------------------------------------------------------- model


def init_model(world: EncoderWorld, key: jax.Array, head_input: str = "semantic", hidden: int = 32) -> dict:
    """Encoder (linear for linear mixing, a tanh MLP otherwise), task heads and the two decoders."""
    if head_input not in HEAD_INPUTS:
        raise ValueError(f"head_input must be one of {', '.join(HEAD_INPUTS)}; got {head_input!r}")
    d, obs = world.dim, world.observation_dim
    keys = jax.random.split(key, 6)
    glorot = lambda k, shape: jax.random.normal(k, shape) / math.sqrt(shape[-1])
    if world.mixing == "linear":
        encoder = {"out": glorot(keys[0], (2 * d, obs))}
    else:
        encoder = {"hidden": glorot(keys[0], (hidden, obs)), "bias": jnp.zeros(hidden),
                   "out": glorot(keys[1], (2 * d, hidden))}
    head_width = d if head_input == "semantic" else 2 * d
    return {"encoder": encoder, "heads": glorot(keys[2], (world.num_tasks, head_width)),
            "decoder_geo": glorot(keys[3], (d, d)), "decoder_app": glorot(keys[4], (obs, 2 * d))}


def encode(encoder: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` ``[..., 2d]`` -> ``(z_s, z_r)``, each ``[..., d]``."""
    h = x
    if "hidden" in encoder:
        h = jnp.tanh(x @ encoder["hidden"].T + encoder["bias"])
    code = h @ encoder["out"].T
    d = code.shape[-1] // 2
    return code[..., :d], code[..., d:]


def predict(params: dict, z_s: jax.Array, z_r: jax.Array) -> jax.Array:
    """Task predictions ``[..., K]`` from the semantic code, or from the full code when the heads are wider."""
    code = z_s if params["heads"].shape[1] == z_s.shape[-1] else jnp.concatenate([z_s, z_r], axis=-1)
    return code @ params["heads"].T


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    z_s, z_r = encode(params["encoder"], x)
    return jnp.mean((predict(params, z_s, z_r) - y) ** 2, axis=0)


GROUNDINGS = ("hard", "soft")


@dataclasses.dataclass(frozen=True)
class CoreWeights:
    r"""Loss weights of the CORE-MTL objective at this scale (Eq (16)) and the kind of grounding.

    ``grounding="hard"`` decodes through the *known* generative map, :math:`\hat x = g(\hat z_s, \hat z_r)` (the
    analogue of the paper's physical shading model, whose form is fixed and whose inputs are the streams);
    ``"soft"`` learns a generic linear decoder from the concatenated codes (Eq (15)).
    """

    independence: float = 1.0
    geometry: float = 1.0
    reconstruction: float = 1.0
    counterfactual: float = 1.0
    grounding: str = "hard"

    def __post_init__(self):
        if self.grounding not in GROUNDINGS:
            raise ValueError(f"grounding must be one of {', '.join(GROUNDINGS)}; got {self.grounding!r}")
        for field in dataclasses.fields(self):
            if field.name == "grounding":
                continue
            value = getattr(self, field.name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{field.name} weight must be a finite number >= 0; got {value}")


def decode(world: EncoderWorld, params: dict, z_s: jax.Array, z_r: jax.Array, grounding: str) -> jax.Array:
    """The appearance decoder: the known map ``g`` (hard grounding) or a learned linear map (soft)."""
    if grounding == "hard":
        return mix(world, z_s, z_r)
    return jnp.concatenate([z_s, z_r], axis=-1) @ params["decoder_app"].T


def core_objective(world: EncoderWorld, params: dict, batch: WorldSample, weights: CoreWeights,
                   key: jax.Array) -> tuple[jax.Array, dict]:
    """The CORE-MTL objective and its terms (heads must read the semantic code)."""
    z_s, z_r = encode(params["encoder"], batch.x)
    task = jnp.sum(jnp.mean((predict(params, z_s, z_r) - batch.y) ** 2, axis=0))
    independence = measures.linear_cka(z_s, z_r)
    geometry = jnp.mean((z_s @ params["decoder_geo"].T - batch.s) ** 2)
    reconstruction = jnp.mean((decode(world, params, z_s, z_r, weights.grounding) - batch.x) ** 2)
    # Counterfactuals: swap residual codes within the batch, decode, re-encode (the image is held fixed, as the
    # authors' code detaches it), score the semantic stream against the original labels.
    permutation = jax.random.permutation(key, batch.x.shape[0])
    swapped = jax.lax.stop_gradient(decode(world, params, z_s, z_r[permutation], weights.grounding))
    z_s_cf, z_r_cf = encode(params["encoder"], swapped)
    counterfactual = jnp.sum(jnp.mean((predict(params, z_s_cf, z_r_cf) - batch.y) ** 2, axis=0))
    total = (task + weights.independence * independence + weights.geometry * geometry
             + weights.reconstruction * reconstruction + weights.counterfactual * counterfactual)
    return total, {"task": task, "independence": independence, "geometry": geometry,
                   "reconstruction": reconstruction, "counterfactual": counterfactual}


# ---------------------------------------------------------------------------------------------------- metrics


class EncoderMetrics(NamedTuple):
    """What is tracked along training (scalars)."""

    theta_stream: jax.Array
    theta_predictor: jax.Array
    kappa: jax.Array
    cka_linear: jax.Array
    cka_debiased: jax.Array
    source_risk: jax.Array
    target_risk: jax.Array
    gap: jax.Array
    gap_se: jax.Array


# Singular values of the rows below this fraction of the largest count as zero (rank deficiency). The rows are
# least-squares fits in float32: an exactly rank-deficient set (K > d heads on a d-dimensional code) shows spurious
# singular values of about 1e-7·σ_max (6e-8 measured for K = 5 heads in d = 2), so 1e-4 leaves three orders of
# margin, while a real direction is dropped only if it is read 10⁴ times more weakly than the strongest. The SVD of
# the rows is used rather than an eigendecomposition of their Gram matrix, whose float32 errors (~1e-7·λ_max) would
# sit above the equivalent threshold 1e-8·λ_max.
RANK_RTOL = 1e-4


def _largest_angle_to_semantic(rows: jax.Array, dim: int) -> jax.Array:
    r"""The largest angle between any direction of the row span of ``rows`` ``[m, 2d]`` (latent coordinates
    :math:`[s; r]`) and the semantic coordinates: how far from semantic the most entangled direction the code (or
    predictor) reads is. Any ``m``, any rank; jit- and vmap-friendly.

    With :math:`R` the rows, :math:`N = R_{:, d:}` their nuisance part and :math:`G = RR^\top = U\Lambda U^\top`, let
    :math:`W = U\Lambda^{-1/2}` with the columns of eigenvalues below ``RANK_RTOL``² :math:`\lambda_{\max}` set to
    0. The columns of :math:`R^\top W` are an orthonormal basis of the row span, a unit direction :math:`q` of it has
    :math:`\sin^2\angle(q, \text{semantic}) = \|q_{d:}\|^2`, and so

    .. math:: \sin^2\hat\theta = \lambda_{\max}(W^\top N N^\top W), \qquad
              \hat\theta = \arcsin\sqrt{\mathrm{clip}(\sin^2\hat\theta, 0, 1)} .

    It is computed from the SVD :math:`R = U S V^\top` (then :math:`R^\top W = V`, and :math:`\sin\hat\theta` is the
    largest singular value of the nuisance rows :math:`V_{d:,\,\text{kept}}`), which does not square the condition
    number. For ``m <= d`` rows of full rank this is the largest principal angle between the row span and the
    semantic subspace (:func:`theory.measures.principal_angles`). Unlike a QR of rank-deficient rows, it adds no
    spurious directions: ``K > d`` predictors that all read the same tilted ``d``-dimensional code give that code's
    angle. A span of dimension above ``d`` meets the nuisance subspace, so gives π/2; all-zero rows give 0.
    """
    _, singular, vt = jnp.linalg.svd(rows, full_matrices=False)  # vt [k, 2d], k = min(m, 2d)
    kept = singular > RANK_RTOL * jnp.max(singular)
    nuisance = jnp.where(kept[:, None], vt[:, dim:], 0.0)             # rows: the nuisance part of the basis vectors
    sin_theta = jnp.linalg.norm(nuisance, ord=2)                       # sqrt of λ_max(Wᵀ N Nᵀ W)
    return jnp.arcsin(jnp.clip(sin_theta, 0.0, 1.0))


def evaluate(world: EncoderWorld, params: dict, key: jax.Array, num_samples: int = 20_000) -> EncoderMetrics:
    """Angles, leakage, CKA and the OOD gap of a trained model on fresh, paired source/target samples."""
    source = sample_world(world, key, num_samples, "source")
    target = sample_world(world, key, num_samples, "target")
    clean_source = mix(world, source.s, source.r)
    z_s, z_r = encode(params["encoder"], clean_source)
    latent = jnp.concatenate([source.s, source.r], axis=1)
    latent_c = latent - latent.mean(0)
    # Linear read-out of the codes and predictions in latent coordinates (exact for linear mixing and encoder).
    fit = lambda target_values: jnp.linalg.lstsq(latent_c, target_values - target_values.mean(0))[0].T
    stream_rows = fit(z_s)
    predictor_rows = fit(predict(params, z_s, z_r))
    dim = world.dim
    semantic_encoder = lambda s, r: encode(params["encoder"], mix(world, s, r))[0]
    kappa = measures.leakage_jacobian(semantic_encoder, source.s[:512], source.r[:512])
    errors_s = jnp.mean((predict(params, *encode(params["encoder"], source.x)) - source.y) ** 2, axis=1)
    errors_t = jnp.mean((predict(params, *encode(params["encoder"], target.x)) - target.y) ** 2, axis=1)
    difference = errors_t - errors_s
    return EncoderMetrics(
        _largest_angle_to_semantic(stream_rows, dim), _largest_angle_to_semantic(predictor_rows, dim), kappa,
        measures.linear_cka(z_s, z_r), measures.debiased_cka(z_s[:256], z_r[:256]),
        jnp.mean(errors_s), jnp.mean(errors_t), jnp.mean(difference),
        jnp.std(difference) / math.sqrt(num_samples))


# --------------------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class EncoderTraining:
    """How the encoder is trained: ``num_samples`` source samples, full batch, Adam with cosine decay."""

    num_samples: int = 2048
    steps: int = 1500
    learning_rate: float = 0.02
    eval_every: int = 100
    eval_samples: int = 20_000

    def __post_init__(self):
        if self.num_samples < 8 or self.steps < 1 or self.eval_every < 1 or self.eval_samples < 256:
            raise ValueError("num_samples must be >= 8, steps and eval_every >= 1, eval_samples >= 256")
        if self.steps % self.eval_every:
            raise ValueError(f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every})")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a finite number > 0; got {self.learning_rate}")


def train_encoder(world: EncoderWorld, training: EncoderTraining, key: jax.Array, *, balancer: Balancer | None = None,
                  head_input: str = "semantic", core: CoreWeights | None = None) -> EncoderMetrics:
    """Trains one model from ``key`` and returns the metrics at every ``eval_every`` steps (leading axis).

    Exactly one of ``balancer`` (task losses only, the encoder balanced across tasks) and ``core`` (the CORE-MTL
    objective, heads on the semantic code) must be given. Pure in ``key``: vmap over seeds.
    """
    if (balancer is None) == (core is None):
        raise ValueError("give exactly one of balancer (a theory.balancing method) or core (CoreWeights)")
    if core is not None and head_input != "semantic":
        raise ValueError("the CORE-MTL objective reads the task heads from the semantic code: head_input='semantic'")
    if balancer is not None and balancer.gradient_of != "parameters":
        raise ValueError(f"{balancer.name} acts on representation gradients; this experiment balances the "
                         f"encoder's parameters")
    data_key, init_key, step_key, eval_key = jax.random.split(key, 4)
    batch = sample_world(world, data_key, training.num_samples, "source")
    params = init_model(world, init_key, head_input)
    optimiser = optax.adam(optax.cosine_decay_schedule(training.learning_rate, training.steps))
    opt_state = optimiser.init(params)
    num_params = sum(leaf.size for leaf in jax.tree.leaves(params["encoder"]))
    balancer_state = balancer.init(world.num_tasks, num_params=num_params) if balancer is not None else None

    def step(carry, key):
        params, opt_state, balancer_state = carry
        if core is not None:
            grads = jax.grad(lambda p: core_objective(world, p, batch, core, key)[0])(params)
        else:
            rest = {k: v for k, v in params.items() if k != "encoder"}
            losses, jacobian, unravel = task_jacobian(
                lambda encoder: task_losses({**rest, "encoder": encoder}, batch.x, batch.y), params["encoder"])
            direction, _, balancer_state = balancer.step(jacobian, losses, balancer_state, key)
            head_grads = jax.grad(lambda h: jnp.sum(task_losses({**params, "heads": h}, batch.x, batch.y)))(
                params["heads"])
            grads = jax.tree.map(jnp.zeros_like, params)
            grads = {**grads, "encoder": unravel(direction), "heads": head_grads}
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, balancer_state), None

    def block(carry, keys):
        carry, _ = jax.lax.scan(step, carry, keys)
        return carry, evaluate(world, carry[0], eval_key, training.eval_samples)

    blocks = training.steps // training.eval_every
    keys = jax.random.split(step_key, training.steps).reshape(blocks, training.eval_every)
    _, metrics = jax.lax.scan(block, (params, opt_state, balancer_state), keys)
    return metrics

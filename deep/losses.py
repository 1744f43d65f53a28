r"""Losses of the dual-stream model (Eqs (11)-(16), ``reference/official_implementation.md`` §3).

Layouts are ``[batch, height, width, channels]``. Task losses follow LibMTL's masks: segmentation cross-entropy
ignores label −1; depth L1 and the normal cosine loss average over pixels whose ground truth's channels do not sum
to zero (for depth: is not zero; for normals this also drops the rare unit normal whose components cancel).
The independence loss is the linear CKA of :mod:`theory.measures` (one implementation for theory and model) on
the spatially pooled streams. The loss weights of the paper's Table 7 are named presets (:data:`PRESETS`).

Soft grounding (the paper's Eq (15); in the authors' dense-task code, the generic-decoder terms of their composite
loss, Eq (14)) is scored as the authors do: unmasked L1 at full resolution (:func:`l1`) plus 0.5 × the
deep-supervision L1 at the auxiliary outputs' resolution, against depth downsampled by nearest neighbour
(:func:`geometry_aux_loss`) and the image downsampled bilinearly (:func:`appearance_aux_loss`). The authors' LPIPS
(VGG) term is :func:`deep.perceptual.lpips_loss`; it needs pretrained weights the user supplies as a local
``.npz`` (``appearance_perceptual`` counts 0 without them).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from deep.resize import resize_bilinear
from deep.shading import srgb_to_linear, unit_vectors
from theory.measures import debiased_cka, linear_cka

__all__ = ["segmentation_loss", "depth_loss", "normal_loss", "DENSE_TASK_LOSSES", "dense_task_loss",
           "independence_loss", "l1", "ssim_loss", "physical_image_loss", "albedo_tv", "grayscale_shading",
           "albedo_normal_covariance", "edge_loss", "resize_nearest", "geometry_aux_loss", "appearance_aux_loss",
           "LossWeights", "PRESETS", "TOTAL_LOSS_TERMS", "total_loss", "linear_cka", "debiased_cka"]


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    count = jnp.sum(mask)
    return jnp.where(count > 0, jnp.sum(values * mask) / jnp.where(count > 0, count, 1.0), 0.0)


def _check_dense_pair(name: str, prediction: jax.Array, target: jax.Array) -> None:
    """Shapes are static, so this runs under ``jit`` too: a target without its channel axis would broadcast against
    the prediction (``[1, H, W]`` against ``[1, H, W, 1]`` is ``[1, H, W, W]`` when H = W) and give a wrong loss."""
    if prediction.ndim != 4 or prediction.shape != target.shape:
        raise ValueError(f"{name}: prediction and target must both be [B, H, W, C] of the same shape; got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")


def segmentation_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Cross-entropy over pixels whose label is not −1: ``logits`` ``[B, H, W, C]``, ``labels`` ``[B, H, W]`` int.

    Labels are class indices in [0, C) or −1 (ignored). Outside ``jit`` others are refused (a 255 "ignore" label, say,
    must be mapped to −1 first); under ``jit`` their values cannot be inspected and such pixels are ignored too,
    rather than counted with a loss of 0 (the data loaders of :mod:`deep.data` refuse them as they read)."""
    num_classes = logits.shape[-1]
    if logits.ndim != 4 or labels.shape != logits.shape[:-1]:
        raise ValueError(f"segmentation_loss: logits must be [B, H, W, C] and labels [B, H, W]; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"segmentation_loss: labels must be integer class indices; got {labels.dtype}")
    if not isinstance(labels, jax.core.Tracer) and labels.size:  # NumPy: jnp.min inside a trace would be traced
        values = np.asarray(labels)
        low, high = int(values.min()), int(values.max())
        if low < -1 or high >= num_classes:
            raise ValueError(f"segmentation_loss: labels must be class indices in [0, {num_classes}) or -1 (ignored); "
                             f"got values from {low} to {high}")
    valid = (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    log_probabilities = jax.nn.log_softmax(logits, axis=-1)
    # A one-hot product rather than a gather: a gather's gradient is a scatter, slow on GPUs.
    # (`where`, not a product, so that a -inf log-probability of another class does not make 0 * -inf.)
    chosen = jax.nn.one_hot(safe, logits.shape[-1], dtype=jnp.bool_)
    picked = jnp.sum(jnp.where(chosen, log_probabilities, 0.0), axis=-1)
    return _masked_mean(-picked, valid.astype(logits.dtype))


def depth_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """L1 over pixels with non-zero ground-truth depth (LibMTL's mask): ``[B, H, W, 1]`` each."""
    _check_dense_pair("depth_loss", prediction, target)
    valid = (jnp.sum(target, axis=-1, keepdims=True) != 0).astype(prediction.dtype)
    return _masked_mean(jnp.abs(prediction - target), valid)


def normal_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """:math:`1 - \\frac{1}{N}\\sum_{valid} \\langle \\hat n/\\|\\hat n\\|, n\\rangle` over pixels whose ground truth's
    components do not sum to zero (LibMTL's ``NormalLoss`` mask), the ground truth used as stored (LibMTL's normals
    are unit): ``[B, H, W, 3]`` each. With no valid pixel the mean is 0 and the loss 1, a constant with no gradient
    (LibMTL's gives NaN there)."""
    _check_dense_pair("normal_loss", prediction, target)
    unit = unit_vectors(prediction, 1e-12)
    valid = (jnp.sum(target, axis=-1) != 0).astype(prediction.dtype)
    return 1.0 - _masked_mean(jnp.sum(unit * target, axis=-1), valid)


DENSE_TASK_LOSSES = {"segmentation": segmentation_loss, "depth": depth_loss, "normal": normal_loss}


def dense_task_loss(name: str, prediction: jax.Array, batch: dict) -> jax.Array:
    """Dense task ``name``'s loss of ``prediction`` against ``batch[name]`` (:data:`DENSE_TASK_LOSSES`): the
    ``task_loss`` of the dense models (:class:`deep.model.DualStreamModel`, :class:`deep.mtan.MTAN`)."""
    if name not in DENSE_TASK_LOSSES:
        raise ValueError(f"no dense-task loss for task {name!r}; there are losses for "
                         f"{', '.join(DENSE_TASK_LOSSES)}")
    if name not in batch:
        raise ValueError(f"the batch has no ground truth for task {name!r}; it has {', '.join(sorted(batch))}")
    return DENSE_TASK_LOSSES[name](prediction, batch[name])


def independence_loss(semantic_map: jax.Array, residual_code: jax.Array, debiased: bool = False) -> jax.Array:
    """Eq (11): CKA between the spatially pooled semantic map ``[B, H, W, C_s]`` and the residual code ``[B, C_r]``
    (already pooled). ``debiased=True`` uses the unbiased-HSIC CKA, which has no finite-batch floor.

    The authors' CKA adds 1e-6 to its denominator, so shrinking both codes towards 0 lowers their loss; this one is
    exactly invariant to the codes' scales (and 0, with a finite gradient, when a stream is constant)."""
    pooled = jnp.mean(semantic_map, axis=(1, 2))
    return (debiased_cka if debiased else linear_cka)(pooled, residual_code)


def l1(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute error (unmasked, as the authors' reconstruction terms)."""
    return jnp.mean(jnp.abs(prediction - target))


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    r"""Nearest-neighbour resize of ``[B, H, W, C]`` to ``size`` with PyTorch's ``mode="nearest"`` rule: output pixel
    ``i`` copies input pixel :math:`\lfloor i\, n_{in}/n_{out} \rfloor` (so ×1/2 keeps the even rows and columns)."""
    rows = np.minimum(np.floor(np.arange(size[0]) * (x.shape[1] / size[0])).astype(np.int32), x.shape[1] - 1)
    columns = np.minimum(np.floor(np.arange(size[1]) * (x.shape[2] / size[1])).astype(np.int32), x.shape[2] - 1)
    return x[:, rows][:, :, columns]


def geometry_aux_loss(geometry_aux: jax.Array, depth: jax.Array) -> jax.Array:
    """Deep supervision of the geometry decoder: L1 between its auxiliary output ``[B, h, w, 1]`` and the depth
    ``[B, H, W, 1]`` resized by nearest neighbour to ``(h, w)``; unmasked, as the authors' code."""
    return l1(geometry_aux, resize_nearest(depth, geometry_aux.shape[1:3]))


def appearance_aux_loss(reconstruction_aux: jax.Array, image: jax.Array) -> jax.Array:
    """Deep supervision of the appearance decoder: L1 between its auxiliary output ``[B, h, w, 3]`` and the image
    resized bilinearly (``align_corners=False``, no antialiasing; a 2×2 mean at exactly ×1/2) to ``(h, w)``."""
    return l1(reconstruction_aux, resize_bilinear(image, reconstruction_aux.shape[1:3]))


def ssim_loss(prediction: jax.Array, target: jax.Array, window: int = 7, data_range: float = 1.0) -> jax.Array:
    """:math:`1 - \\mathrm{SSIM}` with a uniform ``window`` × ``window`` filter (valid positions), per channel,
    averaged.

    The authors' code uses no SSIM; it is offered for reconstruction experiments.
    """
    if window > min(prediction.shape[1], prediction.shape[2]):
        raise ValueError(f"ssim window ({window}) must not exceed the image's height and width "
                         f"{prediction.shape[1:3]}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def local_mean(x):
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1), "VALID") / window**2

    mu_x, mu_y = local_mean(prediction), local_mean(target)
    var_x = local_mean(prediction**2) - mu_x**2
    var_y = local_mean(target**2) - mu_y**2
    cov = local_mean(prediction * target) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return 1.0 - jnp.mean(ssim)


def physical_image_loss(rendered: jax.Array, image: jax.Array) -> jax.Array:
    """L1 between the rendered and the input image after sRGB decoding (the authors' ``λ_img`` term)."""
    return l1(srgb_to_linear(rendered), srgb_to_linear(image))


def albedo_tv(albedo: jax.Array) -> jax.Array:
    """Anisotropic total variation: mean |Δ_y A| + mean |Δ_x A|."""
    return jnp.mean(jnp.abs(jnp.diff(albedo, axis=1))) + jnp.mean(jnp.abs(jnp.diff(albedo, axis=2)))


def grayscale_shading(shading: jax.Array) -> jax.Array:
    """Grey-light prior: mean of :math:`(S_R-S_G)^2 + (S_G-S_B)^2`."""
    return jnp.mean((shading[..., 0] - shading[..., 1]) ** 2 + (shading[..., 1] - shading[..., 2]) ** 2)


def albedo_normal_covariance(albedo: jax.Array, normals: jax.Array) -> jax.Array:
    """Mean absolute entry of the per-image 3×3 spatial cross-covariance of albedo and normals (denominator HW−1)."""
    a = albedo - jnp.mean(albedo, axis=(1, 2), keepdims=True)
    n = normals - jnp.mean(normals, axis=(1, 2), keepdims=True)
    pixels = albedo.shape[1] * albedo.shape[2]
    return jnp.mean(jnp.abs(jnp.einsum("bhwi,bhwj->bij", a, n) / (pixels - 1)))


# numpy, not jnp: a JAX array made at import would start the XLA backend before jax.distributed.initialize() can run.
_SOBEL_X = np.asarray([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)


def _sobel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel_x = _SOBEL_X[:, :, None, None].astype(x.dtype)
    kernel_y = _SOBEL_X.T[:, :, None, None].astype(x.dtype)
    conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return conv(kernel_x), conv(kernel_y)


def edge_loss(predicted_depth: jax.Array, target_depth: jax.Array, scales: int = 3, epsilon: float = 1e-3):
    """Edge consistency: Charbonnier distance between Sobel gradients of :math:`\\log(1+d)` of prediction and target,
    summed over ``scales`` (2×2 average pooling between scales); unmasked, as the authors' code."""
    prediction = jnp.log1p(jnp.maximum(predicted_depth, 0.0))
    target = jnp.log1p(jnp.maximum(target_depth, 0.0))
    total = 0.0
    for scale in range(scales):
        if scale:
            pool = lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
            prediction, target = pool(prediction), pool(target)
        (px, py), (tx, ty) = _sobel(prediction), _sobel(target)
        charbonnier = lambda d: jnp.mean(jnp.sqrt(d**2 + epsilon**2))
        total = total + charbonnier(px - tx) + charbonnier(py - ty)
    return total


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The loss weights of Eq (16) (the paper's Table 7; the authors' config keys in comments)."""

    segmentation: float = 20.0      # lambda_seg
    depth: float = 10.0             # lambda_depth
    normal: float = 10.0            # lambda_normal
    edge: float = 0.1               # lambda_edge
    independence: float = 1.0       # lambda_ind (CKA)
    geometry: float = 2.0           # alpha_geom
    appearance: float = 15.0        # beta_app
    appearance_l1: float = 2.0      # lambda_l1 inside beta_app
    image: float = 2.0              # lambda_img (physical rendering)
    albedo_tv: float = 0.1          # lambda_tv
    gray: float = 0.001             # lambda_gray
    covariance: float = 0.5         # lambda_xcov
    geometry_aux: float = 0.5       # the generic decoders' deep supervision at 1/2 resolution (fixed in their code)
    appearance_aux: float = 0.5
    counterfactual: float = 1.0     # lambda_cfa
    counterfactual_probability: float = 0.5
    counterfactual_start_epoch: int = 20
    stage0_epochs: int = 5
    stage1_epochs: int = 0
    independence_warmup_epochs: int = 10

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"loss weight {field.name} must be a finite number >= 0; got {value!r}")
        if self.counterfactual_probability > 1:
            raise ValueError(f"counterfactual_probability must lie in [0, 1]; got {self.counterfactual_probability}")

    def independence_at(self, epoch: int) -> float:
        """λ_ind ramped linearly over ``independence_warmup_epochs`` after stage 0 (0 in stages 0 and 1; the whole
        weight from stage 2 on when there is no warm-up)."""
        if epoch < self.stage0_epochs + self.stage1_epochs:
            return 0.0
        if self.independence_warmup_epochs == 0:  # the authors' clip((e - stage0) / 0, 0, 1) would divide by zero
            return self.independence
        ramp = (epoch - self.stage0_epochs) / self.independence_warmup_epochs
        return self.independence * min(max(ramp, 0.0), 1.0)


PRESETS: dict[str, LossWeights] = {
    "nyuv2": LossWeights(),
    "cityscapes": LossWeights(segmentation=10, depth=20, normal=0, image=5.0, stage0_epochs=10, stage1_epochs=5,
                              independence_warmup_epochs=20),
    "gta5_to_cityscapes": LossWeights(segmentation=30, depth=25, normal=0, edge=0, independence=0.1, geometry=5,
                                      appearance=2, image=5.0, gray=0.1, counterfactual=0.5,
                                      counterfactual_start_epoch=35, stage0_epochs=10, stage1_epochs=5,
                                      independence_warmup_epochs=30),
    "cityscapes_c": LossWeights(segmentation=10, depth=20, normal=0, appearance=5, image=5.0, gray=0.1,
                                counterfactual_start_epoch=1, stage0_epochs=10, stage1_epochs=5,
                                independence_warmup_epochs=20),
}


def _coefficients(weights: LossWeights, independence_weight: float) -> dict[str, float]:
    """Each term's coefficient in Eq (16): the one table :func:`total_loss` and :data:`TOTAL_LOSS_TERMS` read."""
    return {"segmentation": weights.segmentation, "depth": weights.depth, "normal": weights.normal,
            "edge": weights.edge, "independence": independence_weight, "geometry": weights.geometry,
            "appearance_perceptual": weights.appearance, "appearance_l1": weights.appearance * weights.appearance_l1,
            "image": weights.image, "albedo_tv": weights.albedo_tv, "gray": weights.gray,
            "covariance": weights.covariance, "geometry_aux": weights.geometry_aux,
            "appearance_aux": weights.appearance_aux}


TOTAL_LOSS_TERMS = tuple(_coefficients(LossWeights(), 0.0))


def total_loss(terms: dict[str, jax.Array], weights: LossWeights, independence_weight: float | None = None):
    r"""Eq (16) from named terms (missing terms count 0): the weighted task losses, λ_ind·CKA, and the grounding terms.

    .. math:: \mathcal L = \sum_t \lambda_t \ell_t + \lambda_{edge}\ell_{edge} + \lambda_{ind}\,\mathrm{CKA}
              + \alpha_{geo}\mathcal L_{geo} + \beta_{app}(\mathcal L_{LPIPS} + \lambda_{l1}\mathcal L_{app})
              + \lambda_{img}\mathcal L_{img} + \lambda_{tv}\mathrm{TV}(A) + \lambda_{gray}\mathcal L_{gray}
              + \lambda_{xcov}\mathcal L_{xcov} + \tfrac12\mathcal L_{geo,aux} + \tfrac12\mathcal L_{app,aux}

    ``terms`` keys: any of :data:`TOTAL_LOSS_TERMS` (another raises ``ValueError``, so that a misspelt term is not
    silently dropped). ``independence_weight`` overrides λ_ind (ramps).
    :func:`deep.train.core_step` supplies ``appearance_perceptual`` (:func:`deep.perceptual.lpips_loss`) only
    when given LPIPS-VGG weights (``perceptual=``); without them it counts 0.
    """
    unknown = [name for name in terms if name not in TOTAL_LOSS_TERMS]
    if unknown:
        raise ValueError(f"unknown loss term(s) {', '.join(map(repr, unknown))}; total_loss weighs "
                         f"{', '.join(TOTAL_LOSS_TERMS)}")
    coefficients = _coefficients(weights, weights.independence if independence_weight is None else independence_weight)
    return sum((coefficients[name] * value for name, value in terms.items()), 0.0)

"""The pure-function parts of the deep model: resizing, the SH shading model, and the losses."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deep import losses
from deep.resize import resize_bilinear
from deep.shading import lambertian_shading, render, sh_basis, srgb_to_linear, unit_vectors
from theory import measures


# ---------------------------------------------------------------------------------------------------- resize

@pytest.mark.parametrize("size", [(9, 13), (3, 2), (4, 6)])
def test_half_pixel_resize_matches_jax_without_antialiasing(size):
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    expected = jax.image.resize(x, (2, *size, 3), method="linear", antialias=False)
    np.testing.assert_allclose(resize_bilinear(x, size), expected, atol=1e-5)


def test_align_corners_keeps_corners_and_is_exact_on_linear_ramps():
    ramp = jnp.arange(4.0)[None, :, None, None] * jnp.ones((1, 4, 5, 1))  # value = row index
    out = resize_bilinear(ramp, (7, 5), align_corners=True)
    np.testing.assert_allclose(out[0, :, 0, 0], np.linspace(0, 3, 7), atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (1, 5, 6, 2))
    up = resize_bilinear(x, (17, 11), align_corners=True)
    for i, j in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        np.testing.assert_allclose(up[0, i, j], x[0, i, j], atol=1e-6)


def test_two_fold_half_pixel_downsampling_is_average_pooling():
    x = jax.random.normal(jax.random.key(2), (1, 8, 6, 2))
    pooled = x.reshape(1, 4, 2, 3, 2, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_bilinear(x, (4, 3)), pooled, atol=1e-6)


def reference_resize_axis(x: np.ndarray, axis: int, size_out: int, align_corners: bool) -> np.ndarray:
    """PyTorch's rule written out per output position, in float64."""
    size_in = x.shape[axis]
    rows = []
    for d in range(size_out):
        if align_corners:
            source = d * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        else:
            source = min(max((d + 0.5) * size_in / size_out - 0.5, 0.0), size_in - 1)
        low = int(np.floor(source))
        high, fraction = min(low + 1, size_in - 1), source - low
        rows.append(np.take(x, low, axis) * (1 - fraction) + np.take(x, high, axis) * fraction)
    return np.stack(rows, axis)


# Every path: integer up- and downsampling (slices), any other ratio and align_corners=True (interpolation
# matrices), single rows and columns.
RESIZES = [((36, 48), (72, 96)), ((5, 7), (15, 28)), ((36, 48), (18, 24)), ((9, 12), (3, 4)), ((6, 8), (2, 8)),
           ((36, 48), (288, 384)), ((5, 7), (7, 5)), ((4, 6), (1, 1)), ((1, 3), (2, 6)), ((7, 9), (8, 10))]


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in, size_out", RESIZES)
def test_resize_matches_the_rule_written_out_in_float64(size_in, size_out, align_corners):
    x = np.random.default_rng(sum(size_in + size_out)).normal(size=(2, *size_in, 3))
    expected = reference_resize_axis(reference_resize_axis(x, 1, size_out[0], align_corners), 2, size_out[1],
                                      align_corners)
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x, jnp.float32), size_out, align_corners), expected,
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in, size_out", RESIZES)
def test_resize_and_its_gradient_use_no_gather_or_scatter(size_in, size_out, align_corners):
    # A gather's gradient is a scatter-add: on an H200 these took a third of a CORE-MTL step.
    x = jnp.ones((1, *size_in, 2))
    program = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(resize_bilinear(x, size_out, align_corners) ** 2)))(x))
    assert "gather" not in program and "scatter" not in program


def test_resize_keeps_the_input_dtype():
    x = jnp.ones((1, 6, 8, 2), jnp.bfloat16)
    for size, align_corners in (((12, 16), False), ((3, 4), False), ((7, 9), True)):
        assert resize_bilinear(x, size, align_corners).dtype == jnp.bfloat16


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        resize_bilinear(jnp.ones((4, 4)), (2, 2))


def test_the_interpolation_matrix_path_computes_in_float32_at_full_precision():
    """Ratios that are not integers use a matrix of weights such as k/7, which bfloat16 cannot hold: a bfloat16 input
    is resized in float32 and rounded once, to what the float32 resize of the same values rounds to (one axis at a
    time, as each axis is rounded back to the input's type). The product asks for the highest precision, which a GPU
    would otherwise lower for float32 (the CPU computes alike either way, so the program is checked)."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 7, 3)), jnp.bfloat16)
    for size, align_corners in (((8, 7), True), ((5, 10), True), ((8, 7), False)):
        expected = resize_bilinear(x.astype(jnp.float32), size, align_corners).astype(jnp.bfloat16)
        np.testing.assert_array_equal(resize_bilinear(x, size, align_corners), expected)
    jaxpr = jax.make_jaxpr(lambda x: resize_bilinear(x, (8, 10), True))(x.astype(jnp.float32)).jaxpr
    products = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(products) == 2 and all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in products)


def test_resize_rejects_an_empty_size():
    with pytest.raises(ValueError, match=r"size must be two positive integers; got \(0, 4\)"):
        resize_bilinear(jnp.ones((1, 4, 4, 1)), (0, 4))


# --------------------------------------------------------------------------------------------------- shading

def unit_sphere(n, seed=0):
    v = jax.random.normal(jax.random.key(seed), (n, 3))
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def test_sh_basis_is_orthonormal_on_the_sphere():
    """Monte Carlo Gram matrix over 400k uniform directions: 4π·mean(Y_i Y_j) = δ_ij within 0.02."""
    y = sh_basis(unit_sphere(400_000))
    gram = 4 * math.pi * (y.T @ y) / y.shape[0]
    np.testing.assert_allclose(gram, np.eye(9), atol=0.02)


def test_sh_basis_is_the_authors_in_their_order():
    """Each of the nine functions at probe normals against official_implementation.md's basis, its literal constants
    and its order (orthonormality alone would let band 1 be reordered, or a function change sign; the synthetic
    scenes write their lighting in this order too)."""
    root = 1 / math.sqrt(2)
    probes = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [root, root, 0], [0, root, root], [root, 0, root],
                       [0.48, -0.6, 0.64]])
    x, y, z = probes.T
    authors = np.stack([np.full_like(x, 0.282095), 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y,
                        1.092548 * y * z, 0.315392 * (3 * z**2 - 1), 1.092548 * x * z, 0.546274 * (x**2 - y**2)], -1)
    np.testing.assert_allclose(sh_basis(jnp.asarray(probes)), authors, atol=1e-6)


def test_known_lighting_gives_known_shading():
    normals = unit_sphere(64, seed=1).reshape(1, 8, 8, 3)
    ambient = jnp.zeros((1, 3, 9)).at[:, :, 0].set(2.0)
    np.testing.assert_allclose(lambertian_shading(normals, ambient), 2.0 * 0.282095, rtol=1e-5)
    overhead = jnp.zeros((1, 27)).at[:, 2].set(1.0).at[:, 11].set(1.0).at[:, 20].set(1.0)  # Y_3 = c1 n_z, each RGB
    expected = np.maximum(0.0, 0.488603 * np.asarray(normals[..., 2:3]))
    np.testing.assert_allclose(lambertian_shading(normals, overhead), np.repeat(expected, 3, axis=-1), atol=1e-6)
    # Each image of a batch is shaded by its own lighting (here ambient 1 and 3), not by the first image's.
    pair = jnp.zeros((2, 3, 9)).at[0, :, 0].set(1.0).at[1, :, 0].set(3.0)
    shading = lambertian_shading(jnp.concatenate([normals, normals]), pair)
    np.testing.assert_allclose(shading[0], 0.282095, rtol=1e-5)
    np.testing.assert_allclose(shading[1], 3 * 0.282095, rtol=1e-5)
    np.testing.assert_allclose(render(jnp.full((1, 8, 8, 3), 0.9), jnp.full((1, 8, 8, 3), 2.0)), 1.0)
    # Eq (13) clips at both ends: a negative product (an albedo below 0) renders as 0.
    np.testing.assert_array_equal(render(jnp.full((1, 2, 2, 3), -0.5), jnp.full((1, 2, 2, 3), 2.0)), 0.0)


def test_unit_vectors_divide_by_the_norm_floored_at_epsilon():
    """``x / max(‖x‖, ε)``: the floor is ε on the norm, not on the squared norm (the normal decoder uses ε = 1e-6,
    where a floor of √ε = 1e-3 would leave a normal of length 1e-4 at length 0.1). Below ε the vector is scaled by
    1/ε; at 0 it stays 0 with a finite gradient."""
    x = jnp.asarray([[3.0, 4.0, 0.0], [1e-4, 0.0, 0.0], [0.0, 2e-7, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(unit_vectors(x, 1e-6), [[0.6, 0.8, 0.0], [1.0, 0.0, 0.0], [0.0, 0.2, 0.0], [0, 0, 0]],
                               rtol=1e-5)
    gradient = jax.grad(lambda v: unit_vectors(v, 1e-6).sum())(jnp.zeros(3))
    assert np.all(np.isfinite(gradient))


def test_srgb_decoding_curve():
    # Values are clamped to [0, 1] first, at both ends (a negative value is not decoded as x / 12.92).
    np.testing.assert_allclose(srgb_to_linear(jnp.asarray([-0.5, 0.0, 0.04, 0.5, 1.0, 1.5])),
                               [0.0, 0.0, 0.04 / 12.92, ((0.5 + 0.055) / 1.055) ** 2.4, 1.0, 1.0], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- losses

def test_segmentation_loss_ignores_minus_one_and_matches_a_hand_computation():
    logits = jnp.log(jnp.asarray([[[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]]))  # [1, 1, 2, 3]
    labels = jnp.asarray([[[0, -1]]])
    assert float(losses.segmentation_loss(logits, labels)) == pytest.approx(-math.log(0.7), rel=1e-6)
    labels = jnp.asarray([[[0, 2]]])
    assert float(losses.segmentation_loss(logits, labels)) == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2)
    assert float(losses.segmentation_loss(logits, jnp.full((1, 1, 2), -1))) == 0.0  # nothing valid: 0, not NaN
    # A class with probability 0 (logit -inf) that is not the label leaves the loss finite.
    impossible = jnp.log(jnp.asarray([[[[0.7, 0.3, 0.0]]]]))
    assert float(losses.segmentation_loss(impossible, jnp.asarray([[[0]]]))) == pytest.approx(-math.log(0.7))
    # Its gradient is the softmax minus the one-hot label over valid pixels (here the mean over two of them).
    gradient = jax.grad(losses.segmentation_loss)(logits, jnp.asarray([[[0, 2]]]))
    expected = (jax.nn.softmax(logits, -1) - jax.nn.one_hot(jnp.asarray([[[0, 2]]]), 3)) / 2
    np.testing.assert_allclose(gradient, expected, atol=1e-6)


def test_task_losses_refuse_labels_and_targets_they_would_misread():
    """A 255 "ignore" label made a one-hot row of zeros: a loss of 0 that still counted in the mean (1.49 for 2.87).
    Outside jit it is refused; under jit, where values cannot be read, such a pixel is ignored. A depth target
    without its channel axis broadcast against the prediction (172.5 for 0.62)."""
    logits = jax.random.normal(jax.random.key(0), (2, 4, 4, 13))
    labels = jax.random.randint(jax.random.key(1), (2, 4, 4), 0, 13)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 13\) or -1 \(ignored\); got values "
                                         r"from 0 to 255"):
        losses.segmentation_loss(logits, labels.at[:, :2].set(255))
    # The upper bound is exclusive: C itself (one past the last class) is refused too, not silently ignored.
    with pytest.raises(ValueError, match=r"got values from 0 to 13"):
        losses.segmentation_loss(logits, labels.at[0, 0, 0].set(13))
    ignored = labels.at[:, :2].set(-1)
    # Labels closed over inside a trace are concrete: checked, with NumPy (jnp.min there would be traced).
    np.testing.assert_allclose(jax.jit(lambda x: losses.segmentation_loss(x, ignored))(logits),
                               losses.segmentation_loss(logits, ignored), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(losses.segmentation_loss)(logits, labels.at[:, :2].set(255)),
                               losses.segmentation_loss(logits, ignored), rtol=1e-6)
    # An empty batch (an uneven last shard, say) has nothing to check or to average: 0, not NumPy's error on the
    # minimum of no values.
    assert float(losses.segmentation_loss(logits[:0], labels[:0])) == 0.0
    with pytest.raises(ValueError, match="labels must be integer class indices; got float32"):
        losses.segmentation_loss(logits, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"logits must be \[B, H, W, C\] and labels \[B, H, W\]; got \(2, 4, 4, 13\) "
                                         r"and \(2, 4, 4, 1\)"):
        losses.segmentation_loss(logits, labels[..., None])
    prediction, target = jnp.ones((1, 16, 16, 1)), jnp.full((1, 16, 16, 1), 2.0)
    # Both without their channel axis agree in shape but are refused too: the mask would sum each row of depths.
    with pytest.raises(ValueError, match=r"depth_loss: .* got \(1, 16, 16\) and \(1, 16, 16\)"):
        losses.depth_loss(prediction[..., 0], target[..., 0])
    with pytest.raises(ValueError, match=r"depth_loss: prediction and target must both be \[B, H, W, C\] of the same "
                                         r"shape; got \(1, 16, 16, 1\) and \(1, 16, 16\)"):
        jax.jit(losses.depth_loss)(prediction, target[..., 0])
    with pytest.raises(ValueError, match="normal_loss: prediction and target must both be"):
        losses.normal_loss(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4)))


def test_depth_and_normal_losses_use_libmtl_masks():
    target = jnp.asarray([0.0, 2.0, 4.0]).reshape(1, 1, 3, 1)
    prediction = jnp.asarray([9.0, 1.0, 5.0]).reshape(1, 1, 3, 1)
    assert float(losses.depth_loss(prediction, target)) == pytest.approx(1.0)  # the zero-depth pixel is ignored
    # The mask is "not 0", not "> 0" (the loaders refuse negative depth; the function follows LibMTL's test).
    assert float(losses.depth_loss(prediction, -target)) == pytest.approx(6.0)  # |1 + 2| and |5 + 4|
    normals_gt = jnp.asarray([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).reshape(1, 1, 3, 3)
    normals_pred = jnp.asarray([[0.0, 0.0, 5.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    # valid pixels 0 and 2: cosines 1 and 0 -> loss 1 - 0.5
    assert float(losses.normal_loss(normals_pred, normals_gt)) == pytest.approx(0.5)
    # LibMTL's mask is the components' sum, not the norm: (1, -1, 0)/√2 is dropped. The ground truth is not
    # renormalised (LibMTL's are unit already): one of length 0.5 along the prediction counts a cosine of 0.5.
    normals_gt = jnp.asarray([[0.0, 0.0, 1.0], [math.sqrt(0.5), -math.sqrt(0.5), 0.0], [0.0, 0.0, 0.5]])
    normals_pred = jnp.asarray([[0.0, 0.0, 5.0], [0.0, 0.0, 1.0], [0.0, 0.0, 2.0]])
    assert float(losses.normal_loss(normals_pred.reshape(1, 1, 3, 3), normals_gt.reshape(1, 1, 3, 3))) == \
        pytest.approx(1 - (1 + 0.5) / 2, abs=1e-6)
    # No valid pixel (every ground truth 0): 1, a constant, with no gradient (LibMTL's mean over no pixels is NaN).
    no_normals = jnp.zeros((1, 1, 3, 3))
    loss, gradient = jax.value_and_grad(losses.normal_loss)(normals_pred.reshape(1, 1, 3, 3), no_normals)
    assert float(loss) == 1.0 and not np.any(np.asarray(gradient))


def test_dense_task_loss_takes_the_target_from_the_batch():
    """The models' ``task_loss``: the prediction comes first and the batch's entry is the target, whose zeros are the
    mask. Swapped, depth would be masked by the prediction's zeros and the normal loss would normalise the ground
    truth instead of the prediction (hand values below)."""
    prediction = jnp.asarray([0.0, 1.0, 5.0]).reshape(1, 1, 3, 1)
    target = jnp.asarray([2.0, 0.0, 4.0]).reshape(1, 1, 3, 1)
    # Valid where the target is not 0: pixels 0 and 2, |p - g| = 2 and 1 -> 1.5 (masked by the prediction: 1.0).
    batch = {"depth": target, "normal": jnp.asarray([0.0, 0.0, 1.0]).reshape(1, 1, 1, 3), "images": None}
    assert float(losses.dense_task_loss("depth", prediction, batch)) == pytest.approx(1.5)
    # A prediction of length 5 along the unit ground truth: cosine 1, loss 0 (swapped: 1 - 5 = -4).
    normal = jnp.asarray([0.0, 0.0, 5.0]).reshape(1, 1, 1, 3)
    assert float(losses.dense_task_loss("normal", normal, batch)) == pytest.approx(0.0, abs=1e-6)


def test_independence_loss_is_theory_measures_cka_on_pooled_codes():
    keys = jax.random.split(jax.random.key(3), 2)
    semantic_map = jax.random.normal(keys[0], (6, 4, 5, 8))
    residual = jax.random.normal(keys[1], (6, 3))
    pooled = semantic_map.mean(axis=(1, 2))
    np.testing.assert_allclose(losses.independence_loss(semantic_map, residual), measures.linear_cka(pooled, residual),
                               rtol=1e-6)
    np.testing.assert_allclose(losses.independence_loss(semantic_map, residual, debiased=True),
                               measures.debiased_cka(pooled, residual), rtol=1e-6)


def test_regularisers_on_hand_made_maps():
    flat = jnp.full((1, 4, 4, 3), 0.3)
    assert float(losses.albedo_tv(flat)) == 0.0
    stripes = jnp.tile(jnp.asarray([0.0, 1.0]), 2)[None, None, :, None] * jnp.ones((1, 4, 4, 3))
    assert float(losses.albedo_tv(stripes)) == pytest.approx(1.0)
    albedo = np.random.default_rng(4).random((2, 5, 6, 3))  # differences other than 0 and 1: |d| is not d²
    expected = np.abs(np.diff(albedo, axis=1)).mean() + np.abs(np.diff(albedo, axis=2)).mean()
    np.testing.assert_allclose(losses.albedo_tv(jnp.asarray(albedo)), expected, rtol=1e-6)
    assert float(losses.grayscale_shading(flat)) == 0.0
    coloured = jnp.concatenate([jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 2))], axis=-1)
    assert float(losses.grayscale_shading(coloured)) == pytest.approx(1.0)
    # Three different channels, so that each pair matters: (R - G)² + (G - B)², not (B - R)² nor (R - B)².
    shading = np.random.default_rng(5).random((2, 3, 4, 3))
    expected = np.mean((shading[..., 0] - shading[..., 1]) ** 2 + (shading[..., 1] - shading[..., 2]) ** 2)
    np.testing.assert_allclose(losses.grayscale_shading(jnp.asarray(shading)), expected, rtol=1e-6)
    assert float(losses.albedo_normal_covariance(flat, jax.random.normal(jax.random.key(0), (1, 4, 4, 3)))) < 1e-7
    assert float(losses.ssim_loss(flat, flat, window=3)) == pytest.approx(0.0, abs=1e-6)
    noisy = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3))
    assert float(losses.ssim_loss(noisy, 1.0 - noisy, window=3)) > 1.0  # anti-correlated: SSIM < 0
    # Equal maps: each Charbonnier mean is epsilon, two directions at each of three scales.
    assert float(losses.edge_loss(jnp.ones((1, 16, 16, 1)), jnp.ones((1, 16, 16, 1)))) == pytest.approx(6e-3)


def _correlated_images(seed, shape):
    """Two images in [0, 1] that share structure (so SSIM's and the covariance's cross terms matter)."""
    rng = np.random.default_rng(seed)
    base = rng.random(shape)
    return base, np.clip(0.7 * base + 0.3 * rng.random(shape) + 0.05, 0, 1)


def test_albedo_normal_covariance_is_the_cross_block_of_numpys_covariance():
    albedo, normals = _correlated_images(11, (2, 5, 7, 3))
    normals = normals - 0.5 + 0.2 * albedo[..., ::-1]  # anticorrelated channels too, so no sign can cancel
    expected = np.mean([np.abs(np.cov(np.concatenate([a, n], -1).reshape(-1, 6), rowvar=False)[:3, 3:]).mean()
                        for a, n in zip(albedo, normals)])
    np.testing.assert_allclose(losses.albedo_normal_covariance(jnp.asarray(albedo), jnp.asarray(normals)), expected,
                               rtol=1e-5)


def _windowed_ssim(prediction, target, window, c1=0.01**2, c2=0.03**2):
    """SSIM at every valid position of a uniform ``window`` × ``window`` filter, in float64 from the definition."""
    patches = lambda x: np.lib.stride_tricks.sliding_window_view(x, (window, window), axis=(1, 2))
    p, t = patches(prediction), patches(target)
    mu_p, mu_t = p.mean((-2, -1)), t.mean((-2, -1))
    var_p, var_t = p.var((-2, -1)), t.var((-2, -1))  # population variances, as a uniform-window SSIM
    cov = ((p - mu_p[..., None, None]) * (t - mu_t[..., None, None])).mean((-2, -1))
    return (2 * mu_p * mu_t + c1) * (2 * cov + c2) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))


def test_ssim_loss_is_one_minus_the_windowed_ssim_formula():
    prediction, target = _correlated_images(12, (2, 9, 11, 3))
    window = 3
    ssim = _windowed_ssim(prediction, target, window)
    assert ssim.shape == (2, 7, 9, 3)  # valid positions only
    np.testing.assert_allclose(losses.ssim_loss(jnp.asarray(prediction), jnp.asarray(target), window=window),
                               1 - ssim.mean(), rtol=1e-4)
    # Its constants scale with data_range, which makes SSIM exactly invariant to the images' scale.
    np.testing.assert_allclose(losses.ssim_loss(jnp.asarray(255 * prediction), jnp.asarray(255 * target), window=window,
                                                data_range=255.0), 1 - ssim.mean(), rtol=1e-4)
    # A window as tall as the image (9 on 9 × 11) has one row of positions and is allowed; one larger than either
    # side (10 on 9 × 11 or on 11 × 9) has none and is refused (the mean over no positions would be NaN).
    np.testing.assert_allclose(losses.ssim_loss(jnp.asarray(prediction), jnp.asarray(target), window=9),
                               1 - _windowed_ssim(prediction, target, 9).mean(), rtol=1e-4)
    # The default window is 7 × 7, scikit-image's uniform-filter default.
    np.testing.assert_allclose(losses.ssim_loss(jnp.asarray(prediction), jnp.asarray(target)),
                               1 - _windowed_ssim(prediction, target, 7).mean(), rtol=1e-4)
    for shape in ((2, 9, 11, 3), (2, 11, 9, 3)):
        with pytest.raises(ValueError, match=r"ssim window \(10\) must not exceed"):
            losses.ssim_loss(jnp.zeros(shape), jnp.zeros(shape), window=10)


def test_edge_loss_is_the_charbonnier_distance_of_sobel_gradients_over_scales():
    from scipy import ndimage

    rng = np.random.default_rng(13)
    predicted, target = 5 * rng.random((2, 18, 22, 1)), 5 * rng.random((2, 18, 22, 1))
    predicted[0, :3, :4] = -1.0  # negative depths count as 0 (log1p of the clamped depth)
    sobel_x = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    epsilon, expected = 1e-2, 0.0
    p, t = np.log1p(np.maximum(predicted[..., 0], 0)), np.log1p(target[..., 0])
    for scale in range(3):
        if scale:  # 2x2 means, an odd last row or column dropped
            pool = lambda x: x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2].reshape(
                x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2).mean((2, 4))
            p, t = pool(p), pool(t)
        for kernel in (sobel_x, sobel_x.T):  # d/dx along columns, d/dy along rows; zero padding
            gradient = lambda x: np.stack([ndimage.correlate(image, kernel, mode="constant") for image in x])
            expected += np.mean(np.sqrt((gradient(p) - gradient(t)) ** 2 + epsilon**2))
    np.testing.assert_allclose(losses.edge_loss(jnp.asarray(predicted), jnp.asarray(target), epsilon=epsilon),
                               expected, rtol=1e-5)
    # The target is clamped the same way: its negative values count as 0 (log1p of them would be NaN below -1).
    negative = target.copy()
    negative[1, 5:9, 2:6] = -2.0
    np.testing.assert_allclose(losses.edge_loss(jnp.asarray(predicted), jnp.asarray(negative), epsilon=epsilon),
                               losses.edge_loss(jnp.asarray(predicted), jnp.asarray(np.maximum(negative, 0)),
                                                epsilon=epsilon), rtol=1e-6)


def test_physical_image_loss_compares_the_decoded_images():
    rendered, image = _correlated_images(14, (2, 4, 5, 3))
    decode = lambda x: np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    np.testing.assert_allclose(losses.physical_image_loss(jnp.asarray(rendered), jnp.asarray(image)),
                               np.abs(decode(rendered) - decode(image)).mean(), rtol=1e-5)


def test_presets_hold_table_7_and_the_ramp():
    nyu = losses.PRESETS["nyuv2"]
    assert (nyu.segmentation, nyu.depth, nyu.normal, nyu.independence, nyu.appearance) == (20, 10, 10, 1.0, 15)
    assert losses.PRESETS["gta5_to_cityscapes"].counterfactual_start_epoch == 35
    assert [nyu.independence_at(e) for e in (0, 4, 5, 10, 15, 40)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    # Without a warm-up, the whole weight from stage 2's first epoch.
    no_warmup = dataclasses.replace(nyu, independence_warmup_epochs=0)
    assert [no_warmup.independence_at(e) for e in (4, 5, 6, 40)] == [0.0, 1.0, 1.0, 1.0]
    after_stage_1 = dataclasses.replace(no_warmup, stage1_epochs=2)
    assert [after_stage_1.independence_at(e) for e in (5, 6, 7, 40)] == [0.0, 0.0, 1.0, 1.0]
    # With a stage 1 and a warm-up (Cityscapes: stage 0 of 10, stage 1 of 5, 20 to ramp) the ramp is the authors'
    # clip((e - stage0) / W): it counts from stage 0's end, so stage 2 starts at 5/20 of the weight, not at 0.
    cityscapes = losses.PRESETS["cityscapes"]
    assert [cityscapes.independence_at(e) for e in (14, 15, 20, 30, 31)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="counterfactual_probability"):
        losses.LossWeights(counterfactual_probability=2.0)
    assert losses.LossWeights(counterfactual_probability=1.0).counterfactual_probability == 1.0  # [0, 1]: 1 allowed
    for bad in (math.inf, math.nan, -1.0):  # a weight of inf would make every loss inf (or NaN at a term of 0)
        with pytest.raises(ValueError, match="loss weight depth must be a finite number >= 0"):
            losses.LossWeights(depth=bad)
    total = losses.total_loss({"segmentation": 1.0, "independence": 0.5, "appearance_l1": 1.0}, nyu)
    assert float(total) == pytest.approx(20 + 0.5 + 15 * 2)


# Table 7 as reference/theory.md §7 transcribes it from the authors' configs, row by row: seg, depth, normal, edge, ind,
# geo, app, L1, img, tv, gray, xcov, cfa (prob, start), stage0/stage1, ind-warmup.
TABLE_7 = {"nyuv2": (20, 10, 10, 0.1, 1.0, 2.0, 15, 2.0, 2.0, 0.1, 0.001, 0.5, 1.0, 0.5, 20, 5, 0, 10),
           "cityscapes": (10, 20, 0, 0.1, 1.0, 2.0, 15, 2.0, 5.0, 0.1, 0.001, 0.5, 1.0, 0.5, 20, 10, 5, 20),
           "gta5_to_cityscapes": (30, 25, 0, 0, 0.1, 5.0, 2.0, 2.0, 5.0, 0.1, 0.1, 0.5, 0.5, 0.5, 35, 10, 5, 30),
           "cityscapes_c": (10, 20, 0, 0.1, 1.0, 2.0, 5.0, 2.0, 5.0, 0.1, 0.1, 0.5, 1.0, 0.5, 1, 10, 5, 20)}


@pytest.mark.parametrize("preset", sorted(TABLE_7))
def test_every_preset_weight_is_table_7s(preset):
    fields = ("segmentation", "depth", "normal", "edge", "independence", "geometry", "appearance", "appearance_l1",
              "image", "albedo_tv", "gray", "covariance", "counterfactual", "counterfactual_probability",
              "counterfactual_start_epoch", "stage0_epochs", "stage1_epochs", "independence_warmup_epochs")
    weights = losses.PRESETS[preset]
    assert {name: getattr(weights, name) for name in fields} == dict(zip(fields, TABLE_7[preset]))
    assert set(losses.PRESETS) == set(TABLE_7)


def test_total_loss_weighs_each_term_as_eq_16():
    weights = losses.LossWeights(segmentation=2, depth=3, normal=5, edge=7, independence=11, geometry=13,
                                 appearance=17, appearance_l1=19, image=23, albedo_tv=29, gray=31, covariance=37,
                                 geometry_aux=41, appearance_aux=43)
    assert losses.LossWeights().geometry_aux == losses.LossWeights().appearance_aux == 0.5  # the authors' fixed 0.5
    # Written out from Eq (16) and the authors' deep supervision, not from total_loss.
    coefficients = {"segmentation": 2, "depth": 3, "normal": 5, "edge": 7, "independence": 11, "geometry": 13,
                    "appearance_perceptual": 17, "appearance_l1": 17 * 19, "image": 23, "albedo_tv": 29, "gray": 31,
                    "covariance": 37, "geometry_aux": 41, "appearance_aux": 43}
    for name, coefficient in coefficients.items():
        assert float(losses.total_loss({name: 1.0}, weights)) == pytest.approx(coefficient), name
    every_term = {name: 1.0 + index / 10 for index, name in enumerate(coefficients)}
    assert float(losses.total_loss(every_term, weights)) == pytest.approx(
        sum(coefficients[name] * value for name, value in every_term.items()))
    assert float(losses.total_loss({"independence": 1.0}, weights, independence_weight=0.25)) == 0.25
    # An override of 0 (stages 0 and 1) is 0, not "no override" (λ_ind = 11 here).
    assert float(losses.total_loss({"independence": 1.0}, weights, independence_weight=0.0)) == 0.0
    # A misspelt term is not dropped: every unknown one is named.
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) 'apperance_l1', 'grey'; total_loss weighs "):
        losses.total_loss({"apperance_l1": 1.0, "depth": 1.0, "grey": 1.0}, weights)
    assert float(losses.total_loss({}, weights)) == 0.0


def test_the_readmes_weights_without_grounding_leave_only_the_tasks_and_cka():
    """The README's Table 5 ablation removes every reconstruction term: with its overrides, only the task losses,
    the depth edge term and CKA keep a coefficient."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    overrides = re.search(r"`--loss-weights (geometry=0[^`]*)`", text).group(1)
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], **{name: 0.0 for name in
                                                               (part.split("=")[0] for part in overrides.split(","))})
    kept = {name for name in losses.TOTAL_LOSS_TERMS if float(losses.total_loss({name: 1.0}, weights)) != 0}
    assert kept == {"segmentation", "depth", "normal", "edge", "independence"}

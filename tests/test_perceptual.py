"""LPIPS v0.1 (VGG16) in deep/perceptual.py: the weight files, the distance against an independent numpy
computation with the same random full-width weights, its properties and gradients, and its hook into
deep.train.core_step.

torch (and so the ``lpips`` package) is not installed, so parity is checked against the numpy reference below,
which follows lpips' own code path: torchvision's ``features`` list walked by index, cut at lpips' slices.
"""

import dataclasses
import functools
import math
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_deep_train import TINY, compiled, make_batch
from test_weights import _FakeTensor

from deep import losses, perceptual, train
from deep.model import DualStreamModel

# torchvision's vgg16().features as config "D" builds it: a conv and its ReLU per number, a max pool per "M".
VGG16_CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# lpips' vgg16 slices features[0:4], [4:9], [9:16], [16:23], [23:30]: the taps are the outputs of these ReLUs.
LPIPS_TAP_INDICES = (3, 8, 15, 22, 29)


def _torchvision_layers():
    """``[(index, kind)]`` of ``vgg16().features``: kind is "conv", "relu" or "pool"."""
    layers = []
    for entry in VGG16_CONFIG_D:
        if entry == "M":
            layers.append((len(layers), "pool"))
        else:
            layers += [(len(layers), "conv"), (len(layers) + 1, "relu")]
    return layers


def _random_arrays(seed=0):
    """A full-width LPIPS-VGG state dict with torchvision/lpips keys, PyTorch layouts and random float32
    values (He-scaled kernels so activations stay O(1) through 13 layers, nonnegative linear weights)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape in perceptual.lpips_shapes().items():
        if key.startswith("lin"):
            arrays[key] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        elif key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            arrays[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(math.sqrt(2.0 / fan_in))
        else:
            arrays[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return arrays


@pytest.fixture(scope="module")
def arrays():
    return _random_arrays()


@pytest.fixture(scope="module")
def lpips_weights(arrays, tmp_path_factory):
    """The random weights as a user gets them: written to an .npz and loaded back."""
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.npz"
    np.savez(path, **arrays)
    return perceptual.load_lpips_npz(path)


def _images(seed, batch=2, height=34, width=35):
    """Images in [-1, 1]; 34 x 35 makes the pools floor odd sizes (35 -> 17 -> 8), relu5_3 is 2 x 2."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, height, width, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------ numpy reference


def _numpy_lpips(arrays, x, y):
    """LPIPS v0.1 in float64 numpy from the PyTorch-layout arrays: ScalingLayer, explicit 3x3
    cross-correlation (padding 1), 2x2 max pool (floor), channel normalisation, lin, spatial mean, sum over
    the taps.
    Returns ``(distance [B], taps of x)``."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])

    def correlate(h, weight, bias):
        # out[b, i, j, o] = bias[o] + sum_{c, dy, dx} h_padded[b, i + dy, j + dx, c] weight[o, c, dy, dx]
        height, width = h.shape[1:3]
        padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros(h.shape[:3] + (weight.shape[0],))
        for dy in range(3):
            for dx in range(3):
                out += padded[:, dy:dy + height, dx:dx + width, :] @ weight[:, :, dy, dx].T.astype(np.float64)
        return out + bias

    def max_pool(h):
        batch, height, width, channels = h.shape
        h = h[:, :height // 2 * 2, :width // 2 * 2]
        return h.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))

    def features(image):
        h, taps = (image.astype(np.float64) - shift) / scale, []
        for index, kind in _torchvision_layers():
            if kind == "conv":
                h = correlate(h, arrays[f"features.{index}.weight"], arrays[f"features.{index}.bias"])
            elif kind == "relu":
                h = np.maximum(h, 0.0)
                if index in LPIPS_TAP_INDICES:
                    taps.append(h)
            elif index < LPIPS_TAP_INDICES[-1]:  # the last pool feeds no tap
                h = max_pool(h)
        return taps

    def unit(f):
        return f / (np.sqrt(np.sum(f**2, axis=-1, keepdims=True)) + 1e-10)

    taps_x, taps_y = features(x), features(y)
    distance = 0.0
    for layer, (fx, fy) in enumerate(zip(taps_x, taps_y)):
        linear = arrays[f"lin{layer}.model.1.weight"].reshape(-1)
        distance = distance + np.mean(np.sum((unit(fx) - unit(fy)) ** 2 * linear, axis=-1), axis=(1, 2))
    return distance, taps_x


# ------------------------------------------------------------------------------------------------ the files


def test_layout_is_torchvisions_vgg16_and_lpips_v01():
    assert perceptual.VGG16_CONV_INDICES == tuple(i for i, kind in _torchvision_layers() if kind == "conv")
    assert perceptual.VGG16_CONV_INDICES == (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    shapes = perceptual.lpips_shapes()
    assert len(shapes) == 13 * 2 + 5
    assert shapes["features.0.weight"] == (64, 3, 3, 3) and shapes["features.28.bias"] == (512,)
    assert shapes["features.10.weight"] == (256, 128, 3, 3)
    assert [shapes[f"lin{i}.model.1.weight"] for i in range(5)] == [(1, c, 1, 1)
                                                                    for c in (64, 128, 256, 512, 512)]
    # torchvision's vgg16().features holds 14 714 688 parameters.
    assert sum(math.prod(s) for k, s in shapes.items() if k.startswith("features.")) == 14_714_688


def test_save_then_load_round_trips_with_kernels_transposed(arrays, lpips_weights, tmp_path):
    hwio = arrays["features.10.weight"].transpose(2, 3, 1, 0)  # from OIHW
    np.testing.assert_array_equal(lpips_weights.kernels[4], hwio)
    np.testing.assert_array_equal(lpips_weights.biases[12], arrays["features.28.bias"])
    np.testing.assert_array_equal(lpips_weights.linear[3], arrays["lin3.model.1.weight"].reshape(-1))
    assert all(kernel.dtype == jnp.float32 for kernel in lpips_weights.kernels)
    path = tmp_path / "saved.npz"
    perceptual.save_lpips_npz(lpips_weights, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.npz"]  # no temporary file left behind
    with np.load(path) as saved:
        assert set(saved.files) == set(arrays)
        for key in arrays:
            np.testing.assert_array_equal(saved[key], arrays[key], err_msg=key)
    assert perceptual.check_lpips_npz(path) == 31
    # Loaded in another dtype on request (every array, the linear weights too).
    halved = perceptual.load_lpips_npz(path, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(halved)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(halved.linear[3], np.float32),
                                  np.asarray(jnp.asarray(arrays["lin3.model.1.weight"].reshape(-1), jnp.bfloat16),
                                             np.float32))


def test_missing_extra_misshapen_and_negative_keys_are_rejected_by_name(arrays, tmp_path):
    def rejected(name, changed, match):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **changed)
        with pytest.raises(ValueError, match=match) as error:
            perceptual.load_lpips_npz(path)
        assert "\n" not in str(error.value) and str(path) in str(error.value)

    rejected("missing", {k: v for k, v in arrays.items() if k != "features.17.bias"},
             r"missing LPIPS network key 'features\.17\.bias' \(shape \(512,\)\)$")
    rejected("missing_lin", {k: v for k, v in arrays.items() if k != "lin4.model.1.weight"},
             r"missing LPIPS network key 'lin4\.model\.1\.weight' \(shape \(1, 512, 1, 1\)\)$")
    rejected("extra", {**arrays, "classifier.0.weight": np.zeros((2, 2), np.float32)},
             r"1 key\(s\) the LPIPS network does not have, first 'classifier\.0\.weight'$")
    rejected("misshapen", {**arrays, "features.5.weight": arrays["features.5.weight"].transpose(2, 3, 1, 0)},
             r"key 'features\.5\.weight' has shape \(3, 3, 64, 128\), expected \(128, 64, 3, 3\)")
    rejected("lin_misshapen", {**arrays, "lin1.model.1.weight": np.ones((128,), np.float32)},
             r"key 'lin1\.model\.1\.weight' has shape \(128,\), expected \(1, 128, 1, 1\)")
    rejected("integer", {**arrays, "features.0.bias": np.zeros(64, np.int64)},
             r"key 'features\.0\.bias' has dtype int64, expected a floating type")
    negative = arrays["lin2.model.1.weight"].copy()
    negative[0, 7] = -0.5
    rejected("negative", {**arrays, "lin2.model.1.weight": negative},
             r"key 'lin2\.model\.1\.weight' has a negative or non-finite entry \(min -0\.5\)")
    rejected("negative_last", {**arrays, "lin4.model.1.weight": -arrays["lin4.model.1.weight"]},
             r"key 'lin4\.model\.1\.weight' has a negative or non-finite entry")  # the last layer checked too
    negative[0, 7] = np.inf
    rejected("infinite", {**arrays, "lin2.model.1.weight": negative},
             r"key 'lin2\.model\.1\.weight' has a negative or non-finite entry")
    # lpips clamps its linear weights at 0 while learning them, so a trained file may hold exact zeros: they load.
    zero = arrays["lin2.model.1.weight"].copy()
    zero[0, 7] = 0.0
    np.savez(tmp_path / "zero.npz", **{**arrays, "lin2.model.1.weight": zero})
    assert float(perceptual.load_lpips_npz(tmp_path / "zero.npz").linear[2][7]) == 0.0
    rejected("prefixed", {f"net.{k}": v for k, v in arrays.items()},
             r"missing LPIPS network key 'features\.0\.weight'.*first 'net\.features\.0\.")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        perceptual.load_lpips_npz(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        perceptual.load_lpips_npz(tmp_path / "junk.npz")


def _fake_torch(files):
    """A stand-in ``torch`` whose ``load`` returns the state dict stored under that file's name."""
    module = types.ModuleType("torch")
    module.Tensor = _FakeTensor
    module.float16, module.float32, module.float64 = "float16", "float32", "float64"
    module.load = lambda path, map_location=None, weights_only=False: files[path.name]
    return module


def test_converter_combines_the_two_files_with_a_stand_in_torch(arrays, tmp_path, monkeypatch, capsys):
    tensors = {key: _FakeTensor(value, "float32") for key, value in arrays.items()}
    vgg = {k: v for k, v in tensors.items() if k.startswith("features.")}
    vgg["classifier.6.weight"] = _FakeTensor(np.zeros((10, 4), np.float32), "float32")  # dropped
    linear = {k: v for k, v in tensors.items() if k.startswith("lin")}
    odd = {**linear, "scaling_layer.shift": tensors["features.0.bias"]}
    files = {"vgg16.pth": vgg, "vgg.pth": linear, "odd.pth": odd}
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(files))
    for name in files:
        (tmp_path / name).write_bytes(b"")
    out = tmp_path / "lpips.npz"
    assert perceptual.main(["convert", str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"), str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 31 arrays to {out}\n"
    with np.load(out) as converted:
        assert set(converted.files) == set(arrays)
        np.testing.assert_array_equal(converted["lin0.model.1.weight"], arrays["lin0.model.1.weight"])
    assert perceptual.main(["check", str(out)]) == 0
    assert "all 31 LPIPS-VGG arrays" in capsys.readouterr().out
    convert = lambda vgg_name, lpips_name: perceptual.convert_lpips_pth_to_npz(
        tmp_path / vgg_name, tmp_path / lpips_name, tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"'features\.0\.weight' is not a lpips v0\.1 linear-layer .*swap"):
        convert("vgg16.pth", "vgg16.pth")
    with pytest.raises(ValueError, match=r"'scaling_layer\.shift' is not a lpips v0\.1 linear-layer key"):
        convert("vgg16.pth", "odd.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert("absent.pth", "vgg.pth")
    assert not (tmp_path / "bad.npz").exists()


def test_cli_without_torch_and_with_a_bad_file_reports_one_line(arrays, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(b"a state dict")
    files = [str(tmp_path / name) for name in ("a.pth", "b.pth", "out.npz")]
    assert perceptual.main(["convert", *files]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "core-mtl-toolkit[torch]" in error
    np.savez(tmp_path / "short.npz", **{k: v for k, v in arrays.items() if k != "lin0.model.1.weight"})
    assert perceptual.main(["check", str(tmp_path / "short.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "'lin0.model.1.weight'" in error


# ----------------------------------------------------------------------------------------------- the metric


def _scaled(image):
    shift = np.asarray(perceptual.LPIPS_SHIFT, np.float32)
    return (image - shift) / np.asarray(perceptual.LPIPS_SCALE, np.float32)


@pytest.fixture(scope="module")
def distances(lpips_weights):
    """``d(a, b), d(b, a), d(a, a)`` (each ``[2]``), the VGG taps of ``a``, and the images, from one compiled
    call."""
    a, b = _images(1), _images(2)
    x, y = np.concatenate([a, b, a]), np.concatenate([b, a, a])
    both = jax.jit(lambda weights, x, y, a: (perceptual.lpips_distance(weights, x, y),
                                             perceptual.vgg16_features(weights, a)))
    d, taps = both(lpips_weights, x, y, _scaled(a))
    return np.asarray(d).reshape(3, len(a)), taps, a, b


def test_matches_an_independent_numpy_computation(arrays, distances):
    d, taps, a, b = distances
    reference, reference_taps = _numpy_lpips(arrays, a, b)
    assert np.all(reference > 0.05)  # not a trivial comparison
    np.testing.assert_allclose(d[0], reference, rtol=2e-5)
    # The feature extractor alone, tap by tap; the pools floor the odd sizes (35 -> 17 -> 8).
    assert [t.shape[1:] for t in taps] == [(34, 35, 64), (17, 17, 128), (8, 8, 256), (4, 4, 512), (2, 2, 512)]
    for tap, reference_tap in zip(taps, reference_taps):
        np.testing.assert_allclose(tap, reference_tap, rtol=2e-4, atol=2e-4 * np.abs(reference_tap).max())


def test_taps_are_normalised_as_lpips_normalize_tensor_with_epsilon_outside_the_root():
    """lpips' ``normalize_tensor``: f / (||f||₂ + 1e-10). On ordinary features the epsilon is invisible, so the
    comparison above cannot place it; on features of norm 5e-8 it can: outside the root the result is f/(5.01e-8),
    almost unit length, where inside it (f/sqrt(||f||² + 1e-10)) it would be f/1e-5, 5e-3 long. An all-zero pixel
    (a dead ReLU everywhere) stays 0. float64 reference, float32 rounding only (rtol 1e-6)."""
    features = np.array([[3e-8, 4e-8], [0.0, 0.0], [3.0, -4.0]])
    expected = features / (np.sqrt(np.sum(features**2, axis=-1, keepdims=True)) + 1e-10)
    got = perceptual._unit_normalise(jnp.asarray(features, jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-6, atol=0)


def test_is_zero_on_identical_images_symmetric_and_positive(distances):
    d, _, _, _ = distances
    np.testing.assert_allclose(d[2], 0.0, atol=1e-6)
    np.testing.assert_allclose(d[0], d[1], rtol=1e-5)
    assert np.all(d[0] > 0)


def test_loss_takes_unit_interval_images_and_the_batch_mean_with_useful_gradients(lpips_weights, distances):
    d, _, a, b = distances
    value_and_grad = jax.jit(jax.value_and_grad(perceptual.lpips_loss, argnums=(0, 1)))
    loss, (weight_grads, image_grads) = value_and_grad(lpips_weights, (a + 1) / 2, (b + 1) / 2)
    np.testing.assert_allclose(loss, d[0].mean(), rtol=1e-5)
    image_grads = np.asarray(image_grads)
    assert np.all(np.isfinite(image_grads))
    assert np.all(np.abs(image_grads).reshape(len(a), -1).max(axis=1) > 0)  # every image gets a gradient
    assert all(np.abs(g).max() == 0 for g in jax.tree.leaves(weight_grads))  # constants of the loss
    # relu5_3 sits behind four 2x2 pools: one side of 15 pixels leaves it no pixel (15 -> 7 -> 3 -> 1 -> 0).
    for size in ((8, 8), (15, 16), (16, 15)):
        with pytest.raises(ValueError, match="at least 16 x 16"):
            perceptual.lpips_loss(lpips_weights, jnp.zeros((1, *size, 3)), jnp.zeros((1, *size, 3)))
    # A grey image is refused, not broadcast against the ScalingLayer's three channels into a colour one.
    with pytest.raises(ValueError, match=r"two \[batch, height, width, 3\] images of one shape"):
        perceptual.lpips_loss(lpips_weights, jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 1)))
    with pytest.raises(ValueError, match="one shape"):
        perceptual.lpips_loss(lpips_weights, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 17, 3)))


def test_bfloat16_compute_runs_every_vgg_convolution_in_bfloat16_and_stays_close(lpips_weights, distances):
    """Under the model's bfloat16 compute the 13 VGG convolutions take bfloat16 operands (float32 ones would run
    at half the tensor-core rate or less); the distance, normalised and compared in float32, stays close."""
    d, _, a, b = distances
    loss = functools.partial(perceptual.lpips_loss, compute_dtype="bfloat16")
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=1))(lpips_weights, (a + 1) / 2, (b + 1) / 2)
    convolutions = [equation for equation in jaxpr.jaxpr.eqns if equation.primitive.name == "conv_general_dilated"]
    # 13 forward for each image, 13 backward for the reconstruction's gradient (none for the constant kernels).
    assert len(convolutions) == 3 * 13
    assert all(variable.aval.dtype == jnp.bfloat16 for equation in convolutions for variable in equation.invars)
    # ... while the taps are widened back before lpips' normalize_tensor: its square roots (one per tap and image,
    # none elsewhere) take float32, as the images are; normalised in bfloat16 they would round the differences of
    # near-identical features again.
    roots = [equation for equation in jaxpr.jaxpr.eqns if equation.primitive.name == "sqrt"]
    assert len(roots) == 2 * 5 and all(equation.invars[0].aval.dtype == jnp.float32 for equation in roots)
    value = jax.jit(loss)(lpips_weights, (a + 1) / 2, (b + 1) / 2)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, d[0].mean(), rtol=1e-2)  # 6e-4 measured: 8 bits, errors averaged over pixels
    # Nearer the target the features' differences cancel, and bfloat16's rounding of them sets a floor. At a
    # reconstruction as close as noise of 0.03 (value 0.010) it still gives the value to 0.9 % and the gradient's
    # direction to a cosine of 0.989 (measured here; 66 % off at 0.003, as the docstring says).
    target = (a + 1) / 2
    near = np.clip(target + 0.03 * np.random.default_rng(7).standard_normal(target.shape), 0, 1).astype(np.float32)
    (exact, exact_grad), (rounded, rounded_grad) = (
        jax.jit(jax.value_and_grad(functools.partial(perceptual.lpips_loss, compute_dtype=dtype), argnums=1))(
            lpips_weights, near, target) for dtype in ("float32", "bfloat16"))
    np.testing.assert_allclose(rounded, exact, rtol=3e-2)
    exact_grad, rounded_grad = np.ravel(exact_grad), np.ravel(rounded_grad)
    assert exact_grad @ rounded_grad > 0.95 * np.linalg.norm(exact_grad) * np.linalg.norm(rounded_grad)


# ---------------------------------------------------------------------------------------- the training hook


def _materialised(config, seed=0):
    """A ``DualStreamModel(config)`` whose variables are drawn with numpy into the abstract model (He-scaled
    kernels, unit scales and variances, zero biases and means), the values this file's tests were written with
    (when the model's own build compiled a program per parameter shape, slower than everything else here)."""
    rng = np.random.default_rng(seed)
    model = nnx.eval_shape(lambda: DualStreamModel(config, nnx.Rngs(0)))
    filled = []
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            value = jax.random.split(jax.random.key(seed), shape) if shape else jax.random.key(seed)
        elif not jnp.issubdtype(dtype, jnp.floating):
            value = jnp.zeros(shape, dtype)
        elif path[-1] in ("var", "scale"):
            value = jnp.ones(shape, dtype)
        elif len(shape) >= 2:
            value = jnp.asarray(rng.standard_normal(shape) * math.sqrt(2.0 / math.prod(shape[:-1])), dtype)
        else:
            value = jnp.zeros(shape, dtype)
        filled.append((path, variable.replace(value)))
    nnx.update(model, nnx.from_flat_state(filled))
    return model


# The soft-grounding tiny model (it has the appearance decoder) with one task and one ASPP rate, no
# counterfactual pass and no edge term: none of them touches the hook, and they would double the compile time.
HOOK_CONFIG = dataclasses.replace(TINY, grounding="soft", tasks=(("depth", 1),), aspp_rates=(1,))
HOOK_WEIGHTS = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual=0.0, edge=0.0)


@pytest.fixture(scope="module")
def hooked_step(lpips_weights):
    """``(state, core_step, step)``: core_step of HOOK_CONFIG, and it compiled with LPIPS weights as a traced
    argument (any weights of these shapes run through the same executable). Plain SGD, so that a change of
    gradient shows in the step (Adam's first step is about the learning rate times the gradient's sign)."""
    optimizer = optax.sgd(1e-2)
    graphdef, state = train.split_model(_materialised(HOOK_CONFIG), optimizer)
    core_step = functools.partial(train.core_step, graphdef, optimizer, weights=HOOK_WEIGHTS)
    step = compiled(core_step, state, make_batch(), jax.random.key(0), independence_weight=0.0,
                    perceptual=lpips_weights)
    return state, core_step, step


def test_core_step_adds_the_perceptual_term_weighted_by_beta_app(hooked_step, lpips_weights):
    state, core_step, step = hooked_step
    batch, key = make_batch(), jax.random.key(0)
    run = functools.partial(step, state, batch, key, independence_weight=0.0)
    new_state, metrics = run(perceptual=lpips_weights)
    # The same executable with all-zero linear weights: LPIPS is then exactly 0 and everything else as before.
    silent = lpips_weights._replace(linear=tuple(jnp.zeros_like(w) for w in lpips_weights.linear))
    silent_state, silent_metrics = run(perceptual=silent)
    assert bool(metrics["finite"]) and bool(silent_metrics["finite"])
    term = float(metrics["appearance_perceptual"])
    assert np.isfinite(term) and term > 0.01
    # λ_cfa = 0 here: a model that can make counterfactuals reports the term only when it has a weight.
    assert "counterfactual" not in metrics
    assert float(silent_metrics["appearance_perceptual"]) == 0
    for name in ("appearance_l1", "appearance_aux", "geometry", "depth", "independence"):
        assert float(metrics[name]) == float(silent_metrics[name]), name
    difference = float(metrics["loss"]) - float(silent_metrics["loss"])
    np.testing.assert_allclose(difference, HOOK_WEIGHTS.appearance * term, rtol=1e-4)
    # Its gradient reaches the appearance decoder, not the depth head, which the reconstruction does not read.
    leaves = lambda tree: [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    decoder, heads = (lambda s: leaves(s.params[0]["appearance_decoder"])), (lambda s: leaves(s.params[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(decoder(new_state), decoder(silent_state)))
    assert all(np.array_equal(a, b) for a, b in zip(heads(new_state), heads(silent_state)))
    # Without weights the term is not computed: absent from the metrics, it counts 0 in the loss.
    _, plain_metrics = jax.eval_shape(core_step, state, batch, key, independence_weight=0.0)
    assert "appearance_perceptual" not in plain_metrics and "appearance_l1" in plain_metrics


def test_a_perceptual_loss_needs_the_appearance_decoder(lpips_weights):
    model = nnx.eval_shape(lambda: DualStreamModel(dataclasses.replace(HOOK_CONFIG, grounding="none"),
                                                   nnx.Rngs(0)))
    graphdef, shared, heads, batch_stats, rest = nnx.split(model, train.SHARED, train.HEADS, nnx.BatchStat,
                                                           ...)
    objective = functools.partial(train.core_objective, graphdef, weights=HOOK_WEIGHTS,
                                  perceptual=lpips_weights)
    with pytest.raises(ValueError, match="needs the appearance decoder, which grounding 'none' does not"):
        jax.eval_shape(objective, (shared, heads), batch_stats, rest, make_batch(), jax.random.key(0),
                       independence_weight=0.0, counterfactual=False)

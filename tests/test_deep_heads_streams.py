"""ASPP heads (DeepLabV3, the authors' DeepLabV3+), the multi-scale fusion and the dual-stream projectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep.backbone import BatchNorm
from deep.heads import ASPP, ASPPHead, DeepLabV3PlusHead
from deep.model import ModelConfig
from deep.mtan import MTANConfig
from deep.streams import DualStream, MultiScaleFusion
from test_deep_functional import reference_resize_axis
from test_deep_train import compiled


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


# A tiny DeepLabV3+ head: ẑ_s with 6 channels and F with 16 on a 5×6 grid, c1 with 8 on an odd 9×12 grid.
V3PLUS_SIZES = dict(semantic_channels=6, feature_channels=16, low_level_channels=8, out_channels=3)
V3PLUS_WIDTHS = dict(channels=4, rates=(1, 2, 3), skip_channels=4, skip_groups=2, decoder_groups=2)


def normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    """Test inputs from numpy: a ``jax.random`` draw compiles once per shape, seconds on the CPU."""
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def v3plus_inputs(seed=3):
    rng = np.random.default_rng(seed)
    return normal(rng, 2, 5, 6, 6), normal(rng, 2, 5, 6, 16), normal(rng, 2, 9, 12, 8)


@pytest.fixture(scope="module")
def v3plus_head():
    head = DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(2), **V3PLUS_WIDTHS)
    head.eval()
    return head


def test_both_heads_share_one_aspp_and_the_aspp_head_keeps_its_parameter_paths():
    aspp_head = nnx.eval_shape(lambda: ASPPHead(16, 3, nnx.Rngs(0), channels=8, rates=(2, 4)))
    v3plus = nnx.eval_shape(lambda: DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(0), **V3PLUS_WIDTHS))
    assert isinstance(aspp_head, ASPP) and type(v3plus.aspp) is ASPP
    # Checkpoints of ASPP-head models saved before the ASPP was shared must still restore: same names.
    names = {path[0] for path, _ in nnx.to_flat_state(nnx.state(aspp_head, nnx.Param))}
    assert names == {"branch_1x1", "branches_atrous", "branch_pool", "project", "refine", "classifier"}
    # The authors' head has no refine convolution after the ASPP; its ASPP reads the two projections.
    assert not hasattr(v3plus, "refine") and v3plus.aspp.branch_1x1[0].in_features == 2 * 4
    assert v3plus.aspp.dropout.rate == 0.5 and v3plus.decoder_dropout.rate == 0.1


def test_deeplabv3plus_head_predicts_on_the_c1_grid_with_group_norms(v3plus_head):
    inputs = v3plus_inputs()
    out = compiled(lambda *xs: v3plus_head(*xs), *inputs)(*inputs)
    assert out.shape == (2, 9, 12, 3) and out.dtype == jnp.float32  # c1's odd grid, not 2 × the 5×6 grid
    assert (v3plus_head.skip_norm.num_groups, v3plus_head.fuse_norm.num_groups) == (2, 2)
    assert v3plus_head.skip.use_bias is False and v3plus_head.fuse.use_bias is False
    # GroupNorm (fresh: scale 1, bias 0) standardises each (example, group) over pixels and channels together.
    x = normal(np.random.default_rng(4), 2, 9, 12, 4) * jnp.array([1.0, 3.0, 0.5, 2.0]) + 1.0
    grouped = v3plus_head.skip_norm(x).reshape(2, 9 * 12, 2, 2)
    np.testing.assert_allclose(grouped.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(grouped.var(axis=(1, 3)), 1.0, rtol=1e-3)
    # ... not each channel on its own: channels of different scales keep different variances within a group.
    channel_variances = np.asarray(grouped.var(axis=1))
    assert channel_variances.min() < 0.5 and channel_variances.max() > 1.5, channel_variances
    with pytest.raises(ValueError, match="skip_groups"):
        DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(0), **{**V3PLUS_WIDTHS, "skip_groups": 3})


def test_deeplabv3plus_head_reads_the_semantic_map_the_features_and_the_c1_skip(v3plus_head):
    inputs = v3plus_inputs()
    gradients = jax.grad(lambda *xs: v3plus_head(*xs).sum(), argnums=(0, 1, 2))
    grads = compiled(gradients, *inputs)(*inputs)
    for name, grad in zip(("semantic_map", "features", "low_level"), grads):
        assert float(jnp.abs(grad).max()) > 0, name


def test_multiscale_fusion_brings_every_stage_to_the_c4_grid_and_downsamples_c1_by_2x2_average_pooling():
    fusion = MultiScaleFusion((8, 16, 32, 64), nnx.Rngs(5), channels=3)
    rng = np.random.default_rng(5)
    stages = (normal(rng, 2, 8, 10, 8), normal(rng, 2, 4, 5, 16), normal(rng, 2, 4, 5, 32),
              normal(rng, 2, 4, 5, 64))

    def fused_and_expected(stages):
        c1, c2, _, c4 = stages
        average_pooled = c1.reshape(2, 4, 2, 5, 2, 8).mean(axis=(2, 4))
        fused = fusion(stages)
        expected = fusion.adapters[0](average_pooled), fusion.adapters[1](c2), fusion.adapters[3](c4)
        return fused, fusion.adapted_last_stage(fused), expected

    fused, adapted_c4, expected = compiled(fused_and_expected, stages)(stages)
    expected_c1, expected_c2, expected_c4 = expected
    assert fused.shape == (2, 4, 5, 12)
    np.testing.assert_allclose(fused[..., :3], expected_c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused[..., 3:6], expected_c2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(adapted_c4, expected_c4, rtol=1e-6, atol=1e-6)
    assert fusion.adapters[0].use_bias  # 1×1 convolutions with bias, as the authors'


def test_defaults_are_deeplabv3_at_output_stride_8():
    """The documented defaults (official_implementation.md §2, LibMTL's NYUv2 example): ASPP rates 12, 24, 36 (the
    OS-8 rates; 6, 12, 18 are DeepLabV3's OS-16 ones), 256 channels, dropout 0.5 after the projection; the authors'
    decoder dropout 0.1. Abstract modules (nnx.eval_shape): nothing is drawn."""
    assert ModelConfig().aspp_rates == (12, 24, 36) and MTANConfig().aspp_rates == (12, 24, 36)
    aspp = nnx.eval_shape(lambda: ASPP(8, nnx.Rngs(0)))
    assert [branch[0].kernel_dilation for branch in aspp.branches_atrous] == [(12, 12), (24, 24), (36, 36)]
    assert aspp.project[0].out_features == 256 and aspp.dropout.rate == 0.5
    head = nnx.eval_shape(lambda: DeepLabV3PlusHead(6, 16, 8, 3, nnx.Rngs(0)))
    assert head.aspp.dropout.rate == 0.5 and head.decoder_dropout.rate == 0.1
    assert [branch[0].kernel_dilation for branch in head.aspp.branches_atrous] == [(12, 12), (24, 24), (36, 36)]


def test_the_rates_and_dropouts_given_reach_the_layers_of_the_heads_and_of_the_models_heads():
    """Non-default rates and dropouts are built, in both heads and through the models' configurations (ModelConfig's
    ``aspp_rates`` for either head type, MTANConfig's for its task heads): the defaults alone, checked above, cannot
    tell a forwarded argument from an ignored one. Abstract modules (nnx.eval_shape): nothing is drawn."""
    from deep.model import DualStreamModel
    from deep.mtan import MTAN
    from deep.trainer import MODEL_SIZES

    def dilations(aspp):
        return [branch[0].kernel_dilation for branch in aspp.branches_atrous]

    head = nnx.eval_shape(lambda: ASPPHead(8, 3, nnx.Rngs(0), channels=4, rates=(2, 5), dropout=0.3))
    assert dilations(head) == [(2, 2), (5, 5)] and head.dropout.rate == 0.3
    v3plus = nnx.eval_shape(lambda: DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(0), **V3PLUS_WIDTHS, dropout=0.2,
                                                      decoder_dropout=0.3))
    assert dilations(v3plus.aspp) == [(1, 1), (2, 2), (3, 3)]
    assert v3plus.aspp.dropout.rate == 0.2 and v3plus.decoder_dropout.rate == 0.3
    with pytest.raises(ValueError, match=r"decoder_dropout must lie in \[0, 1\); got 1.0"):
        DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(0), **V3PLUS_WIDTHS, decoder_dropout=1.0)
    tiny = {**MODEL_SIZES["tiny"], "aspp_rates": (2, 5), "tasks": (("depth", 1),), "grounding": "none"}
    for head_type, heads_read in (("aspp", "semantic"), ("deeplabv3plus", "semantic+backbone")):
        config = ModelConfig(**tiny, head=head_type, heads_read=heads_read)
        model = nnx.eval_shape(lambda: DualStreamModel(config, nnx.Rngs(0)))
        depth_head = model.heads["depth"]
        assert dilations(depth_head if head_type == "aspp" else depth_head.aspp) == [(2, 2), (5, 5)], head_type
    mtan_config = MTANConfig(backbone=tiny["backbone"], tasks=(("depth", 1),), head_channels=4, aspp_rates=(2, 5))
    mtan = nnx.eval_shape(lambda: MTAN(mtan_config, nnx.Rngs(0)))
    assert dilations(mtan.heads["depth"].head) == [(2, 2), (5, 5)]


def test_the_aspp_drops_out_after_its_projection():
    """DeepLabV3's ASPP ends in 1×1 projection → BN → ReLU → Dropout(0.5): in training mode its output is the same
    pass without dropout with each entry either zeroed or scaled by 1/(1 − 0.5) = 2. (Dropout on the concatenated
    branches, before the projection, would leave no such relation.) BatchNorm reads the batch's statistics in both
    passes, so they differ by the dropout alone; float32 rounding only."""
    aspp = ASPP(6, nnx.Rngs(3), channels=8, rates=(1, 2))
    aspp.train()
    x = normal(np.random.default_rng(3), 2, 5, 6, 6)
    dropped = np.asarray(aspp(x))
    aspp.dropout.deterministic = True
    kept = np.asarray(aspp(x))
    zeroed = dropped == 0
    np.testing.assert_allclose(dropped[~zeroed], 2.0 * kept[~zeroed], rtol=1e-6)
    assert 0.3 < np.mean(zeroed[kept > 0]) < 0.7  # about half of the live entries dropped


def test_multiscale_fusion_goes_to_c4s_grid_on_an_undilated_backbone():
    """At output stride 32 (no dilation) c2 and c3 are not on c4's grid, unlike the default stride 8 where any of
    c2..c4 gives the grid: every stage is still brought to c4's grid, on which ``F`` lies. Shapes only
    (``jax.eval_shape``): nothing is computed."""
    fusion = MultiScaleFusion((8, 16, 32, 64), nnx.Rngs(5), channels=3)
    stages = tuple(jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
                   for size, channels in ((16, 8), (8, 16), (4, 32), (2, 64)))
    assert jax.eval_shape(fusion, stages).shape == (2, 2, 2, 12)


def test_dual_stream_projectors_are_1x1_convolutions_and_the_residual_code_their_spatial_mean():
    """ẑ_s is a 1×1 convolution with bias of the features, ẑ_r the *spatial mean* of another one (the authors'
    ``z_p_vec``, official_implementation.md §2), both recomputed in numpy from the layers' parameters. The
    permutation test above cannot tell the mean from another symmetric pooling (max, sum)."""
    streams = DualStream(8, nnx.Rngs(0), semantic_channels=6, residual_channels=3)
    x = np.random.default_rng(2).normal(size=(2, 5, 7, 8))
    semantic, residual = streams(jnp.asarray(x, jnp.float32))
    expected_semantic = x @ _np(streams.semantic.kernel[...])[0, 0] + _np(streams.semantic.bias[...])
    residual_map = x @ _np(streams.residual.kernel[...])[0, 0] + _np(streams.residual.bias[...])
    expected_residual = residual_map.mean(axis=(1, 2))
    np.testing.assert_allclose(semantic, expected_semantic, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(residual, expected_residual, rtol=1e-5, atol=1e-5)


def _conv_same(x: np.ndarray, kernel: np.ndarray, bias=None, dilation: int = 1) -> np.ndarray:
    """A stride-1 cross-correlation (PyTorch's and Flax's convolution) with zero padding dilation·(k-1)/2 on each
    side, written out tap by tap in float64: ``x [B, H, W, C_in]``, ``kernel [kh, kw, C_in, C_out]``."""
    kh, kw = kernel.shape[:2]
    ph, pw = dilation * (kh - 1) // 2, dilation * (kw - 1) // 2
    batch, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out = np.zeros((batch, height, width, kernel.shape[-1]))
    for a in range(kh):
        for b in range(kw):
            out += padded[:, a * dilation:a * dilation + height, b * dilation:b * dilation + width] @ kernel[a, b]
    return out if bias is None else out + bias


def _np(value) -> np.ndarray:
    return np.asarray(value, np.float64)


def _batch_norm_eval(x: np.ndarray, norm: BatchNorm) -> np.ndarray:
    """PyTorch's BatchNorm2d in eval mode: running statistics, epsilon 1e-5."""
    return ((x - _np(norm.mean[...])) / np.sqrt(_np(norm.var[...]) + 1e-5) * _np(norm.scale[...])
            + _np(norm.bias[...]))


def _group_norm(x: np.ndarray, norm: nnx.GroupNorm, groups: int) -> np.ndarray:
    """PyTorch's GroupNorm(groups, C): each (example, group of consecutive channels) standardised over pixels and
    channels together with the biased variance and epsilon 1e-5, then the per-channel affine map."""
    batch, height, width, channels = x.shape
    grouped = x.reshape(batch, height, width, groups, channels // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = grouped.var(axis=(1, 2, 4), keepdims=True)
    standardised = ((grouped - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    return standardised * _np(norm.scale[...]) + _np(norm.bias[...])


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _conv_bn_relu(pair, x: np.ndarray, dilation: int = 1) -> np.ndarray:
    layer, norm = pair
    return _relu(_batch_norm_eval(_conv_same(x, _np(layer.kernel[...]), dilation=dilation), norm))


def _aspp_eval(aspp: ASPP, x: np.ndarray, rates: tuple[int, ...]) -> np.ndarray:
    """DeepLabV3's ASPP in eval mode (official_implementation.md §2): a 1×1 branch, 3×3 branches at ``rates``, image
    pooling (global average → 1×1 → BN → ReLU, broadcast), concatenated in that order, 1×1 projection → BN → ReLU
    (dropout off)."""
    branches = [_conv_bn_relu(aspp.branch_1x1, x)]
    branches += [_conv_bn_relu(branch, x, rate) for branch, rate in zip(aspp.branches_atrous, rates, strict=True)]
    pooled = _conv_bn_relu(aspp.branch_pool, x.mean(axis=(1, 2), keepdims=True))
    branches.append(np.broadcast_to(pooled, branches[0].shape))
    return _conv_bn_relu(aspp.project, np.concatenate(branches, axis=-1))


def _randomise_normalisation(module: nnx.Module, seed: int) -> None:
    """Every BatchNorm's and GroupNorm's affine parameters (and BatchNorm's running statistics) drawn at random, so
    that a missing or misplaced normalisation cannot hide behind the fresh identity map."""
    rng = np.random.default_rng(seed)
    for _, layer in nnx.iter_graph(module):
        if isinstance(layer, (nnx.BatchNorm, nnx.GroupNorm)):
            size = layer.scale[...].shape
            layer.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, size), jnp.float32))
            layer.bias.set_value(jnp.asarray(rng.normal(0.0, 0.5, size), jnp.float32))
            if isinstance(layer, nnx.BatchNorm):
                layer.mean.set_value(jnp.asarray(rng.normal(0.0, 0.5, size), jnp.float32))
                layer.var.set_value(jnp.asarray(rng.uniform(0.5, 2.0, size), jnp.float32))


def test_deeplabv3plus_head_in_eval_mode_equals_the_authors_task_head_written_out_in_numpy():
    """The authors' ``TaskHead`` as official_implementation.md §2 describes it, in float64 numpy from the head's
    parameters: ``[P_F(F); P_s(ẑ_s)]`` (1×1 with bias) → ASPP → bilinear ``align_corners=True`` to c1's odd 9×12 grid,
    concatenated with the skip c1 → 1×1 (no bias) → GroupNorm → ReLU, → 3×3 (no bias) → GroupNorm → ReLU → (dropout
    off) → 1×1 classifier. The normalisations' parameters and running statistics are randomised first."""
    head = DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(7), **V3PLUS_WIDTHS)
    _randomise_normalisation(head, seed=7)
    head.eval()
    semantic, features, low_level = v3plus_inputs(seed=8)
    out = head(semantic, features, low_level)

    def conv1x1(layer, x):
        return _conv_same(x, _np(layer.kernel[...]), None if layer.bias is None else _np(layer.bias[...]))

    x = np.concatenate([conv1x1(head.project_features, _np(features)),
                        conv1x1(head.project_semantic, _np(semantic))], axis=-1)
    x = _aspp_eval(head.aspp, x, V3PLUS_WIDTHS["rates"])
    skip = _relu(_group_norm(conv1x1(head.skip, _np(low_level)), head.skip_norm, V3PLUS_WIDTHS["skip_groups"]))
    x = reference_resize_axis(reference_resize_axis(x, 1, low_level.shape[1], True), 2, low_level.shape[2], True)
    x = _conv_same(np.concatenate([x, skip], axis=-1), _np(head.fuse.kernel[...]))
    x = _relu(_group_norm(x, head.fuse_norm, V3PLUS_WIDTHS["decoder_groups"]))
    expected = conv1x1(head.classifier, x)
    assert out.shape == expected.shape == (2, 9, 12, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))


def test_the_decoder_drops_out_before_its_classifier():
    """The authors' decoder ends in ReLU → Dropout(0.1) → 1×1 classifier. With the classifier made to copy three of
    its four input channels and add 5, each output either is 5 (its input dropped) or 5 + (kept − 5)/0.9; dropout
    after the classifier would zero whole outputs instead. Eval mode with only the decoder's dropout switched on, so
    both passes see the same features."""
    head = DeepLabV3PlusHead(**V3PLUS_SIZES, rngs=nnx.Rngs(4), **V3PLUS_WIDTHS)
    head.classifier.kernel.set_value(jnp.eye(4, 3, dtype=jnp.float32)[None, None])
    head.classifier.bias.set_value(jnp.full((3,), 5.0, jnp.float32))
    head.eval()
    inputs = v3plus_inputs(seed=5)
    kept = np.asarray(head(*inputs))
    head.decoder_dropout.deterministic = False
    dropped = np.asarray(head(*inputs))
    live, zeroed = kept != 5.0, dropped == 5.0  # live: the copied channel is not 0 after the ReLU
    assert 0.02 < np.mean(zeroed[live]) < 0.3  # about one in ten dropped
    survived = live & ~zeroed
    np.testing.assert_allclose(dropped[survived] - 5.0, (kept[survived] - 5.0) / 0.9, rtol=1e-5, atol=1e-6)


def test_fusion_and_stream_widths_must_be_positive():
    with pytest.raises(ValueError, match="fusion channels must be >= 1; got 0"):
        MultiScaleFusion((8, 16), nnx.Rngs(0), channels=0)
    for widths in (dict(semantic_channels=0), dict(residual_channels=0)):
        with pytest.raises(ValueError, match="semantic_channels and residual_channels must be >= 1"):
            DualStream(8, nnx.Rngs(0), **widths)

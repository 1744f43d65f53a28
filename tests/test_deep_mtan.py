"""MTAN on a tiny dilated ResNet (CPU): shapes, the shared/task split, task independence, balanced training.

Compilation dominates (a tiny MTAN still has ~200 convolutions in a training step), so the file compiles three
functions — an eval-mode forward pass, an EW step (shared through a fixture by the task-independence and training
tests) and a PCGrad step — with two tasks, one ASPP rate, plain SGD (fewer optimiser ops than the clipped,
scheduled Adam that ``tests/test_deep_train.py`` covers, and an update that is exactly −η × the gradient), under
the suite's fast-compile XLA flags (conftest.py). The full-size and the bfloat16 models are only traced
(``eval_shape``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from deep import train
from deep.backbone import BackboneConfig, ResNet
from deep.heads import ASPPHead
from deep.mtan import MTAN, AttentionMask, MTANConfig
from test_deep_baselines import assert_same_jacobian_step, whole_model_jacobian
from theory.balancing import make

TINY = MTANConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), tasks=(("segmentation", 13), ("normal", 3)),
                  head_channels=4, aspp_rates=(1,))
TASKS = [name for name, _ in TINY.tasks]


def make_batch(seed=1, size=2, height=16, width=16):
    """Images with per-image labels (a class, a normal) that a tiny model can fit, in float32 explicitly (the test
    session enables x64)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    images = jax.random.uniform(keys[0], (size, height, width, 3), jnp.float32)
    classes = jax.random.randint(keys[1], (size, 1, 1), 0, 13, jnp.int32)
    normal = jax.random.normal(keys[2], (size, 1, 1, 3), jnp.float32)
    normal = normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)
    ones = jnp.ones((size, height, width), jnp.int32)
    return {"images": images, "segmentation": classes * ones, "normal": normal * ones[..., None]}


def parameter_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_parameter_count(build) -> int:
    """The parameters of the module ``build()`` makes, counted without allocating them."""
    return parameter_count(nnx.state(nnx.eval_shape(build), nnx.Param))


@pytest.fixture(scope="module")
def setup():
    model = MTAN(TINY, nnx.Rngs(0))
    optimizer = optax.sgd(0.1)
    graphdef, state = train.split_model(model, optimizer)
    return graphdef, optimizer, state


@pytest.fixture(scope="module")
def ew_step(setup):
    """The jitted EW step, shared by the task-independence and the training tests."""
    graphdef, optimizer, _ = setup
    return jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, make("ew")))


def test_config_is_validated():
    with pytest.raises(ValueError, match="compute_dtype"):
        MTANConfig(compute_dtype="float16")
    with pytest.raises(ValueError, match="distinct"):
        MTANConfig(tasks=(("depth", 1), ("depth", 1)))
    with pytest.raises(ValueError, match="tasks"):
        MTANConfig(tasks=())
    with pytest.raises(ValueError, match="aspp_rates"):
        MTANConfig(aspp_rates=(0,))
    with pytest.raises(ValueError, match="head_channels must be >= 1"):
        MTANConfig(head_channels=0)
    with pytest.raises(ValueError, match="output channels >= 1"):
        MTANConfig(tasks=(("depth", 0),))


def test_output_shapes_dtypes_and_unit_normals(setup):
    graphdef, _, state = setup

    @jax.jit
    def forward(state, images):
        model = nnx.merge(graphdef, *state.params, state.batch_stats, state.rest)
        model.eval()
        return model(images), model.backbone(images)

    # 20×28 gives odd maps (5×7 at stride 4, 3×4 at stride 8): the attention's pooling must round up as the ResNet.
    images = jax.random.uniform(jax.random.key(0), (2, 20, 28, 3), jnp.float32)
    (predictions, aux), (c1, _, _, c4) = forward(state, images)
    for name, channels in TINY.tasks:
        assert predictions[name].shape == (2, 20, 28, channels) and predictions[name].dtype == jnp.float32
        assert aux["attended"][name].shape == (2, 3, 4, 64) and aux["attended"][name].dtype == jnp.float32
    norms = np.asarray(jnp.linalg.norm(predictions["normal"], axis=-1))
    # Unit length, except where a tiny random head outputs exactly 0 (ReLU-dead inputs): 0 stays 0.
    assert np.all(np.isclose(norms, 1.0, rtol=1e-5) | (norms == 0)) and np.mean(norms > 0) > 0.5
    # The attention pass re-runs the backbone block by block: its features are the backbone's.
    np.testing.assert_allclose(aux["features"], c4, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux["low_level"], c1, rtol=1e-6, atol=1e-6)


def test_aux_holds_the_stage_outputs_and_each_tasks_attended_map(setup, monkeypatch):
    """``features`` and ``low_level`` are the last and the first stage's output p, not its penultimate block's u, and
    ``attended[t]`` is task t's branch on the stages. The tiny backbone's stages have one block each, so u is p there:
    stand-in stages with u ≠ p are fed instead (eval mode: no dropout, running statistics)."""
    graphdef, _, state = setup
    images = jnp.zeros((1, 16, 16, 3), jnp.float32)
    model = nnx.merge(graphdef, *state.params, state.batch_stats, state.rest)
    model.eval()  # the shapes only: no statistics updated
    rng = np.random.default_rng(3)
    stages = [tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in pair)
              for pair in jax.eval_shape(model.shared_stages, images)]
    monkeypatch.setattr(MTAN, "shared_stages", lambda self, images: stages)

    @jax.jit
    def forward(state, stages):
        model = nnx.merge(graphdef, *state.params, state.batch_stats, state.rest)
        model.eval()
        return model(images)[1], {name: model.heads[name].attend(stages, model.transitions) for name in TASKS}

    aux, attended = forward(state, stages)
    np.testing.assert_array_equal(aux["features"], stages[-1][1])
    np.testing.assert_array_equal(aux["low_level"], stages[0][1])
    for name in TASKS:
        np.testing.assert_allclose(aux["attended"][name], attended[name], rtol=1e-6, atol=1e-6)


def labelled_for(task: str, batch: dict) -> dict:
    """``batch`` with every other task's labels removed (segmentation -1, normals 0): their losses are then
    constants (0 and 1, every pixel masked), whose gradients are exactly 0."""
    unlabelled = {"segmentation": lambda labels: jnp.full_like(labels, -1), "normal": jnp.zeros_like}
    return {name: value if name in ("images", task) else unlabelled[name](value) for name, value in batch.items()}


def moved(new, old) -> list[bool]:
    """Per leaf of two parameter trees, whether any entry changed."""
    return [bool(jnp.any(n != o)) for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old))]


def test_attention_pooling_rounds_odd_sizes_up_with_windows_starting_at_even_rows():
    """``_pool_to`` pads an odd map at the end (bottom, right): output pixel i is the max over rows and columns
    2i and 2i + 1, those that exist, the rows a stride-2 ResNet stage samples (its kernel centres sit at 2i). Padding
    at the start would shift every window by one. Numpy reference, exact (a max)."""
    from deep.mtan import _pool_to

    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
    expected = padded.reshape(2, 3, 2, 4, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(_pool_to(jnp.asarray(x), (3, 4)), expected)
    # One side odd, the other even (5×6): only the odd side is padded.
    np.testing.assert_array_equal(_pool_to(jnp.asarray(x[:, :, :6]), (3, 3)), expected[:, :, :3])
    # A size the map cannot reach (smaller on one side already) is refused at once, naming the map as given, not
    # after pooling the other side towards it.
    with pytest.raises(ValueError, match="cannot pool a 5×7 map to 6×4$"):
        _pool_to(jnp.asarray(x), (6, 4))


def test_a_task_reads_no_other_tasks_parameters(setup, ew_step):
    """Plain SGD moves a parameter by exactly −η × its gradient, so a step on a batch labelled for task t alone
    leaves task s's attention masks and head bit for bit where they were when ∂L_t/∂θ_s is exactly 0, while task
    t's own parameters and the shared transition blocks move."""
    _, _, state = setup
    balancer_state = make("ew").init(len(TASKS))
    for task in TASKS:
        new_state, _, metrics = ew_step(state, balancer_state, labelled_for(task, make_batch()), jax.random.key(0))
        assert bool(metrics["finite"])
        for source in TASKS:
            changed = moved(new_state.params[1]["heads"][source], state.params[1]["heads"][source])
            if source == task:
                assert any(changed), task
            else:
                assert not any(changed), (task, source)
        assert any(moved(new_state.params[0]["transitions"], state.params[0]["transitions"])), task


def test_the_jacobian_step_equals_the_pull_back_of_all_losses_through_the_whole_model(setup):
    """``task_jacobian_step`` runs the backbone once and each task's branch alone, each from the states the one
    before left: the transitions' gradients come from each branch's own pass, and their BatchNorm statistics are
    updated once per task, in order. It must give what one train-mode pass of the whole model, its K losses pulled
    back together, gives: the same losses (each branch's own dropout mask), Jacobian, head gradients and states."""
    graphdef, _, state = setup
    batch = make_batch()
    got = jax.jit(functools.partial(train.task_jacobian_step, graphdef))(state, batch)
    expected = whole_model_jacobian(graphdef, state, batch, TINY.tasks)
    # 10⁻⁴: the attention masks' BatchNorm normalises over 8 values at stage 4 (2 images of 2×2), which amplifies
    # rounding (up to 5·10⁻⁵ of a leaf's largest gradient seen); an error of the method is of order 1.
    assert_same_jacobian_step(got, expected, 1e-4)
    # The transitions' columns again, at their own scale: their gradients come from the branches' own passes.
    in_transitions = ravel_pytree(jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full(leaf.shape, "transitions" in jax.tree_util.keystr(path)), state.params[0]))[0]
    columns = np.asarray(in_transitions, bool)
    wanted = np.asarray(expected[1])[:, columns]
    assert all(np.any(row != 0) for row in wanted)  # every task's loss reaches them
    np.testing.assert_allclose(np.asarray(got[1])[:, columns], wanted, rtol=0, atol=1e-4 * np.abs(wanted).max())


def test_representation_gradients_refuse_mtan(setup):
    """GradDrop balances gradients of the representation, which would leave out the transitions' own gradients."""
    graphdef, _, state = setup
    # Refused while tracing, as under the step's jit: traced abstractly, nothing runs or compiles.
    with pytest.raises(ValueError, match="need the dual-stream model"):
        jax.eval_shape(lambda state, batch: train.representation_jacobian_step(graphdef, state, batch), state,
                       make_batch())


def test_split_puts_every_task_parameter_under_heads(setup):
    graphdef, _, state = setup
    shared, heads = state.params
    model = nnx.merge(graphdef, *state.params, state.batch_stats, state.rest)
    attention = sum(parameter_count(nnx.state(m, nnx.Param)) for _, m in nnx.iter_graph(model)
                    if isinstance(m, AttentionMask))
    # The attention masks of K tasks, counted by hand: stage widths C = 8, 16, 32, 64, hidden C/4; stage 1 reads
    # C channels, later stages 2C; each mask is two 1×1 convolutions with bias and two BatchNorms (scale, bias).
    per_task = sum((c if j == 0 else 2 * c) * (c // 4) + c // 4 + 2 * (c // 4) + (c // 4) * c + c + 2 * c
                   for j, c in enumerate((8, 16, 32, 64)))
    assert attention == len(TASKS) * per_task == 2 * 4_514
    aspp = sum(abstract_parameter_count(lambda c=channels: ASPPHead(64, c, nnx.Rngs(0), channels=4, rates=(1,)))
               for _, channels in TINY.tasks)
    assert parameter_count(heads) == attention + aspp
    # The shared part is the backbone plus the shared transition blocks, and no attention mask.
    backbone = abstract_parameter_count(lambda: ResNet(TINY.backbone, nnx.Rngs(0)))
    transitions = parameter_count(nnx.state(model.transitions, nnx.Param))
    assert parameter_count(shared) == backbone + transitions
    shared_paths = [path for path, _ in nnx.to_flat_state(shared)]
    assert {path[0] for path in shared_paths} == {"backbone", "transitions"}
    assert not any("attention" in path for path in shared_paths)


def test_bfloat16_computes_in_bfloat16_and_returns_float32():
    config = MTANConfig(backbone=TINY.backbone, tasks=TINY.tasks, head_channels=4, aspp_rates=(1,),
                        compute_dtype="bfloat16")
    model = nnx.eval_shape(lambda: MTAN(config, nnx.Rngs(0)))
    convolutions = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Conv)]
    assert convolutions and all(conv.dtype == jnp.bfloat16 for conv in convolutions)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    graphdef, state = nnx.split(model)
    predictions, aux = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                      jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((predictions, aux)))


@pytest.mark.parametrize("method", ["ew", "pcgrad"])
def test_balanced_steps_lower_the_loss_on_one_batch(setup, ew_step, method):
    """EW weighs the losses (one backward pass); PCGrad projects the per-task Jacobian of the shared parameters
    (``task_jacobian_step`` + ``apply_gradients``), each head taking its own task's gradient."""
    graphdef, optimizer, state = setup
    balancer = make(method)
    step = ew_step if method == "ew" else jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, balancer))
    balancer_state = balancer.init(len(TASKS))
    batch = make_batch()
    history = []
    for key in jax.random.split(jax.random.key(0), 8):
        state, balancer_state, metrics = step(state, balancer_state, batch, key)
        assert bool(metrics["finite"]) and set(TASKS) <= set(metrics)
        history.append(float(metrics["loss"]))
    # Train-mode losses carry the heads' dropout noise: ask for a clear drop (3.17 -> 2.15 with EW), not a monotone one.
    assert history[-1] < 0.8 * history[0], history


def test_full_size_parameter_count():
    """ResNet-50 without fc 23,508,032; the shared transitions (bottlenecks 256→512, 512→1024, 1024→2048 with a
    projection) 379,392 + 1,512,448 + 6,039,552; per task the attention masks 33,728 + 198,528 + 790,272 +
    3,153,408 = 4,175,936 and the ASPP head 16,125,440 + 257·C (C = 13, 1, 3)."""
    model = nnx.eval_shape(lambda: MTAN(MTANConfig(), nnx.Rngs(0)))
    _, shared, heads, _ = nnx.split(model, train.SHARED, train.HEADS, ...)
    shared_count, heads_count = parameter_count(shared), parameter_count(heads)
    message = f"shared {shared_count:,}, heads {heads_count:,}, total {shared_count + heads_count:,}"
    assert shared_count == 23_508_032 + 379_392 + 1_512_448 + 6_039_552 == 31_439_424, message
    assert heads_count == 3 * (4_175_936 + 16_125_440) + 257 * (13 + 1 + 3) == 60_908_497, message
    assert shared_count + heads_count == 92_347_921, message


def test_mtan_refuses_a_basic_block_backbone():
    from deep.backbone import RESNET18

    with pytest.raises(ValueError, match="built for a bottleneck ResNet .*got backbone block 'basic'"):
        MTANConfig(backbone=RESNET18)

"""The pieces of a training run: the representation path of the baselines, CORE-MTL's stage schedule,
checkpoints. (Each kind of baseline step trains end to end in tests/test_train_nyuv2.py and tests/test_deep_mtan.py.)"""

import dataclasses
import errno
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deep import losses, train, trainer
from deep.checkpoint import CheckpointMismatch, Checkpoints, _looks_damaged
from deep.model import DualStreamModel, ModelConfig
from test_deep_model import abstract_model, output_shapes
from test_deep_train import TINY, _DualStreamStandIn, comparable_leaves, copied, make_batch
from theory.balancing import make

PLAIN = ModelConfig(**{**TINY.__dict__, "grounding": "none"})
STAGE_ZERO = trainer.EpochControls(train_tasks=False, independence_weight=0.0, counterfactual_probability=0.0)


@pytest.fixture(scope="module")
def plain_setup():
    optimizer = train.make_optimizer(train.OptimConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1000))
    graphdef, state = train.split_model(DualStreamModel(PLAIN, nnx.Rngs(0)), optimizer)
    return graphdef, optimizer, state


@pytest.fixture(scope="module")
def core_training_step(plain_setup):
    """The script's CORE-MTL step (``trainer.make_step``: jitted, donating the state it is given) on the plain
    model, compiled once for the tests that take steps with it; they pass copies of the module's state."""
    graphdef, optimizer, _ = plain_setup
    _, step = trainer.make_step("core", graphdef, optimizer, losses.PRESETS["nyuv2"])
    return step


def test_the_representation_path_pulls_back_to_the_parameter_gradient(plain_setup):
    """GradDrop with leak 1 keeps every gradient: its representation direction, pulled back through the encoder,
    must be the gradient of the summed task losses with respect to the shared parameters."""
    graphdef, _, state = plain_setup

    @jax.jit
    def both_paths(state, batch):
        losses_k, jacobian, pull_back, head_grads, _, _ = train.representation_jacobian_step(graphdef, state, batch)
        direction, _, _ = make("graddrop", leak=1.0).step(jacobian, losses_k, (), jax.random.key(0))
        expected_losses, parameter_jacobian, expected_heads, _, _ = train.task_jacobian_step(graphdef, state, batch)
        return (losses_k, pull_back(direction), head_grads), (expected_losses, parameter_jacobian.sum(axis=0),
                                                              expected_heads)

    (losses_k, pulled, head_grads), (expected_losses, summed, expected_heads) = both_paths(state, make_batch())
    np.testing.assert_allclose(losses_k, expected_losses, rtol=1e-6)
    assert float(jnp.linalg.norm(pulled - summed)) < 1e-4 * float(jnp.linalg.norm(summed))
    for a, b in zip(jax.tree.leaves(head_grads), jax.tree.leaves(expected_heads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_stage_zero_freezes_the_heads_and_trains_the_rest(plain_setup, core_training_step):
    _, _, state = plain_setup
    new_state, _, metrics = core_training_step(copied(state), (), make_batch(), jax.random.key(0), STAGE_ZERO)
    assert bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(new_state.params[1]), jax.tree.leaves(state.params[1])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state.params[0]),
                                                        jax.tree.leaves(state.params[0])))


def test_the_heads_start_adam_afresh_when_the_tasks_start(plain_setup, core_training_step):
    """PyTorch keeps no Adam state for frozen heads, so their first update in stage 1 is a first Adam step:
    bias-corrected, about lr per weight (whatever the gradient's scale). The heads' group must stay untouched
    through stage 0 while the shared group counts its steps."""
    _, _, state = plain_setup
    heads_adam = lambda s: s.opt_state[1].inner_states["heads"]
    shared_adam = lambda s: s.opt_state[1].inner_states["shared"]
    frozen = copied(state)
    for i in range(3):
        frozen, _, metrics = core_training_step(frozen, (), make_batch(), jax.random.key(i), STAGE_ZERO)
        assert bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(heads_adam(frozen)), jax.tree.leaves(heads_adam(state))):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(shared_adam(frozen)),
                                                        jax.tree.leaves(shared_adam(state))))
    stage_one = dataclasses.replace(STAGE_ZERO, train_tasks=True)
    trained, _, _ = core_training_step(copied(frozen), (), make_batch(), jax.random.key(9), stage_one)
    learning_rate = float(train.learning_rate_at(
        train.OptimConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1000), 3))
    moves = np.concatenate([np.abs(np.ravel(a - b)) for a, b in zip(jax.tree.leaves(trained.params[1]),
                                                                    jax.tree.leaves(frozen.params[1]))])
    assert moves.max() <= learning_rate * (1 + 1e-5)
    assert np.median(moves) == pytest.approx(learning_rate, rel=1e-3)


def test_frozen_heads_do_not_count_in_the_clipping_norm(plain_setup):
    """In stage 0 PyTorch gives the frozen heads no gradient, so its global-norm clipping sees the shared
    parameters' alone, although the edge term reaches the encoder through the depth head. With plain SGD behind an
    always-active clip the shared update shows which norm was used."""
    import optax

    graphdef, _, state = plain_setup
    clip = 5.0
    optimizer = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(1.0))
    state = state._replace(opt_state=optimizer.init(state.params))
    weights, batch = losses.PRESETS["nyuv2"], make_batch()
    assert weights.edge > 0
    new_state, _ = jax.jit(functools.partial(train.core_step, graphdef, optimizer, weights=weights))(
        state, batch, jax.random.key(0), independence_weight=0.0, train_tasks=False)
    grads = jax.jit(lambda params: jax.grad(train.core_objective, argnums=1, has_aux=True)(
        graphdef, params, state.batch_stats, state.rest, batch, jax.random.key(0), weights, 0.0, False, 0.0)[0])(
        state.params)
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(tree))))
    head_norm, shared_norm = norm(grads[1]), norm(grads[0])
    # The edge term's gradient reaches the depth head: counting it would shrink the update by this much (1.6e-4
    # here), five times the tolerance of the comparison below.
    assert np.hypot(1.0, head_norm / shared_norm) - 1 > 5 * 2e-5 and shared_norm > clip
    # Plain SGD at rate 1 behind the clip: the shared update's norm is the clip itself when the heads are left out.
    moved = norm(jax.tree.map(lambda new, old: new - old, new_state.params[0], state.params[0]))
    assert moved == pytest.approx(clip, rel=2e-5)


def test_the_stage_schedule_follows_the_authors_configs():
    nyu = losses.PRESETS["nyuv2"]  # stage 0: 5 epochs, stage 1: none, CKA ramp over 10, CFA from epoch 20
    at = lambda epoch, weights=nyu: trainer.EpochControls.at(weights, epoch)
    assert at(0) == trainer.EpochControls(False, 0.0, 0.0) and not at(4).train_tasks
    assert at(5).train_tasks and at(5).independence_weight == 0.0 and at(5).counterfactual_probability == 0
    assert at(10).independence_weight == pytest.approx(0.5) and at(15).independence_weight == pytest.approx(1.0)
    assert at(19).counterfactual_probability == 0 and at(20).counterfactual_probability == 0.5
    assert at(20, dataclasses.replace(nyu, counterfactual=0.0)).counterfactual_probability == 0  # no weight: no pass
    cityscapes = losses.PRESETS["cityscapes"]  # stage 0: 10 epochs, stage 1: 5 epochs (tasks, no CKA)
    assert at(12, cityscapes).train_tasks and at(12, cityscapes).independence_weight == 0.0
    assert at(15, cityscapes).independence_weight == pytest.approx(0.25)


def test_the_counterfactual_coin_flips_are_fair_reproducible_and_apart_from_the_loaders_stream():
    """The host's draw of which steps run the counterfactual pass: a fair coin of the epoch's probability (within
    4 standard errors over 20,000 steps), the same for the same seed and step (a resumed run draws what the
    uninterrupted one drew), another sequence for another seed, and never before the pass's start epoch."""
    opened, closed = trainer.EpochControls.at(losses.PRESETS["nyuv2"], 20), trainer.EpochControls.at(
        losses.PRESETS["nyuv2"], 19)
    steps = 20_000
    flips = np.array([opened.counterfactual_at(2024, step) for step in range(steps)])
    standard_error = np.sqrt(0.5 * 0.5 / steps)
    assert abs(flips.mean() - 0.5) < 4 * standard_error, flips.mean()
    assert [opened.counterfactual_at(2024, step) for step in range(13_000, 13_100)] == list(flips[13_000:13_100])
    other_seed = np.array([opened.counterfactual_at(7, step) for step in range(1000)])
    assert 0.4 < np.mean(other_seed == flips[:1000]) < 0.6  # independent sequences agree half the time
    # The loader shuffles epoch e with default_rng((seed, e)); the same numbers must not decide the flips.
    loaders_first = np.array([np.random.default_rng((2024, e)).random() < 0.5 for e in range(1000)])
    assert 0.4 < np.mean(loaders_first == flips[:1000]) < 0.6
    assert not any(closed.counterfactual_at(2024, step) for step in range(1000))
    always = dataclasses.replace(opened, counterfactual_probability=1.0)
    assert all(always.counterfactual_at(2024, step) for step in range(1000))


def test_the_scripts_core_step_refuses_to_guess_whether_the_pass_runs(plain_setup, core_training_step):
    """Left out, the flag would silently skip the counterfactual pass in an epoch that runs it; it is refused there
    (before anything is compiled) and means False where the epoch never runs the pass."""
    _, _, state = plain_setup
    stage_two = trainer.EpochControls.at(losses.PRESETS["nyuv2"], 20)
    with pytest.raises(ValueError, match="pass counterfactual=controls.counterfactual_at"):
        core_training_step(state, (), make_batch(), jax.random.key(0), stage_two)


def test_model_configs_for_each_method():
    assert trainer.model_config("nyuv2", "tiny", "core").grounding == "hard"
    assert trainer.model_config("nyuv2", "tiny", "pcgrad").grounding == "none"
    assert trainer.model_config("cityscapes", "tiny", "ew").tasks == (("segmentation", 7), ("depth", 1))
    assert trainer.model_config("nyuv2", "tiny", "stl", task="depth").tasks == (("depth", 1),)
    with pytest.raises(ValueError, match="--task must be one of segmentation, depth, normal"):
        trainer.model_config("nyuv2", "tiny", "stl", task="albedo")
    paper, authors = (trainer.model_config("gta5", "tiny", "core", variant=v) for v in ("paper", "authors"))
    assert (paper.fusion, paper.head, paper.heads_read) == ("c4", "aspp", "semantic")
    assert (authors.fusion, authors.head, authors.heads_read) == ("multiscale", "deeplabv3plus", "semantic+backbone")
    assert trainer.model_config("nyuv2", "tiny", "ew", heads_read="semantic+backbone").heads_read == "semantic+backbone"
    with pytest.raises(ValueError, match="heads_read"):  # the authors' heads read the fused features
        trainer.model_config("nyuv2", "tiny", "core", heads_read="semantic", variant="authors")
    full, wide = (trainer.model_config("gta5", "full", "core", semantic_channels=s, residual_channels=r)
                  for s, r in ((0, 0), (1024, 64)))
    assert (full.semantic_channels, full.residual_channels, wide.semantic_channels, wide.residual_channels) == (
        512, 256, 1024, 64)  # the paper's streams, and the authors' GTA5 ones
    tiny = trainer.model_config("nyuv2", "tiny", "core", semantic_channels=5)
    assert (tiny.semantic_channels, tiny.residual_channels) == (5, 3)
    images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    _, aux = output_shapes(abstract_model(tiny), lambda m, x: m(x), images)
    assert aux["semantic_map"].shape[-1] == 5 and aux["residual_code"].shape[-1] == 3


def _names(directory):
    """The entries of ``directory`` but hidden ones (Orbax's temporaries)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_checkpoints_round_trip_keep_the_newest_and_survive_a_half_written_one(tmp_path):
    optimizer = train.make_optimizer(train.OptimConfig())
    _, state = train.split_model(DualStreamModel(TINY, nnx.Rngs(0)), optimizer)
    checkpoints = Checkpoints(tmp_path / "run", keep=2)
    assert checkpoints.latest_epoch() is None
    tree = {"state": state, "balancer": {"w": jnp.arange(3.0)}, "key": jax.random.key(7)}
    for epoch in (1, 2, 3):
        checkpoints.save(epoch, tree)
    assert checkpoints.latest_epoch() == 3
    assert _names(tmp_path / "run") == ["2", "3"]
    # A save killed half-way leaves only a temporary folder, which is not a checkpoint.
    (tmp_path / "run" / "4.orbax-checkpoint-tmp-0").mkdir()
    with Checkpoints(tmp_path / "run") as other:
        assert other.latest_epoch() == 3
    restored = checkpoints.restore(3, tree)
    assert isinstance(restored["state"], train.TrainState)
    for a, b in zip(comparable_leaves(restored), comparable_leaves(tree)):
        np.testing.assert_array_equal(a, b)
    # A checkpoint of another structure (an older optimiser state, say) is refused in one line.
    with pytest.raises(ValueError, match="does not match this model and optimiser") as refused:
        checkpoints.restore(3, {**tree, "balancer": {"w": jnp.arange(3.0), "v": jnp.zeros(2)}})
    assert "\n" not in str(refused.value)
    checkpoints.close()


def test_an_asynchronous_save_owns_its_copy_of_the_arrays(tmp_path):
    """A save returns while Orbax still writes, and the training step then donates (deletes) the arrays it saved:
    what lands on disk must be the values at the save. Large arrays, so that the write is still under way."""
    tree = {"weights": [jnp.full((1024, 1024), float(i)) for i in range(16)], "key": jax.random.key(3)}
    expected = comparable_leaves(tree)
    with Checkpoints(tmp_path / "run") as checkpoints:
        checkpoints.save(1, tree)
        for leaf in jax.tree.leaves(tree):
            leaf.delete()  # as a donated buffer is
        template = {"weights": [jnp.zeros((1024, 1024))] * 16, "key": jax.random.key(0)}
        assert checkpoints.latest_epoch() == 1
        restored = checkpoints.restore(1, template)
    for a, b in zip(comparable_leaves(restored), expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_evaluation_returns_only_the_predictions_and_runs_no_grounding_decoder(plain_setup):
    """A grounded model's evaluation costs what the same model without decoders costs: only the predictions leave
    the call, so the decoders are never computed (XLA's FLOP count of the lowered call)."""
    plain_graphdef, optimizer, plain_state = plain_setup
    assert TINY.grounding == "hard"
    graphdef, state = train.split_model(DualStreamModel(TINY, nnx.Rngs(0)), optimizer)
    images = make_batch()["images"]

    def flops(graphdef, state):
        cost = trainer.predict_function(graphdef).trace(state, images).lower().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert flops(graphdef, state) == flops(plain_graphdef, plain_state) > 0
    predictions = trainer.predict_function(graphdef)(state, images)
    assert set(predictions) == {name for name, _ in TINY.tasks}
    assert all(value.shape[:3] == images.shape[:3] for value in predictions.values())


def test_a_last_batch_filled_with_ignored_labels_changes_no_metric_and_compiles_nothing_more(plain_setup):
    """Evaluation's last batch (6 = 4 + 2 examples) filled up with ignored labels and black images: the metrics of
    the split are those of the plain pass, and the prediction is compiled for one batch shape instead of two."""
    from deep.data import Loader, nyuv2_arrays
    from deep.metrics import IGNORED_LABELS

    graphdef, _, state = plain_setup
    split = nyuv2_arrays(6, 16, 16, seed=3)
    results, shapes = [], []
    for fill_last in (None, {name: value for name, value in IGNORED_LABELS.items() if name in split}):
        predict = trainer.predict_function(graphdef)
        loader = Loader(split, 4, seed=0, shuffle=False, drop_last=False, fill_last=fill_last)
        results.append(trainer.evaluate(predict, state, loader.epoch(0), TINY.tasks))
        shapes.append(predict._cache_size())
    assert shapes == [2, 1]
    assert set(results[0]) == set(results[1])
    for name, value in results[0].items():
        np.testing.assert_allclose(results[1][name], value, rtol=1e-6, err_msg=name)


def test_one_behind_yields_each_item_once_the_next_is_produced_and_the_last_at_the_end():
    produced = []

    def items():
        for i in range(3):
            produced.append(i)
            yield i

    assert [(item, list(produced)) for item in trainer.one_behind(items())] == [
        (0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
    assert list(trainer.one_behind([])) == []


def recording_brightness_model():
    """A stub predictor, depth = each pixel's mean brightness, and the list of the image batches it was shown."""
    seen = []

    def predict(state, batch_images):
        seen.append(np.asarray(batch_images))
        return {"depth": jnp.mean(batch_images, axis=-1, keepdims=True)}

    return predict, seen


def test_evaluate_corrupted_scores_corrupted_images_against_clean_labels_with_one_noise_per_corruption():
    """A stub model that predicts depth = mean brightness records what it was shown: the corrupted images, each
    severity of a corruption the same noise at another strength, the labels untouched."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.3, 0.7, (6, 8, 8, 3)).astype(np.float32)  # no clipping at severities 1 and 2
    depth = rng.uniform(1.0, 2.0, (6, 8, 8, 1)).astype(np.float32)
    batches = lambda: ({"images": images[i:i + 3], "depth": depth[i:i + 3]} for i in (0, 3))
    predict, seen = recording_brightness_model()
    passes = []
    results = trainer.evaluate_corrupted(predict, None, batches, (("depth", 1),), ("gaussian_noise", "contrast"),
                                         (1, 2), jax.random.key(0), progress=lambda: passes.append(1))
    assert set(results) == {"gaussian_noise", "contrast"} and set(results["contrast"]) == {"1", "2"}
    assert len(passes) == 4 and len(seen) == 8  # 2 corruptions x 2 severities x 2 batches
    # Gaussian noise x + c * eps with c = .08, .12: the same eps at both severities, batch by batch.
    for index, clean in ((0, images[:3]), (1, images[3:])):
        np.testing.assert_allclose((seen[index] - clean) / 0.08, (seen[index + 2] - clean) / 0.12, atol=1e-4)
    assert not np.allclose(seen[0] - images[:3], seen[1] - images[3:])  # each batch its own noise
    # The metrics are those of the corrupted predictions against the clean depth, over the whole split.
    corrupted_predictions = np.concatenate([seen[4], seen[5]]).mean(-1, keepdims=True)  # contrast, severity 1
    assert not np.allclose(seen[4], images[:3])
    np.testing.assert_allclose(results["contrast"]["1"]["depth/abs_err"],
                               np.mean(np.abs(corrupted_predictions - depth)), rtol=1e-5)


def _restore_latest(directory, tree):
    with Checkpoints(directory) as checkpoints:
        return checkpoints.restore_latest(tree)


def _save(directory, epoch, tree) -> int:
    """Saves (keeping two) and returns the newest epoch on disk."""
    with Checkpoints(directory, keep=2) as checkpoints:
        checkpoints.save(epoch, tree)
        return checkpoints.latest_epoch()


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path):
    """Orbax never leaves a partial checkpoint, but a disk can damage one: resuming then takes the newest readable
    checkpoint, renames the damaged one out of the run's way, and says so; with none readable it refuses in one
    line and renames nothing."""
    tree = {"w": jnp.arange(1000.0), "b": jnp.ones(3)}
    assert _restore_latest(tmp_path / "run", tree) == (None, None, [])
    for epoch in (1, 2):
        _save(tmp_path / "run", epoch, jax.tree.map(lambda leaf: leaf * epoch, tree))

    def damage(epoch):
        for path in (tmp_path / "run" / str(epoch)).rglob("*"):
            if path.is_file() and "METADATA" not in path.name and path.stat().st_size > 0:
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])

    damage(2)
    epoch, restored, set_aside = _restore_latest(tmp_path / "run", tree)
    assert epoch == 1 and len(set_aside) == 1 and set_aside[0].startswith("epoch 2: ")
    np.testing.assert_array_equal(restored["w"], tree["w"])
    assert _names(tmp_path / "run") == ["1", "2.unreadable"]
    assert _save(tmp_path / "run", 2, tree) == 2  # the run goes on where the damaged checkpoint was
    damage(2)  # damaged again: set aside beside the first
    assert _restore_latest(tmp_path / "run", tree)[0] == 1
    assert _names(tmp_path / "run") == ["1", "2.unreadable", "2.unreadable.2"]
    _save(tmp_path / "run", 2, tree)
    damage(1), damage(2)
    with pytest.raises(ValueError, match="no checkpoint in .* can be read; the newest \\(epoch 2\\)") as refused:
        _restore_latest(tmp_path / "run", tree)
    assert "\n" not in str(refused.value)
    assert _names(tmp_path / "run") == ["1", "2", "2.unreadable", "2.unreadable.2"]


def test_a_restore_failing_for_another_reason_renames_nothing(tmp_path, monkeypatch):
    """Out of memory, say: nothing says the checkpoint is bad, so it stays where it is and the error propagates."""
    tree = {"w": jnp.arange(4.0)}
    _save(tmp_path / "run", 1, tree)

    def out_of_memory(self, epoch, template):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory")

    monkeypatch.setattr(Checkpoints, "restore", out_of_memory)
    with pytest.raises(MemoryError):
        _restore_latest(tmp_path / "run", tree)
    assert _names(tmp_path / "run") == ["1"]


def test_a_training_step_consumes_its_state(plain_setup, core_training_step):
    """The script's steps donate the state they are given, so XLA can write the new state into those buffers: the
    arrays passed in are deleted, the ones returned are new. (A balancer's state too: tests/test_deep_baselines.py.)"""
    _, _, state = plain_setup
    given = copied(state)
    new_state, _, metrics = core_training_step(given, (), make_batch(), jax.random.key(0), STAGE_ZERO)
    assert bool(metrics["finite"])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(given))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


def test_stream_shift_is_each_streams_relative_change_over_the_images_asked_for(plain_setup):
    """The stream probe against the streams computed here: per image ‖z(x) - z(x')‖ / ‖z(x)‖ of the semantic map and
    the residual code (eval mode), averaged over the first ``count`` images only (the last batch's filler rows are
    not images of the split); the same images twice move nothing."""
    graphdef, _, state = plain_setup
    first, second = make_batch(seed=3)["images"], make_batch(seed=4)["images"]
    restyled = [jnp.clip(first * 0.6 + 0.2, 0, 1), jnp.clip(second[:, :, ::-1] * 1.3, 0, 1)]
    count = 6  # two of the second batch's four rows are filler
    shift = trainer.stream_shift(graphdef, state, zip([first, second], restyled), count)

    model = trainer.eval_model(graphdef, state)
    expected = {"semantic": [], "residual": []}
    for images, other in zip([first, second], restyled):
        before, after = model.encode(images), model.encode(other)
        for name, key in (("semantic", "semantic_map"), ("residual", "residual_code")):
            a, b = np.asarray(before[key], np.float64), np.asarray(after[key], np.float64)
            a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
            expected[name].extend(np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1))
    for name in ("semantic", "residual"):
        values = np.array(expected[name][:count])
        assert shift[name]["n"] == count
        assert shift[name]["mean"] == pytest.approx(values.mean(), rel=1e-5)
        assert shift[name]["standard_error"] == pytest.approx(values.std(ddof=1) / np.sqrt(count), rel=1e-4)
    assert shift["ratio"]["ratio"] == pytest.approx(shift["residual"]["mean"] / shift["semantic"]["mean"])

    still = trainer.stream_shift(graphdef, state, [(first, first)], 4)
    assert still["semantic"]["mean"] == still["residual"]["mean"] == 0.0 and still["ratio"]["ratio"] is None
    with pytest.raises(ValueError, match="the pairs held 4 images, fewer than the 5 asked for"):
        trainer.stream_shift(graphdef, state, [(first, first)], 5)


def test_terms_the_schedule_never_reaches_are_named():
    """An ablation whose run ends before a term starts trains the same model as one without it."""
    cityscapes = losses.PRESETS["cityscapes"]  # stage 0: 10 epochs, stage 1: 5, the counterfactual pass from 20
    assert trainer.unused_terms(cityscapes, 15) == ["the CKA term (independence)",
                                                    "the counterfactual pass (counterfactual)"]
    assert trainer.unused_terms(cityscapes, 17) == ["the counterfactual pass (counterfactual)"]
    assert trainer.unused_terms(cityscapes, 21) == []
    assert trainer.unused_terms(dataclasses.replace(cityscapes, independence=0, counterfactual=0), 12) == []
    # The earliest epochs that train them, by the schedule itself:
    controls = [trainer.EpochControls.at(cityscapes, epoch) for epoch in range(21)]
    assert min(e for e, c in enumerate(controls) if c.independence_weight > 0) == 15
    assert min(e for e, c in enumerate(controls) if c.counterfactual_probability > 0) == 20


def test_a_misspelt_method_or_grounding_and_a_step_without_its_controls_are_refused(plain_setup):
    """A typo in a method's name or (for a baseline, which ignores it) the grounding used to pass; CORE-MTL's step
    without its stage controls failed with an AttributeError; on MTAN it traced the whole forward pass before a
    KeyError. Each now gives one line that says what is allowed."""
    with pytest.raises(ValueError, match=r"method must be core, stl or a balancing method \(ew, .*\); got 'pcgard'"):
        trainer.model_config("nyuv2", "tiny", "pcgard")
    with pytest.raises(ValueError, match="grounding must be one of hard, soft, none; got 'hrad'"):
        trainer.model_config("nyuv2", "tiny", "ew", grounding="hrad")
    graphdef, optimizer, state = plain_setup
    with pytest.raises(ValueError, match="method must be core, stl or a balancing method"):
        trainer.make_step("pcgard", graphdef, optimizer, losses.PRESETS["nyuv2"])
    _, step = trainer.make_step("core", graphdef, optimizer, losses.PRESETS["nyuv2"])
    with pytest.raises(ValueError, match=r"CORE-MTL's step needs the epoch's stage controls, EpochControls.at"):
        step(state, (), make_batch(), jax.random.key(0), None)
    config = trainer.model_config("nyuv2", "tiny", "ew")
    mtan_graphdef, mtan_state = train.split_model(trainer.build_model(config, "mtan", 0), optimizer)
    with pytest.raises(ValueError, match="CORE-MTL's objective needs the dual-stream model .* got MTAN"):
        jax.eval_shape(functools.partial(train.core_step, mtan_graphdef, optimizer, weights=losses.PRESETS["nyuv2"],
                                         independence_weight=0.0), mtan_state, make_batch(), jax.random.key(0))
    with pytest.raises(ValueError, match="no dense-task loss for task 'edges'; there are losses for segmentation, "
                                         "depth, normal"):
        losses.dense_task_loss("edges", jnp.zeros((1, 2, 2, 1)), {"edges": jnp.zeros((1, 2, 2, 1))})
    with pytest.raises(ValueError, match="the batch has no ground truth for task 'normal'; it has depth, images"):
        losses.dense_task_loss("normal", jnp.zeros((1, 2, 2, 3)), {"images": 0, "depth": 0})


def test_stage_zero_leaves_the_task_losses_out_of_the_objective(plain_setup, core_training_step):
    """The authors' stage 0 trains the encoder on the other terms only (here the plain model's edge term; λ_ind is 0
    in STAGE_ZERO): the objective the step minimises, its reported loss, is λ_edge·ℓ_edge, while the task losses
    are still reported. (The stage-0 tests check the heads and the clipping norm, which zeroed head gradients
    satisfy whatever reaches the encoder.)"""
    _, _, state = plain_setup
    weights = losses.PRESETS["nyuv2"]
    _, _, metrics = core_training_step(copied(state), (), make_batch(), jax.random.key(0), STAGE_ZERO)
    assert bool(metrics["finite"]) and min(float(metrics[t]) for t in ("segmentation", "depth", "normal")) > 0
    assert float(metrics["loss"]) == pytest.approx(weights.edge * float(metrics["edge"]), rel=1e-5)


def test_the_counterfactual_pass_waits_for_stage_two_even_when_it_may_start_earlier():
    """Cityscapes-C's preset lets the pass start at epoch 1, but stage 2 begins after stage 0 (10 epochs) and stage
    1 (5): the authors' _switch_stage_freeze runs no pass before epoch 15."""
    weights = losses.PRESETS["cityscapes_c"]
    assert (weights.counterfactual_start_epoch, weights.stage0_epochs, weights.stage1_epochs) == (1, 10, 5)
    probability = lambda epoch: trainer.EpochControls.at(weights, epoch).counterfactual_probability
    assert [probability(epoch) for epoch in (1, 10, 14)] == [0.0, 0.0, 0.0]
    assert probability(15) == weights.counterfactual_probability > 0


def test_the_scripts_core_step_passes_the_epochs_controls(monkeypatch):
    """make_step's CORE-MTL step hands the step what the epoch's controls say (the CKA ramp's weight, whether the
    tasks train), not the preset's full weights. A recording stand-in for core_step shows what arrives, without
    compiling a model."""

    def recording_core_step(graphdef, optimizer, state, batch, key, weights, independence_weight,
                            counterfactual=False, train_tasks=True, perceptual=None):
        return state, {"independence_weight": independence_weight, "train_tasks": train_tasks}

    monkeypatch.setattr(train, "core_step", recording_core_step)
    weights = losses.PRESETS["nyuv2"]  # λ_ind = 1, ramped over 10 epochs after stage 0's 5
    _, step = trainer.make_step("core", None, None, weights)
    for epoch, ramped, tasks in ((0, 0.0, False), (10, 0.5 * weights.independence, True)):
        _, _, seen = step(jnp.zeros(()), (), {"images": jnp.zeros((2, 1))}, jax.random.key(0),
                          trainer.EpochControls.at(weights, epoch))
        assert float(seen["independence_weight"]) == pytest.approx(ramped) and bool(seen["train_tasks"]) == tasks


def test_each_batch_of_a_corrupted_pass_gets_its_own_noise():
    """fold_in(fold_in(key, corruption), i) for batch i: two batches of identical grey images (0.5, so Gaussian
    noise at c = 0.08 never reaches the clipping at 0 or 1) must come back with independent noise, which
    agrees nowhere (two draws of the same noise could still differ somewhere, wherever one was clipped)."""
    images = np.full((6, 8, 8, 3), 0.5, np.float32)
    batches = lambda: ({"images": images[i:i + 3], "depth": np.ones((3, 8, 8, 1), np.float32)} for i in (0, 3))
    predict, seen = recording_brightness_model()
    trainer.evaluate_corrupted(predict, None, batches, (("depth", 1),), ("gaussian_noise",), (1,), jax.random.key(0))
    first, second = seen[0] - 0.5, seen[1] - 0.5
    assert 0 < first.min() + 0.5 and first.max() + 0.5 < 1  # unclipped
    assert np.mean(np.isclose(first, second, rtol=0, atol=1e-6)) < 0.01


def test_a_damaged_checkpoint_is_told_apart_by_its_error_type_or_by_tensorstores_code():
    """restore_latest sets aside a checkpoint whose restore fails with a ValueError (JSON that does not decode, say,
    with no TensorStore code in its words) or with TensorStore's data-loss code under another type; anything else
    (memory) is not damage."""
    try:
        json.loads('{"step": ')
    except ValueError as error:
        undecodable = error
    assert _looks_damaged(undecodable)
    assert _looks_damaged(RuntimeError("DATA_LOSS: Error reading local file /run/2/d/0"))
    # Each of TensorStore's codes on its own, in words that name no read or open: corrupt data, a file gone.
    assert _looks_damaged(RuntimeError("DATA_LOSS: checksum mismatch in /run/2/d/0"))
    assert _looks_damaged(RuntimeError("NOT_FOUND: /run/2/d/manifest.ocdbt"))
    assert not _looks_damaged(MemoryError("RESOURCE_EXHAUSTED: out of memory"))


def test_a_counterfactual_pass_of_probability_zero_is_not_named_unused():
    """unused_terms names terms the schedule starts too late; a counterfactual pass the run's weights give
    probability 0 never runs in any run, by the user's choice, and is not 'unused' by this run's length."""
    never = dataclasses.replace(losses.PRESETS["cityscapes"], counterfactual_probability=0.0)
    assert never.counterfactual > 0
    assert trainer.unused_terms(never, 15) == ["the CKA term (independence)"]
    assert trainer.unused_terms(never, 30) == []


def _truncate_arrays(directory, epoch):
    """Damages the checkpoint of ``epoch`` as a disk might: every data file cut to a third."""
    for path in (directory / str(epoch)).rglob("*"):
        if path.is_file() and "METADATA" not in path.name and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_the_checkpoints_that_restored_past_a_damaged_one_save_that_epoch_again_and_give_typed_keys(tmp_path):
    """The script restores and then saves with one Checkpoints: once the damaged newest is set aside, the same
    object must save that epoch again (Orbax's list of steps reloaded), and what it restored holds the template's
    typed PRNG keys (NNX's dropout streams), not their raw uint32 data."""
    tree = {"w": jnp.arange(1000.0), "key": jax.random.key(5)}
    for epoch in (1, 2):
        _save(tmp_path / "run", epoch, tree)
    _truncate_arrays(tmp_path / "run", 2)
    with Checkpoints(tmp_path / "run", keep=2) as checkpoints:
        epoch, restored, set_aside = checkpoints.restore_latest(tree)
        assert epoch == 1 and len(set_aside) == 1
        assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"]))
        checkpoints.save(2, {**tree, "w": tree["w"] * 2})
        assert checkpoints.latest_epoch() == 2
        np.testing.assert_array_equal(checkpoints.restore(2, tree)["w"], tree["w"] * 2)
    assert _names(tmp_path / "run") == ["1", "2", "2.unreadable"]


def test_every_damaged_checkpoint_is_set_aside_under_a_name_of_its_own(tmp_path):
    """The same epoch damaged three times keeps three copies (.unreadable, .2, .3); with more kept checkpoints, two
    damaged newer ones are both set aside on the way to the readable one."""
    tree = {"w": jnp.arange(1000.0)}
    run = tmp_path / "run"
    _save(run, 1, tree)
    for _ in range(3):
        _save(run, 2, tree)
        _truncate_arrays(run, 2)
        assert _restore_latest(run, tree)[0] == 1
    assert _names(run) == ["1", "2.unreadable", "2.unreadable.2", "2.unreadable.3"]
    three = tmp_path / "three"
    with Checkpoints(three, keep=3) as checkpoints:
        for epoch in (1, 2, 3):
            checkpoints.save(epoch, tree)
    for epoch in (2, 3):
        _truncate_arrays(three, epoch)
    epoch, _, set_aside = _restore_latest(three, tree)
    assert epoch == 1 and [reason.split(":")[0] for reason in set_aside] == ["epoch 3", "epoch 2"]
    assert _names(three) == ["1", "2.unreadable", "3.unreadable"]


def test_a_checkpoint_of_other_shapes_is_a_mismatch_not_damage(tmp_path):
    """Another configuration with the same tree but wider layers: Orbax's words are about a shape, not the tree, and
    it must still be CheckpointMismatch, with nothing set aside as unreadable (as a ValueError would be)."""
    _save(tmp_path / "run", 1, {"w": jnp.arange(3.0)})
    _save(tmp_path / "run", 2, {"w": jnp.arange(3.0)})
    with pytest.raises(CheckpointMismatch, match="checkpoint of epoch 2 .* does not match"):
        _restore_latest(tmp_path / "run", {"w": jnp.arange(4.0)})
    assert _names(tmp_path / "run") == ["1", "2"]


def test_a_save_below_the_newest_epoch_is_written_not_skipped(tmp_path):
    """Orbax skips, silently, a save of a step below its newest unless forced: an epoch saved out of order must still
    land on disk with the values given."""
    with Checkpoints(tmp_path / "run", keep=3) as checkpoints:
        checkpoints.save(1, {"w": jnp.ones(3)})
        checkpoints.save(3, {"w": jnp.ones(3)})
        checkpoints.save(2, {"w": jnp.full(3, 2.0)})
        np.testing.assert_array_equal(checkpoints.restore(2, {"w": jnp.zeros(3)})["w"], [2.0, 2.0, 2.0])
    assert _names(tmp_path / "run") == ["1", "2", "3"]


def test_a_resume_of_another_configuration_an_io_error_and_a_failed_close_are_reported_as_such(tmp_path):
    """A whole checkpoint of another structure: restore_latest's one-line CheckpointMismatch, nothing renamed (it is
    not damage). An I/O error is not damage either. keep=0 (a run that keeps nothing) is refused. A close that fails
    while an error stops the run leaves that error in charge, with the close's as a note."""
    tree = {"w": jnp.arange(4.0)}
    _save(tmp_path / "run", 1, tree)
    with pytest.raises(CheckpointMismatch, match="checkpoint of epoch 1 .* does not match") as refused:
        _restore_latest(tmp_path / "run", {"w": jnp.arange(4.0), "v": jnp.zeros(2)})
    assert "\n" not in str(refused.value) and _names(tmp_path / "run") == ["1"]
    assert not _looks_damaged(OSError(errno.EIO, "Input/output error"))
    with pytest.raises(ValueError, match="keep must be an integer >= 1; got 0"):
        Checkpoints(tmp_path / "none", keep=0)
    checkpoints = Checkpoints(tmp_path / "closing")
    real_close = checkpoints.close

    def failing_close():
        real_close()
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoints.close = failing_close
    with pytest.raises(KeyError, match="the run's own error") as stopped:
        with checkpoints:
            raise KeyError("the run's own error")
    assert any("could not be finished either: OSError" in note for note in stopped.value.__notes__)


def test_sample_panels_are_eval_mode_predictions_and_the_next_images_residual_code():
    """The panels on the dual-stream stand-in (test_deep_train): its prediction is the images through a BatchNorm,
    which in eval mode reads the running statistics 0 and 1 (train mode would normalise by the batch); its
    counterfactual image is ẑ_s + ẑ_r, here the images plus each image's first pixel, and the panel's takes the
    residual code of the image before it in the batch (rolled by one over the batch)."""
    model = _DualStreamStandIn()
    graphdef, state = train.split_model(model, train.make_optimizer(train.OptimConfig()))
    # One channel, as its BatchNorm has.
    images = jnp.asarray(np.random.default_rng(6).normal(2.0, 1.5, size=(3, 2, 2, 1)), jnp.float32)
    panels = trainer.sample_panels(graphdef, state, images)
    assert set(panels) == {"pred/depth", "counterfactual"} and panels["counterfactual"].dtype == np.float32
    x = np.asarray(images, np.float64)
    np.testing.assert_allclose(panels["pred/depth"], x / np.sqrt(1 + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(panels["counterfactual"], x + x[[2, 0, 1], :1, :1, :], rtol=1e-5)
    # A bfloat16 model's panels come back as float32 arrays too (numpy has no bfloat16 of its own to save them).
    halved = trainer.sample_panels(graphdef, state, images.astype(jnp.bfloat16))
    assert {name: value.dtype for name, value in halved.items()} == {name: np.float32 for name in panels}


def test_an_mtan_model_gets_the_configurations_backbone_heads_and_compute_dtype():
    """build_model's MTAN copies what the configuration says (built abstractly: nothing is initialised)."""
    config = dataclasses.replace(trainer.model_config("cityscapes", "tiny", "pcgrad", compute_dtype="bfloat16"),
                                 dilated_conv="space_to_batch")
    mtan = nnx.eval_shape(lambda: trainer.build_model(config, "mtan", 0))
    assert type(mtan).__name__ == "MTAN"
    for field in ("backbone", "tasks", "head_channels", "aspp_rates", "compute_dtype", "dilated_conv"):
        assert getattr(mtan.config, field) == getattr(config, field), field
    assert mtan.config.compute_dtype == "bfloat16" and mtan.config.tasks == (("segmentation", 7), ("depth", 1))
    with pytest.raises(ValueError, match="architecture must be one of shared, mtan; got 'mtl'"):
        trainer.build_model(config, "mtl", 0)
    for name in ("semantic_channels", "residual_channels"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 0 \\(0: the model size's\\); got -1"):
            trainer.model_config("nyuv2", "tiny", "core", **{name: -1})


def test_tensorstores_words_for_missing_or_corrupt_data_are_damage_and_other_failures_are_not():
    """_looks_damaged on the errors TensorStore raises as runtime errors (no ValueError): each of its data-loss and
    unreadable-array wordings marks a damaged checkpoint, to be set aside; running out of memory does not."""
    for words in ("DATA_LOSS: checksum mismatch", "NOT_FOUND: Error opening \"zarr\" driver",
                  "Encountered error while reading array", "Error opening file", "Error reading \"d/0.0\""):
        assert _looks_damaged(RuntimeError(words)), words
    assert not _looks_damaged(RuntimeError("RESOURCE_EXHAUSTED: out of memory while allocating"))


def test_a_synchronous_save_is_on_disk_when_it_returns_and_keys_keep_their_implementation(tmp_path):
    """Checkpoints(asynchronous=False): save returns once the checkpoint is finished on disk (no wait asked for), as
    the checkpoint benchmark's synchronous mode measures. A restored key takes the template's implementation (an
    rbg key here, whose raw data has another shape than the default threefry key's)."""
    tree = {"weights": [jnp.full((512, 512), float(i)) for i in range(8)], "key": jax.random.key(3, impl="rbg")}
    checkpoints = Checkpoints(tmp_path / "run", asynchronous=False)
    checkpoints.save(1, tree)
    assert _names(tmp_path / "run") == ["1"] and (tmp_path / "run" / "1" / "_CHECKPOINT_METADATA").exists()
    restored = checkpoints.restore(1, {**tree, "key": jax.random.key(0, impl="rbg")})
    checkpoints.close()
    assert str(jax.random.key_impl(restored["key"])) == str(jax.random.key_impl(tree["key"]))
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"]))


def test_checkpoints_under_a_relative_folder_are_saved_and_named_by_their_absolute_path(tmp_path, monkeypatch):
    """A run given a relative --out (``runs/a``) keeps its checkpoints there, and the messages name the folder in
    full, wherever the process was started from."""
    monkeypatch.chdir(tmp_path)
    with Checkpoints("runs/a", asynchronous=False) as checkpoints:
        checkpoints.save(1, {"w": jnp.ones(2)})
        assert checkpoints.directory == tmp_path / "runs" / "a" and checkpoints.latest_epoch() == 1
    assert _names(tmp_path / "runs" / "a") == ["1"]


def test_restore_latest_right_after_an_asynchronous_save_finds_that_save(tmp_path):
    """restore_latest waits for a save under way before it lists the checkpoints: right after an asynchronous save
    of large arrays (still being written when save returns), the newest is that save's epoch, not the one before."""
    template = {"w": [jnp.zeros((1024, 1024))] * 8}
    with Checkpoints(tmp_path / "run") as checkpoints:
        checkpoints.save(1, template)
        checkpoints.save(2, {"w": [jnp.ones((1024, 1024))] * 8})
        epoch, restored, set_aside = checkpoints.restore_latest(template)
    assert (epoch, set_aside) == (2, []) and float(restored["w"][0][0, 0]) == 1.0

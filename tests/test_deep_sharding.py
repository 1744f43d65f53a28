"""Data parallelism on CPU devices: the CORE-MTL step and the baselines' steps sharded over four devices give the
update of one device, as do the perceptual term, evaluation and the loader's device-held batches (in subprocesses,
since the device count is fixed when XLA starts); and two processes of two devices build one global batch and state.
The layout rules and the multi-host helpers are checked in this process, on a mesh that repeats its one device."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

from deep import devices
from scripts import USE_GLOO, run_processes, with_cpu_devices

ROOT = Path(__file__).resolve().parents[1]


# The tiny model, a batch of 4 and the mesh of 4 CPU devices, shared by the scripts below, with the comparison of a
# single-device update against the sharded one.
PREAMBLE = textwrap.dedent("""
    import dataclasses, functools, jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from deep import devices, losses, train
    from deep.backbone import BackboneConfig
    from deep.model import DualStreamModel, ModelConfig
    assert len(jax.devices()) == 4, jax.devices()
    backbone = BackboneConfig(depths=(1, 1, 1, 1), width=2)
    config = ModelConfig(backbone=backbone, semantic_channels=6, residual_channels=3, head_channels=4,
                         aspp_rates=(1, 2, 3), grounding="hard", decoder_widths=(4, 4), albedo_seed=2,
                         light_hidden=8, generic_width=8)
    # Plain SGD: Adam's first step is lr * sign(g), which turns rounding noise in tiny gradients into whole steps.
    optimizer = optax.sgd(1e-2)
    keys = jax.random.split(jax.random.key(1), 4)
    normal = jax.random.normal(keys[3], (4, 16, 16, 3))
    batch = {"images": jax.random.uniform(keys[0], (4, 16, 16, 3)),
              "segmentation": jax.random.randint(keys[1], (4, 16, 16), 0, 13),
              "depth": jax.random.uniform(keys[2], (4, 16, 16, 1), minval=0.5),
              "normal": normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)}
    mesh = devices.data_mesh()

    def compiled(step, *args, **static):
        # Ahead of time, under the suite's fast-compile XLA flags (inherited from conftest.py).
        return step.lower(*args, **static).compile()

    def largest_difference(single, sharded, before):
        # The largest difference between the two updated parameters and the largest update; in numpy: eager jnp
        # operations would compile a program per leaf shape and placement.
        pairs = [tuple(map(np.asarray, leaves)) for leaves in zip(*map(jax.tree.leaves, (single, sharded, before)))]
        worst = max(float(np.max(np.abs(a - b))) for a, b, _ in pairs)
        largest_update = max(float(np.max(np.abs(a - p))) for a, _, p in pairs)
        assert largest_update > 0 and worst < 1e-4 * largest_update, (worst, largest_update)
        return worst, largest_update
""")


def run_on_four_devices(script: str, preamble: str = PREAMBLE) -> str:
    """The standard output of ``preamble + script`` run on four CPU devices (``preamble=""``: the script alone)."""
    result = subprocess.run([sys.executable, "-c", preamble + textwrap.dedent(script)], capture_output=True,
                            text=True, cwd=ROOT, env=with_cpu_devices(dict(os.environ), 4), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_sharded_step_equals_the_single_device_step():
    stdout = run_on_four_devices("""
        # CORE-MTL's step with its counterfactual pass on: the residual codes are shuffled across the whole batch,
        # which the sharded step must draw and apply exactly as one device does. (The step without the pass, a
        # program of its own since the flag is static, runs a subset of these operations: compiled once, on one
        # device, to show that the pass is in the update compared.)
        graphdef, state = train.split_model(DualStreamModel(config, nnx.Rngs(0)), optimizer)
        core_step = functools.partial(train.core_step, graphdef, optimizer, weights=losses.PRESETS["nyuv2"],
                                      independence_weight=1.0)
        sharded_batch, sharded_state = devices.shard(mesh, batch, state)
        assert len(sharded_batch["images"].sharding.device_set) == 4
        step = jax.jit(functools.partial(core_step, counterfactual=True))
        single, single_metrics = compiled(step, state, batch, jax.random.key(0))(state, batch, jax.random.key(0))
        sharded, sharded_metrics = compiled(step, sharded_state, sharded_batch, jax.random.key(0))(
            sharded_state, sharded_batch, jax.random.key(0))
        assert float(single_metrics["counterfactual"]) > 0
        for metric in single_metrics:
            np.testing.assert_allclose(sharded_metrics[metric], single_metrics[metric], rtol=1e-5, atol=1e-7,
                                       err_msg=metric)
        worst, largest_update = largest_difference(single.params, sharded.params, state.params)
        print("max difference", worst, "largest update", largest_update)
        # The counterfactual pass changes the update by more than 1 % of the largest update.
        step_without = jax.jit(functools.partial(core_step, counterfactual=False))
        without, without_metrics = compiled(step_without, state, batch, jax.random.key(0))(
            state, batch, jax.random.key(0))
        assert float(without_metrics["counterfactual"]) == 0
        change = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(*map(jax.tree.leaves, (single.params, without.params))))
        print("the counterfactual pass changes the update by", change)
        assert change > 1e-2 * largest_update, change
        # The perceptual (LPIPS-VGG) term as the script computes it, full-width weights (random here) replicated and
        # the batch split: its value and its gradient with respect to the reconstruction are one device's.
        import sys
        sys.path.insert(0, "tests")
        from deep import perceptual
        from test_perceptual import _random_arrays
        lpips = perceptual.weights_from_arrays(_random_arrays())
        lpips_value_and_grad = jax.jit(jax.value_and_grad(perceptual.lpips_loss, argnums=1))
        pair = {"reconstruction": jax.random.uniform(jax.random.key(5), batch["images"].shape),
                "images": batch["images"]}
        single_value, single_grad = lpips_value_and_grad(lpips, *pair.values())
        sharded_value, sharded_grad = lpips_value_and_grad(devices.replicate(mesh, lpips),
                                                           *devices.shard_batch(mesh, pair).values())
        assert not sharded_grad.sharding.is_fully_replicated and float(single_value) > 0  # split work
        np.testing.assert_allclose(sharded_value, single_value, rtol=1e-5)
        np.testing.assert_allclose(sharded_grad, single_grad, rtol=0, atol=1e-5 * float(np.abs(single_grad).max()))
        print("LPIPS split over 4 devices: same value and gradient")
        # Evaluation: batches of 4 split over the devices, a last one of 2 copied to each; the metrics are those
        # of one device.
        from deep import trainer
        predict = trainer.predict_function(graphdef)
        batches = [{k: v[:4] for k, v in batch.items()}, {k: v[:2] for k, v in batch.items()}]
        placed = list(trainer.placed_for_evaluation(mesh, batches))
        assert [len(b["images"].sharding.device_set) for b in placed] == [4, 4]
        assert [b["images"].sharding.is_fully_replicated for b in placed] == [False, True]
        assert not predict(sharded_state, placed[0]["images"])["depth"].sharding.is_fully_replicated  # split work
        split = trainer.evaluate(predict, sharded_state, placed, config.tasks)
        whole = trainer.evaluate(predict, state, batches, config.tasks)
        for name, value in whole.items():
            np.testing.assert_allclose(split[name], value, rtol=1e-5, err_msg=name)
        print("evaluation split over 4 devices: same metrics")
        # The data set kept on the mesh's devices: the host loader's batches, each gathered already split over the
        # 4 devices (a last batch of 2 copied to each).
        from jax.sharding import PartitionSpec
        from deep.data import Loader
        arrays = {"index": np.arange(10), "images": np.arange(40, dtype=np.float32).reshape(10, 2, 2)}
        host = list(Loader(arrays, 4, seed=3, drop_last=False).epoch(1))
        placed = list(Loader(arrays, 4, seed=3, drop_last=False, on_device=True, mesh=mesh).epoch(1))
        assert [b["index"].sharding.spec for b in placed] == [PartitionSpec("data")] * 2 + [PartitionSpec()]
        # Filled up (evaluation's loader), the last batch splits over the devices too, its filler rows at the end.
        filled = list(Loader(arrays, 4, seed=3, drop_last=False, on_device=True, mesh=mesh,
                             fill_last={"index": -1}).epoch(1))
        assert [b["index"].sharding.spec for b in filled] == [PartitionSpec("data")] * 3
        np.testing.assert_array_equal(np.asarray(filled[-1]["index"]), np.r_[host[-1]["index"], -1, -1])
        assert [len(b["images"].sharding.device_set) for b in placed] == [4, 4, 4]
        for host_batch, placed_batch in zip(host, placed, strict=True):
            for name in host_batch:
                np.testing.assert_array_equal(host_batch[name], placed_batch[name])
        try:
            Loader(arrays, 6, seed=3, on_device=True, mesh=mesh)
            raise AssertionError("a training batch of 6 was accepted for 4 devices")
        except ValueError as error:
            assert "batch_size must be a multiple of 4; got 6" in str(error), error
        print("loader on 4 devices: the host's batches, split")
    """)
    assert stdout.count("max difference") == 1, stdout
    assert "LPIPS split over 4 devices: same value and gradient" in stdout, stdout
    assert "evaluation split over 4 devices: same metrics" in stdout, stdout
    assert "loader on 4 devices: the host's batches, split" in stdout, stdout


def test_the_sharded_baseline_steps_equal_the_single_device_steps():
    """The baselines' two Jacobian paths, sharded: PCGrad's per-task gradients of the shared parameters, and
    GradDrop's per-task gradients of the representation (split over the devices with the batch) with its random
    mask, pulled back through the encoder."""
    stdout = run_on_four_devices("""
        from theory.balancing import make
        model = DualStreamModel(dataclasses.replace(config, grounding="none"), nnx.Rngs(0))
        graphdef, state = train.split_model(model, optimizer)
        sharded_batch, sharded_state = devices.shard(mesh, batch, state)
        assert len(sharded_batch["images"].sharding.device_set) == 4
        for name in ("pcgrad", "graddrop"):
            balancer = make(name)
            balancer_state = balancer.init(3)
            step = jax.jit(functools.partial(train.balanced_step, graphdef, optimizer, balancer))
            single, _, single_metrics = compiled(step, state, balancer_state, batch, jax.random.key(0))(
                state, balancer_state, batch, jax.random.key(0))
            sharded, _, sharded_metrics = compiled(step, sharded_state, balancer_state, sharded_batch,
                                                   jax.random.key(0))(
                sharded_state, balancer_state, sharded_batch, jax.random.key(0))
            # The losses, and the weights the method reads off them and the gradients (PCGrad's from ratios of
            # dot products over every shared parameter: measured 1e-5 apart; all of order 1).
            for metric in single_metrics:
                np.testing.assert_allclose(sharded_metrics[metric], single_metrics[metric], rtol=1e-4, atol=1e-6,
                                           err_msg=metric)
            worst, largest_update = largest_difference(single.params, sharded.params, state.params)
            print(name, "max difference", worst, "largest update", largest_update)
    """)
    assert stdout.count("max difference") == 2, stdout


def test_two_processes_build_one_global_batch_and_state():
    """The multi-host path on one machine: two processes of two CPU devices each join through
    devices.initialize_distributed (the JAX_* variables; Gloo collectives), each passes the whole batch to
    devices.shard_batch and keeps its own rows, and a jitted reduction over the global batch gives the same, full
    answer in both."""
    worker = textwrap.dedent("""
        import numpy as np
        from deep import devices
        assert devices.initialize_distributed()  # from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
        mesh = devices.data_mesh()
        assert mesh.devices.size == 4 and jax.process_count() == 2
        batch = devices.shard_batch(mesh, {"x": np.arange(24, dtype=np.float32).reshape(8, 3)})
        state = devices.replicate(mesh, {"w": np.asarray([1.0, 2.0, 3.0], np.float32), "key": jax.random.key(7)})
        assert devices.replicate(mesh, state)["w"] is state["w"]  # already global: kept, no trip through the host
        rows = sorted(shard.index[0].indices(8)[:2] for shard in batch["x"].addressable_shards)
        # Column sums weighted by the row number: a batch whose rows were dealt out of order would change them.
        sums, key_data = jax.jit(lambda s, b: ((b["x"] * s["w"] * jax.numpy.arange(8.0)[:, None]).sum(0),
                                               jax.random.key_data(s["key"])))(state, batch)
        print("RESULT", rows, np.asarray(sums).tolist(), np.asarray(key_data).tolist())
        # Metrics of predictions and labels split over both processes' devices: each process gathers the rows of
        # per-image statistics it does not hold, so both see the metrics of the whole batch.
        from deep.metrics import MetricAccumulator
        rng = np.random.default_rng(0)
        labels = {"segmentation": rng.integers(-1, 3, (8, 4, 5)).astype(np.int32),
                  "depth": rng.uniform(0.5, 2, (8, 4, 5, 1)).astype(np.float32)}
        predictions = {"segmentation": rng.normal(size=(8, 4, 5, 3)).astype(np.float32),
                       "depth": rng.uniform(0.5, 2, (8, 4, 5, 1)).astype(np.float32)}
        split, whole = MetricAccumulator({"segmentation": 3, "depth": 1}), MetricAccumulator({"segmentation": 3,
                                                                                               "depth": 1})
        split.update(devices.shard_batch(mesh, predictions), devices.shard_batch(mesh, labels))
        whole.update(predictions, labels)
        # And a batch of 6, which does not divide over the 4 devices: copied to every device, as evaluation does.
        six = lambda tree: {k: v[:6] for k, v in tree.items()}
        split.update(devices.replicate(mesh, six(predictions)), devices.replicate(mesh, six(labels)))
        whole.update(six(predictions), six(labels))
        split, whole = split.result(), whole.result()
        print("METRICS", all(abs(split[k] - whole[k]) <= 1e-6 * abs(whole[k]) for k in whole), sorted(split))
    """)
    results = []
    for process in run_processes(f"{USE_GLOO}\n{worker}", [], dict(os.environ), timeout=300):
        lines = process.stdout.splitlines()
        results.append(next(line for line in lines if line.startswith("RESULT")))
        metrics = next(line for line in lines if line.startswith("METRICS"))
        assert metrics.startswith("METRICS True ['depth/abs_err', 'depth/rel_err', 'segmentation/miou'"), metrics
    import jax
    import numpy as np

    expected_sums = (np.arange(24, dtype=np.float32).reshape(8, 3) * [1, 2, 3] * np.arange(8.0)[:, None]).sum(0)
    expected_sums = expected_sums.astype(np.float32).tolist()
    expected_key = np.asarray(jax.random.key_data(jax.random.key(7))).tolist()
    assert results[0] == f"RESULT [(0, 2), (2, 4)] {expected_sums} {expected_key}"
    assert results[1] == f"RESULT [(4, 6), (6, 8)] {expected_sums} {expected_key}"


def four_device_mesh():
    """A mesh of four entries, all this process's one CPU device: enough for the layout rules (which read the
    mesh's size, not its devices), without a subprocess of four devices."""
    return Mesh(np.asarray([jax.devices()[0]] * 4), ("data",))


def test_a_batch_splits_only_when_its_size_divides_by_the_device_count():
    """batch_sharding splits an evaluation batch of 8 over 4 devices and copies one of 6 (or 2) to every device;
    shard_batch refuses a training batch of 6 over 4 devices in one line naming the field and the counts."""
    mesh = four_device_mesh()
    assert [devices.batch_sharding(mesh, size).spec for size in (8, 6, 2, 4)] == [
        PartitionSpec("data"), PartitionSpec(), PartitionSpec(), PartitionSpec("data")]
    with pytest.raises(ValueError, match="batch field 'images' has 6 examples, not divisible by the 4 devices"):
        devices.shard_batch(mesh, {"images": np.zeros((6, 2), np.float32)})


def test_on_a_mesh_only_training_batches_must_split_over_the_devices():
    """A training loader (drop_last) refuses a batch of 6 over 4 devices; an evaluation loader takes it, since its
    batches are laid out by their size (copied to every device when it does not divide) and a small split may hold
    fewer examples than the devices."""
    from deep.data import Loader

    mesh = four_device_mesh()
    arrays = {"images": np.arange(10, dtype=np.float32).reshape(10, 1)}
    with pytest.raises(ValueError, match="batch_size must be a multiple of 4; got 6"):
        Loader(arrays, 6, seed=0, on_device=True, mesh=mesh)
    evaluation = Loader(arrays, 6, seed=0, shuffle=False, drop_last=False, on_device=True, mesh=mesh)
    # The layouts only: this mesh repeats one device, whose copies of a batch cannot be read back.
    assert [(batch["images"].shape, batch["images"].sharding.spec) for batch in evaluation.epoch(0)] == [
        ((6, 1), PartitionSpec()), ((4, 1), PartitionSpec("data"))]


def test_on_one_device_a_replicated_state_has_the_type_of_a_steps_output_so_the_step_compiles_once():
    """The training scripts' loop on one device (a GPU, this CPU): the state replicated from arrays already on the
    device, the batch placed from numpy. The state a step returns carries the mesh in its type, so a first state
    without it made the second step compile the whole program again (and a resumed run a third time)."""
    import jax.numpy as jnp

    mesh = devices.data_mesh(jax.devices()[:1])
    state = devices.replicate(mesh, {"w": jnp.ones(3), "count": jnp.zeros((), jnp.int32)})
    step = jax.jit(lambda state, batch: {"w": state["w"] + batch["x"].sum(0), "count": state["count"] + 1},
                   donate_argnums=0)
    for _ in range(3):
        state = step(state, devices.shard_batch(mesh, {"x": np.ones((4, 3), np.float32)}))
    assert step._cache_size() == 1 and int(state["count"]) == 3
    np.testing.assert_array_equal(state["w"], np.full(3, 13.0))


def test_the_multi_host_helpers_wait_for_every_process_and_pass_the_count_and_index_as_named(monkeypatch):
    """barrier syncs whenever there is more than one process (two included) and never in one; initialize_distributed
    hands JAX_NUM_PROCESSES as the process count and JAX_PROCESS_ID as this process's index, and does nothing
    without a coordinator."""
    synced, initialised = [], []
    monkeypatch.setattr(multihost_utils, "sync_global_devices", synced.append)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: initialised.append(kwargs))
    for count in (1, 2, 3):
        monkeypatch.setattr(jax, "process_count", lambda count=count: count)
        devices.barrier(f"p{count}")
    assert synced == ["p2", "p3"]
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert devices.initialize_distributed() is False and initialised == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert devices.initialize_distributed() is True and initialised == [{"num_processes": 3, "process_id": 1}]
    # A typo in a variable is named with its value, not left to int()'s "invalid literal for int() with base 10".
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="^JAX_PROCESS_ID must be an integer; got 'one'$"):
        devices.initialize_distributed()


def test_without_the_count_and_index_variables_jax_finds_them_from_the_cluster(monkeypatch):
    """initialize_distributed with only JAX_COORDINATOR_ADDRESS set (the others unset or empty, as a job script may
    leave them): nothing is passed for them, so that JAX takes them from the cluster (SLURM, Open MPI)."""
    initialised = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: initialised.append(kwargs))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    monkeypatch.setenv("JAX_PROCESS_ID", "")
    assert devices.initialize_distributed() is True and initialised == [{}]


def test_a_batch_is_laid_out_by_its_size_whatever_layout_it_arrives_in():
    """shard_batch and place_batch lay a batch out by its size even when it arrives copied to every device (a batch
    gathered for evaluation, say): 8 examples are split over 4 devices, not kept copied (a layout already right is
    kept). On four CPU devices, in a subprocess that compiles nothing. A size one more than a multiple of the count
    (5, 9) does not divide, so place_batch copies it."""
    stdout = run_on_four_devices("""
        import jax, numpy as np
        from jax.sharding import PartitionSpec
        from deep import devices
        mesh = devices.data_mesh()
        copied = devices.replicate(mesh, {"x": np.arange(16, dtype=np.float32).reshape(8, 2)})
        split = devices.shard_batch(mesh, copied)
        assert copied["x"].sharding.spec == PartitionSpec(), copied["x"].sharding
        assert split["x"].sharding.spec == PartitionSpec("data"), split["x"].sharding
        assert devices.place_batch(mesh, copied)["x"].sharding.spec == PartitionSpec("data")
        assert devices.shard_batch(mesh, split)["x"] is split["x"]
        np.testing.assert_array_equal(split["x"], np.arange(16).reshape(8, 2))
        print("ok")
    """, preamble="")
    assert stdout.strip() == "ok"
    mesh = four_device_mesh()
    for size in (5, 9):
        assert devices.place_batch(mesh, {"x": np.zeros((size, 2), np.float32)})["x"].sharding.spec == PartitionSpec()

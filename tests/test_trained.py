"""deep.trained.load_trained on run folders written here: an MTAN baseline's checkpoint with a balancer state, and
the one-line errors. (Runs of the training scripts are loaded in test_train_nyuv2.py and test_train_celeba.py.)"""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from deep import train, trainer
from deep.checkpoint import Checkpoints
from deep.mtan import MTAN
from deep.trained import _checkpointed_tree, _instead_of_damaged, load_trained
from scripts import load_script
from test_deep_trainer import _truncate_arrays
from theory.balancing import make


def leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_an_mtan_run_loads_the_checkpointed_parameters_and_statistics_not_its_seeds(tmp_path):
    """The run.json of train_nyuv2.py's own configuration (MTAN, FAMO, AdamW: another optimiser chain and a balancer
    state in the checkpoint's tree); the checkpoint holds a model of another seed with shifted BatchNorm statistics,
    and that is what comes back, in eval mode."""
    script = load_script("experiments/train_nyuv2.py")
    record = script.TrainConfig(synthetic=True, model="tiny", method="famo", architecture="mtan", optimizer="adamw",
                                seed=3).run_identity()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"holds no checkpoint \(no checkpoints/ folder\)$"):
        load_trained(folder)

    model = trainer.build_model(trainer.run_model_config(record), "mtan", seed=99)
    optimizer = train.make_optimizer(train.OptimConfig(decoupled_weight_decay=True))
    graphdef, state = train.split_model(model, optimizer)
    state = state._replace(batch_stats=jax.tree.map(lambda value: value + 0.5, state.batch_stats))
    with Checkpoints(folder / "checkpoints") as checkpoints:
        checkpoints.save(7, {"state": state, "balancer": make("famo").init(3)})

    trained = load_trained(folder, np.int64(7))  # any integer type
    assert trained.epoch == 7 and isinstance(trained.model, MTAN) and trained.record == record
    _, params, batch_stats, _ = train.split_states(trained.model)  # laid out as the state was
    for loaded, saved in ((params, state.params), (batch_stats, state.batch_stats)):
        assert len(leaves(loaded)) == len(leaves(saved)) > 0
        for a, b in zip(leaves(loaded), leaves(saved)):
            np.testing.assert_array_equal(a, b)
    # The run's own seed draws other parameters: what was loaded came from the checkpoint.
    _, seeded, _, _ = train.split_states(trainer.build_model(trainer.run_model_config(record), "mtan", seed=3))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(seeded), leaves(params)))
    # A record without a field the model needs or with a value no script writes, a checkpoint of another model, and
    # one damaged on disk (as test_deep_trainer damages them).
    (folder / "run.json").write_text(json.dumps({k: v for k, v in record.items() if k != "architecture"}))
    with pytest.raises(ValueError, match=r"run.json lacks the field 'architecture': not written by this version's "
                                         r"train_nyuv2.py or train_celeba.py$"):
        load_trained(folder)
    for field, value, message in (("model", "huge", "model size must be one of full, reduced, tiny; got 'huge'"),
                                  ("seed", None, "")):
        (folder / "run.json").write_text(json.dumps({**record, field: value}))
        with pytest.raises(ValueError, match=rf"run.json does not describe a model: .*{re.escape(message)}$"):
            load_trained(folder)
    (folder / "run.json").write_text(json.dumps(record))
    with Checkpoints(folder / "checkpoints") as checkpoints:
        checkpoints.save(8, {"state": state, "balancer": ()})  # as an EW run's, not FAMO's
        checkpoints.save(9, {"state": state, "balancer": make("famo").init(3)})
    with pytest.raises(ValueError, match=r"epoch 8 .* does not match the model and optimiser that .*run.json "
                                         r"describes \(another configuration's, or another version's of this code\): "
                                         r".*tree structures do not match"):
        load_trained(folder, 8)
    _truncate_arrays(folder / "checkpoints", 9)
    with pytest.raises(ValueError, match=r"the checkpoint of epoch 9 .* cannot be read \(.*\); load epoch 8 instead, "
                                         r"or resume the run, which sets the damaged one aside$"):
        load_trained(folder)
    modes = [node.use_running_average for _, node in nnx.iter_graph(trained.model)
             if isinstance(node, nnx.Module) and hasattr(node, "use_running_average")]
    assert modes and all(modes)


def test_what_to_do_about_a_damaged_checkpoint_is_true_for_each_epoch_damaged():
    """A resume sets aside only damaged checkpoints newer than the one it resumes from: it is advice for the newest
    alone, when an older one is kept."""
    assert _instead_of_damaged(9, [8, 9]) == "load epoch 8 instead, or resume the run, which sets the damaged one aside"
    assert _instead_of_damaged(8, [8, 9]) == "load epoch 9 instead"
    assert _instead_of_damaged(9, [9]) == "it is the only checkpoint kept"


def test_an_epoch_and_a_folder_of_the_wrong_kind_are_one_line(tmp_path):
    for epoch in ("3", True, 2.0):
        with pytest.raises(ValueError, match=rf"^epoch must be an integer or None; got {re.escape(repr(epoch))}$"):
            load_trained(tmp_path, epoch)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(ValueError, match=r"run.json is not a run's folder \(the --out of a training run\)$"):
        load_trained(tmp_path / "run.json")


@pytest.mark.parametrize("content, message", [
    ("{", r"run.json cannot be read \("),
    ("[1, 2]", r"run.json is not a run's record \(a JSON object\)$"),
])
def test_a_bad_record_is_one_line(tmp_path, content, message):
    (tmp_path / "run.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_trained(tmp_path)


def test_a_run_without_a_finished_epoch_is_one_line(tmp_path):
    script = load_script("experiments/train_nyuv2.py")
    record = script.TrainConfig(synthetic=True, model="tiny", method="ew").run_identity()
    (tmp_path / "run.json").write_text(json.dumps(record))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match=r"holds no checkpoint yet \(the run has not finished an epoch\)$"):
        load_trained(tmp_path)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["checkpoints", "run.json"]
    (tmp_path / "checkpoints" / "3.unreadable").mkdir()  # what a resume leaves of a damaged checkpoint
    with pytest.raises(ValueError, match=r"holds no readable checkpoint: 3.unreadable set aside as damaged$"):
        load_trained(tmp_path)


class _Stopped(Exception):
    """Raised in place of restore_run: the script has built what it would checkpoint."""


def tree_layout(tree):
    """A tree's structure and each leaf's path, shape and dtype."""
    leaves, structure = jax.tree.flatten_with_path(tree)
    return structure, [(jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype)) for path, leaf in leaves]


@pytest.mark.parametrize("script, flags", [
    ("train_nyuv2.py", ["--method", "famo", "--architecture", "mtan", "--optimizer", "adamw"]),
    ("train_nyuv2.py", ["--method", "core", "--variant", "authors", "--precision", "bfloat16", "--epochs", "6"]),
    ("train_nyuv2.py", ["--method", "graddrop", "--batch-size", "4"]),
    ("train_nyuv2.py", ["--method", "stl", "--task", "depth"]),
    ("train_celeba.py", ["--method", "nash_mtl", "--attributes", "5", "--image-size", "32"]),
    ("train_celeba.py", ["--method", "core", "--variant", "authors", "--attributes", "3", "--image-size", "32"]),
], ids=["nyuv2-mtan-famo-adamw", "nyuv2-core-authors-bfloat16", "nyuv2-graddrop", "nyuv2-stl", "celeba-nash_mtl",
        "celeba-core-authors"])
def test_the_tree_rebuilt_from_run_json_is_the_tree_the_script_checkpoints(tmp_path, monkeypatch, script, flags):
    """The script's own main(), stopped where it hands its first state to restore_run (the tree record_epoch later
    checkpoints), against the tree load_trained rebuilds from the run.json main wrote by then: the same structure
    (the optimiser's chain and the balancer's state included), paths, shapes and dtypes. Nothing is compiled."""
    module = load_script(f"experiments/{script}")
    captured = {}

    def stop(checkpoints, initial, *args, **kwargs):
        captured["tree"] = initial
        raise _Stopped

    monkeypatch.setattr(module, "restore_run", stop)
    out = tmp_path / "run"
    with pytest.raises(_Stopped):
        module.main(["--synthetic", "--model", "tiny", "--epochs", "3", "--warmup-epochs", "1", "--batch-size", "8",
                     "--quiet", *flags, "--out", str(out)])
    _, rebuilt = _checkpointed_tree(json.loads((out / "run.json").read_text()), out)
    assert tree_layout(rebuilt) == tree_layout(captured["tree"])

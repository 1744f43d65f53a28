"""experiments/train_celeba.py end to end on a generated CelebA set: a CORE-MTL run, a killed-and-resumed run that
ends with the same numbers, a balanced baseline, and bad flags rejected with one line."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from scripts import (ROOT, assert_each_flag_reaches_its_field, assert_one_line_error, killed_after_the_first_checkpoint,
                     load_script, run_in_process, run_script, run_training, steps_of_a_resumed_stand_in_loop,
                     weights_reaching)

SCRIPT = ROOT / "experiments" / "train_celeba.py"
FLAGS = ["--synthetic", "--model", "tiny", "--attributes", "5", "--epochs", "3", "--warmup-epochs", "1",
         "--batch-size", "12", "--image-size", "64", "--learning-rate", "0.005", "--quiet"]


def run(args, cache, **kwargs):
    return run_training(SCRIPT, args, cache, **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run([*FLAGS, "--out", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_core_run_writes_its_results_plots_and_one_line_per_epoch(uninterrupted):
    """Batches of 12: 16 val and test examples leave a last evaluation batch of 4 and 8 unlabelled filler rows."""
    out = uninterrupted
    results = json.loads((out / "results.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3] and results["epochs"] == 3
    names = ("5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald")  # the file's first 5
    assert set(results["test"]) == {"attributes/mean_accuracy", *(f"attributes/{name}" for name in names)}
    assert results["model"]["attributes"] == list(names) and results["model"]["grounding"] == "soft"
    assert {"attributes", "independence", "appearance_l1", "loss"} <= set(lines[0]["train"])
    assert lines[-1]["train"]["loss"] < lines[0]["train"]["loss"]
    assert lines[-1]["train"]["attributes"] < lines[0]["train"]["attributes"]  # not the reconstruction alone
    for name in ("curves.png", "attributes.png", "samples.png", "gradients.png"):
        assert (out / name).stat().st_size > 10_000
    cosines = results["gradient_cosines"]  # the paper's Figs. 4-5, one training batch by default
    assert cosines["batches"] == 1 and len(cosines["task_task"]) == 5 and len(cosines["task_reconstruction"]) == 5
    assert all(abs(cosines["task_task"][i][i] - 1) < 1e-5 for i in range(5))
    assert 0 < cosines["mean_abs_task_reconstruction"] < 1 and 0 < cosines["mean_abs_task_task"] < 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_the_model_loaded_from_a_run_scores_the_runs_test_accuracies(uninterrupted):
    """deep.trained.load_trained reads a CelebA run too (CORE-MTL: the attribute model with its decoder, no balancer
    state): on the run's test split its logits give results.json's test accuracies, and the epoch-2 model's on the
    validation split that epoch's line (in eval mode; the filler rows the run's last batch carried count for
    nothing)."""
    import jax.numpy as jnp
    from flax import nnx

    from deep import attributes, data
    from deep.trained import load_trained

    results = json.loads((uninterrupted / "results.json").read_text())
    trained = load_trained(uninterrupted)
    names = tuple(trained.record["attributes"])
    assert trained.epoch == 3 and type(trained.model).__name__ == "AttributeModel" and len(names) == 5
    predict = nnx.jit(lambda model, images: attributes.stacked_logits(model(images)[0], names))

    def batch(split):
        arrays = data.load_celeba(uninterrupted / "data", split, names, size=(64, 64))  # the run's --image-size
        return {**arrays, "images": jnp.asarray(arrays["images"], jnp.float32) / 255.0}  # uint8 -> [0, 1]

    assert attributes.evaluate_attributes(predict, trained.model, [batch("test")], names) == pytest.approx(
        results["test"], rel=1e-6)
    earlier, val = load_trained(uninterrupted, 2), batch("val")
    assert earlier.epoch == 2
    assert attributes.evaluate_attributes(predict, earlier.model, [val], names) == pytest.approx(
        results["history"][1]["val"], rel=1e-6)
    # Accuracies over 16 faces barely move in an epoch; the logits show it is another model.
    assert not np.allclose(predict(earlier.model, val["images"]), predict(trained.model, val["images"]))


def test_compare_runs_reads_a_run(uninterrupted, tmp_path):
    compared = run_script("experiments/compare_runs.py", str(uninterrupted), "--out", str(tmp_path))
    assert compared.returncode == 0, compared.stderr
    test = json.loads((uninterrupted / "results.json").read_text())["test"]
    assert f"| core | 1 | {test['attributes/mean_accuracy']:.4g} |" in compared.stdout
    assert "CelebA, generated data, 5 attributes (5_o_Clock_Shadow, Arched_Eyebrows, Attractive, ...), test:" in \
        compared.stdout


def test_a_killed_run_resumes_to_the_same_numbers(uninterrupted, cache, tmp_path):
    out = tmp_path / "killed"
    # The epochs checkpointed before the kill are not trained again: their lines (timings included) stay as written.
    before_kill = killed_after_the_first_checkpoint(SCRIPT, FLAGS, out, cache)

    result = run([*FLAGS, "--out", str(out), "--resume"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in resumed] == [1, 2, 3]
    assert (out / "metrics.jsonl").read_text().splitlines()[:1] == before_kill
    for a, b in zip(expected, resumed):
        assert a["val"] == b["val"] and a["train"] == b["train"], (a["epoch"], a, b)
    assert (json.loads((out / "results.json").read_text())["test"]
            == json.loads((uninterrupted / "results.json").read_text())["test"])


def test_a_balanced_baseline_trains_the_attributes_as_tasks(cache, tmp_path):
    """PCGrad over the per-attribute losses, the model without its decoder (the authors' ResNet-18), one
    attribute's pull-back at a time; named attributes in the given order."""
    out = tmp_path / "pcgrad"
    flags = [*FLAGS, "--method", "pcgrad", "--attributes", "Young,Male", "--epochs", "2", "--augment", "--variant",
             "authors", "--jacobian-chunk", "1"]
    result = run([*flags, "--out", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["attributes"] == ["Young", "Male"] and results["model"]["grounding"] == "none"
    assert results["model"]["backbone"]["block"] == "basic"
    train = results["history"][0]["train"]
    assert {"Young", "Male", "weight/Young", "weight/Male"} <= set(train) and "independence" not in train
    assert set(results["gradient_cosines"]) == {"batches", "task_task", "mean_abs_task_task"}  # no grounding terms
    assert not (out / "samples.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--attributes", "41"], "--attributes: attributes must be an integer in 1..40"),
    (["--synthetic", "--attributes", "Smiling,Grin"],
     "--attributes: attributes[1] = 'Grin' is not a CelebA attribute; allowed names: 5_o_Clock_Shadow, "),
    (["--synthetic", "--method", "stl"], "--method must be one of core, "),
    (["--synthetic", "--method", "ew", "--perceptual", __file__], "--perceptual is for --method core"),
    (["--synthetic", "--min-learning-rate", "0.1"], "--min-learning-rate must be at most --learning-rate (0.0002)"),
    (["--synthetic", "--image-size", "16"], "--image-size must be an integer >= 32; got 16"),
    (["--synthetic", "--data", "/tmp"], "give exactly one of --data PATH and --synthetic"),
    (["--data", "/nonexistent"], "--data: no such folder: /nonexistent"),
    (["--data", __file__], f"--data: not a folder (a file): {__file__}"),
    (["--synthetic", "--variant", "theirs"], "--variant must be one of paper, authors"),
    (["--synthetic", "--jacobian-chunk", "-1"], "--jacobian-chunk must be an integer >= 0; got -1"),
    (["--synthetic", "--loss-weights", "image=1"],
     "--loss-weights takes comma-separated name=value from attributes, independence, appearance, appearance_l1; "),
    (["--synthetic", "--method", "ew", "--loss-weights", "independence=0"], "--loss-weights is for --method core"),
    (["--synthetic", "--epochs", "5"],
     "--warmup-epochs must be smaller than --epochs (5); got 5 (the paper variant's"),
    (["--synthetic", "--optimizer", "sgd"], "--optimizer must be one of adamw, adam; got 'sgd'"),
    (["--synthetic", "--pretrained", "/tmp"], "--pretrained: not a file (a folder): /tmp"),
    (["--synthetic", "--perceptual", "/nonexistent.npz"], "--perceptual: no such file: /nonexistent.npz"),
    (["--synthetic", "--batch-size", "0"], "--batch-size must be an integer >= 1; got 0"),
    # -1 means the variant's warm-up; below it is refused, not read as the default.
    (["--synthetic", "--warmup-epochs", "-2"], "--warmup-epochs must be an integer >= 0; got -2"),
    (["--synthetic", "--min-learning-rate", "-0.000001"],
     "--min-learning-rate must be a finite number >= 0; got -1e-06"),
])
def test_bad_flags_give_one_line_and_exit_2(tmp_path, args, message):
    assert_one_line_error(run_in_process("experiments/train_celeba.py", *args, "--out", str(tmp_path / "out"),
                                         "--quiet", computation="deep.devices.initialize_distributed"), message)
    assert not (tmp_path / "out").exists()


def test_bad_data_and_a_changed_resume_are_one_line(uninterrupted, cache, tmp_path):
    (tmp_path / "celeba").mkdir()  # no lists, no images
    result = run(["--data", str(tmp_path / "celeba"), "--out", str(tmp_path / "out"), "--quiet"], cache)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "train_celeba.py: error: " in result.stderr and "list_attr_celeba" in result.stderr, result.stderr
    changed = [*FLAGS, "--out", str(uninterrupted), "--resume", "--seed", "3"]
    result = run(changed, cache)
    assert result.returncode == 2 and "--resume must use the run's own flags: --seed was 2024, now 3" in result.stderr


def test_the_perceptual_weights_are_refused_where_the_appearance_term_has_no_weight():
    """The LPIPS term is weighted by appearance alone: with appearance=0 --perceptual would train nothing and the
    run's record would still name it. Accepted with the appearance term on."""
    config = load_script("experiments/train_celeba.py").TrainConfig
    with pytest.raises(ValueError, match=re.escape("--perceptual weights the appearance reconstruction, which "
                                                   "--loss-weights appearance=0 removes (leave out one of them)")):
        config(synthetic=True, perceptual=__file__, loss_weights="appearance=0")
    assert config(synthetic=True, perceptual=__file__, loss_weights="appearance_l1=0").perceptual == __file__


def test_the_first_t_attributes_and_their_names_are_the_same_run():
    config = load_script("experiments/train_celeba.py").TrainConfig
    by_count = config(synthetic=True, attributes="3").run_identity()
    by_name = config(synthetic=True, attributes="5_o_Clock_Shadow, Arched_Eyebrows,Attractive").run_identity()
    assert by_count == by_name and by_count["attributes"] == ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive"]
    assert config(synthetic=True, attributes=" 3 ").run_identity() == by_count  # a count with spaces is still one
    paper, authors = (config(synthetic=True, variant=variant) for variant in ("paper", "authors"))
    assert (paper.warmup_epochs, authors.warmup_epochs) == (5, 0)  # the paper's Appendix F; the authors' code


def test_a_command_line_without_settings_trains_with_the_authors_celeba_configuration():
    """The defaults the README states (the authors' 5celeba.yaml and the paper's Appendix F): all 40 attributes, 50
    epochs, batches of 256, 128 × 128 faces, AdamW at 2e-4 with decay 1e-4, a cosine to 1e-6, seed 2024, the
    authors' loss weights, and one batch of gradient probes."""
    from deep.attributes import AttributeLossWeights
    from deep.data import CELEBA_ATTRIBUTES

    module = load_script("experiments/train_celeba.py")
    parser = module.parser_for(module.TrainConfig, "train", prog="train_celeba.py")
    config = module.TrainConfig(**vars(parser.parse_args(["--synthetic"])))
    assert (config.method, config.variant, config.model, config.attribute_names) == (
        "core", "paper", "full", CELEBA_ATTRIBUTES)
    assert (config.epochs, config.batch_size, config.image_size, config.seed) == (50, 256, 128, 2024)
    assert (config.optimizer, config.learning_rate, config.min_learning_rate, config.weight_decay) == (
        "adamw", 2e-4, 1e-6, 1e-4)
    assert (config.precision, config.augment, config.gradient_probe, config.jacobian_chunk, config.limit) == (
        "float32", False, 1, 0, 0)
    assert config.weights == AttributeLossWeights(attributes=1.0, independence=0.5, appearance=5.0, appearance_l1=1.0)


def test_each_flag_reaches_the_field_it_names(tmp_path):
    """Two command lines that between them give every flag a value other than its default: each lands in its own
    field (a flag read into another field, or dropped, would train another run than the one asked for)."""
    (tmp_path / "celeba").mkdir()
    for name in ("resnet18.npz", "lpips.npz"):
        (tmp_path / name).write_bytes(b"")  # read only once the run starts
    lines = [
        {"data": str(tmp_path / "celeba"), "attributes": "7", "variant": "authors", "model": "tiny",
         "loss_weights": "independence=0.25", "image_size": 64, "epochs": 9, "batch_size": 12, "learning_rate": 0.003,
         "min_learning_rate": 0.0001, "warmup_epochs": 2, "weight_decay": 0.002, "optimizer": "adam",
         "precision": "bfloat16", "augment": True, "on_device": True, "limit": 100,
         "pretrained": str(tmp_path / "resnet18.npz"), "perceptual": str(tmp_path / "lpips.npz"), "jacobian_chunk": 3,
         "gradient_probe": 4, "steps_per_epoch": 5, "out": str(tmp_path / "run"), "resume": True, "seed": 11,
         "quiet": True},
        {"synthetic": True, "method": "pcgrad"},
    ]
    assert_each_flag_reaches_its_field(SCRIPT, lines, tmp_path / "out")


def test_the_bounds_themselves_are_accepted():
    """Each bound's own value trains: 32-pixel faces, a run one epoch longer than its warm-up, a constant learning
    rate (the cosine's floor at the peak), a floor and a weight decay of 0; the gradient probe is not part of the run
    (a finished run may be probed again)."""
    module = load_script("experiments/train_celeba.py")
    edges = [{"image_size": 32, "epochs": 1, "warmup_epochs": 0}, {"epochs": 6, "warmup_epochs": 5},
             {"min_learning_rate": 2e-4, "learning_rate": 2e-4}, {"min_learning_rate": 0.0, "weight_decay": 0.0},
             {"batch_size": 1, "seed": 0, "gradient_probe": 0}]
    for edge in edges:
        config = module.TrainConfig(synthetic=True, **edge)
        assert all(getattr(config, name) == value for name, value in edge.items()), edge
    with pytest.raises(ValueError, match="--image-size must be an integer >= 32; got 31"):
        module.TrainConfig(synthetic=True, image_size=31)
    probed = module.TrainConfig(synthetic=True, gradient_probe=9, quiet=True, out="elsewhere", resume=True)
    assert probed.run_identity() == module.TrainConfig(synthetic=True).run_identity()


def test_a_resume_compares_path_flags_as_files_and_may_move_the_data_onto_the_device(tmp_path, monkeypatch, capsys):
    """The path flags are recorded absolute (a resume from another working folder names the same files), and a resume
    may change --on-device (where the data lies, not what trains), saying so."""
    import dataclasses

    module = load_script("experiments/train_celeba.py")
    from _training import check_run_folder, record_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "celeba").mkdir()
    for name in ("resnet18.npz", "lpips.npz"):
        (tmp_path / name).write_bytes(b"")
    paths = {"data": "celeba/", "pretrained": "./resnet18.npz", "perceptual": "lpips.npz"}
    started = module.TrainConfig(**paths)
    identity = started.run_identity()
    assert {name: identity[name] for name in paths} == {name: str(tmp_path / Path(path)) for name, path in
                                                        paths.items()}
    folder = tmp_path / "run"
    folder.mkdir()
    record_run(folder, identity, {"train": 8, "val": 4, "test": 4}, resumed=None)
    moved = dataclasses.replace(started, resume=True, on_device=True)
    check_run_folder(folder, moved.run_identity(), True, module.TrainConfig, module.PATH_FIELDS, "train_celeba.py")
    assert capsys.readouterr().err == "train_celeba.py: --resume: --on-device is now True (was False)\n"


def test_the_model_flags_reach_the_models_configuration():
    """--attributes, --precision and --variant reach the model the run builds; CORE-MTL grounds softly (its
    reconstruction decoder), a baseline not at all."""
    from deep.attributes import ATTRIBUTE_BACKBONES

    module = load_script("experiments/train_celeba.py")
    core = module.TrainConfig(synthetic=True, attributes="Smiling,Male", precision="bfloat16").model_config()
    assert (core.attributes, core.compute_dtype, core.grounding) == (("Smiling", "Male"), "bfloat16", "soft")
    assert core.backbone == ATTRIBUTE_BACKBONES["paper"]
    baseline = module.TrainConfig(synthetic=True, method="ew", variant="authors", attributes="3").model_config()
    assert (len(baseline.attributes), baseline.compute_dtype, baseline.grounding) == (3, "float32", "none")
    assert baseline.backbone == ATTRIBUTE_BACKBONES["authors"]


def test_the_schedule_flags_reach_the_optimiser_and_the_step(tmp_path):
    """--learning-rate, --min-learning-rate (as the cosine's floor over the peak), --weight-decay, --optimizer,
    --epochs and --warmup-epochs reach the optimiser's configuration, whose steps per epoch are the generated
    training split's 5 full batches of 12 (64 examples), not the larger --steps-per-epoch cap; --jacobian-chunk 0
    reaches the step as None (all at once). The run is stopped where the step is built."""
    from unittest import mock

    from deep import train

    class Reached(Exception):
        pass

    built = {}

    def make_step(*args):
        built["args"] = args
        raise Reached

    module = load_script(SCRIPT)
    flags = [*FLAGS, "--method", "ew", "--steps-per-epoch", "50", "--min-learning-rate", "0.0005",
             "--weight-decay", "0.003", "--optimizer", "adam", "--out", str(tmp_path / "out")]
    with mock.patch("deep.train.make_optimizer", wraps=train.make_optimizer) as make_optimizer, \
            mock.patch("deep.attributes.make_attribute_step", side_effect=make_step), pytest.raises(Reached):
        module.main(flags)
    assert make_optimizer.call_args.args == (train.OptimConfig(
        learning_rate=0.005, weight_decay=0.003, decoupled_weight_decay=False, epochs=3, warmup_epochs=1,
        steps_per_epoch=5, min_lr_ratio=0.1),)
    assert built["args"][0] == "ew" and built["args"][-1] is None


def test_loss_weight_overrides_reach_the_step(tmp_path):
    import dataclasses

    from deep.attributes import AttributeLossWeights

    weights = weights_reaching("experiments/train_celeba.py", "deep.attributes.make_attribute_step", *FLAGS,
                               "--loss-weights", "appearance=0, independence=2", "--out", str(tmp_path / "out"))
    assert weights == dataclasses.replace(AttributeLossWeights(), appearance=0.0, independence=2.0)


def test_the_gradient_summary_leaves_out_each_attributes_cosine_with_itself():
    """Mean |cos| between two attributes' gradients: the off-diagonal of a hand-made 3 × 3 matrix, (0.2 + 0.4 + 0.6)
    × 2 / 6 = 0.4, not the diagonal's 1; the grounding terms' means are plain means of |cos|."""
    module = load_script("experiments/train_celeba.py")
    cosines = {"task_task": [[1.0, 0.2, -0.4], [0.2, 1.0, 0.6], [-0.4, 0.6, 1.0]],
               "task_reconstruction": [0.1, -0.3, 0.2], "task_independence": [0.0, 0.0, -0.6]}
    summary = module._gradient_summary(cosines)
    assert summary["mean_abs_task_task"] == pytest.approx(0.4)
    assert summary["mean_abs_task_reconstruction"] == pytest.approx(0.2)
    assert summary["mean_abs_task_independence"] == pytest.approx(0.2)
    # One attribute has no pair: no conflict to report (0, not its cosine with itself), and a baseline's probe has
    # no grounding terms to summarise.
    assert module._gradient_summary({"task_task": [[1.0]]}) == {"mean_abs_task_task": 0.0}


def test_a_probe_longer_than_an_epoch_averages_over_the_batches_it_ran(uninterrupted, cache, tmp_path):
    """The finished run resumed with --gradient-probe 9 (not part of the run's identity: nothing is trained): the
    generated set's 64 training examples give 64 // 12 = 5 full batches, so 5 are probed and the average divides by 5
    (an attribute's gradient has cos 1 with itself, so the diagonal stays 1, not 5/9). Uses the module's fixtures."""
    import shutil

    out = tmp_path / "probed"
    shutil.copytree(uninterrupted, out)
    result = run([*FLAGS, "--out", str(out), "--resume", "--gradient-probe", "9"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    cosines = json.loads((out / "results.json").read_text())["gradient_cosines"]
    assert cosines["batches"] == 5
    assert all(abs(cosines["task_task"][i][i] - 1) < 1e-5 for i in range(5))


def test_the_epochs_val_line_is_measured_on_val_not_on_test(uninterrupted):
    """Each epoch's line scores the val split; the test split is scored once, at the end. With the same final model
    the two differ unless one split were scored for both. Uses the module's ``uninterrupted`` run."""
    results = json.loads((uninterrupted / "results.json").read_text())
    assert results["history"][-1]["val"] != results["test"]


def test_a_resumed_loop_hands_each_step_what_the_uninterrupted_loop_did(cache, tmp_path):
    """The epoch loop's side of an exact resume (as train_nyuv2.py's test), with a stand-in step that counts its
    steps in a balancer state: the resumed run goes on from the balancer state of its checkpoint, with the keys and
    the augmented batches of the uninterrupted run."""
    flags = [*FLAGS, "--method", "ew", "--augment", "--steps-per-epoch", "2", "--gradient-probe", "0"]
    expected = steps_of_a_resumed_stand_in_loop(SCRIPT, flags, cache, tmp_path)
    assert [step["balancer"] for step in expected] == list(range(len(expected)))

"""experiments/train_nyuv2.py end to end on a generated data set: a run, a killed-and-resumed run that ends with the
same numbers, and bad flags rejected with one line."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts import (ROOT, USE_GLOO, assert_each_flag_reaches_its_field, assert_one_line_error, environment,
                     killed_after_the_first_checkpoint, load_script, run_in_process, run_processes,
                     run_readme_example, run_script, run_training, run_with_a_stand_in_step,
                     steps_of_a_resumed_stand_in_loop, weights_reaching, with_cpu_devices)

SCRIPT = ROOT / "experiments" / "train_nyuv2.py"
FLAGS = ["--synthetic", "--model", "tiny", "--method", "ew", "--epochs", "4", "--warmup-epochs", "1",
         "--batch-size", "4", "--learning-rate", "0.01", "--quiet"]


def run(args, cache, **kwargs):
    return run_training(SCRIPT, args, cache, **kwargs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One persistent compilation cache for every run of this file. Runs under the same XLA flags share programs:
    the training step of the same configuration, and the model's initialisation and evaluation programs of others
    (the multi-device runs' flags differ, so they share only among themselves)."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run([*FLAGS, "--out", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_a_run_writes_its_results_curves_samples_and_one_line_per_epoch(uninterrupted):
    out = uninterrupted
    results = json.loads((out / "results.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4] and results["epochs"] == 4
    assert set(results["final"]) == {"segmentation/miou", "segmentation/pixel_accuracy", "depth/abs_err",
                                     "depth/rel_err", "normal/mean", "normal/median", "normal/within_11.25",
                                     "normal/within_22.5", "normal/within_30"}
    assert lines[-1]["train"]["loss"] < lines[0]["train"]["loss"]  # EW on a learnable generated set
    for name in ("curves.png", "samples.png"):
        assert (out / name).stat().st_size > 10_000
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]


def test_a_killed_run_resumes_to_the_same_numbers(uninterrupted, cache, tmp_path):
    reference = uninterrupted
    out = tmp_path / "killed"
    # The epochs checkpointed before the kill are not trained again: their lines (timings included) stay as written.
    before_kill = killed_after_the_first_checkpoint(SCRIPT, FLAGS, out, cache)

    result = run([*FLAGS, "--out", str(out), "--resume"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in resumed] == [1, 2, 3, 4]
    assert (out / "metrics.jsonl").read_text().splitlines()[:1] == before_kill
    for a, b in zip(expected, resumed):
        assert a["test"] == b["test"] and a["train"] == b["train"], (a["epoch"], a, b)


def test_gta5_to_cityscapes_with_the_cityscapes_c_evaluation(cache, tmp_path):
    """Trains on generated GTA5, evaluates on generated Cityscapes' val split and on held-out GTA5 scenes (the
    source-target gap), then under two corruptions; in bfloat16, as a GPU user would run it (training, evaluation,
    checkpoint and panels all take that path)."""
    out = tmp_path / "gta5"
    result = run(["--synthetic", "--dataset", "gta5", "--model", "tiny", "--method", "ew", "--epochs", "2",
                  "--warmup-epochs", "0", "--batch-size", "4", "--steps-per-epoch", "1", "--quiet",
                  "--precision", "bfloat16",
                  "--corruptions", "contrast,gaussian_noise", "--severities", "1,5", "--out", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    metric_names = {"segmentation/miou", "segmentation/pixel_accuracy", "depth/abs_err", "depth/rel_err"}
    assert set(results["final"]) == metric_names  # Cityscapes' tasks: no normals
    # The source split (other scenes than the training ones) is scored beside the target, and the gap is theirs: the
    # last epoch's, as the target's (the first epoch's source metrics differ: a step was taken since).
    assert results["history"][-1]["source"] == results["final_source"] and set(results["final_source"]) == metric_names
    assert results["history"][0]["source"] != results["final_source"]
    # The run recorded every split's size, the source split's too (a resume with another held-out set is refused).
    from deep.data import load_cityscapes

    tested = len(load_cityscapes(out / "data" / "cityscapes", "val")["images"])
    assert json.loads((out / "run.json").read_text())["examples"] == {"train": 8, "test": tested, "source": 4}
    for name in metric_names:
        assert results["source_target_gap"][name] == pytest.approx(results["final"][name] -
                                                                  results["final_source"][name])
    assert results["final_source"] != results["final"]
    assert results["loss_weights_preset"] == "gta5_to_cityscapes" and results["epochs"] == 2
    assert results["model"]["compute_dtype"] == "bfloat16"
    corrupted = results["corrupted"]
    assert set(corrupted) == {"contrast", "gaussian_noise"} and all(set(v) == {"1", "5"} for v in corrupted.values())
    # Each metric's mean under corruption is over every corruption and severity evaluated (2 x 2 passes here).
    for name in metric_names:
        assert results["corrupted_mean"][name] == pytest.approx(np.mean(
            [corrupted[corruption][severity][name] for corruption in corrupted for severity in ("1", "5")]), rel=1e-12)
    # Heavy noise changes what the model sees, so its depth error is not the clean one (a depth prediction moves
    # with its input; after one step the tiny model's classes need not).
    clean = results["final"]["depth/abs_err"]
    assert corrupted["gaussian_noise"]["5"]["depth/abs_err"] != clean
    assert (out / "corruptions.png").stat().st_size > 10_000


def test_colored_cityscapes_trains_in_the_source_colours_and_is_scored_in_the_permuted_ones(cache, tmp_path):
    """The paper's stress test (Appendix I): the training split and the source metrics' in one colour per class, the
    result (the target) on the same val images in the permuted colours, with the source metrics and the gap beside
    it."""
    from deep.data import load_cityscapes
    from deep.data.colored import SOURCE_PALETTE, recolor, target_palette

    module = load_script("experiments/train_nyuv2.py")
    config = module.TrainConfig(synthetic=True, dataset="colored_cityscapes", model="tiny", batch_size=4,
                                shortcut_strength=0.8)
    train, target, source = module._load_splits(config, tmp_path / "splits")
    original = {split: load_cityscapes(tmp_path / "splits" / "data", split) for split in ("train", "val")}
    for recoloured, split, palette in ((train, "train", SOURCE_PALETTE), (source, "val", SOURCE_PALETTE),
                                       (target, "val", target_palette())):
        np.testing.assert_array_equal(recoloured["images"], recolor(original[split]["images"],
                                                                    original[split]["segmentation"], palette, 0.8))
        np.testing.assert_array_equal(recoloured["segmentation"], original[split]["segmentation"])
        np.testing.assert_array_equal(recoloured["depth"], original[split]["depth"])
    assert config.batch_size == 4 and config.weights_preset == "cityscapes"

    # CORE-MTL end to end (the suite's one run of the script's CORE-MTL path), its stages shortened to one epoch with
    # the tasks and the counterfactual pass: the stream probe measures both appearance changes.
    out = tmp_path / "colored"
    result = run(["--synthetic", "--dataset", "colored_cityscapes", "--model", "tiny", "--method", "core", "--epochs",
                  "1", "--warmup-epochs", "0", "--batch-size", "4", "--steps-per-epoch", "1", "--loss-weights",
                  "stage0_epochs=0,stage1_epochs=0,counterfactual_start_epoch=0,counterfactual_probability=1.0",
                  "--out", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["final"]) == set(results["final_source"]) == {
        "segmentation/miou", "segmentation/pixel_accuracy", "depth/abs_err", "depth/rel_err"}
    assert results["final"] != results["final_source"]  # other colours, other predictions
    assert results["source_target_gap"]["depth/abs_err"] == pytest.approx(
        results["final"]["depth/abs_err"] - results["final_source"]["depth/abs_err"])
    assert results["loss_weights"]["stage0_epochs"] == 0 and results["loss_weights"]["counterfactual_probability"] == 1
    assert {"counterfactual", "independence"} <= set(results["history"][0]["train"])  # the tasks' stage, with the pass
    shifts = results["stream_shift"]
    assert set(shifts) == {"appearance", "colors_permuted"}
    for shift in shifts.values():
        assert shift["semantic"]["n"] == shift["residual"]["n"] == len(target["images"])
        assert shift["semantic"]["mean"] > 0 and shift["residual"]["mean"] > 0
        assert shift["ratio"]["ratio"] == pytest.approx(shift["residual"]["mean"] / shift["semantic"]["mean"])
    assert "stream shift (colors_permuted): semantic " in result.stdout
    # The run as compare_runs reads it: its probe, one value per appearance change and stream, and their ratio.
    compared = load_script("experiments/compare_runs.py")
    assert compared.main([str(out), "--section", "stream_shift", "--out", str(tmp_path / "compared"), "--quiet"]) == 0
    setup = json.loads((tmp_path / "compared" / "comparison.json").read_text())["setups"][0]
    assert setup["label"].startswith("core (loss_weights=")
    assert setup["colors_permuted/ratio"]["mean"] == shifts["colors_permuted"]["ratio"]["ratio"]
    assert setup["appearance/semantic"]["mean"] == shifts["appearance"]["semantic"]["mean"]


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--method", "adam"], "--method must be one of core, stl, "),
    (["--synthetic", "--epochs", "0"], "--epochs must be an integer >= 1; got 0"),
    (["--synthetic", "--seed", "-1"], "--seed must be an integer >= 0; got -1"),
    (["--synthetic", "--residual-channels", "-4"], "--residual-channels must be an integer >= 0; got -4"),
    (["--synthetic", "--dataset", "gta5", "--method", "ew", "--epochs", "8"],
     "--warmup-epochs must be smaller than --epochs (8); got 10 (the paper's for gta5: pass a smaller"),
    (["--synthetic", "--seed", str(2**63)], "--seed must be an integer in [-2^63, 2^63 - 1]"),
    (["--synthetic", "--data", "/nonexistent"], "give exactly one of --data PATH and --synthetic"),
    (["--data", "/nonexistent"], "--data: no such folder: /nonexistent"),
    (["--data", __file__], f"--data: not a folder (a file): {__file__}"),
    (["--synthetic", "--pretrained", "/tmp"], "--pretrained: not a file (a folder): /tmp"),
    (["--synthetic", "--method", "graddrop", "--architecture", "mtan"], "--method graddrop needs hard parameter "
                                                                        "sharing (it masks the gradients of the one "),
    (["--synthetic", "--method", "stl", "--task", "albedo"], "--task must be one of segmentation, depth, normal"),
    (["--synthetic", "--batch-size", "two"], "--batch-size"),
    (["--synthetic", "--target-data", "/tmp"], "--target-data is for --dataset gta5 only"),
    (["--synthetic", "--source-data", "/tmp"], "--source-data is for --dataset gta5 only"),
    (["--synthetic", "--dataset", "gta5", "--source-data", "/nonexistent"], "--source-data: no such folder"),
    (["--data", "/tmp", "--dataset", "gta5", "--target-data", "/tmp", "--source-data", "/tmp/"],
     "--source-data must be a held-out GTA5 folder, not the training folder --data"),
    (["--synthetic", "--variant", "theirs"], "--variant must be one of paper, authors"),
    (["--synthetic", "--variant", "authors", "--heads-read", "semantic"], "heads_read"),
    (["--synthetic", "--perceptual", "/nonexistent.npz"], "--perceptual: no such file: /nonexistent.npz"),
    (["--synthetic", "--method", "ew", "--perceptual", __file__], "--perceptual is for --method core"),
    (["--data", "/tmp", "--dataset", "gta5"], "--dataset gta5 needs --target-data PATH"),
    (["--synthetic", "--method", "core", "--epochs", "5", "--warmup-epochs", "1"],
     "--epochs must exceed 5 for the heads to train; got 5"),
    (["--synthetic", "--corruptions", "snow"], "--corruptions must be 'all', 'paper' or comma-separated names from"),
    (["--synthetic", "--corruptions", "fog", "--severities", "0,6"], "--severities must be comma-separated integers"),
    (["--synthetic", "--loss-weights", "cka=0"], "--loss-weights takes comma-separated name=value from segmentation, "),
    (["--synthetic", "--method", "ew", "--loss-weights", "independence=0"],
     "--loss-weights is for --method core (its objective); got --method ew"),
    (["--synthetic", "--method", "core", "--epochs", "6", "--warmup-epochs", "1", "--loss-weights", "stage0_epochs=6"],
     "(stage 0 of the nyuv2 preset with --loss-weights): --epochs must exceed 6"),
    (["--synthetic", "--dataset", "colored_cityscapes", "--shortcut-strength", "1.5"],
     "--shortcut-strength must lie in [0, 1]; got 1.5"),
    (["--synthetic", "--dataset", "cityscapes", "--shortcut-strength", "0.5"],
     "--shortcut-strength is for --dataset colored_cityscapes only; got --dataset cityscapes"),
    (["--synthetic", "--dataset", "gta5", "--shortcut-strength", "0"],
     "--shortcut-strength is for --dataset colored_cityscapes only; got --dataset gta5"),
    # A warm-up as long as the run leaves no epoch to the cosine: refused with the flags, not later by the optimiser.
    (["--synthetic", "--method", "ew", "--epochs", "3", "--warmup-epochs", "3"],
     "--warmup-epochs must be smaller than --epochs (3); got 3"),
    (["--synthetic", "--method", "ew", "--architecture", "mtan", "--variant", "authors"],
     "--variant authors builds the dual-stream model; --architecture mtan has its own heads"),
    (["--synthetic", "--method", "core", "--architecture", "mtan"], "--method core needs the dual-stream model"),
    (["--synthetic", "--method", "ew", "--task", "depth"], "--task is for --method stl only; got --method ew"),
    (["--synthetic", "--steps-per-epoch", "-1"], "--steps-per-epoch must be an integer >= 0; got -1"),
    (["--synthetic", "--learning-rate", "0"], "--learning-rate must be a finite number > 0; got 0.0"),
    (["--synthetic", "--weight-decay", "nan"], "--weight-decay must be a finite number >= 0; got nan"),
    # Below the bounds (0 is --batch-size's "the dataset's", -1 --warmup-epochs'): refused, not read as the default.
    (["--synthetic", "--batch-size", "-1"], "--batch-size must be an integer >= 1; got -1"),
    (["--synthetic", "--warmup-epochs", "-2"], "--warmup-epochs must be an integer >= 0; got -2"),
    (["--synthetic", "--dataset", "colored_cityscapes", "--shortcut-strength", "-0.5"],
     "--shortcut-strength must lie in [0, 1]; got -0.5"),
    (["--synthetic", "--corruptions", "fog", "--severities", "0"], "--severities must be comma-separated integers in "
                                                                   "1..5; got '0'"),
    # Named by the flag, not by the library's argument: the user can act on the line.
    (["--synthetic", "--semantic-channels", "-64"], "--semantic-channels must be an integer >= 0; got -64"),
    (["--synthetic", "--preset", "nyu"], "--preset must be one of nyuv2, cityscapes, gta5_to_cityscapes, cityscapes_c"),
    (["--synthetic", "--optimizer", "sgd"], "--optimizer must be one of adam, adamw; got 'sgd'"),
    (["--synthetic", "--model", "huge"], "--model must be one of full, reduced, tiny; got 'huge'"),
    (["--synthetic", "--heads-read", "backbone"], "--heads-read must be one of semantic, semantic+backbone"),
    (["--synthetic", "--precision", "float16"], "--precision must be one of float32, bfloat16; got 'float16'"),
    (["--synthetic", "--learning-rate", "inf"], "--learning-rate must be a finite number > 0; got inf"),
])
def test_bad_flags_give_one_line_and_exit_2(tmp_path, args, message):
    """Refused before the run starts (checked through the script's entry point in this process)."""
    assert_one_line_error(run_in_process("experiments/train_nyuv2.py", *args, "--out", str(tmp_path / "out"),
                                         "--quiet", computation="deep.devices.initialize_distributed"), message)
    assert not (tmp_path / "out").exists()


def test_cityscapes_data_read_as_nyuv2_says_which_flag_reads_it(tmp_path):
    from deep.data import write_cityscapes

    module = load_script(SCRIPT)
    root = write_cityscapes(tmp_path / "cityscapes")
    with pytest.raises(FileNotFoundError, match=r"has no train/normal folder, as LibMTL's Cityscapes has none: for "
                                                r"Cityscapes give --dataset cityscapes \(or colored_cityscapes\)"):
        module._load_splits(module.TrainConfig(data=str(root), method="ew"), tmp_path / "out")
    assert module._load_splits(module.TrainConfig(data=str(root), method="ew", dataset="cityscapes"),
                               tmp_path / "out")[0]["images"].ndim == 4


def test_the_papers_corruptions_are_its_four():
    from deep.data import CORRUPTIONS

    config_class = load_script("experiments/train_nyuv2.py").TrainConfig
    paper = config_class(synthetic=True, corruptions="paper").corruption_names
    assert paper == ("contrast", "defocus_blur", "fog", "gaussian_noise")  # its Appendix J
    assert config_class(synthetic=True, corruptions="all").corruption_names == CORRUPTIONS


def test_a_command_line_without_settings_trains_with_the_papers_per_dataset():
    """The defaults the README states, from the paper's Appendix F and the authors' code: 100 epochs, Adam with
    coupled L2 decay 1e-4, learning rate 2e-4, seed 2024, float32; batches of 16 on NYUv2 and 32 on Cityscapes and
    GTA5, 5 warm-up epochs (10 on GTA5), and each dataset's Table 7 loss weights (Colored-Cityscapes is Cityscapes
    recoloured: Cityscapes' weights)."""
    from deep.losses import PRESETS

    module = load_script(SCRIPT)
    parser = module.parser_for(module.TrainConfig, "train", prog="train_nyuv2.py")
    config = module.TrainConfig(**vars(parser.parse_args(["--synthetic"])))
    assert (config.method, config.architecture, config.grounding, config.variant, config.model) == (
        "core", "shared", "hard", "paper", "full")
    assert (config.epochs, config.learning_rate, config.weight_decay, config.optimizer, config.seed) == (
        100, 2e-4, 1e-4, "adam", 2024)
    assert (config.precision, config.augment, config.steps_per_epoch, config.severities) == (
        "float32", False, 0, "1,2,3,4,5")
    settings = {dataset: module.TrainConfig(synthetic=True, dataset=dataset, method="ew")
                for dataset in module.DATASETS}
    assert {dataset: (c.batch_size, c.warmup_epochs, c.weights_preset) for dataset, c in settings.items()} == {
        "nyuv2": (16, 5, "nyuv2"), "cityscapes": (32, 5, "cityscapes"), "gta5": (32, 10, "gta5_to_cityscapes"),
        "colored_cityscapes": (32, 5, "cityscapes")}
    assert all(c.weights == PRESETS[c.weights_preset] for c in settings.values())
    # --preset replaces the dataset's weights (and, for Cityscapes-C, its batch size), nothing else.
    chosen = module.TrainConfig(synthetic=True, dataset="gta5", preset="cityscapes_c", method="core", epochs=12)
    assert (chosen.weights, chosen.batch_size, chosen.warmup_epochs) == (PRESETS["cityscapes_c"], 16, 10)


def test_each_flag_reaches_the_field_it_names(tmp_path):
    """Three command lines that between them give every flag a value other than its default: each lands in its own
    field (a flag read into another field, or dropped, would train another run than the one asked for)."""
    for name in ("gta5", "cityscapes", "held_out"):
        (tmp_path / name).mkdir()
    for name in ("resnet50.npz", "lpips.npz"):
        (tmp_path / name).write_bytes(b"")  # read only once the run starts
    lines = [
        {"data": str(tmp_path / "gta5"), "dataset": "gta5", "target_data": str(tmp_path / "cityscapes"),
         "source_data": str(tmp_path / "held_out"), "grounding": "soft",
         "heads_read": "semantic+backbone", "preset": "cityscapes_c", "loss_weights": "independence=0.5",
         "model": "tiny", "semantic_channels": 24, "residual_channels": 8, "epochs": 12, "batch_size": 6,
         "learning_rate": 0.003, "weight_decay": 0.002, "optimizer": "adamw", "warmup_epochs": 2,
         "precision": "bfloat16", "augment": True, "on_device": True, "pretrained": str(tmp_path / "resnet50.npz"),
         "perceptual": str(tmp_path / "lpips.npz"), "corruptions": "fog", "severities": "2,4", "steps_per_epoch": 3,
         "out": str(tmp_path / "run"), "resume": True, "seed": 7, "quiet": True},
        {"synthetic": True, "dataset": "colored_cityscapes", "shortcut_strength": 0.25, "method": "pcgrad",
         "architecture": "mtan"},
        {"synthetic": True, "method": "stl", "task": "depth", "variant": "authors"},
    ]
    assert_each_flag_reaches_its_field(SCRIPT, lines, tmp_path / "out")


def test_the_bounds_themselves_are_accepted():
    """Each bound's own value trains: no warm-up, a run one epoch longer than its warm-up, a zero weight decay, seed
    0, and a CORE-MTL run one epoch longer than its preset's stage 0 (5 epochs on NYUv2, 10 on GTA5)."""
    module = load_script(SCRIPT)
    edges = [{"method": "ew", "warmup_epochs": 0, "epochs": 1}, {"method": "ew", "warmup_epochs": 4, "epochs": 5},
             {"method": "ew", "weight_decay": 0.0, "seed": 0, "batch_size": 1, "steps_per_epoch": 0},
             {"method": "core", "epochs": 6, "warmup_epochs": 1},
             {"method": "core", "dataset": "cityscapes", "epochs": 11, "warmup_epochs": 1}]
    for edge in edges:
        config = module.TrainConfig(synthetic=True, **edge)
        assert all(getattr(config, name) == value for name, value in edge.items()), edge
    with pytest.raises(ValueError, match="--epochs must exceed 10 for the heads to train; got 10"):
        module.TrainConfig(synthetic=True, method="core", dataset="cityscapes", epochs=10, warmup_epochs=1)


def test_every_path_flag_is_recorded_as_the_absolute_path_it_names(tmp_path, monkeypatch):
    """A resume from another working folder names the same files: each path flag is recorded absolute."""
    module = load_script(SCRIPT)
    monkeypatch.chdir(tmp_path)
    for name in ("gta5", "cityscapes", "held_out"):
        (tmp_path / name).mkdir()
    for name in ("resnet50.npz", "lpips.npz"):
        (tmp_path / name).write_bytes(b"")
    paths = {"data": "gta5", "target_data": "cityscapes/", "source_data": "./held_out", "pretrained": "resnet50.npz",
             "perceptual": "lpips.npz"}
    identity = module.TrainConfig(dataset="gta5", model="tiny", epochs=12, **paths).run_identity()
    assert {name: identity[name] for name in paths} == {name: str(tmp_path / Path(path)) for name, path in
                                                        paths.items()}


@pytest.mark.parametrize("flags, message", [
    ({"method": "ew", "grounding": "soft"},  # a baseline has no grounding: model_config sets "none"
     "--grounding is for --method core (the baselines' models have no decoders); got --method ew"),
    ({"method": "stl", "task": "depth", "grounding": "soft"}, "--grounding is for --method core"),
    ({"method": "ew", "architecture": "mtan", "semantic_channels": 24},  # MTAN builds no streams
     "--semantic-channels set the dual-stream model's streams and heads; --architecture mtan has neither"),
    ({"method": "ew", "architecture": "mtan", "residual_channels": 8, "heads_read": "semantic+backbone"},
     "--residual-channels, --heads-read set the dual-stream model's streams and heads"),  # MTAN has its own heads
])
def test_a_flag_the_chosen_model_ignores_is_refused(flags, message):
    """As --loss-weights and --perceptual for a baseline, --task for a multi-task run and --variant authors with
    MTAN are: a flag the run would silently ignore trains another run than the one its record (and --resume) claims.
    At their defaults (--grounding hard, widths 0, no --heads-read) they are accepted, as they change nothing."""
    module = load_script(SCRIPT)
    with pytest.raises(ValueError, match=re.escape(message)):
        module.TrainConfig(synthetic=True, model="tiny", **flags)
    module.TrainConfig(synthetic=True, model="tiny", method="ew", architecture="mtan", grounding="hard")


@pytest.mark.parametrize("flags, message", [
    ({"method": "ew", "residual_channels": 8},  # no head reads the residual stream: a baseline never trains it
     "--residual-channels is for --method core (no head reads the residual stream; only its decoders and CKA term "
     "do); got --method ew"),
    ({"method": "stl", "task": "depth", "residual_channels": 8}, "--residual-channels is for --method core"),
    ({"perceptual": __file__, "loss_weights": "appearance=0"},  # the LPIPS term's weight is appearance
     "--perceptual weights the appearance reconstruction, which --loss-weights appearance=0 removes"),
    ({"method": "ew", "severities": "3"},  # nothing is evaluated under corruption without --corruptions
     "--severities is for --corruptions (the severities each corruption is evaluated at); got --severities 3 "
     "without --corruptions"),
])
def test_a_flag_that_another_flag_makes_idle_is_refused(flags, message):
    """A flag that changes nothing the run trains or reports under another flag's value is refused, as the ones the
    chosen model ignores are: its record would claim a setting the run did not use. Each is accepted where it acts."""
    module = load_script(SCRIPT)
    with pytest.raises(ValueError, match=re.escape(message)):
        module.TrainConfig(synthetic=True, model="tiny", **flags)
    module.TrainConfig(synthetic=True, model="tiny", residual_channels=8)
    module.TrainConfig(synthetic=True, model="tiny", perceptual=__file__, loss_weights="appearance_l1=0")
    module.TrainConfig(synthetic=True, model="tiny", method="ew", corruptions="fog", severities="3")


def test_the_evaluation_under_corruption_is_no_part_of_the_run():
    """--corruptions and --severities only choose what the final model is evaluated on, so a resume may change them
    (the run's identity leaves them out); each severity is evaluated once, in the order given."""
    module = load_script(SCRIPT)
    plain = module.TrainConfig(synthetic=True, method="ew")
    corrupted = module.TrainConfig(synthetic=True, method="ew", corruptions="paper", severities="3, 1,3")
    assert plain.run_identity() == corrupted.run_identity()
    assert (plain.corruption_names, corrupted.severity_levels) == ((), (3, 1))


def test_the_model_flags_reach_the_models_configuration():
    """--precision, --grounding, --variant, --heads-read and the stream widths reach the model the run builds; a
    baseline has no grounding; an stl run's one head is its --task."""
    module = load_script(SCRIPT)
    core = module.TrainConfig(synthetic=True, model="tiny", grounding="soft", precision="bfloat16",
                              heads_read="semantic+backbone", semantic_channels=24, residual_channels=8).model_config()
    assert (core.grounding, core.compute_dtype, core.heads_read, core.semantic_channels, core.residual_channels) == (
        "soft", "bfloat16", "semantic+backbone", 24, 8)
    assert [name for name, _ in core.tasks] == ["segmentation", "depth", "normal"]
    authors = module.TrainConfig(synthetic=True, model="tiny", method="ew", variant="authors").model_config()
    assert (authors.grounding, authors.compute_dtype, authors.heads_read) == ("none", "float32", "semantic+backbone")
    single = module.TrainConfig(synthetic=True, model="tiny", method="stl", task="depth", dataset="cityscapes")
    assert [name for name, _ in single.model_config().tasks] == ["depth"]


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--epochs", "0"], "--epochs must be an integer >= 1; got 0"),
    (["--data", "/nonexistent"], "--data: no such folder: /nonexistent"),
    # Met once the data set is generated or the weights are opened:
    (["--data", "SMALL_SET", "--model", "tiny", "--method", "ew", "--epochs", "2", "--warmup-epochs", "1",
      "--batch-size", "4"], "--batch-size 4 is larger than the training split (3 examples), which would leave no "
                            "full batch; give --batch-size 3 or less"),
    ([*FLAGS, "--pretrained", __file__], f"--pretrained: {__file__} is not a readable .npz archive (not a zip file"),
    (["--synthetic", "--model", "tiny", "--method", "core", "--epochs", "6", "--warmup-epochs", "1", "--batch-size",
      "4", "--perceptual", __file__], f"--perceptual: {__file__} is not a readable .npz archive (not a zip file"),
])
def test_bad_flags_from_the_command_line(cache, tmp_path, args, message):
    """Errors from ``python train_nyuv2.py`` on the CPU: one refused by the parser, one by the configuration's own
    checks, two met late. The run's folder stays free for the corrected command (a generated data set may stay)."""
    out = tmp_path / "out"
    if "SMALL_SET" in args:
        from deep.data import write_nyuv2

        small_set = write_nyuv2(tmp_path / "small", train=3, val=2)
        args = [str(small_set) if arg == "SMALL_SET" else arg for arg in args]
    result = run([*args, "--out", str(out), "--quiet"], cache)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"train_nyuv2.py: error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"data"}


def test_an_existing_run_is_not_overwritten_and_a_resume_must_keep_its_flags(uninterrupted, cache):
    out = uninterrupted
    result = run([*FLAGS, "--out", str(out)], cache)
    assert result.returncode == 2 and "already holds a run: pass --resume" in result.stderr
    changed = [*FLAGS[:-1], "--seed", "1", "--quiet", "--out", str(out), "--resume"]
    changed[changed.index("--learning-rate") + 1] = "0.02"
    result = run(changed, cache)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--learning-rate was 0.01, now 0.02; --seed was 2024, now 1" in result.stderr, result.stderr  # all at once


def test_a_resume_compares_paths_as_files_and_fills_in_the_datasets_defaults(tmp_path, monkeypatch):
    script = load_script("experiments/train_nyuv2.py")
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    named = lambda data: script.TrainConfig(data=data, model="tiny", method="ew").run_identity()
    assert named("data") == named(str(tmp_path / "data") + "/") == named("../" + tmp_path.name + "/data")
    assert named("data")["data"] == str(tmp_path / "data")
    # The perceptual loss's weights too (a weight file that must stay where it was: compared as the same file).
    (tmp_path / "lpips.npz").write_bytes(b"")
    weights = lambda path: script.TrainConfig(synthetic=True, perceptual=path).run_identity()
    assert weights("lpips.npz") == weights(str(tmp_path / "lpips.npz"))
    assert weights("lpips.npz")["perceptual"] == str(tmp_path / "lpips.npz")
    # An empty --heads-read is the variant's: the paper's heads read the semantic stream, however it was spelled.
    heads = lambda read: script.TrainConfig(synthetic=True, method="ew", heads_read=read).run_identity()
    assert heads("") == heads("semantic") and heads("")["heads_read"] == "semantic"
    nyuv2, gta5, colored = (script.TrainConfig(synthetic=True, dataset=d, method="ew")
                            for d in ("nyuv2", "gta5", "colored_cityscapes"))
    assert (nyuv2.batch_size, nyuv2.warmup_epochs, gta5.batch_size, gta5.warmup_epochs) == (16, 5, 32, 10)
    assert (colored.batch_size, colored.warmup_epochs) == (32, 5)  # Cityscapes recoloured: Cityscapes' schedule
    # Both ends of --shortcut-strength's [0, 1]: 0 leaves the images as they are (the unshifted control).
    for strength in (0.0, 1.0):
        assert script.TrainConfig(synthetic=True, dataset="colored_cityscapes", shortcut_strength=strength)
    clean, corrupted = (script.TrainConfig(synthetic=True, dataset="cityscapes", preset=p, method="ew")
                        for p in ("", "cityscapes_c"))
    assert (clean.batch_size, corrupted.batch_size) == (32, 16)  # the paper's Cityscapes-C runs: batches of 16


def test_each_dataset_is_augmented_as_the_paper_says():
    """--augment per dataset (the paper's Appendix F and the authors' NYUv2 pipeline): NYUv2 random scale-crop, flip
    and colour jitter; GTA5 and Cityscapes a flip only, and Colored-Cityscapes as Cityscapes (a colour jitter would
    change the class colours that are its shortcut); Cityscapes' depth is a disparity, which a zoom would scale the
    other way."""
    from deep.data import AugmentConfig

    configs = {name: AugmentConfig(**fields) for name, fields in load_script(SCRIPT).AUGMENTATIONS.items()}
    flip_only = {"scales": (1.0,), "flip": True, "color_jitter": (0.0, 0.0, 0.0, 0.0)}
    assert configs == {"nyuv2": AugmentConfig(scales=(1.0, 1.2, 1.5), flip=True, color_jitter=(0.4, 0.4, 0.4, 0.1)),
                       "gta5": AugmentConfig(**flip_only),
                       "cityscapes": AugmentConfig(**flip_only, depth_is_disparity=True),
                       "colored_cityscapes": AugmentConfig(**flip_only, depth_is_disparity=True)}


def test_generated_sets_hold_a_full_batch_of_the_datasets_default_size(tmp_path):
    """``--synthetic`` runs with each dataset's default batch (16 for NYUv2, 32 for Cityscapes and GTA5)."""
    script = load_script("experiments/train_nyuv2.py")
    for dataset in ("nyuv2", "cityscapes", "gta5"):
        config = script.TrainConfig(synthetic=True, dataset=dataset, method="ew")
        train_split, _, source = script._load_splits(config, tmp_path / dataset)
        assert len(train_split["images"]) == config.batch_size, dataset
    # GTA5's held-out source split is other scenes than the training ones (else the source metrics are training ones).
    assert not any(np.array_equal(held_out, image) for held_out in source["images"] for image in train_split["images"])
    small = script.TrainConfig(synthetic=True, method="ew", batch_size=4)
    assert len(script._load_splits(small, tmp_path / "small")[0]["images"]) == 8  # never fewer than 8


def test_a_damaged_record_of_the_run_is_refused_on_resume(tmp_path):
    """run.json that is not JSON, and a metrics.jsonl that lacks checkpointed epochs or cannot be read: one line
    each (the results would otherwise silently lack epochs), before any work for run.json."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"data": ')
    assert_one_line_error(run_in_process("experiments/train_nyuv2.py", *FLAGS, "--out", str(out), "--resume",
                                         computation="_load_splits"),
                          f"--resume: {out / 'run.json'} is not this script's record of a run")
    from _training import check_run_folder, read_history  # experiments/ is on the import path since load_script
    module = load_script("experiments/train_nyuv2.py")
    (out / "run.json").write_bytes(b"\xff\xfe{")  # not even text: the same refusal, not a traceback
    with pytest.raises(ValueError, match=r"run\.json is not this script's record of a run \(a JSON object of its"):
        check_run_folder(out, {}, True, module.TrainConfig, module.PATH_FIELDS, "train_nyuv2.py")
    history = tmp_path / "metrics.jsonl"
    assert read_history(history, 0) == []  # nothing checkpointed: nothing to read
    history.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')
    assert [line["epoch"] for line in read_history(history, 2)] == [1, 2]  # the epoch killed before its checkpoint
    history.write_text('{"epoch": 1}\n\n{"epoch": 2}\n\n')  # blank lines (an editor's) hold no epoch to lose
    assert [line["epoch"] for line in read_history(history, 2)] == [1, 2]
    for text, problem in (('{"epoch": 2}\n', "it holds epochs [2]"),
                          ('{"epoch": 1}\nnot json\n', "its line 2 is not JSON"),
                          ('{"epoch": 1}\n[2]\n', "its line 2 has no epoch number"), (None, "it is missing"),
                          (b'{"epoch": 1}\n\xff\n', "it is not text")):
        history.unlink(missing_ok=True)
        if isinstance(text, bytes):
            history.write_bytes(text)
        elif text is not None:
            history.write_text(text)
        with pytest.raises(ValueError, match=f"must hold the JSON line of each epoch from 1 to 2 .*; "
                                             f"{re.escape(problem)}"):
            read_history(history, 2)


def test_an_epoch_whose_evaluation_is_not_finite_is_named():
    """What stops a run before its epoch is recorded (a non-finite metric would make metrics.jsonl unwritable, and
    every resume would redo the epoch and meet it again)."""
    load_script("experiments/train_nyuv2.py")  # puts experiments/ on the import path, as running the script does
    from _training import non_finite_metrics

    non_finite = lambda line: non_finite_metrics(line, ("test", "source"))  # noqa: E731
    line = {"train": {"loss": float("nan")}, "test": {"depth/abs_err": 0.5, "normal/median": float("nan")},
            "source": {"depth/abs_err": float("inf")}}
    assert non_finite(line) == ["test normal/median", "source depth/abs_err"]
    assert non_finite({"test": {"depth/abs_err": 0.5}}) == []


def test_a_finished_run_adds_the_corruption_evaluation_on_resume(uninterrupted, cache, tmp_path):
    """--corruptions is evaluation only: resuming a finished run with it trains nothing and adds the results, which
    a later resume without it keeps (the model is the same)."""
    reference = uninterrupted
    out = tmp_path / "finished"
    shutil.copytree(reference, out)
    result = run([*FLAGS, "--out", str(out), "--resume", "--corruptions", "contrast", "--severities", "5"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["final"] == json.loads((reference / "results.json").read_text())["final"]
    assert set(results["corrupted"]) == {"contrast"} and set(results["corrupted"]["contrast"]) == {"5"}
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    result = run([*FLAGS, "--out", str(out), "--resume"], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["corrupted"] == results["corrupted"] and again["corrupted_mean"] == results["corrupted_mean"]


def test_two_processes_of_two_devices_reach_the_numbers_of_one_device(uninterrupted, cache, tmp_path):
    """Data parallelism and the multi-host path end to end on one machine: two processes of two CPU devices each
    join through the JAX_* variables (Gloo collectives on CPUs), process 0 generates the data while the other waits,
    both keep the data set on their devices (``--on-device``) and train on their halves of each batch, save the
    checkpoints together, and process 0 writes the files. The run ends the first epoch with the training losses and
    test metrics of one device reading host memory (BatchNorm statistics are over the global batch either way; only
    the order of float sums differs). A batch the devices cannot split leaves the folder free for the corrected
    command."""
    out = tmp_path / "run"
    env = environment(cache)
    four = with_cpu_devices(env, 4)
    result = subprocess.run([sys.executable, str(SCRIPT), *FLAGS, "--batch-size", "6", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT, env=four, timeout=900)
    assert result.returncode == 2 and "--batch-size must be a multiple of the 4 devices" in result.stderr
    assert not out.exists()  # nothing written, and the folder the check made removed: the corrected command below
    # runs in the same place

    launcher = (f"{USE_GLOO}; import runpy, sys; sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]; "
                f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    run_processes(launcher, [*FLAGS, "--on-device", "--out", str(out)], env, timeout=900)
    results = json.loads((out / "results.json").read_text())
    expected = json.loads((uninterrupted / "results.json").read_text())
    assert [line["devices"] for line in results["history"]] == [4] * 4 and results["config"]["on_device"] is True
    assert [line["devices"] for line in expected["history"]] == [1] * 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["3", "4"]
    # The first epoch's training losses and test errors (measured: within 3e-7 relative): later ones drift apart,
    # since Adam's first steps are about lr·sign(g) and turn rounding differences in near-zero gradients into whole
    # steps (thresholded metrics moved by 4 % at the end). The errors are averaged over the whole test split, which
    # both processes' evaluation must gather, not over one process's half.
    first, first_expected = results["history"][0], expected["history"][0]
    assert first["train"].keys() == first_expected["train"].keys() and len(first_expected["train"]) == 7
    assert first["test"].keys() == first_expected["test"].keys()
    pairs = [(first["train"][name], value, name) for name, value in first_expected["train"].items()]
    pairs += [(first["test"][name], first_expected["test"][name], name)
              for name in ("depth/abs_err", "depth/rel_err", "normal/mean")]
    for value, expected_value, name in pairs:
        assert value == pytest.approx(expected_value, rel=1e-5), name
    # The confusion matrix's metrics too (they were equal when measured), allowing a few pixels whose predicted class
    # flips with rounding: one of the 4 x 32 x 48 test pixels moves the accuracy by 1.6e-4, a small class's IoU more.
    for name, tolerance in (("segmentation/pixel_accuracy", 1e-3), ("segmentation/miou", 1e-2)):
        assert first["test"][name] == pytest.approx(first_expected["test"][name], abs=tolerance), name


def test_a_single_task_run_writes_its_results_and_samples(uninterrupted, cache, tmp_path):
    """A single-task run's test split holds one task's labels: the sample figure shows that task alone; compared
    with a multi-task run, it is the baseline row, which lacks the other tasks for Δm."""
    out = tmp_path / "stl"
    result = run(["--synthetic", "--model", "tiny", "--method", "stl", "--task", "depth", "--epochs", "1",
                  "--warmup-epochs", "0", "--batch-size", "4", "--steps-per-epoch", "1", "--quiet",
                  "--out", str(out)], cache)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["final"]) == {"depth/abs_err", "depth/rel_err"}
    assert (out / "samples.png").stat().st_size > 10_000

    compared = run_script("experiments/compare_runs.py", str(uninterrupted), str(out), "--out", str(tmp_path / "c"))
    assert compared.returncode == 0, compared.stderr
    rows = [line.split(" | ") for line in compared.stdout.splitlines() if line.startswith("| ")][1:]
    ew = json.loads((uninterrupted / "results.json").read_text())["final"]
    assert [row[0] for row in rows] == ["| stl (depth)", "| ew"]
    assert rows[1][4] == f"{ew['depth/abs_err']:.4g}" and rows[0][4] == f"{results['final']['depth/abs_err']:.4g}"
    assert "the single-task runs lack normal, segmentation" in compared.stdout


def test_loss_weight_overrides_reach_the_step_and_the_record(tmp_path, capsys):
    """--loss-weights replaces the preset's weights (the paper's ablations), in the step the run trains with: here
    no CKA and a stage 0 of one epoch, which lets a 3-epoch run through the check a 5-epoch stage 0 would fail."""
    import dataclasses

    from deep.losses import PRESETS

    module = load_script("experiments/train_nyuv2.py")
    weights = weights_reaching("experiments/train_nyuv2.py", "deep.trainer.make_step", "--synthetic", "--model",
                               "tiny", "--method", "core", "--epochs", "3", "--warmup-epochs", "1", "--batch-size",
                               "4", "--loss-weights", "independence=0,stage0_epochs=1", "--out", str(tmp_path / "out"))
    assert weights == dataclasses.replace(PRESETS["nyuv2"], independence=0.0, stage0_epochs=1)
    # Three epochs end before the preset's counterfactual pass starts (epoch 20): the run says so.
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["train_nyuv2.py: warning: no epoch of 3 trains the counterfactual pass (counterfactual): the "
                        "nyuv2 preset's schedule starts it later (its stage0_epochs, stage1_epochs, "
                        "counterfactual_start_epoch), so this run is the same as one with it at 0"]
    # Recorded (run.json, results.json's config) in one spelling, values equal to the preset's left out: a resume
    # spelling the same weights otherwise continues the run; other weights, or none, are refused.
    config = module.TrainConfig(synthetic=True, method="core", loss_weights="stage0_epochs=1, independence=0")
    assert config.run_identity()["loss_weights"] == "independence=0.0,stage0_epochs=1"
    from _training import check_run_folder

    folder = tmp_path / "resumed"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(config.run_identity()))
    same = module.TrainConfig(synthetic=True, method="core", loss_weights="independence=0.00,stage0_epochs=1,depth=10",
                              resume=True)
    check_run_folder(folder, same.run_identity(), True, module.TrainConfig, module.PATH_FIELDS, "t")
    for other in ("independence=0.0", ""):
        changed = module.TrainConfig(synthetic=True, method="core", loss_weights=other, epochs=6, resume=True)
        with pytest.raises(ValueError, match="--resume must use the run's own flags: --loss-weights was "):
            check_run_folder(folder, changed.run_identity(), True, module.TrainConfig, module.PATH_FIELDS, "t")


def test_the_training_flags_reach_the_optimiser_the_model_and_the_loader(tmp_path):
    """Each flag that shapes the training is handed on, not only parsed: --optimizer adamw (decoupled weight decay),
    --learning-rate, --weight-decay, --epochs and --warmup-epochs reach the optimiser's configuration, whose steps per
    epoch are the training split's 2 batches (8 generated examples in batches of 4), not the larger
    --steps-per-epoch cap; --architecture and --seed reach the model; --seed and --on-device reach the training
    loader. The run is stopped where the model is built (nothing compiled)."""
    from unittest import mock

    from deep import data, train

    class Reached(Exception):
        pass

    loaders, built = [], {}
    real_loader = data.Loader

    def loader(*args, **kwargs):
        loaders.append(kwargs)
        return real_loader(*args, **kwargs)

    def build_model(*args):
        built["args"] = args
        raise Reached

    module = load_script(SCRIPT)
    with mock.patch("deep.train.make_optimizer", wraps=train.make_optimizer) as make_optimizer, \
            mock.patch("deep.data.Loader", side_effect=loader), \
            mock.patch("deep.trainer.build_model", side_effect=build_model), pytest.raises(Reached):
        module.main(["--synthetic", "--model", "tiny", "--method", "ew", "--architecture", "mtan", "--epochs", "3",
                     "--warmup-epochs", "1", "--batch-size", "4", "--steps-per-epoch", "50", "--optimizer", "adamw",
                     "--learning-rate", "0.005", "--weight-decay", "0.003", "--seed", "7", "--on-device", "--quiet",
                     "--out", str(tmp_path / "out")])
    assert make_optimizer.call_args.args == (train.OptimConfig(
        learning_rate=0.005, weight_decay=0.003, decoupled_weight_decay=True, epochs=3, warmup_epochs=1,
        steps_per_epoch=2),)
    assert built["args"][1:] == ("mtan", 7)
    training = loaders[0]  # the evaluation loaders (unshuffled) follow it
    assert training["seed"] == 7 and training["on_device"] is True and training["mesh"] is not None
    assert training.get("shuffle", True) and all(kwargs.get("shuffle") is False for kwargs in loaders[1:])


def test_a_resume_may_find_its_data_elsewhere_but_not_other_data_or_weights(tmp_path, capsys):
    """The data copied elsewhere (a job's scratch disk) and its placement changed: the resume goes on and says so. A
    folder given before must be given again and hold splits of the sizes the run recorded; weight files (the
    perceptual loss's are read anew by every resume) must stay where they were; the other flags must agree."""
    module = load_script(SCRIPT)
    from _training import check_run_folder, record_run

    for name in ("nyuv2", "moved"):
        (tmp_path / name).mkdir()
    for name in ("a.npz", "b.npz"):
        (tmp_path / name).write_bytes(b"")  # read only once the run starts
    folder = tmp_path / "run"
    folder.mkdir()
    started = module.TrainConfig(data=str(tmp_path / "nyuv2"), pretrained=str(tmp_path / "a.npz"), method="ew")
    sizes = {"train": 795, "test": 654}
    record_run(folder, started.run_identity(), sizes, resumed=None)
    assert json.loads((folder / "run.json").read_text()) == {**started.run_identity(), "examples": sizes}
    check = lambda **changes: check_run_folder(  # noqa: E731
        folder, dataclasses.replace(started, resume=True, **changes).run_identity(), True, module.TrainConfig,
        module.PATH_FIELDS, "train_nyuv2.py")
    check()
    assert capsys.readouterr().err == ""
    check(data=str(tmp_path / "moved"), on_device=True)
    assert capsys.readouterr().err == (f"train_nyuv2.py: --resume: --data is now '{tmp_path / 'moved'}' (was "
                                       f"'{tmp_path / 'nyuv2'}'); --on-device is now True (was False)\n")
    record = check()
    record_run(folder, started.run_identity(), dict(sizes), resumed=record)
    with pytest.raises(ValueError, match=r"^--resume: the data holds other splits than the run was trained on: train "
                                         r"700 \(the run's: 795\) examples; resume with the run's data$"):
        record_run(folder, started.run_identity(), {**sizes, "train": 700}, resumed=record)
    with pytest.raises(ValueError, match=r"^--resume must use the run's own flags: --epochs was 100, now 7; "
                                         r"--pretrained was '.*a\.npz', now '.*b\.npz'$"):
        check(data=str(tmp_path / "moved"), pretrained=str(tmp_path / "b.npz"), epochs=7)
    with pytest.raises(ValueError, match=r"^--resume must use the run's own flags: --data was '.*nyuv2', now ''; "
                                         r"--synthetic was False, now True$"):
        check(data="", synthetic=True)
    # A run.json from before the sizes were recorded: nothing to check them against.
    (folder / "run.json").write_text(json.dumps(started.run_identity()))
    record_run(folder, started.run_identity(), {"train": 1, "test": 1}, resumed=check())


class FakeCheckpoints:
    """What restore_run reads of deep.checkpoint.Checkpoints: the newest readable epoch (None: none) and where."""

    def __init__(self, epoch, directory):
        self.epoch, self.directory = epoch, directory

    def restore_latest(self, template):
        return self.epoch, ({"restored": self.epoch} if self.epoch else None), []


@pytest.mark.parametrize("checkpointed, recorded, quiet, message", [
    (None, 0, False, "train_nyuv2.py: --resume: no readable checkpoint in CKPT: training from epoch 1"),
    (None, 0, True, None),
    (2, 3, False, "train_nyuv2.py: --resume: resuming after epoch 2 of 4; metrics.jsonl's epoch 3 has no readable "
                  "checkpoint and is trained again"),
    (2, 3, True, None),  # the epoch under way at a kill: nothing lost a quiet run must hear of
    (1, 3, True, "train_nyuv2.py: warning: --resume: resuming after epoch 1 of 4; metrics.jsonl's epochs 2-3 have no "
                 "readable checkpoint and are trained again"),
    (None, 2, True, "train_nyuv2.py: warning: --resume: no readable checkpoint in CKPT: training from epoch 1; "
                    "metrics.jsonl's epochs 1-2 have no readable checkpoint and are trained again"),
    (3, 3, False, "train_nyuv2.py: --resume: resuming after epoch 3 of 4"),  # one epoch left: it is trained
    (4, 4, False, "train_nyuv2.py: --resume: all 4 epochs were trained: evaluating the final model"),
])
def test_a_resume_says_where_it_goes_on_from(tmp_path, capsys, checkpointed, recorded, quiet, message):
    """Checkpoints lost (deleted, or set aside as unreadable) would otherwise make a resume train again, silently,
    epochs that metrics.jsonl records."""
    load_script(SCRIPT)
    from _training import restore_run

    history = tmp_path / "metrics.jsonl"
    if recorded:
        history.write_text("".join(json.dumps({"epoch": epoch}) + "\n" for epoch in range(1, recorded + 1)))
    start, tree, lines = restore_run(FakeCheckpoints(checkpointed, tmp_path / "ckpt"), {"initial": 0}, True,
                                     "train_nyuv2.py", history, 4, quiet)
    assert (start, tree) == ((checkpointed, {"restored": checkpointed}) if checkpointed else (0, {"initial": 0}))
    assert [line["epoch"] for line in lines] == list(range(1, start + 1))
    printed = capsys.readouterr().err.strip().replace(str(tmp_path / "ckpt"), "CKPT")
    assert printed == (message or "")
    assert restore_run(None, {"initial": 0}, False, "train_nyuv2.py", history, 4, False) == (0, {"initial": 0}, [])
    assert capsys.readouterr().err == ""


def test_a_resume_from_epoch_1_counts_the_epochs_a_damaged_history_still_shows(tmp_path, capsys):
    """With no checkpoint nothing reads metrics.jsonl (the first epoch rewrites it), so a damaged line must not hide
    the epochs the others record."""
    load_script(SCRIPT)
    from _training import restore_run

    history = tmp_path / "metrics.jsonl"
    history.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n\xff\n')
    assert restore_run(FakeCheckpoints(None, tmp_path), {}, True, "p", history, 4, True) == (0, {}, [])
    assert capsys.readouterr().err.startswith("p: warning: --resume: no readable checkpoint in ")


def test_the_results_are_the_last_epochs(uninterrupted):
    """results.json's final metrics are those metrics.jsonl records for the last epoch (the run's result is its
    last epoch, nothing is chosen), and its history is the file's lines. Uses the module's ``uninterrupted`` run."""
    results = json.loads((uninterrupted / "results.json").read_text())
    lines = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert results["final"] == lines[-1]["test"] and results["history"] == lines
    assert results["final"] != lines[0]["test"]  # EW learns: the epochs' metrics differ


def test_the_model_loaded_from_a_run_scores_the_runs_test_metrics(uninterrupted):
    """deep.trained.load_trained rebuilds the model from run.json and a checkpoint: evaluated on the run's test split
    (one batch of its 4 examples, as the run evaluated it), the newest gives results.json's final metrics and the
    epoch-3 one that epoch's line; the README's example runs on the folder; an epoch not kept and a folder without a
    run are one-line errors; nothing in the folder changes (names, sizes, modification times). Uses the module's
    ``uninterrupted`` run (EW; test_trained.py checks the trees of other methods against the script's)."""
    from flax import nnx

    from deep import data, trainer
    from deep.trained import load_trained

    def files(folder):
        return sorted((str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns)
                      for path in folder.rglob("*"))

    before = files(uninterrupted)
    results = json.loads((uninterrupted / "results.json").read_text())
    test_split = data.load_nyuv2(uninterrupted / "data", "val")
    predict = nnx.jit(lambda model, images: model(images)[0])
    for epoch, expected in ((None, results["final"]), (3, results["history"][2]["test"])):
        trained = load_trained(uninterrupted, epoch)
        assert trained.epoch == (epoch or 4) and trained.record["method"] == "ew"
        # In eval mode: BatchNorm with the batch's statistics or dropout on would give other metrics.
        metrics = trainer.evaluate(predict, trained.model, [test_split], trainer.run_model_config(trained.record).tasks)
        assert metrics == pytest.approx(expected, rel=1e-5)
    assert results["final"] != results["history"][2]["test"]  # two models told apart

    example = run_readme_example("readme-trained-model", {'"results/train_nyuv2"': repr(str(uninterrupted)),
                                                          '"nyuv2"': repr(str(uninterrupted / "data"))})
    assert example["trained"].epoch == 4
    assert {task: value.shape for task, value in example["predictions"].items()} == {
        "segmentation": (4, 32, 48, 13), "depth": (4, 32, 48, 1), "normal": (4, 32, 48, 3)}

    with pytest.raises(ValueError, match=r"keeps no checkpoint of epoch 1; it keeps 3, 4$"):
        load_trained(uninterrupted, 1)
    with pytest.raises(ValueError, match=r"holds no training run: run.json is missing$"):
        load_trained(uninterrupted / "data")
    assert files(uninterrupted) == before


def test_the_step_guard_stops_at_the_first_non_finite_step_and_the_epochs_means_are_over_its_steps():
    """train_epoch with steps stood in by their metrics: the means' sums and count over the steps (the guard's flag
    not among them), and a non-finite step stops the epoch with its number and the last good state."""
    load_script(SCRIPT)
    from _training import train_epoch

    steps = [(0, {"finite": True, "loss": 1.0, "depth": 2.0}), (1, {"finite": True, "loss": 3.0, "depth": 4.0})]
    assert train_epoch(iter(steps), 2, 0, 4, True, ("loss",), lambda: "LAST") == ({"loss": 4.0, "depth": 6.0}, 2)
    diverged = [*steps, (2, {"finite": False, "loss": float("nan"), "depth": 1.0}), (3, {"finite": True, "loss": 1.0,
                                                                                         "depth": 1.0})]
    with pytest.raises(ValueError, match=r"^training diverged at epoch 2, step 3: a non-finite loss or gradient norm "
                                         r"\(that step was not applied\); LAST$"):
        train_epoch(iter(diverged), 4, 1, 4, True, ("loss",), lambda: "LAST")


class RecordingCheckpoints:
    """What record_epoch and last_good_state_of use of Checkpoints; each save notes metrics.jsonl as it was then."""

    def __init__(self, out):
        self.out, self.saved = out, []

    def save(self, epoch, tree):
        history = self.out / "metrics.jsonl"
        self.saved.append((epoch, tree, history.read_text() if history.exists() else None))

    def latest_epoch(self):
        return self.saved[-1][0] if self.saved else None


def test_an_epoch_is_recorded_line_first_and_a_non_finite_evaluation_records_nothing(tmp_path):
    """record_epoch writes the epoch's line before its checkpoint (a kill between them redoes the epoch; the other
    way round would leave a checkpoint whose line is lost), and an evaluation with a non-finite metric (here the
    source split's) stops the run with where its last good state is, recording nothing."""
    load_script(SCRIPT)
    from _training import last_good_state_of, record_epoch

    checkpoints, history = RecordingCheckpoints(tmp_path), []
    last_good = lambda: last_good_state_of(checkpoints, tmp_path / "checkpoints")  # noqa: E731
    assert last_good() == "no epoch had completed, so there is no checkpoint"
    line = {"epoch": 1, "train": {"loss": 1.0}, "test": {"depth/abs_err": 0.5}, "source": {"depth/abs_err": 0.7}}
    record_epoch(line, history, ("test", "source"), tmp_path, True, checkpoints, {"w": 1}, last_good)
    assert history == [line] and checkpoints.saved == [(1, {"w": 1}, json.dumps(line) + "\n")]
    assert last_good() == f"the last good state is the checkpoint of epoch 1 in {tmp_path / 'checkpoints'}"
    bad = {**line, "epoch": 2, "source": {"depth/abs_err": float("inf")}}
    with pytest.raises(ValueError, match=r"^the model diverged at epoch 2: its evaluation gave a non-finite source "
                                         r"depth/abs_err; the last good state is the checkpoint of epoch 1 in "):
        record_epoch(bad, history, ("test", "source"), tmp_path, True, checkpoints, {"w": 2}, last_good)
    assert history == [line] and len(checkpoints.saved) == 1
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(line) + "\n"


def test_a_resume_counts_the_last_epoch_a_damaged_history_records_and_epoch_true_is_no_epoch(tmp_path, capsys):
    """The epochs to train again run to the last one metrics.jsonl records, past a damaged line (not to its number of
    lines); ``true`` is not epoch 1, though Python counts it as 1."""
    load_script(SCRIPT)
    from _training import read_history, restore_run

    history = tmp_path / "metrics.jsonl"
    history.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    restore_run(FakeCheckpoints(None, tmp_path), {}, True, "p", history, 4, True)
    assert "metrics.jsonl's epochs 1-3 have no readable checkpoint" in capsys.readouterr().err
    history.write_text('{"epoch": true}\n')
    with pytest.raises(ValueError, match="its line 1 has no epoch number"):
        read_history(history, 1)
    # Nor do they count for the epochs trained again (a string's number is no epoch either): nothing to warn of.
    history.write_text('{"epoch": true}\n{"epoch": "2"}\n')
    restore_run(FakeCheckpoints(None, tmp_path), {}, True, "p", history, 4, False)
    assert capsys.readouterr().err == f"p: --resume: no readable checkpoint in {tmp_path}: training from epoch 1\n"


def test_a_resume_takes_unrecorded_fields_at_their_defaults_and_refuses_what_would_change_the_run(tmp_path):
    """A run.json of an older version lacks newer fields: they had their defaults, so a resume with those passes. A
    resume without run.json, with another --steps-per-epoch (the schedule), a data folder the run did not have
    (--source-data added) or a test split of another size is refused."""
    module = load_script(SCRIPT)
    from _training import check_run_folder, record_run

    for name in ("gta5", "cityscapes", "held_out"):
        (tmp_path / name).mkdir()
    folder = tmp_path / "run"
    folder.mkdir()
    started = module.TrainConfig(data=str(tmp_path / "gta5"), dataset="gta5", target_data=str(tmp_path / "cityscapes"),
                                 method="ew", steps_per_epoch=2)
    check = lambda **changes: check_run_folder(  # noqa: E731
        folder, dataclasses.replace(started, resume=True, **changes).run_identity(), True, module.TrainConfig,
        module.PATH_FIELDS, "train_nyuv2.py")
    with pytest.raises(FileNotFoundError, match="--resume: no run to resume in .* \\(run.json is missing\\)"):
        check()
    older = {k: v for k, v in started.run_identity().items() if k != "shortcut_strength"}  # at its default, 1.0
    (folder / "run.json").write_text(json.dumps({**older, "examples": {"train": 32, "test": 16}}))
    record = check()
    with pytest.raises(ValueError, match="--steps-per-epoch was 2, now 3"):
        check(steps_per_epoch=3)
    with pytest.raises(ValueError, match="--augment was False, now True"):  # other batches from the same data
        check(augment=True)
    with pytest.raises(ValueError, match="--source-data was '', now '.*held_out'"):
        check(source_data=str(tmp_path / "held_out"))
    with pytest.raises(ValueError, match=r"other splits than the run was trained on: test 12 \(the run's: 16\)"):
        record_run(folder, started.run_identity(), {"train": 32, "test": 12}, resumed=record)
    # A split the run did not have is named too (its size against none).
    with pytest.raises(ValueError, match=r"other splits than the run was trained on: source 4 \(the run's: None\) "):
        record_run(folder, started.run_identity(), {"train": 32, "test": 16, "source": 4}, resumed=record)


def test_a_generated_set_appears_whole_or_not_at_all(tmp_path):
    """A run killed while generating its data set leaves no set behind, and the next run's writer starts from an
    empty folder (the half-written one cleared)."""
    load_script(SCRIPT)
    from _training import generated

    root = tmp_path / "data"

    def killed(folder):
        folder.mkdir()
        (folder / "half.npy").write_bytes(b"x")
        raise KeyboardInterrupt

    def whole(folder):
        folder.mkdir()
        (folder / "all.npy").write_bytes(b"y")

    with pytest.raises(KeyboardInterrupt):
        generated(root, killed)
    assert not root.exists()
    assert generated(root, whole) == root and _names_in(root) == ["all.npy"] and _names_in(tmp_path) == ["data"]


def _names_in(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("method_flags", [
    ["--method", "ew", "--augment"],
    ["--method", "core", "--epochs", "3", "--warmup-epochs", "0", "--loss-weights",
     "stage0_epochs=0,stage1_epochs=0,counterfactual_start_epoch=0,counterfactual_probability=0.5"]],
    ids=["ew_augmented", "core_coin_flips"])
def test_a_resumed_loop_hands_each_step_what_the_uninterrupted_loop_did(cache, tmp_path, method_flags):
    """The epoch loop's side of an exact resume, with a stand-in step (no training compiled): interrupted in its
    second epoch and resumed, a run hands every step the key, the (augmented) batch, the counterfactual coin flip,
    the state and the balancer's state that the uninterrupted run did, and trains each epoch once; keys and coin
    flips follow the global step, so no epoch repeats another's. (EW trains without randomness and has no balancer
    state, so the resumed run's numbers alone would not show these.)"""
    expected = steps_of_a_resumed_stand_in_loop(SCRIPT, [*FLAGS, "--steps-per-epoch", "2", *method_flags], cache,
                                                tmp_path)
    # Each step's batch is the seed's shuffled order of the epoch (2 of its batches), augmented only with --augment.
    from deep.data import Loader, load_nyuv2

    loader = Loader(load_nyuv2(tmp_path / "whole" / "data", "train"), 4, seed=2024)
    raw = [float(np.asarray(batch["images"], np.float64).sum()) for epoch in range(len(expected) // 2)
           for batch in list(loader.epoch(epoch))[:2]]
    if "--augment" in method_flags:
        assert any(step["images"] != pytest.approx(total, rel=1e-9) for step, total in zip(expected, raw))
    else:
        assert [step["images"] for step in expected] == pytest.approx(raw, rel=1e-9)
    if "core" in method_flags:
        from deep.trainer import EpochControls

        coin = EpochControls(train_tasks=True, independence_weight=0.0, counterfactual_probability=0.5)
        assert [step["counterfactual"] for step in expected] == [coin.counterfactual_at(2024, global_step)
                                                                 for global_step in range(len(expected))]
    else:
        assert [step["balancer"] for step in expected] == list(range(len(expected)))


def test_a_non_finite_metric_of_the_source_split_stops_the_run_before_its_epoch_is_recorded(cache, tmp_path):
    """GTA5 with held-out source scenes, a stand-in step, and the source split's evaluation (the epoch's second,
    after the target's) made NaN: the run stops with a line naming that split's metric, and records no epoch."""
    out = tmp_path / "gta5"
    flags = ["--synthetic", "--dataset", "gta5", "--model", "tiny", "--method", "ew", "--epochs", "1",
             "--warmup-epochs", "0", "--batch-size", "4", "--steps-per-epoch", "1", "--quiet", "--out", str(out)]
    result = run_with_a_stand_in_step(SCRIPT, flags, cache, tmp_path / "steps.jsonl", nan_evaluation=2)
    assert_one_line_error(result, "train_nyuv2.py: error: the model diverged at epoch 1: its evaluation gave a "
                                  "non-finite source segmentation/miou; no epoch had completed, so there is no "
                                  "checkpoint")
    assert not (out / "metrics.jsonl").exists() and not (out / "results.json").exists()

"""deep.comparison and experiments/compare_runs.py: runs grouped into setups over seeds, means with standard errors,
Δm and Δp against the single-task runs, and the table, JSON and figure the script writes. The runs here are
results.json files in the training scripts' format (tests/test_train_nyuv2.py and tests/test_train_celeba.py compare
runs the scripts really wrote)."""

import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from deep import comparison
from scripts import assert_one_line_error, interrupted_write_text, load_script, run_in_process

SCRIPT = "experiments/compare_runs.py"
TASK_METRICS = {"segmentation": ("segmentation/miou", "segmentation/pixel_accuracy"),
                "depth": ("depth/abs_err", "depth/rel_err"),
                "normal": ("normal/mean", "normal/median", "normal/within_11.25", "normal/within_22.5",
                           "normal/within_30")}
ALL_METRICS = [name for names in TASK_METRICS.values() for name in names]


def write_run(folder, method="ew", seed=0, final=None, task="", seconds=(30.0, 10.0, 11.0), **flags):
    """A results.json as experiments/train_nyuv2.py writes it (the fields the comparison reads, and a few more)."""
    config = {"data": f"/data/{folder.name}", "synthetic": False, "dataset": "nyuv2", "method": method, "task": task,
              "grounding": "hard", "variant": "paper", "model": "full", "epochs": len(seconds), "batch_size": 8,
              "learning_rate": 2e-4, "pretrained": "", "out": str(folder), "resume": False, "seed": seed,
              "quiet": True, **flags}
    history = [{"epoch": i + 1, "train": {"loss": 1.0}, "test": final, "train_seconds": s}
               for i, s in enumerate(seconds)]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"experiment": "train_nyuv2", "config": config, "final": final,
                                                     "epochs": len(seconds), "history": history}))
    return folder


def metrics_for(tasks, rng):
    return {name: float(rng.uniform(0.2, 0.9)) for task in tasks for name in TASK_METRICS[task]}


@pytest.fixture
def table1(tmp_path):
    """Single-task runs of the three tasks (two seeds each), EW and PCGrad on three seeds, CORE-MTL on two."""
    rng = np.random.default_rng(0)
    folders = []
    for task in TASK_METRICS:
        for seed in (0, 1):
            folders.append(write_run(tmp_path / f"stl_{task}_{seed}", "stl", seed, metrics_for([task], rng), task))
    for method, seeds in (("ew", (0, 1, 2)), ("pcgrad", (0, 1, 2)), ("core", (0, 1))):
        for seed in seeds:
            folders.append(write_run(tmp_path / f"{method}_{seed}", method, seed, metrics_for(TASK_METRICS, rng)))
    return folders


def edit(folder, source, change):
    """A copy of the run ``source`` in ``folder``, its results changed in place by ``change``."""
    results = json.loads((source / "results.json").read_text())
    change(results)
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def raw(folder):
    return json.loads((folder / "results.json").read_text())["final"]


def test_each_setup_is_the_mean_of_its_seeds_with_its_standard_error(table1):
    summary = comparison.compare([comparison.read_run(folder) for folder in table1])
    assert [setup.label for setup in summary.setups] == ["stl (depth, normal, segmentation)", "ew", "pcgrad", "core"]
    assert summary.section == "final" and list(summary.metrics) == ALL_METRICS  # the paper's order
    ew = [raw(folder) for folder in table1 if folder.name.startswith("ew_")]
    for name in ALL_METRICS:
        values = np.array([run[name] for run in ew])
        stats = summary.values["ew"][name]
        assert stats["n"] == 3 and stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
        # The sample standard deviation (n - 1) over sqrt(n): a population deviation would be sqrt(2/3) as large.
        assert stats["standard_error"] == pytest.approx(math.sqrt(np.sum((values - values.mean()) ** 2) / 2 / 3))
    # Each run's median epoch time (30 s of compiling in the first epoch are not an epoch's cost).
    assert summary.values["ew"]["seconds_per_epoch"] == {"mean": 11.0, "standard_error": 0.0, "n": 3}


def test_delta_m_and_delta_p_are_taken_against_the_mean_single_task_run(table1):
    summary = comparison.compare([comparison.read_run(folder) for folder in table1])
    stl = [raw(folder) for folder in table1 if folder.name.startswith("stl_")]
    baseline = {name: np.mean([run[name] for run in stl if name in run]) for name in ALL_METRICS}
    assert summary.baseline == pytest.approx(baseline)
    higher_better = {"segmentation/miou", "segmentation/pixel_accuracy", "normal/within_11.25", "normal/within_22.5",
                     "normal/within_30"}
    for method in ("ew", "pcgrad", "core"):
        deltas_m, deltas_p = [], []
        for run in (raw(folder) for folder in table1 if folder.name.startswith(f"{method}_")):
            change = {name: (1 if name in higher_better else -1) * (run[name] - baseline[name]) / baseline[name]
                      for name in ALL_METRICS}
            deltas_m.append(-100 * np.mean(list(change.values())))  # flat over the nine metrics; lower is better
            deltas_p.append(100 * np.mean([np.mean([change[name] for name in names])  # per task first
                                           for names in TASK_METRICS.values()]))
        for key, values in (("delta_m", deltas_m), ("delta_p", deltas_p)):
            stats = summary.values[method][key]
            assert stats["mean"] == pytest.approx(np.mean(values))
            assert stats["standard_error"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert "delta_m" not in summary.values["stl (depth, normal, segmentation)"]


def test_only_the_flags_that_change_what_is_learned_split_setups(tmp_path):
    rng = np.random.default_rng(1)
    runs = [
        write_run(tmp_path / "a", "core", 0, metrics_for(TASK_METRICS, rng), pretrained="/x/resnet50.npz"),
        # Another seed, folder, data path, weight file and progress output: the same setup.
        write_run(tmp_path / "b", "core", 1, metrics_for(TASK_METRICS, rng), pretrained="/y/r50.npz",
                  quiet=False, on_device=True, corruptions="paper"),
        write_run(tmp_path / "c", "core", 0, metrics_for(TASK_METRICS, rng), pretrained="/x/resnet50.npz",
                  grounding="soft"),
        write_run(tmp_path / "d", "core", 0, metrics_for(TASK_METRICS, rng), pretrained=""),  # no weights at all
        write_run(tmp_path / "e", "ew", 0, metrics_for(TASK_METRICS, rng), pretrained="/x/resnet50.npz"),
    ]
    summary = comparison.compare([comparison.read_run(folder) for folder in runs])
    # Labels name what differs within a method: EW's grounding flag, at its default, would be noise.
    assert [(setup.label, len(setup.runs)) for setup in summary.setups] == [
        ("core (grounding=hard, pretrained=True)", 2), ("core (grounding=soft, pretrained=True)", 1),
        ("core (grounding=hard, pretrained=False)", 1), ("ew", 1)]
    assert not any("also differ" in note for note in summary.notes)
    # One setup of one seed among others of more is enough for the note: its spread is unknown.
    assert "a setup of one seed has no standard error; train more seeds (--seed) to see the spread" in summary.notes
    # A flag that differs between methods and no label shows is named in a note.
    write_run(tmp_path / "f", "pcgrad", 0, metrics_for(TASK_METRICS, rng), pretrained="/x", learning_rate=1e-3)
    summary = comparison.compare([comparison.read_run(folder) for folder in [*runs, tmp_path / "f"]])
    assert summary.setups[-1].label == "pcgrad"
    assert "the setups also differ in --learning-rate (each setup's flags are in comparison.json)" in summary.notes


def test_without_a_full_baseline_or_for_gaps_there_is_no_delta_and_a_note_says_why(tmp_path):
    rng = np.random.default_rng(2)
    runs = [write_run(tmp_path / "stl_depth", "stl", 0, metrics_for(["depth"], rng), "depth"),
            write_run(tmp_path / "ew", "ew", 0, metrics_for(TASK_METRICS, rng))]
    summary = comparison.compare([comparison.read_run(folder) for folder in runs])
    assert summary.baseline is None and "delta_m" not in summary.values["ew"]
    assert any("lack normal, segmentation" in note for note in summary.notes)
    assert summary.values["ew"]["depth/abs_err"]["standard_error"] is None  # one seed: unknown, not zero
    alone = comparison.compare([comparison.read_run(runs[1])])
    assert any("no single-task runs" in note for note in alone.notes)
    # A baseline of 0 (a within-11.25° fraction of an untrained single-task run, say) has no relative change.
    zero = {**metrics_for(["normal"], rng), "normal/within_11.25": 0.0}
    runs += [write_run(tmp_path / "stl_normal", "stl", 0, zero, "normal"),
             write_run(tmp_path / "stl_segmentation", "stl", 0, metrics_for(["segmentation"], rng), "segmentation")]
    summary = comparison.compare([comparison.read_run(folder) for folder in runs])
    assert summary.baseline is None and any("mean of normal/within_11.25 is 0" in note for note in summary.notes)
    # Whichever way the metric is better: a single-task depth error of 0 has no relative change either.
    runs[0] = write_run(tmp_path / "stl_depth_exact", "stl", 0, {"depth/abs_err": 0.0, "depth/rel_err": 0.1}, "depth")
    runs[2] = write_run(tmp_path / "stl_normal_1", "stl", 0, metrics_for(["normal"], rng), "normal")
    summary = comparison.compare([comparison.read_run(folder) for folder in runs])
    assert summary.baseline is None and any("mean of depth/abs_err is 0" in note for note in summary.notes)


def test_a_section_of_differences_gets_no_relative_change(tmp_path):
    rng = np.random.default_rng(3)
    folders = []
    for task in TASK_METRICS:
        folders.append(write_run(tmp_path / f"stl_{task}", "stl", 0, metrics_for([task], rng), task))
    folders.append(write_run(tmp_path / "ew", "ew", 0, metrics_for(TASK_METRICS, rng)))
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        results["source_target_gap"] = {name: value - 0.5 for name, value in results["final"].items()}
        (folder / "results.json").write_text(json.dumps(results))
    runs = [comparison.read_run(folder) for folder in folders]
    assert comparison.compare(runs).baseline is not None
    gaps = comparison.compare(runs, "source_target_gap")
    assert gaps.baseline is None and any("differences" in note for note in gaps.notes)
    assert gaps.values["ew"]["depth/abs_err"]["mean"] == pytest.approx(raw(folders[-1])["depth/abs_err"] - 0.5)
    # A gap has no better direction: the table gives it neither arrows nor a bold best, even between two setups.
    folders.append(edit(tmp_path / "pcgrad", folders[-1], lambda r: r["config"].update(method="pcgrad")))
    text = load_script(SCRIPT).table(comparison.compare([comparison.read_run(f) for f in folders],
                                                        "source_target_gap"), ALL_METRICS)
    assert "**" not in text and "↑" not in text and "↓" not in text and "| depth/abs_err |" in text.splitlines()[0]


def test_the_table_bolds_the_best_setup_of_each_column_by_its_direction(table1, tmp_path):
    module = load_script(SCRIPT)
    summary = comparison.compare([comparison.read_run(folder) for folder in table1])
    text = module.table(summary, ALL_METRICS)
    lines = text.splitlines()
    assert lines[0].startswith("| setup | n | segmentation/miou ↑ |") and "| depth/abs_err ↓ |" in lines[0]
    assert "| Δm % ↓ | Δp % ↑ | s/epoch |" in lines[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    assert list(rows) == ["stl (depth, normal, segmentation)", "ew", "pcgrad", "core"]
    header = lines[0].split(" | ")
    for column, key in ((header.index("depth/abs_err ↓"), "depth/abs_err"),
                        (header.index("segmentation/miou ↑"), "segmentation/miou"),
                        (header.index("Δm % ↓"), "delta_m")):
        means = {label: summary.values[label][key]["mean"] for label in ("ew", "pcgrad", "core")}
        best = (min if key == "delta_m" or comparison.direction_of(key) < 0 else max)(means, key=means.get)
        assert [label for label, row in rows.items() if row[column].startswith("**")] == [best], key
    assert rows["ew"][1] == "3" and " ± " in rows["ew"][2]
    assert rows["stl (depth, normal, segmentation)"][1] == "2"  # seeds per task, not the six runs
    assert rows["stl (depth, normal, segmentation)"][header.index("Δm % ↓")] == "—"


def test_the_script_writes_the_table_json_and_figure(table1, tmp_path, capsys):
    module = load_script(SCRIPT)
    out = tmp_path / "compared"
    assert module.main([*map(str, table1), "--out", str(out), "--metrics", "segmentation/miou,depth/abs_err"]) == 0
    printed = capsys.readouterr().out
    document = (out / "comparison.md").read_text()
    assert document.startswith("# nyuv2: final") and module.table(
        comparison.compare([comparison.read_run(folder) for folder in table1]),
        ["segmentation/miou", "depth/abs_err"]) in document and "| setup | n | segmentation/miou ↑ |" in printed
    payload = json.loads((out / "comparison.json").read_text())
    assert len(payload["setups"]) == 4 and payload["setups"][1]["seeds"] == [0, 1, 2]
    assert set(payload["setups"][1]) >= {*ALL_METRICS, "delta_m", "delta_p", "seconds_per_epoch", "runs", "flags"}
    assert payload["directions"]["depth/abs_err"] == -1
    assert [setup["baseline"] for setup in payload["setups"]] == [True, False, False, False]
    assert (out / "comparison.png").stat().st_size > 10_000
    # A write that stops half-way (a full disk) leaves the previous table whole: written beside it, then renamed.
    before = (out / "comparison.md").read_text()

    with mock.patch("pathlib.Path.write_text", interrupted_write_text), pytest.raises(OSError):
        module.main([*map(str, table1), "--out", str(out), "--quiet"])
    assert (out / "comparison.md").read_text() == before
    # The figure's panels: the single-task mean as a dashed line on every metric's, whichever way it is better, and
    # 0 (the baseline's own Δm) on Δm's.
    summary = comparison.compare([comparison.read_run(folder) for folder in table1])
    with mock.patch.object(module, "save_figure") as saved:
        module.plot(summary, ["segmentation/miou", "depth/abs_err"], out / "unused.png")
    figure = saved.call_args.args[0]
    dashed = {axis.get_title(): [line.get_xdata()[0] for line in axis.get_lines() if line.get_linestyle() == "--"]
              for axis in figure.axes if axis.get_visible()}
    assert dashed == {"segmentation/miou (higher is better)": [summary.baseline["segmentation/miou"]],
                      "depth/abs_err (lower is better)": [summary.baseline["depth/abs_err"]],
                      "Δm % (lower is better)": [0.0]}
    # Each setup's seeds are its runs', in the same order (here given out of order).
    shuffled = comparison.compare([comparison.read_run(folder) for folder in reversed(table1)]).to_json()
    for setup in shuffled["setups"]:
        assert setup["seeds"] == [json.loads((Path(run) / "results.json").read_text())["config"]["seed"]
                                  for run in setup["runs"]] and setup["seeds"] != sorted(setup["seeds"])


@pytest.mark.parametrize("make, message", [
    (lambda tmp: [tmp / "missing"], "no such run folder"),
    (lambda tmp: [tmp / "unfinished"], "has no results.json yet"),
    (lambda tmp: [tmp / "killed_in_epoch_1"], "killed_in_epoch_1 has no results.json yet"),
    (lambda tmp: [tmp / "broken"], "is not valid JSON"),
    (lambda tmp: [tmp / "other"], "is not the results of a training run"),
    (lambda tmp: [tmp / "ew_0", tmp / "copy_of_ew_0"], "are the same setup with the same seed (0)"),
    (lambda tmp: [tmp / "ew_0", tmp / "celeba"], "compare runs of one benchmark at a time"),
    (lambda tmp: [tmp / "ew_0", tmp / "generated"], "ew_0 is a run on nyuv2 and "),
    (lambda tmp: [tmp / "generated", tmp / "ew_0"], "generated is a run on nyuv2 (generated data) and "),
    (lambda tmp: [tmp / "stl_depth", tmp / "stl_depth_lr"], "the single-task runs differ in --learning-rate"),
    (lambda tmp: [tmp / "ew_0", "--section", "final_source"], "has no 'final_source' results (it has final)"),
    (lambda tmp: [tmp / "ew_0", "--section", "test"], "section 'test' is not one of train_nyuv2's"),
    (lambda tmp: [tmp / "ew_0", "--metrics", "depth/abs"], "--metrics must be 'all' or comma-separated names"),
    (lambda tmp: [tmp / "ew_0", tmp / "two_tasks"], "two_tasks has other metrics than the runs beside it (it lacks "
                                                    "normal/mean, "),
    (lambda tmp: [tmp / "no_value"], "final['depth/abs_err'] is None, not a number"),
    (lambda tmp: [tmp / "boolean"], "final['depth/abs_err'] is True, not a number"),  # JSON true is no 1.0
    (lambda tmp: [tmp / "empty"], "its 'final' results hold no metric"),
    (lambda tmp: [tmp / "no_method"], "is not the results of a training run"),
    (lambda tmp: [tmp / "bad_history"], "its history is not a list of epochs with their train_seconds"),
    (lambda tmp: [tmp / "celeba_without_model"], "a CelebA run's results must name its attributes"),
    (lambda tmp: [tmp / "celeba", tmp / "celeba_other"], "celeba is a run on CelebA's Male, Young, Bald, Smiling and "),
])
def test_bad_input_is_one_line(tmp_path, make, message):
    rng = np.random.default_rng(4)
    write_run(tmp_path / "ew_0", "ew", 0, metrics_for(TASK_METRICS, rng))
    write_run(tmp_path / "copy_of_ew_0", "ew", 0, metrics_for(TASK_METRICS, rng))
    write_run(tmp_path / "stl_depth", "stl", 0, metrics_for(["depth"], rng), "depth")
    write_run(tmp_path / "stl_depth_lr", "stl", 0, metrics_for(["depth"], rng), "depth", learning_rate=1e-3)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "killed_in_epoch_1").mkdir()
    (tmp_path / "killed_in_epoch_1" / "run.json").write_text("{}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"experiment": "sweep_theta"}))
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "results.json").write_text(json.dumps({
        "experiment": "train_celeba", "config": {"method": "ew", "seed": 0},
        "model": {"attributes": ["Male", "Young", "Bald", "Smiling"]}, "test": {"attributes/mean_accuracy": 0.9}}))
    write_run(tmp_path / "two_tasks", "ew", 1, metrics_for(["segmentation", "depth"], rng))
    write_run(tmp_path / "generated", "pcgrad", 1, metrics_for(TASK_METRICS, rng), synthetic=True)
    write_run(tmp_path / "no_value", "ew", 1, {**metrics_for(TASK_METRICS, rng), "depth/abs_err": None})
    write_run(tmp_path / "boolean", "ew", 1, {**metrics_for(TASK_METRICS, rng), "depth/abs_err": True})
    write_run(tmp_path / "empty", "ew", 1, {})
    edit(tmp_path / "no_method", tmp_path / "ew_0", lambda r: r["config"].pop("method"))
    edit(tmp_path / "bad_history", tmp_path / "ew_0", lambda r: r["history"][0].update(train_seconds=None))
    edit(tmp_path / "celeba_without_model", tmp_path / "celeba", lambda r: r.update(model=None))
    edit(tmp_path / "celeba_other", tmp_path / "celeba",
         lambda r: r["model"].update(attributes=["Male", "Young", "Bald", "Eyeglasses"]))
    args = [str(arg) for arg in make(tmp_path)]
    assert_one_line_error(run_in_process(SCRIPT, *args, "--out", str(tmp_path / "out"), computation="plot"), message)


def test_celeba_runs_naming_the_same_attributes_differently_are_one_setup(tmp_path):
    names = ["5_o_Clock_Shadow", "Arched_Eyebrows"]
    for folder, flag, seed, accuracy in (("first_two", "2", 0, 0.8), ("named", ",".join(names), 1, 0.9)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps({
            "experiment": "train_celeba", "config": {"method": "core", "attributes": flag, "seed": seed},
            "model": {"attributes": names}, "history": [{"train_seconds": 5.0}],
            "test": {"attributes/mean_accuracy": accuracy, **{f"attributes/{name}": accuracy for name in names}}}))
    summary = comparison.compare([comparison.read_run(tmp_path / name) for name in ("first_two", "named")])
    assert [setup.label for setup in summary.setups] == ["core"] and summary.section == "test"
    assert summary.values["core"]["attributes/mean_accuracy"] == pytest.approx(
        {"mean": 0.85, "standard_error": 0.05, "n": 2})
    assert summary.benchmark == "CelebA, 2 attributes (5_o_Clock_Shadow, Arched_Eyebrows)"
    assert summary.notes[0] == "train_celeba.py trains no single-task runs: no Δm or Δp"  # not: "add --method stl"


def test_defaults_count_as_the_values_the_run_filled_in(tmp_path):
    """An empty --preset is the data set's, an empty --heads-read the variant's (the run records both); a baseline's
    grounding flag is not what it trained with (it has no decoder)."""
    rng = np.random.default_rng(5)
    runs = []
    for seed, preset, heads in ((0, "", ""), (1, "nyuv2", "semantic")):
        folder = write_run(tmp_path / f"core_{seed}", "core", seed, metrics_for(TASK_METRICS, rng), preset=preset,
                           heads_read=heads)
        runs.append(edit(tmp_path / f"core_{seed}_resolved", folder, lambda r: r.update(
            loss_weights_preset="nyuv2", model={"grounding": "hard", "heads_read": "semantic"})))
    runs.append(edit(tmp_path / "ew", write_run(tmp_path / "ew_raw", "ew", 0, metrics_for(TASK_METRICS, rng),
                                                  grounding="soft"),
                     lambda r: r.update(model={"grounding": "none", "heads_read": "semantic"})))
    setups = comparison.group_setups([comparison.read_run(folder) for folder in runs])
    assert [(setup.label, len(setup.runs)) for setup in setups] == [("core", 2), ("ew", 1)]
    # Nor does a baseline train with a loss-weight preset: EW runs recorded under other ones are one setup.
    presets = [edit(tmp_path / f"ew_preset_{seed}", write_run(tmp_path / f"ew_preset_raw_{seed}", "ew", seed,
                                                               metrics_for(TASK_METRICS, rng), preset=preset),
                    lambda r, preset=preset: r.update(loss_weights_preset=preset or "nyuv2"))
               for seed, preset in ((1, ""), (2, "cityscapes_c"))]
    setups = comparison.group_setups([comparison.read_run(folder) for folder in presets])
    assert [(setup.label, len(setup.runs)) for setup in setups] == [("ew", 2)]


def test_single_task_runs_trained_otherwise_are_named_in_a_note(tmp_path):
    rng = np.random.default_rng(6)
    folders = [write_run(tmp_path / f"stl_{task}", "stl", 0, metrics_for([task], rng), task, model="tiny")
               for task in TASK_METRICS]
    folders.append(write_run(tmp_path / "stl_depth_1", "stl", 1, metrics_for(["depth"], rng), "depth",
                             model="tiny"))
    folders.append(write_run(tmp_path / "ew", "ew", 0, metrics_for(TASK_METRICS, rng)))
    summary = comparison.compare([comparison.read_run(folder) for folder in folders])
    assert summary.baseline is not None
    assert ("the single-task runs differ from the multi-task setups in --model: Δm and Δp compare unlike trainings"
            in summary.notes)
    rows = load_script(SCRIPT).table(summary, ALL_METRICS).splitlines()[2:]
    assert rows[0].startswith("| stl (depth, normal, segmentation) | depth 2, normal 1, segmentation 1 |")
    # Single-task runs alone: a table and figure of them, no Δ. The figure shows them as its setup (there is no
    # other), each mean hollow: one seed per task for segmentation and normal, so no spread is known for the setup.
    alone = comparison.compare([comparison.read_run(folder) for folder in folders[:4]])
    assert alone.baseline is None and any("only single-task runs" in note for note in alone.notes)
    module = load_script(SCRIPT)
    with mock.patch.object(module, "save_figure", wraps=module.save_figure) as saved:
        module.plot(alone, ["segmentation/miou"], tmp_path / "alone.png")
    assert (tmp_path / "alone.png").stat().st_size > 10_000
    axis = saved.call_args.args[0].axes[0]
    assert [label.get_text().replace("\n", " ") for label in axis.get_yticklabels()] == [  # labels are wrapped
        "stl (depth, normal, segmentation)"]
    assert [line.get_markerfacecolor() for line in axis.get_lines() if line.get_marker() == "o"] == ["white"]


def test_every_setup_tied_for_the_best_is_bold(tmp_path):
    same = {name: 0.5 for name in ALL_METRICS}
    folders = [write_run(tmp_path / method, method, 0, same) for method in ("ew", "pcgrad")]
    folders.append(write_run(tmp_path / "core", "core", 0, {**same, "depth/abs_err": 0.6,
                                                              "segmentation/miou": 0.4}))
    text = load_script(SCRIPT).table(comparison.compare([comparison.read_run(f) for f in folders]), ALL_METRICS)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()[2:]}
    assert rows["ew"][2] == rows["pcgrad"][2] == "**0.5**" and rows["core"][2] == "0.4"
    assert rows["ew"][4] == rows["pcgrad"][4] == "**0.5**" and rows["core"][4] == "0.6"


def test_a_cell_is_the_mean_with_its_error_and_a_delta_is_signed(tmp_path):
    """Single-task runs at 0.5 on every metric; EW on two seeds at 0.5 ± 0.003 (the standard error of 0.503 and
    0.497: sd 0.003·√2 over √2), shown to two significant digits, not rounded away to 0.00; CORE-MTL 10 % worse on
    every metric, whose Δm, by its definition, is +10 % (worse), printed with its sign."""
    folders = [write_run(tmp_path / f"stl_{task}", "stl", 0, {name: 0.5 for name in names}, task)
               for task, names in TASK_METRICS.items()]
    folders += [write_run(tmp_path / f"ew_{seed}", "ew", seed, {name: 0.5 + offset for name in ALL_METRICS})
                for seed, offset in ((0, 0.003), (1, -0.003))]
    folders.append(write_run(tmp_path / "core", "core", 0, {name: 0.5 * (1 - 0.1 * comparison.direction_of(name))
                                                            for name in ALL_METRICS}))
    text = load_script(SCRIPT).table(comparison.compare([comparison.read_run(f) for f in folders]), ALL_METRICS)
    header, _, *lines = text.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines}
    columns = header.split(" | ")
    assert rows["ew"][columns.index("segmentation/miou ↑")].strip("*") == "0.5 ± 0.003"
    assert rows["core"][columns.index("Δm % ↓")] == "+10.00" and rows["core"][columns.index("Δp % ↑")] == "-10.00"


def test_the_tables_cells_are_the_json_values_rounded_as_documented(tmp_path):
    """The table rounds, comparison.json does not: a metric's mean to four significant digits with its standard error
    to two, a Δ to two decimals with its error to two decimals, s/epoch to four significant digits. Single-task runs
    at 0.5; EW at 0.61234 ± 0.01 on every metric (two seeds 0.01 either side, 90.1234 s an epoch); CORE-MTL on two
    seeds 10 % and 12 % worse on every metric, so Δm = +11 ± 1 % and Δp = -11 ± 1 %."""
    folders = [write_run(tmp_path / f"stl_{task}", "stl", 0, {name: 0.5 for name in names}, task)
               for task, names in TASK_METRICS.items()]
    folders += [write_run(tmp_path / f"ew_{seed}", "ew", seed, {name: 0.61234 + offset for name in ALL_METRICS},
                          seconds=(30.0, 90.1234, 90.1234)) for seed, offset in ((0, 0.01), (1, -0.01))]
    folders += [write_run(tmp_path / f"core_{seed}", "core", seed, {
        name: 0.5 * (1 - worse * comparison.direction_of(name)) for name in ALL_METRICS})
        for seed, worse in ((0, 0.10), (1, 0.12))]
    summary = comparison.compare([comparison.read_run(f) for f in folders])
    stored = {setup["label"]: setup for setup in summary.to_json()["setups"]}
    assert stored["ew"]["depth/abs_err"]["mean"] == pytest.approx(0.61234)
    assert stored["ew"]["depth/abs_err"]["standard_error"] == pytest.approx(0.01)
    assert stored["ew"]["seconds_per_epoch"]["mean"] == pytest.approx(90.1234)
    assert stored["core"]["delta_m"]["mean"] == pytest.approx(11.0)
    assert stored["core"]["delta_m"]["standard_error"] == pytest.approx(1.0)
    header, _, *lines = load_script(SCRIPT).table(summary, ["depth/abs_err"]).splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    rows = {cells[0]: dict(zip(columns, cells)) for cells in
            ([cell.strip().strip("*") for cell in line.strip("|").split("|")] for line in lines)}
    assert rows["ew"]["depth/abs_err ↓"] == "0.6123 ± 0.01" and rows["ew"]["s/epoch"] == "90.12"
    assert rows["core"]["Δm % ↓"] == "+11.00 ± 1.00" and rows["core"]["Δp % ↑"] == "-11.00 ± 1.00"


def test_a_single_task_run_of_a_task_no_multi_task_run_has_is_refused(tmp_path):
    """Two-task runs (segmentation and depth, Cityscapes' tasks) beside a single-task normal run: the baseline would
    hold metrics no multi-task run has, so no Δ could be taken; the run is refused by name, with what it adds."""
    rng = np.random.default_rng(11)
    folders = [write_run(tmp_path / f"stl_{task}", "stl", 0, metrics_for([task], rng), task) for task in TASK_METRICS]
    folders.append(write_run(tmp_path / "ew", "ew", 0, metrics_for(["segmentation", "depth"], rng)))
    with pytest.raises(ValueError, match=r"stl_normal has other metrics than the runs beside it \(it adds "
                                         r"normal/mean, normal/median, "):
        comparison.compare([comparison.read_run(folder) for folder in folders])
    summary = comparison.compare([comparison.read_run(folder) for folder in folders if folder.name != "stl_normal"])
    assert list(summary.baseline) == [*TASK_METRICS["segmentation"], *TASK_METRICS["depth"]]


def test_corrupted_means_compare_only_over_the_same_corruptions(tmp_path):
    rng = np.random.default_rng(7)
    folders = []
    for name, corruptions in (("a", {"fog": [3]}), ("b", {"fog": [3]}), ("c", {"fog": [3], "contrast": [1, 5]})):
        base = write_run(tmp_path / f"{name}_raw", "ew", len(folders), metrics_for(TASK_METRICS, rng))
        folders.append(edit(tmp_path / name, base, lambda r: r.update(
            corrupted={c: {str(s): r["final"] for s in levels} for c, levels in corruptions.items()},
            corrupted_mean=r["final"])))
    summary = comparison.compare([comparison.read_run(f) for f in folders[:2]], "corrupted_mean")
    assert summary.values["ew"]["depth/abs_err"]["n"] == 2
    with pytest.raises(ValueError, match=r"was evaluated under fog/3 and .* under contrast/1, contrast/5, fog/3;"):
        comparison.compare([comparison.read_run(f) for f in folders], "corrupted_mean")
    assert comparison.compare([comparison.read_run(f) for f in folders]).values["ew"]["depth/abs_err"]["n"] == 3


def test_a_run_from_before_a_flag_existed_had_its_default(tmp_path):
    """Runs record every flag of the version that wrote them: a later flag is filled in with the training script's
    default (which the older version trained as), so an older run joins its setup instead of making its own."""
    rng = np.random.default_rng(8)
    new = write_run(tmp_path / "new", "ew", 0, metrics_for(TASK_METRICS, rng), shortcut_strength=1.0,
                    architecture="shared")
    old = write_run(tmp_path / "old", "ew", 1, metrics_for(TASK_METRICS, rng))  # neither flag recorded
    defaults = load_script(SCRIPT).training_defaults()
    assert defaults["train_nyuv2"]["shortcut_strength"] == 1.0 and defaults["train_celeba"]["image_size"] == 128
    setups = comparison.group_setups([comparison.read_run(folder, defaults) for folder in (new, old)])
    assert [(setup.label, len(setup.runs)) for setup in setups] == [("ew", 2)]
    assert len(comparison.group_setups([comparison.read_run(folder) for folder in (new, old)])) == 2


def test_changed_loss_weights_are_named_and_shortcut_strengths_are_other_benchmarks(tmp_path):
    rng = np.random.default_rng(9)
    folders = [write_run(tmp_path / f"stl_{task}", "stl", 0, metrics_for([task], rng), task) for task in TASK_METRICS]
    folders.append(write_run(tmp_path / "ew", "ew", 0, metrics_for(TASK_METRICS, rng), loss_weights=""))
    folders.append(write_run(tmp_path / "core", "core", 0, metrics_for(TASK_METRICS, rng),
                             loss_weights="independence=0.0"))
    summary = comparison.compare([comparison.read_run(folder) for folder in folders])
    # A lone ablation is named as one; the baseline has no loss weights, which no note reports as a difference.
    assert [setup.label for setup in summary.setups][-2:] == ["ew", "core (loss_weights=independence=0.0)"]
    assert not any("differ" in note for note in summary.notes) and summary.baseline is not None

    strong = write_run(tmp_path / "strong", "ew", 0, metrics_for(["segmentation", "depth"], rng),
                       dataset="colored_cityscapes", shortcut_strength=1.0)
    weak = write_run(tmp_path / "weak", "ew", 1, metrics_for(["segmentation", "depth"], rng),
                     dataset="colored_cityscapes", shortcut_strength=0.5)
    assert comparison.read_run(strong).benchmark == "colored_cityscapes (shortcut strength 1)"
    # A run from before the flag existed trained at its default, full strength.
    older = edit(tmp_path / "older", strong, lambda r: r["config"].pop("shortcut_strength"))
    assert comparison.read_run(older).benchmark == "colored_cityscapes (shortcut strength 1)"
    with pytest.raises(ValueError, match=r"on colored_cityscapes \(shortcut strength 1\) and .* one on "
                                         r"colored_cityscapes \(shortcut strength 0.5\)"):
        comparison.group_setups([comparison.read_run(strong), comparison.read_run(weak)])


def probe(semantic, residual):
    """A results.json's stream_shift entry for one appearance change (deep.trainer.stream_shift's layout)."""
    return {"semantic": {"mean": semantic, "standard_error": 0.01, "n": 8},
            "residual": {"mean": residual, "standard_error": 0.02, "n": 8},
            "ratio": {"ratio": residual / semantic, "standard_error": 0.1, "n": 8}}


@pytest.mark.filterwarnings("error")  # a figure whose labels leave its panels no room warns
def test_the_stream_probe_compares_core_runs_by_each_appearance_change(tmp_path):
    """``--section stream_shift``: each CORE-MTL setup's probe (ẑ_s's and ẑ_r's relative change and their ratio, per
    appearance change) over its seeds; ẑ_s's change is better lower, the ratio higher, ẑ_r's change neither (no
    arrow, no bold); no Δ, since single-task runs have no streams."""
    rng = np.random.default_rng(10)
    folders, shifts = [], {}
    ablation = "counterfactual_probability=1.0,counterfactual_start_epoch=0,independence=0.0,stage0_epochs=0"
    for weights in ("", ablation):
        for seed in (0, 1, 2):
            semantic, residual = rng.uniform(0.05, 0.3, 2), rng.uniform(0.3, 1.5, 2)
            base = write_run(tmp_path / f"raw_{weights}_{seed}", "core", seed, metrics_for(TASK_METRICS, rng),
                             loss_weights=weights)
            entry = {"appearance": probe(semantic[0], residual[0]), "colors_permuted": probe(semantic[1], residual[1])}
            shifts.setdefault(weights, []).append(entry)
            folders.append(edit(tmp_path / f"core_{weights}_{seed}", base, lambda r: r.update(stream_shift=entry)))
    summary = comparison.compare([comparison.read_run(folder) for folder in folders], "stream_shift")
    assert list(summary.metrics) == [f"{change}/{name}" for change in ("appearance", "colors_permuted")
                                     for name in ("semantic", "residual", "ratio")]
    assert summary.baseline is None and any("single-task runs do not have" in note for note in summary.notes)
    labels = ["core (loss_weights=default)", f"core (loss_weights={ablation})"]
    assert [setup.label for setup in summary.setups] == labels
    for weights, label in zip(("", ablation), labels):
        values = summary.values[label]
        for change in ("appearance", "colors_permuted"):
            ratios = [entry[change]["ratio"]["ratio"] for entry in shifts[weights]]
            assert values[f"{change}/ratio"]["mean"] == pytest.approx(np.mean(ratios))
            assert values[f"{change}/ratio"]["standard_error"] == pytest.approx(np.std(ratios, ddof=1) / math.sqrt(3))
            assert values[f"{change}/semantic"]["mean"] == pytest.approx(
                np.mean([entry[change]["semantic"]["mean"] for entry in shifts[weights]]))

    module = load_script(SCRIPT)
    lines = module.table(summary, summary.metrics).splitlines()
    header = lines[0].split(" | ")
    assert "appearance/semantic ↓" in header and "appearance/ratio ↑" in header and "appearance/residual" in header
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    for key, title in (("appearance/semantic", "appearance/semantic ↓"), ("colors_permuted/ratio",
                                                                            "colors_permuted/ratio ↑")):
        means = {label: summary.values[label][key]["mean"] for label in rows}
        best = (min if comparison.direction_of(key) < 0 else max)(means, key=means.get)
        assert [label for label, row in rows.items() if row[header.index(title)].startswith("**")] == [best]
    assert not any(row[header.index("appearance/residual")].startswith("**") for row in rows.values())
    assert module.main([*map(str, folders), "--section", "stream_shift", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    # Every probe metric's direction as the table used it: the JSON's reader needs it to know which way is better.
    assert json.loads((tmp_path / "c" / "comparison.json").read_text())["directions"] == {
        f"{change}/{name}": direction for change in ("appearance", "colors_permuted")
        for name, direction in (("semantic", -1), ("residual", 0), ("ratio", +1))}

    # Other runs have no probe, and a probe must be one.
    ew = write_run(tmp_path / "ew", "ew", 0, metrics_for(TASK_METRICS, rng))
    assert_one_line_error(run_in_process(SCRIPT, str(folders[0]), str(ew), "--section", "stream_shift", "--out",
                                         str(tmp_path / "out"), computation="plot"),
                          "ew is a run of --method ew, which has no streams to probe: stream_shift compares CORE-MTL "
                          "runs only")
    broken = edit(tmp_path / "broken", folders[0], lambda r: r["stream_shift"]["appearance"].pop("ratio"))
    assert_one_line_error(run_in_process(SCRIPT, str(broken), "--section", "stream_shift", "--out",
                                         str(tmp_path / "out"), computation="plot"),
                          "its stream_shift['appearance'] is not a probe's result (semantic, residual and ratio)")


def test_the_jacobian_chunk_changes_memory_not_what_is_learned(tmp_path):
    """--jacobian-chunk trades memory for sequential passes with the same Jacobian (deep.train.task_jacobian_step):
    runs differing only in it (and the seed) are one setup over two seeds."""
    final = {"depth/abs_err": 0.5}
    runs = [write_run(tmp_path / "a", "pcgrad", 0, final, jacobian_chunk=0),
            write_run(tmp_path / "b", "pcgrad", 1, final, jacobian_chunk=2)]
    summary = comparison.compare([comparison.read_run(folder) for folder in runs])
    assert [(setup.label, len(setup.runs)) for setup in summary.setups] == [("pcgrad", 2)]


def test_celeba_attribute_accuracies_are_better_higher():
    """As the module says: an attribute's accuracy (and their mean) is +1, so the table bolds the highest. A metric
    of no known kind (a probe's name one level too deep included) is refused rather than given a direction."""
    assert comparison.direction_of("attributes/Smiling") == +1
    assert comparison.direction_of("attributes/mean_accuracy") == +1
    # A probe's raw layout flattened one level too deep ("appearance/semantic/mean") is no probe metric either.
    for unknown in ("depth/abs", "appearance/colors/ratio", "appearance/semantic/mean", "ratio"):
        with pytest.raises(ValueError, match=f"metric '{unknown}' has no known direction"):
            comparison.direction_of(unknown)


def test_celebas_table_shows_the_mean_accuracy_unless_asked_for_each_attribute(tmp_path):
    """By default the table's CelebA column is the mean accuracy (forty attribute columns would not fit); 'all'
    shows each attribute too, and a name given twice is one column."""
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "results.json").write_text(json.dumps({
        "experiment": "train_celeba", "config": {"method": "core", "seed": 0},
        "model": {"attributes": ["Male", "Bald"]},
        "test": {"attributes/Male": 0.9, "attributes/Bald": 0.7, "attributes/mean_accuracy": 0.8}}))
    summary = comparison.compare([comparison.read_run(tmp_path / "celeba")])
    shown = load_script(SCRIPT).shown_metrics
    assert shown(summary, "") == ["attributes/mean_accuracy"]
    assert shown(summary, "all") == ["attributes/mean_accuracy", "attributes/Male", "attributes/Bald"]
    assert shown(summary, "attributes/Bald, attributes/Bald,attributes/Male") == ["attributes/Bald", "attributes/Male"]
    with pytest.raises(ValueError, match="--metrics must be 'all' or comma-separated names"):
        shown(summary, " , ")  # no name at all: a table without a metric column is a mistake, not a choice


def test_bold_marks_the_best_multi_task_setup_never_the_baseline_nor_a_lone_setup(tmp_path):
    """The single-task baseline is better than every multi-task setup on depth/abs_err (0.1) and miou (0.9): the bold
    goes to the best multi-task setup (CORE-MTL's 0.4 and 0.6), not to the baseline, which is the reference, not a
    contender. With a single multi-task setup there is nothing to compare, and nothing is bold."""
    def metrics(names, **values):
        return {name: values.get(name.replace("/", "_").replace(".", "_"), 0.5) for name in names}

    folders = [write_run(tmp_path / f"stl_{task}", "stl", 0, metrics(names, depth_abs_err=0.1,
                                                                      segmentation_miou=0.9), task)
               for task, names in TASK_METRICS.items()]
    folders.append(write_run(tmp_path / "ew", "ew", 0, metrics(ALL_METRICS, depth_abs_err=0.5,
                                                               segmentation_miou=0.5)))
    folders.append(write_run(tmp_path / "core", "core", 0, metrics(ALL_METRICS, depth_abs_err=0.4,
                                                                   segmentation_miou=0.6)))
    table = load_script(SCRIPT).table
    text = table(comparison.compare([comparison.read_run(f) for f in folders]), ALL_METRICS)
    header, _, *lines = text.splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines}
    columns = header.split(" | ")
    for name, best, baseline in (("depth/abs_err ↓", "**0.4**", "0.1"), ("segmentation/miou ↑", "**0.6**", "0.9")):
        assert rows["stl (depth, normal, segmentation)"][columns.index(name)] == baseline
        assert rows["core"][columns.index(name)] == best and not rows["ew"][columns.index(name)].startswith("**")
    lone = table(comparison.compare([comparison.read_run(f) for f in folders[:4]]), ALL_METRICS)
    assert "**" not in lone

"""Compare finished training runs: each setup's metrics over its seeds (mean ± standard error), Δm and Δp.

    python experiments/compare_runs.py runs/stl_* runs/ew_* runs/pcgrad_* runs/core_*     # NYUv2's Table 1
    python experiments/compare_runs.py runs/gta5_* --section source_target_gap            # Table 2's gaps
    python experiments/compare_runs.py runs/celeba_t10_*                                  # Table 4 at T = 10
    python experiments/compare_runs.py runs/core_* --section stream_shift                 # Table 3's claim

Each argument is a run folder of ``experiments/train_nyuv2.py`` or ``experiments/train_celeba.py`` (its
``results.json``). Runs whose flags agree except for the seed (and the output folder, data and weight paths, progress
output, extra evaluations) are one setup on several seeds: its row gives each metric's mean over the seeds with its
standard error (sample standard deviation / √n; none for a single seed) and n, the number of seeds. Single-task runs
(``--method stl``, one per task and seed) are the baseline: with one for every task, each multi-task setup also gets Δm
(Nash-MTL's, in percent, lower is better) and Δp (LibMTL's, in percent, higher is better) against their mean, averaged
over the setup's seeds. The best mean of each column among the multi-task setups is in bold (every one on a tie; none
where there is only one setup); arrows say which way is better. ``s/epoch`` is each run's median training time per
epoch, averaged over the seeds (the paper's Table 4 cost; the median leaves out the epochs that compiled the step, the
first of the run and of every resume, while they are fewer than half). Notes under the table say what else differs:
flags in which setups of different methods differ, or in which the single-task runs differ from them (Δm would then
compare unlike trainings).

``--section`` picks which results: ``final`` (the test split at the last epoch; default), ``final_source``,
``source_target_gap`` (target - source, GTA5 -> Cityscapes), ``corrupted_mean`` (Cityscapes-C's mean over
corruptions and severities) or ``stream_shift`` (CORE-MTL runs only: the stream probe's relative change of ẑ_s and
ẑ_r and their ratio, per appearance change; the paper's Table 3 claim) for ``train_nyuv2``; ``test`` (default) or
``final_val`` for ``train_celeba``.
Writes ``comparison.md`` (the table printed), ``comparison.json`` (every metric, each setup's runs and seeds) and
``comparison.png`` (one panel per metric shown: each setup's mean and standard error, the single-task baseline
dashed) to ``--out``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import parse_config, parser_for, pyplot, run_main, save_figure, write_atomically, write_json  # noqa: E402

from deep import comparison  # noqa: E402

# Columns beyond the metrics: (key in the summary, header, direction).
DELTA_COLUMNS = (("delta_m", "Δm %", -1), ("delta_p", "Δp %", +1))


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    runs: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "positional": True, "help": "run folders (each holding a training run's results.json)"})
    section: str = dataclasses.field(default="", metadata={
        "help": "which results: final, final_source, source_target_gap, corrupted_mean or stream_shift (CORE-MTL "
                "runs only) (train_nyuv2); test or final_val (train_celeba) (default: final or test)"})
    metrics: str = dataclasses.field(default="", metadata={
        "help": "the metric columns of the table and figure: comma-separated names, or 'all' (default: every "
                "dense metric; CelebA's mean accuracy); comparison.json always holds all"})
    out: str = dataclasses.field(default="results/compare_runs", metadata={"help": "output folder"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        object.__setattr__(self, "runs", tuple(self.runs))
        if not self.runs:
            raise ValueError("give one or more run folders")


def shown_metrics(summary: comparison.Summary, option: str) -> list[str]:
    """The metrics the table and figure show: ``option``'s names, or by default every metric except CelebA's
    per-attribute accuracies (their mean stands for them; ``all`` shows them too)."""
    if option == "all":
        return list(summary.metrics)
    if not option:
        return [name for name in summary.metrics
                if not name.startswith("attributes/") or name == "attributes/mean_accuracy"]
    names = [name.strip() for name in option.split(",") if name.strip()]
    unknown = [name for name in names if name not in summary.metrics]
    if unknown or not names:
        raise ValueError(f"--metrics must be 'all' or comma-separated names from {', '.join(summary.metrics)}; "
                         f"got {option!r}")
    return list(dict.fromkeys(names))


def _cell(stats: dict | None, signed: bool = False) -> str:
    if stats is None:
        return "—"
    mean, error = stats["mean"], stats["standard_error"]
    value = f"{mean:+.2f}" if signed else f"{mean:.4g}"
    if error is None:
        return value
    return f"{value} ± {error:.2f}" if signed else f"{value} ± {error:.2g}"


def _seeds(summary: comparison.Summary, setup: comparison.Setup) -> str:
    """The n column: the seeds behind each mean; for the baseline, per task where its tasks have different counts
    ("depth 3, normal 2, segmentation 3")."""
    if not setup.is_baseline:
        return str(len(setup.runs))
    per_task = {}
    for run in setup.runs:
        per_task[str(run.config.get("task"))] = per_task.get(str(run.config.get("task")), 0) + 1
    if len(set(per_task.values())) == 1:
        return str(next(iter(per_task.values())))
    return ", ".join(f"{task} {count}" for task, count in sorted(per_task.items()))


def table(summary: comparison.Summary, metrics: Sequence[str]) -> str:
    """The comparison as a Markdown table: one row per setup (the baseline first), one column per metric."""
    with_deltas = summary.baseline is not None
    columns = [(name, name, comparison.direction_of(name)) for name in metrics]
    if with_deltas:
        columns += list(DELTA_COLUMNS)
    # A gap (target - source) has no better direction, nor has a metric of direction 0: no arrows, no bold.
    arrows = summary.section not in ("source_target_gap",)
    setups = sorted(summary.setups, key=lambda setup: not setup.is_baseline)
    contenders = [setup for setup in setups if not setup.is_baseline]
    best: dict[str, set[str]] = {}  # column -> the setups whose mean is the best (all of them on a tie)
    if arrows and len(contenders) > 1:
        for key, _, direction in columns:
            means = {setup.label: summary.values[setup.label][key]["mean"] for setup in contenders
                     if key in summary.values[setup.label]}
            if means and direction:
                top = (max if direction > 0 else min)(means.values())
                best[key] = {label for label, mean in means.items() if mean == top}
    header = ["setup", "n"] + [f"{title} {'↑' if direction > 0 else '↓'}" if arrows and direction else title
                                for _, title, direction in columns] + ["s/epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for setup in setups:
        row = summary.values[setup.label]
        cells = [setup.label, _seeds(summary, setup)]
        for key, _, _ in columns:
            text = _cell(row.get(key), signed=key.startswith("delta_"))
            cells.append(f"**{text}**" if setup.label in best.get(key, ()) else text)
        seconds = row.get("seconds_per_epoch")
        cells.append("—" if seconds is None else f"{seconds['mean']:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: comparison.Summary, metrics: Sequence[str], path: Path) -> None:
    """One panel per metric shown (and Δm where there is a baseline): each multi-task setup's mean as a dot with its
    standard error (hollow: one seed, whose spread is unknown), the single-task baseline as a dashed line."""
    plt = pyplot()
    keys = list(metrics) + (["delta_m"] if summary.baseline is not None else [])
    # The multi-task setups against the baseline's dashed line; single-task runs alone are shown as a setup.
    contenders = [setup for setup in summary.setups if not setup.is_baseline] or list(summary.setups)
    # Labels wrapped (an ablation's loss weights can be a hundred characters), so the panels keep their width.
    labels = [textwrap.fill(re.sub(r",(?=\S)", ", ", setup.label), 30) for setup in contenders]
    lines = sum(label.count("\n") + 1 for label in labels)
    columns = min(len(keys), 3)
    rows = math.ceil(len(keys) / columns)
    height = (0.25 * lines + 0.1 * len(contenders) + 1.8) * rows
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, height), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        for position, setup in enumerate(contenders):
            stats = summary.values[setup.label].get(key)
            if stats is None:
                continue
            error = stats["standard_error"]
            axis.errorbar(stats["mean"], position, xerr=error or 0.0, fmt="o", color=f"C{position % 10}", capsize=3,
                          markerfacecolor="white" if error is None else f"C{position % 10}")
        axis.set_yticks(range(len(contenders)), labels, fontsize=8)
        axis.set_ylim(len(contenders) - 0.5, -0.5)
        axis.grid(axis="x", alpha=0.3)
        if key == "delta_m":
            axis.set_title("Δm % (lower is better)", fontsize=9)
            axis.axvline(0.0, color="black", linestyle="--", linewidth=1.0)  # the single-task runs' own Δm
        else:
            direction = comparison.direction_of(key)
            better = "higher" if direction > 0 else "lower"
            axis.set_title(key if summary.section == "source_target_gap" or not direction
                           else f"{key} ({better} is better)", fontsize=9)
            if summary.baseline is not None and key in summary.baseline:
                axis.axvline(summary.baseline[key], color="black", linestyle="--", linewidth=1.0)
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    seeds = sorted({len(setup.runs) for setup in contenders})
    baseline = "; dashed: the single-task runs" if summary.baseline is not None else ""
    figure.suptitle(f"{summary.benchmark}, {summary.section}: mean over {'/'.join(map(str, seeds))} seed(s) ± 1 "
                    f"standard error (hollow: one seed){baseline}", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def training_defaults() -> dict[str, dict]:
    """Each training script's flag defaults (experiment -> flag -> default), for runs written before a flag existed
    (which trained as its default does)."""
    import importlib

    return {name: {field.name: field.default for field in dataclasses.fields(importlib.import_module(name).TrainConfig)}
            for name in comparison.SECTIONS}


def main(argv: Sequence[str] | None = None) -> int:
    parser = parser_for(CompareConfig, __doc__.splitlines()[0], prog="compare_runs.py")
    config = parse_config(CompareConfig, parser, argv, out_kind="folder")
    defaults = training_defaults()
    runs = [comparison.read_run(path, defaults) for path in config.runs]
    summary = comparison.compare(runs, config.section or None)
    metrics = shown_metrics(summary, config.metrics)
    text = table(summary, metrics)
    notes = "\n".join(f"- {note}" for note in summary.notes)
    out = Path(config.out)
    document = (f"# {summary.benchmark}: {summary.section}\n\n{text}\n" + (f"\n{notes}\n" if notes else ""))
    write_atomically(out / "comparison.md", lambda tmp: tmp.write_text(document))
    write_json(out / "comparison.json", {"experiment": "compare_runs", **summary.to_json()})
    plot(summary, metrics, out / "comparison.png")
    if not config.quiet:
        print(f"{summary.benchmark}, {summary.section}:\n{text}")
        if notes:
            print(notes)
        print(f"wrote {out / 'comparison.md'}, {out / 'comparison.json'} and {out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    run_main(main)

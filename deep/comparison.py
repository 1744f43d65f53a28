r"""Finished training runs side by side: each setup's metrics as a mean over its seeds with a standard error, and
Δm / Δp against the single-task runs, as the paper's tables print them.

A run is the folder ``experiments/train_nyuv2.py`` or ``experiments/train_celeba.py`` wrote (its ``results.json``).
Runs of one benchmark are grouped into **setups**: runs whose flags agree on everything but the seed and the
machine's particulars (output folder, data and weight paths, progress output, extra evaluations) are the same setup
trained on several seeds. A setup is labelled by its method and, where setups differ in more than the method, by the
flags in which they differ (``core (grounding=soft)``).

Single-task runs (``--method stl``, one per task) are the baseline: each metric's baseline is the mean over the
seeds of the single-task runs of its task, and every multi-task run's Δm and Δp (:func:`deep.metrics.delta_m`,
:func:`deep.metrics.delta_p`) are taken against it, then averaged over the setup's seeds. Their standard errors are
those of the setup's seeds alone: the spread of the baseline's own seeds is not propagated (every setup shares the
same baseline, so it moves them all together and does not change their order).

Standard errors are the sample standard deviation over the seeds (``ddof = 1``) divided by √n; a setup of one seed
has none (``None``), which says that its spread is unknown, not that it is zero.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deep.metrics import METRIC_DIRECTIONS, delta_m, delta_p, mean_and_error

__all__ = ["Run", "Setup", "Summary", "read_run", "group_setups", "compare", "SECTIONS", "direction_of"]

# The sections of a results.json that hold one value per metric, by experiment; the first is the default.
SECTIONS: dict[str, tuple[str, ...]] = {
    "train_nyuv2": ("final", "final_source", "source_target_gap", "corrupted_mean", "stream_shift"),
    "train_celeba": ("test", "final_val"),
}
# Sections whose values are differences (target - source): a relative change against a baseline means nothing there.
_DIFFERENCE_SECTIONS = ("source_target_gap",)
# The stream probe (deep.trainer.stream_shift) of a CORE-MTL run, by appearance change: how far ẑ_s moves (lower is
# the claim: it keeps the content), how far ẑ_r moves (no better way: it should absorb the change, but moving alone
# says nothing), and their ratio (higher is the claim). Single-task and baseline runs have no streams to probe.
PROBE_SECTION = "stream_shift"
_PROBE_DIRECTIONS = {"semantic": -1, "residual": 0, "ratio": +1}
# Flags that do not change what a run learns: where it was written and read from, how it talked, what was evaluated
# after it ended. Paths to weights do matter in one respect, whether there were any: they are compared as booleans.
_MACHINE_FLAGS = frozenset({"seed", "out", "resume", "quiet", "data", "target_data", "source_data", "on_device",
                            "corruptions", "severities", "gradient_probe", "jacobian_chunk"})
_WEIGHT_FLAGS = frozenset({"pretrained", "perceptual"})
_BENCHMARK_FLAGS = frozenset({"dataset", "attributes", "shortcut_strength", "synthetic"})
# Flags whose values follow from the method: a baseline has no grounding, loss weights, preset or perceptual loss.
_METHOD_FLAGS = frozenset({"method", "grounding", "preset", "perceptual", "loss_weights"})
BASELINE_METHOD = "stl"


def direction_of(metric: str) -> int:
    """+1 where higher is better, −1 where lower is better, 0 where neither is (a CelebA attribute's accuracy: +1;
    the stream probe's ``<change>/semantic``: −1, ``<change>/residual``: 0, ``<change>/ratio``: +1)."""
    if metric in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[metric]
    if metric.startswith("attributes/"):
        return +1
    if metric.count("/") == 1 and metric.split("/")[1] in _PROBE_DIRECTIONS:
        return _PROBE_DIRECTIONS[metric.split("/")[1]]
    raise ValueError(f"metric {metric!r} has no known direction; known: {', '.join(METRIC_DIRECTIONS)}, "
                     f"attributes/<name> and <change>/{{{','.join(_PROBE_DIRECTIONS)}}}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One finished training run: where it is, the script that wrote it, its flags and its whole ``results.json``
    (checked by :func:`read_run`)."""

    path: Path
    experiment: str
    config: Mapping[str, Any]
    results: Mapping[str, Any]

    @property
    def attributes(self) -> tuple[str, ...]:
        """CelebA's attributes, in the run's order (empty for the dense benchmarks)."""
        return tuple(self.results["model"]["attributes"]) if self.experiment == "train_celeba" else ()

    @property
    def benchmark_key(self) -> tuple:
        """What the run was trained and evaluated on; only runs of one benchmark compare."""
        return (self.experiment, str(self.config.get("dataset", "")), self.attributes, self.shortcut_strength,
                self.synthetic)

    @property
    def synthetic(self) -> bool:
        """Whether the run trained on a generated data set (``--synthetic``), another benchmark than the real one."""
        return bool(self.config.get("synthetic", False))

    @property
    def shortcut_strength(self) -> float | None:
        """Colored-Cityscapes' shortcut strength (its images are other data at another strength); else None."""
        if self.config.get("dataset") != "colored_cityscapes":
            return None
        return float(self.config.get("shortcut_strength", 1.0))

    @property
    def benchmark(self) -> str:
        """:attr:`benchmark_key` for a title (CelebA's attributes shortened)."""
        generated = ", generated data" if self.synthetic else ""
        if self.experiment == "train_celeba":
            names = self.attributes
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f"CelebA{generated}, {len(names)} attribute{'s' if len(names) != 1 else ''} ({shown})"
        if self.shortcut_strength is not None:
            return f"colored_cityscapes (shortcut strength {self.shortcut_strength:g}{generated})"
        return str(self.config.get("dataset", "nyuv2")) + (" (generated data)" if self.synthetic else "")

    @property
    def method(self) -> str:
        return str(self.config["method"])

    @property
    def setup_flags(self) -> dict[str, Any]:
        """The flags that define what the run learned, as the run resolved them (the seed and the machine's
        particulars left out)."""
        # The benchmark's own flags (the data set, CelebA's attributes however named) are the same for every run
        # compared: the benchmark says so.
        flags = {k: v for k, v in self.config.items() if k not in _MACHINE_FLAGS | _BENCHMARK_FLAGS}
        for name in _WEIGHT_FLAGS & flags.keys():
            flags[name] = bool(flags[name])
        # Defaults the run filled in, as it filled them in: an empty --preset is the data set's, an empty
        # --heads-read the variant's; a baseline has no grounding and no loss-weight preset, whatever the flags said.
        model = self.results.get("model")
        for name in ("grounding", "heads_read"):
            if name in flags and isinstance(model, Mapping) and name in model:
                flags[name] = model[name]
        if "preset" in flags:
            flags["preset"] = self.results.get("loss_weights_preset") if self.method == "core" else None
        if self.method == BASELINE_METHOD:
            flags.pop("task", None)  # one task per run; together they are the baseline
        return flags

    def metrics(self, section: str) -> dict[str, float]:
        """The run's values of ``section`` (``final``, ``test``...), one per metric."""
        values = self.results.get(section)
        if not isinstance(values, Mapping):
            held = [name for name in SECTIONS[self.experiment] if isinstance(self.results.get(name), Mapping)]
            if section == PROBE_SECTION and self.method != "core":
                raise ValueError(f"{self.path} is a run of --method {self.method}, which has no streams to probe: "
                                 f"{section} compares CORE-MTL runs only")
            raise ValueError(f"{self.path} has no {section!r} results (it has {', '.join(held) or 'none'}); "
                             f"choose a section every run has")
        if section == PROBE_SECTION:
            values = _probe_values(values, self.path)
        if not values:
            raise ValueError(f"{self.path}: its {section!r} results hold no metric")
        for name, value in values.items():
            if not _is_number(value):
                raise ValueError(f"{self.path}: {section}[{name!r}] is {value!r}, not a number")
        return {name: float(value) for name, value in values.items()}

    def corruptions(self) -> list[str]:
        """The corruptions and severities behind ``corrupted_mean`` (``"fog/3"``...), sorted."""
        corrupted = self.results.get("corrupted")
        if not isinstance(corrupted, Mapping):
            return []
        return sorted(f"{name}/{severity}" for name, by_severity in corrupted.items()
                      for severity in (by_severity if isinstance(by_severity, Mapping) else {}))

    def seconds_per_epoch(self) -> float | None:
        """The median over the epochs of an epoch's training time, which leaves out the epochs that compiled the
        step (the first of the run and of every resume) once they are fewer than half."""
        seconds = [line["train_seconds"] for line in self.results.get("history") or [] if "train_seconds" in line]
        return float(np.median(seconds)) if seconds else None


def _probe_values(shifts: Mapping, path: Path) -> dict[str, Any]:
    """A run's stream probe as one value per metric: ``<change>/semantic`` and ``<change>/residual`` (the mean
    relative change over the test images) and ``<change>/ratio`` (their ratio), for each appearance change."""
    values = {}
    for change, shift in shifts.items():
        try:
            values.update({f"{change}/semantic": shift["semantic"]["mean"],
                           f"{change}/residual": shift["residual"]["mean"], f"{change}/ratio": shift["ratio"]["ratio"]})
        except (TypeError, KeyError):
            raise ValueError(f"{path}: its stream_shift[{change!r}] is not a probe's result (semantic, residual and "
                             f"ratio)") from None
    return values


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(path: str | Path, defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Run:
    """The run in folder ``path`` (or the ``results.json`` file ``path``), refusing anything else in one line.
    ``defaults`` (experiment -> flag -> default) fills in the flags a run does not record: it was written before they
    existed, and so trained as their defaults do (else such a run would be a setup of its own)."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.exists():
        if path.is_dir() and ((path / "metrics.jsonl").exists() or (path / "run.json").exists()):
            raise FileNotFoundError(f"{path} has no results.json yet: a training run writes it when it ends "
                                    f"(resume it with its own flags and --resume to finish it)")
        raise FileNotFoundError(f"{path}: no such run folder (a folder holding a training run's results.json)")
    try:
        results = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error})") from None
    experiment = results.get("experiment") if isinstance(results, dict) else None
    config = results.get("config") if isinstance(results, dict) else None
    if experiment not in SECTIONS or not isinstance(config, dict) or not isinstance(config.get("method"), str):
        raise ValueError(f"{file} is not the results of a training run (written by "
                         f"{' or '.join(f'experiments/{name}.py' for name in SECTIONS)}, with its flags)")
    history = results.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(line, dict) and _is_number(line.get("train_seconds", 0.0)) for line in history):
        raise ValueError(f"{file}: its history is not a list of epochs with their train_seconds")
    model = results.get("model")
    if experiment == "train_celeba" and not (isinstance(model, dict) and isinstance(model.get("attributes"), list)
                                             and all(isinstance(name, str) for name in model["attributes"])):
        raise ValueError(f"{file}: a CelebA run's results must name its attributes (model.attributes)")
    config = {**(defaults or {}).get(experiment, {}), **config}
    return Run(path=file.parent, experiment=experiment, config=config, results=results)


@dataclasses.dataclass(frozen=True)
class Setup:
    """Runs of the same flags on different seeds, with the label the tables print and the flags it names."""

    label: str
    flags: Mapping[str, Any]
    runs: tuple[Run, ...]
    named: tuple[str, ...] = ()

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE_METHOD


def group_setups(runs: Sequence[Run]) -> list[Setup]:
    """The runs grouped into setups, in the order their first runs were given; refuses runs of different benchmarks,
    two runs of one setup with the same seed (a copy, whose agreement would shrink the standard error), and
    single-task runs of more than one setup (no one of them could be the baseline)."""
    if not runs:
        raise ValueError("no runs to compare; give one or more run folders")
    first = runs[0]
    other = next((run for run in runs if run.benchmark_key != first.benchmark_key), None)
    if other is not None:
        described = [run.benchmark if first.benchmark != other.benchmark or not run.attributes
                     else f"CelebA's {', '.join(run.attributes)}" for run in (first, other)]
        raise ValueError(f"{first.path} is a run on {described[0]} and {other.path} one on {described[1]}; "
                         f"compare runs of one benchmark at a time")
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run.setup_flags, sort_keys=True), []).append(run)
    for members in groups.values():
        seen: dict[tuple, Run] = {}
        for run in members:
            key = (run.config.get("seed"), run.config.get("task") if run.method == BASELINE_METHOD else None)
            if key in seen:
                raise ValueError(f"{seen[key].path} and {run.path} are the same setup with the same seed "
                                 f"({key[0]}); give each run once (a copy would understate the standard error)")
            seen[key] = run
    baselines = [members for members in groups.values() if members[0].method == BASELINE_METHOD]
    if len(baselines) > 1:
        differing = _differing_flags([members[0].setup_flags for members in baselines])
        raise ValueError(f"the single-task runs differ in {_flags(differing)}; "
                         f"give the single-task runs of one setup (they are the baseline of every other)")
    # A setup's label names the flags in which it differs from the other setups of its method (a baseline's
    # grounding flag, recorded at its default, would only be noise beside CORE-MTL's).
    by_method: dict[str, list[dict]] = {}
    for flags_key in groups:
        flags = json.loads(flags_key)
        by_method.setdefault(flags["method"], []).append(flags)
    shown = {method: _differing_flags(flag_sets) for method, flag_sets in by_method.items()}
    setups = []
    for flags_key, members in groups.items():
        flags = json.loads(flags_key)
        method = members[0].method
        named = []
        if method == BASELINE_METHOD:
            tasks = sorted({str(run.config.get("task")) for run in members})
            label = f"{BASELINE_METHOD} ({', '.join(tasks)})"
        else:
            # Changed loss weights are always named: a lone ablation is not the method as the paper runs it.
            named = shown[method] + (["loss_weights"] if flags.get("loss_weights") and
                                     "loss_weights" not in shown[method] else [])
            # An empty flag is the script's default ("core (loss_weights=default)" beside an ablation's overrides).
            extra = ", ".join(f"{name}={flags.get(name) if flags.get(name) != '' else 'default'}" for name in named)
            label = f"{method} ({extra})" if extra else method
        setups.append(Setup(label=label, flags=flags, runs=tuple(members), named=tuple(named)))
    return setups


def unlabelled_differences(setups: Sequence[Setup]) -> tuple[list[str], list[str]]:
    """``(between_methods, from_baseline)``: the flags in which multi-task setups of different methods differ, and
    those in which the single-task runs differ from any of them, where no label says so (a learning rate tuned for
    one method only, a baseline trained for fewer epochs): a comparison should know. Flags the method decides
    (CORE-MTL's grounding, loss weights, preset and perceptual loss) are left out."""
    contenders = [setup for setup in setups if not setup.is_baseline]
    labelled = {name for setup in contenders for name in setup.named} | _METHOD_FLAGS

    def differing(flag_sets):
        return [name for name in _differing_flags(flag_sets) if name not in labelled]

    between = differing([setup.flags for setup in contenders])
    baseline = next((setup for setup in setups if setup.is_baseline), None)
    from_baseline = [] if baseline is None else list(dict.fromkeys(
        name for setup in contenders for name in differing([baseline.flags, setup.flags]) if name != "task"))
    return between, from_baseline


def _differing_flags(flag_sets: Sequence[Mapping[str, Any]]) -> list[str]:
    """The flags whose values are not the same in all of ``flag_sets``, in the order the first one lists them."""
    names = list(dict.fromkeys(name for flags in flag_sets for name in flags))
    return [name for name in names if len({json.dumps(flags.get(name)) for flags in flag_sets}) > 1]


@dataclasses.dataclass(frozen=True)
class Summary:
    """The comparison: each setup's metrics (mean, standard error, n), Δm and Δp where a baseline allows them, and
    why they are absent where it does not."""

    benchmark: str
    section: str
    metrics: tuple[str, ...]
    setups: tuple[Setup, ...]
    values: Mapping[str, Mapping[str, Mapping[str, Any]]]  # setup label -> metric (or "delta_m", ...) -> statistics
    baseline: Mapping[str, float] | None
    notes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, "section": self.section, "metrics": list(self.metrics),
                "directions": {name: direction_of(name) for name in self.metrics},
                "baseline": dict(self.baseline) if self.baseline is not None else None,
                "notes": list(self.notes),
                "setups": [{"label": setup.label, "method": setup.method, "baseline": setup.is_baseline,
                            "flags": dict(setup.flags), "runs": [str(run.path) for run in setup.runs],
                            "seeds": [run.config.get("seed") for run in setup.runs],
                            **{name: dict(stats) for name, stats in self.values[setup.label].items()}}
                           for setup in self.setups]}


def compare(runs: Sequence[Run], section: str | None = None) -> Summary:
    """Groups ``runs`` into setups and summarises ``section`` of their results (default: the experiment's final
    test metrics, ``final`` or ``test``) over each setup's seeds, with Δm and Δp against the single-task runs when
    they cover every metric."""
    setups = group_setups(runs)
    experiment = runs[0].experiment
    section = section or SECTIONS[experiment][0]
    if section not in SECTIONS[experiment]:
        raise ValueError(f"section {section!r} is not one of {experiment}'s: {', '.join(SECTIONS[experiment])}")
    measured = {id(run): run.metrics(section) for run in runs}  # each run's values, read and checked once
    metrics = list(dict.fromkeys(name for values in measured.values() for name in values))
    order = {name: index for index, name in enumerate(METRIC_DIRECTIONS)}
    metrics.sort(key=lambda name: order.get(name, len(order)))  # the paper's order; attributes as the runs list them
    for name in metrics:
        direction_of(name)  # refuses an unknown metric before any work
    multi_task = {name for run in runs if run.method != BASELINE_METHOD for name in measured[id(run)]}
    for run in runs:
        names = set(measured[id(run)])
        odd = (names ^ multi_task) if run.method != BASELINE_METHOD else (names - multi_task if multi_task else set())
        if odd:
            how = "lacks" if odd <= multi_task else "adds"
            raise ValueError(f"{run.path} has other metrics than the runs beside it (it {how} "
                             f"{', '.join(sorted(odd))}); compare runs of the same tasks")
    if section == "corrupted_mean":
        first = runs[0]
        other = next((run for run in runs if run.corruptions() != first.corruptions()), None)
        if other is not None:
            raise ValueError(f"{first.path} was evaluated under {_shorten(first.corruptions())} and {other.path} "
                             f"under {_shorten(other.corruptions())}; corrupted means compare over the same "
                             f"corruptions and severities")

    notes: list[str] = []
    values: dict[str, dict[str, dict[str, Any]]] = {}
    for setup in setups:
        per_run = [measured[id(run)] for run in setup.runs]
        values[setup.label] = {name: mean_and_error([m[name] for m in per_run if name in m])
                               for name in metrics if any(name in m for m in per_run)}
        seconds = [s for run in setup.runs if (s := run.seconds_per_epoch()) is not None]
        if seconds:
            values[setup.label]["seconds_per_epoch"] = mean_and_error(seconds)

    baseline = _baseline(setups, values, metrics, section, notes)
    if baseline is not None:
        for setup in setups:
            if setup.is_baseline:
                continue
            per_run = [measured[id(run)] for run in setup.runs]
            values[setup.label]["delta_m"] = mean_and_error([delta_m(m, baseline, _directions(metrics))
                                                             for m in per_run])
            values[setup.label]["delta_p"] = mean_and_error([delta_p(m, baseline, _directions(metrics))
                                                             for m in per_run])
    between, from_baseline = unlabelled_differences(setups)
    if between:
        notes.append(f"the setups also differ in {_flags(between)} (each setup's flags are in comparison.json)")
    if from_baseline:
        notes.append(f"the single-task runs differ from the multi-task setups in {_flags(from_baseline)}: "
                     f"Δm and Δp compare unlike trainings")
    if any(len(setup.runs) == 1 for setup in setups):
        notes.append("a setup of one seed has no standard error; train more seeds (--seed) to see the spread")
    return Summary(benchmark=runs[0].benchmark, section=section, metrics=tuple(metrics), setups=tuple(setups),
                   values=values, baseline=baseline, notes=tuple(notes))


def _shorten(names: Sequence[str], shown: int = 4) -> str:
    if not names:
        return "no corruption"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _flags(names: Sequence[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def _directions(metrics: Sequence[str]) -> dict[str, int]:
    return {name: direction_of(name) for name in metrics}


def _baseline(setups: Sequence[Setup], values, metrics: Sequence[str], section: str,
              notes: list[str]) -> dict[str, float] | None:
    """Each metric's single-task mean over the seeds, or None (with a note saying why) when Δ cannot be taken."""
    if section == PROBE_SECTION:
        notes.append(f"{section} probes CORE-MTL's two streams, which single-task runs do not have: no Δm or Δp")
        return None
    baseline_setup = next((setup for setup in setups if setup.is_baseline), None)
    if baseline_setup is None:
        if setups[0].runs[0].experiment == "train_celeba":  # the attributes are trained together only
            notes.append("train_celeba.py trains no single-task runs: no Δm or Δp")
        else:
            notes.append(f"no single-task runs (--method {BASELINE_METHOD}) among the runs: no Δm or Δp")
        return None
    if all(setup.is_baseline for setup in setups):
        notes.append("only single-task runs: no multi-task setup to take Δm or Δp of")
        return None
    if section in _DIFFERENCE_SECTIONS:
        notes.append(f"{section} holds differences, which have no relative change: no Δm or Δp")
        return None
    covered = values[baseline_setup.label]
    missing_tasks = sorted({name.split("/")[0] for name in metrics if name not in covered})
    if missing_tasks:
        notes.append(f"the single-task runs lack {', '.join(missing_tasks)}: Δm and Δp need a single-task run of "
                     f"every task")
        return None
    zero = [name for name in metrics if covered[name]["mean"] == 0]
    if zero:
        notes.append(f"the single-task mean of {', '.join(zero)} is 0, against which no relative change can be "
                     f"taken: no Δm or Δp")
        return None
    return {name: covered[name]["mean"] for name in metrics}

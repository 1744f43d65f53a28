"""The cost of a CelebA training step against the number of attributes T, the paper's Table 4 in FLOPs and seconds.

    python bench/bench_celeba_scaling.py                              # the paper's setting: FLOPs only, any machine
    python bench/bench_celeba_scaling.py --variant authors            # their ResNet-18
    python bench/bench_celeba_scaling.py --config tiny --time         # step times too, at a CPU-sized model
    python bench/bench_celeba_scaling.py --time                       # on a GPU: the paper's setting, timed
    python bench/bench_celeba_scaling.py --memory --jacobian-chunk 8  # XLA's memory, PCGrad 8 tasks at a time

The paper's claim (its Table 4): CORE-MTL's cost per epoch stays constant as T grows (297-300 s on an A800), as does
EW's and STCH's (86-97 s), while PCGrad's grows linearly (690 s at T = 10, 2806 s at T = 40), since it needs each
task's gradient of the shared parameters. Each step (``ew``, ``stch``, ``pcgrad``: the balancing baselines of
:func:`deep.train.balanced_step`; ``core``: :func:`deep.attributes.attribute_step` with the decoder, and
``core_lpips`` with the authors' LPIPS-VGG term too, its weights random here) is traced on
abstract arrays and counted by XLA's cost analysis, as ``bench_flops.py`` counts the dense steps (nothing is compiled
or run; the same count on every device). ``--time`` also compiles and times each step on this machine's default
device (the median of ``--repeats`` steps, after one untimed step); it and ``--memory`` record XLA's memory figures
of the compiled program (``temporary_gib``: on a CPU, the CPU program's, an indication of a GPU's).
``--jacobian-chunk`` runs PCGrad's pull-backs through the encoder that many at a time
(:func:`deep.train.task_jacobian_step`): a loop, whose body XLA's cost analysis counts once, so PCGrad's FLOPs are
then undercounted at task counts above the chunk (the JSON says so); take its FLOPs from a run without it.

Settings: ``celeba`` is the paper's (128x128 faces, batch 256, the full model of ``--variant``); ``tiny`` is the CPU
smoke model (batch 16, 64x64). Writes ``bench/results/bench_celeba_scaling_<config>[_authors].json``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (environment, median_seconds, parse_config, parser_for, require_integer,  # noqa: E402
                     run_main, write_json)
from bench_train_step import lowered_flops  # noqa: E402

CONFIGS = {"celeba": ("full", 256, 128), "tiny": ("tiny", 16, 64)}  # model size, batch, image size
METHODS = ("ew", "stch", "pcgrad", "core", "core_lpips")
TASK_COUNTS = (10, 20, 30, 40)  # the paper's Table 4
# The paper's Table 4: seconds per epoch on an A800 (its CORE-MTL runs with the LPIPS term, as the authors' code).
PAPER_SECONDS_PER_EPOCH = {"ew": (86, 91, 92, 94), "pcgrad": (690, 1396, 1950, 2806), "stch": (89, 88, 91, 97),
                           "core_lpips": (297, 297, 297, 300)}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="celeba", metadata={
        "help": "celeba (the paper's setting: 128x128, batch 256) or tiny (a CPU-sized model, 64x64, batch 16)"})
    variant: str = dataclasses.field(default="paper", metadata={
        "help": "paper (ResNet-50 without dilation) or authors (ResNet-18)"})
    tasks: str = dataclasses.field(default="10,20,30,40", metadata={
        "help": "the numbers of attributes T (comma-separated, each 1..40; the paper's Table 4 by default)"})
    time: bool = dataclasses.field(default=False, metadata={"help": "also compile and time each step here"})
    memory: bool = dataclasses.field(default=False, metadata={
        "help": "also compile each step for this machine's device and record XLA's memory figures (with --time "
                "always); on a CPU the paper's setting takes 20-45 s per step"})
    jacobian_chunk: int = dataclasses.field(default=0, metadata={
        "help": "PCGrad's pull-backs through the encoder at a time (0: all T at once)"})
    repeats: int = dataclasses.field(default=5, metadata={"help": "timed steps per method and T (with --time)"})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/...)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        from deep.attributes import ATTRIBUTE_BACKBONES

        if self.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {self.config!r}")
        if self.variant not in ATTRIBUTE_BACKBONES:
            raise ValueError(f"--variant must be one of {', '.join(ATTRIBUTE_BACKBONES)}; got {self.variant!r}")
        require_integer(self, "repeats", 1)
        require_integer(self, "jacobian_chunk", 0)
        self.task_counts  # validates --tasks
        if not self.out:
            suffix = "" if self.variant == "paper" else f"_{self.variant}"
            object.__setattr__(self, "out", str(ROOT / "bench" / "results" /
                                                f"bench_celeba_scaling_{self.config}{suffix}.json"))

    @property
    def task_counts(self) -> tuple[int, ...]:
        counts = tuple(dict.fromkeys(part.strip() for part in self.tasks.split(",")))
        if not counts or not all(count.isdigit() and 1 <= int(count) <= 40 for count in counts):
            raise ValueError(f"--tasks must be comma-separated integers in 1..40; got {self.tasks!r}")
        return tuple(int(count) for count in counts)


def step_and_arguments(method: str, variant: str, size: str, attributes: int, batch: int, image_size: int,
                       abstract: bool, jacobian_chunk: int | None = None):
    """``(jitted step, (state, balancer_state, batch, key[, perceptual]))`` of ``method`` for the first
    ``attributes`` attributes; abstract arrays (``jax.ShapeDtypeStruct``) when ``abstract``, else initialised
    ones."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deep import attributes as celeba, train
    from deep.data import resolve_attributes
    from theory.balancing import make

    config = celeba.attribute_model_config(variant, size, attributes=resolve_attributes(attributes),
                                           grounding="soft" if method.startswith("core") else "none")
    optimizer = train.make_optimizer(train.OptimConfig(decoupled_weight_decay=True, warmup_epochs=0))

    def model():
        return celeba.AttributeModel(config, nnx.Rngs(0))

    graphdef, state = train.split_model(nnx.eval_shape(model) if abstract else model(), optimizer)
    arrays = {"images": jnp.zeros((batch, image_size, image_size, 3), jnp.float32),
              "attributes": jnp.zeros((batch, attributes), jnp.int32)}
    if method.startswith("core"):
        weights = celeba.AttributeLossWeights()
        step = jax.jit(lambda state, balancer_state, batch, key, perceptual: (celeba.attribute_step(
            graphdef, optimizer, state, batch, weights, perceptual)[0], balancer_state))
        extra = (lpips_weights() if method == "core_lpips" else None,)
        balancer_state = ()
    else:
        balancer = make(method)
        balancer_state, extra = balancer.init(attributes), ()
        step = jax.jit(lambda state, balancer_state, batch, key: train.balanced_step(
            graphdef, optimizer, balancer, state, balancer_state, batch, key, jacobian_chunk)[:2])
    args = (state, balancer_state, arrays, jax.random.key(0), *extra)
    return step, jax.eval_shape(lambda: args) if abstract else args


def lpips_weights():
    """LPIPS-VGG weights of the right shapes (random: they set the FLOPs and the time, not the values)."""
    import numpy as np

    from deep.perceptual import lpips_shapes, weights_from_arrays

    rng = np.random.default_rng(0)
    return weights_from_arrays({key: rng.uniform(0.0, 0.01, shape).astype(np.float32)
                                for key, shape in lpips_shapes().items()})


def payload_device() -> str:
    import jax

    return str(jax.devices()[0].device_kind)


def with_ratios(rows: list[dict]) -> list[dict]:
    """``rows`` with their ratios to EW's step at the same T (counted and, where timed, measured), to the same
    method's at the fewest T, and the paper's Table 4 time ratio, each where the rows it needs are there."""
    by_key = {(row["tasks"], row["method"]): row for row in rows}
    fewest = min(row["tasks"] for row in rows)
    for row in rows:
        ew = by_key.get((row["tasks"], "ew"))
        if ew is not None:
            row["ratio_to_ew"] = row["gflops"] / ew["gflops"]
            if "seconds" in row:
                row["seconds_ratio_to_ew"] = row["seconds"] / ew["seconds"]
        if (fewest, row["method"]) in by_key:
            row["ratio_to_fewest_tasks"] = row["gflops"] / by_key[fewest, row["method"]]["gflops"]
        if row["method"] in PAPER_SECONDS_PER_EPOCH and row["tasks"] in TASK_COUNTS:
            index = TASK_COUNTS.index(row["tasks"])
            row["paper_seconds_ratio_to_ew"] = (PAPER_SECONDS_PER_EPOCH[row["method"]][index]
                                                / PAPER_SECONDS_PER_EPOCH["ew"][index])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0],
                                                  prog="bench_celeba_scaling.py"), argv, out_kind="file")
    size, batch, image_size = CONFIGS[config.config]
    rows, task_counts, out = [], config.task_counts, Path(config.out)
    # Only where the chunk is smaller than the task count do the pull-backs run in a loop (else all at once).
    chunk = config.jacobian_chunk
    note = (f"XLA counts the body of the chunked pull-backs' loop once: PCGrad's gflops are undercounted at more "
            f"than {chunk} tasks" if chunk and chunk < max(task_counts) else "")
    for attributes in task_counts:
        for method in METHODS:
            arguments = functools.partial(step_and_arguments, method, config.variant, size, attributes, batch,
                                          image_size, jacobian_chunk=config.jacobian_chunk or None)
            step, abstract = arguments(abstract=True)
            row = {"tasks": attributes, "method": method, "gflops": lowered_flops(step, abstract) / 1e9}
            if config.time or config.memory:
                compiled = step.trace(*abstract).lower().compile()
                memory = compiled.memory_analysis()
                if memory is not None:
                    row["temporary_gib"] = memory.temp_size_in_bytes / 2**30
                    row["arguments_gib"] = memory.argument_size_in_bytes / 2**30
            if config.time:
                _, args = arguments(abstract=False)
                row["seconds"] = median_seconds(lambda: jax.block_until_ready(compiled(*args)), config.repeats,
                                                warmup=True)
            rows.append(row)
            # Written after every row, so that a run stopped early (a short GPU lease) keeps what it measured.
            write_json(out, {"benchmark": "bench_celeba_scaling", "config": config.config, "variant": config.variant,
                             "batch": batch, "image_size": image_size, "jacobian_chunk": config.jacobian_chunk,
                             **({"gflops_note": note} if note else {}),
                             "device": payload_device() if config.time else None,
                             "rows": with_ratios(rows), "environment": environment()})
            if not config.quiet:
                timing = f" {row['seconds'] * 1e3:>9.1f} ms" if "seconds" in row else ""
                timing += f" {row['temporary_gib']:>7.2f} GiB temporaries" if "temporary_gib" in row else ""
                print(f"T={attributes:<3} {method:<10} {row['gflops']:>10.1f} GFLOP{timing}", flush=True)
    by_key = {(row["tasks"], row["method"]): row for row in rows}
    if not config.quiet:
        print(f"{'GFLOP per step':<16}" + "".join(f"{method:>12}" for method in METHODS))
        for attributes in task_counts:
            print(f"T = {attributes:<12}" + "".join(f"{by_key[attributes, m]['gflops']:>12.1f}" for m in METHODS))
        print(f"{'x EW at that T':<16}" + "".join(f"{method:>12}" for method in METHODS)
              + "   (the paper's Table 4: time per epoch x EW's)")
        for attributes in task_counts:
            paper = " ".join(f"{m} {by_key[attributes, m]['paper_seconds_ratio_to_ew']:.2f}" for m in METHODS
                             if m != "ew" and "paper_seconds_ratio_to_ew" in by_key[attributes, m])
            print(f"T = {attributes:<12}" + "".join(f"{by_key[attributes, m]['ratio_to_ew']:>12.2f}" for m in METHODS)
                  + f"   {paper}")
        if config.time:
            print(f"{'time x EW':<16}" + "".join(f"{method:>12}" for method in METHODS)
                  + f"   (measured here, {payload_device()})")
            for attributes in task_counts:
                print(f"T = {attributes:<12}" + "".join(f"{by_key[attributes, m]['seconds_ratio_to_ew']:>12.2f}"
                                                        for m in METHODS))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Training-step cost of CORE-MTL against the EW and PCGrad baselines on the same backbone, in one run.

    python bench/bench_train_step.py                      # reduced configuration (CPU-sized)
    python bench/bench_train_step.py --config nyuv2       # the paper's NYUv2 setting: run it on a GPU

    python bench/bench_train_step.py --config nyuv2 --precisions bfloat16,float32 --peak-tflops 989

Four steps per compute precision, each compiled before timing (median over ``--repeats`` calls):

* ``ew``: the model without grounding, one backward pass of the weighted sum of the task losses;
* ``core``: CORE-MTL with hard grounding, λ_ind = 1 and the counterfactual pass on (the paper's stage 2);
* ``core_no_cfa``: the same step when the counterfactual gate is closed. The paper draws the gate with probability
  0.5 per step, so its average step is the mean of ``core`` and ``core_no_cfa`` (reported as ``core_expected``);
* ``pcgrad``: per-task Jacobian of the shared parameters from one forward pass, PCGrad, the optax update.

Reported per step: milliseconds, images per second, the ratio to EW at the same precision, FLOPs from XLA's cost
analysis of the step's unoptimised HLO (the same count on every device), the memory XLA assigns (arguments + outputs + temporaries), and the model FLOP utilisation against the
device's peak (``--peak-tflops``; H100/H200 SXM: ~989 dense bf16 — use the bf16 peak for both precisions, as MFU is
conventionally quoted, or ~67 for plain fp32). ``bfloat16`` computes convolutions and matrix products in bfloat16
with float32 parameters, optimiser and losses. ``--variant authors`` times the authors' architecture (multi-scale
fusion, DeepLabV3+ heads) instead of the paper's. Writes ``bench/results/bench_train_step_<config>.json`` (with
``_authors`` for that variant) after each precision, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (environment, median_seconds, parse_choices, parse_config, parser_for, run_main,  # noqa: E402
                     write_json)

CONFIGS = ("reduced", "nyuv2")
PRECISIONS = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="reduced", metadata={"help": "reduced (CPU) or nyuv2 (288x384, batch "
                                                                         "16, full ResNet-50)"})
    precisions: str = dataclasses.field(default="float32", metadata={
        "help": f"comma-separated compute precisions from {', '.join(PRECISIONS)} (bfloat16 is emulated, slowly, "
                f"on CPUs)"})
    variant: str = dataclasses.field(default="paper", metadata={
        "help": "the architecture: paper (ASPP heads on the semantic stream of c4) or authors (multi-scale fusion, "
                "DeepLabV3+ heads)"})
    repeats: int = dataclasses.field(default=5, metadata={"help": "timed steps per method (median)"})
    peak_tflops: float = dataclasses.field(default=0.0, metadata={
        "help": "the device's peak TFLOP/s for model FLOP utilisation (0: not reported)"})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/...)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        if self.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {self.config!r}")
        parse_choices("--precisions", self.precisions, PRECISIONS)
        if self.variant not in ("paper", "authors"):
            raise ValueError(f"--variant must be one of paper, authors; got {self.variant!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be an integer >= 1; got {self.repeats}")
        if not self.peak_tflops >= 0:
            raise ValueError(f"--peak-tflops must be >= 0; got {self.peak_tflops}")


def _setting(name: str, variant: str):
    """``(model config, batch size, image size)``: the paper's NYUv2 run, or the reduced model of
    ``deep.trainer.MODEL_SIZES`` for CPUs."""
    from deep.model import ModelConfig
    from deep.trainer import MODEL_SIZES

    if name == "nyuv2":
        return ModelConfig.variant(variant), 16, (288, 384)
    return ModelConfig.variant(variant, **MODEL_SIZES["reduced"]), 4, (64, 80)


def _batch(batch_size: int, size: tuple[int, int]):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    normal = jax.random.normal(keys[3], (batch_size, *size, 3), jnp.float32)
    return {"images": jax.random.uniform(keys[0], (batch_size, *size, 3), jnp.float32),
            "segmentation": jax.random.randint(keys[1], (batch_size, *size), -1, 13, jnp.int32),
            "depth": jax.random.uniform(keys[2], (batch_size, *size, 1), jnp.float32, minval=0.5, maxval=5.0),
            "normal": normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)}


def _steps(model_config, precision: str):
    """The jitted steps to compare, each with its arguments' state: ``[(name, step, state)]``."""
    import jax
    from flax import nnx

    from deep import losses, train
    from deep.model import DualStreamModel
    from theory.balancing import make

    model_config = dataclasses.replace(model_config, compute_dtype=precision)
    optimizer = train.make_optimizer(train.OptimConfig())
    weights = dataclasses.replace(losses.PRESETS["nyuv2"], counterfactual_probability=1.0)

    graphdef, core_state = train.split_model(DualStreamModel(model_config, nnx.Rngs(0)), optimizer)

    def core_with(counterfactual_on: bool):
        return jax.jit(lambda state, batch, key: train.core_step(graphdef, optimizer, state, batch, key, weights,
                                                                 independence_weight=1.0,
                                                                 counterfactual_on=counterfactual_on))

    plain = dataclasses.replace(model_config, grounding="none")
    plain_graphdef, plain_state = train.split_model(DualStreamModel(plain, nnx.Rngs(0)), optimizer)
    ew_weights = dataclasses.replace(weights, independence=0.0, counterfactual=0.0, edge=0.0)
    ew = jax.jit(lambda state, batch, key: train.core_step(plain_graphdef, optimizer, state, batch, key, ew_weights,
                                                           independence_weight=0.0, counterfactual_on=False))
    pcgrad_balancer = make("pcgrad")
    pcgrad = jax.jit(lambda state, batch, key: train.balanced_step(
        plain_graphdef, optimizer, pcgrad_balancer, state, pcgrad_balancer.init(len(plain.tasks)), batch, key))

    return [("ew", ew, plain_state), ("core", core_with(True), core_state),
            ("core_no_cfa", core_with(False), core_state), ("pcgrad", pcgrad, plain_state)]


def _measure(name: str, function, args, batch_size: int, repeats: int, peak_tflops: float) -> dict:
    import jax

    lowered = function.lower(*args)
    # FLOPs of the step's HLO before backend optimisation: on GPUs the compiled module's cost analysis leaves out
    # the convolutions XLA hands to cuDNN (custom calls), which would undercount a ResNet step about 100-fold.
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    peak = None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                        + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**20
    seconds = median_seconds(lambda: jax.block_until_ready(compiled(*args)), repeats, warmup=True)
    row = {"method": name, "ms": 1e3 * seconds, "images_per_second": batch_size / seconds, "gflops": flops / 1e9,
           "peak_mb": peak}
    if peak_tflops > 0 and flops > 0:
        row["model_flop_utilisation"] = flops / seconds / (peak_tflops * 1e12)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_train_step.py"),
                          argv)
    model_config, batch_size, size = _setting(config.config, config.variant)
    batch = _batch(batch_size, size)
    key = jax.random.key(1)
    suffix = "" if config.variant == "paper" else f"_{config.variant}"
    out = Path(config.out or ROOT / "bench" / "results" / f"bench_train_step_{config.config}{suffix}.json")
    rows = []
    for precision in parse_choices("--precisions", config.precisions, PRECISIONS):
        measured = []
        for name, function, state in _steps(model_config, precision):
            measured.append(dict(_measure(name, function, (state, batch, key), batch_size, config.repeats,
                                          config.peak_tflops), precision=precision))
            if not config.quiet:
                print(f"{precision} {name}: {measured[-1]['ms']:.1f} ms", file=sys.stderr, flush=True)
        by_name = {row["method"]: row for row in measured}
        expected_ms = 0.5 * (by_name["core"]["ms"] + by_name["core_no_cfa"]["ms"])
        measured.append({"method": "core_expected", "precision": precision, "ms": expected_ms,
                         "images_per_second": batch_size / expected_ms * 1e3,
                         "note": "mean of core and core_no_cfa: the paper's CFA probability 0.5"})
        for row in measured:
            row["ratio_to_ew"] = row["ms"] / by_name["ew"]["ms"]
        rows += measured
        write_json(out, {"benchmark": "bench_train_step", "config": config.config, "variant": config.variant,
                         "batch": batch_size,
                         "image_size": list(size), "peak_tflops": config.peak_tflops, "rows": rows,
                         "environment": environment()})
    if not config.quiet:
        print(f"{'precision':<9} {'step':<12} {'ms':>9} {'img/s':>8} {'x EW':>6} {'GFLOP':>9} {'peak MB':>9} "
              f"{'MFU':>6}")
        for row in rows:
            peak = f"{row['peak_mb']:>9.0f}" if row.get("peak_mb") is not None else f"{'-':>9}"
            gflops = f"{row['gflops']:>9.1f}" if "gflops" in row else f"{'-':>9}"
            mfu = f"{row['model_flop_utilisation']:>6.1%}" if "model_flop_utilisation" in row else f"{'-':>6}"
            print(f"{row['precision']:<9} {row['method']:<12} {row['ms']:>9.1f} {row['images_per_second']:>8.1f} "
                  f"{row['ratio_to_ew']:>6.2f} {gflops} {peak} {mfu}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

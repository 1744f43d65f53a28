"""CORE-MTL's training step with Adam's state raveled into one vector per parameter group (what
``deep.train.make_optimizer`` builds) against one array per parameter, in one run.

    python bench/bench_optimizer.py                        # the reduced model (CPU-sized)
    python bench/bench_optimizer.py --config nyuv2         # the paper's NYUv2 setting, on a GPU

Adam is elementwise, so both give the same update; the step's program differs in size. For each layout: the
operations of the traced step (nested programs counted), the seconds to trace and lower it, the seconds to compile it,
and the median time of a step (the counterfactual pass on, the state donated as the training script's steps donate
it), with the largest difference of the two layouts' parameters after the timed steps. Writes
``bench/results/bench_optimizer_<config>.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment, median_seconds, parse_config, parser_for, require_integer, run_main  # noqa: E402
from _common import write_json  # noqa: E402
from bench_train_step import CONFIGS, batch_arrays, default_out, setting  # noqa: E402

LAYOUTS = {"per_parameter": False, "raveled": True}  # the layout's name: make_optimizer's ravel


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="reduced", metadata={
        "help": "reduced (bench_train_step.py's CPU-sized model) or nyuv2 (288x384, batch 16, full ResNet-50)"})
    repeats: int = dataclasses.field(default=10, metadata={"help": "timed steps per layout (median)"})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/...)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        if self.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {self.config!r}")
        require_integer(self, "repeats", 1)
        if not self.out:
            object.__setattr__(self, "out", default_out("bench_optimizer", self.config, "paper"))


def count_operations(jaxpr) -> int:
    """The equations of ``jaxpr`` and of every program nested in them."""
    from jax.extend import core

    total = 0
    for equation in jaxpr.eqns:
        total += 1
        for param in equation.params.values():
            for nested in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(nested, core.ClosedJaxpr):
                    total += count_operations(nested.jaxpr)
                elif isinstance(nested, core.Jaxpr):
                    total += count_operations(nested)
    return total


def largest_difference(tree, other) -> float:
    """The largest absolute difference of two trees' corresponding entries."""
    import jax
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other), strict=True))


def core_step(ravel: bool, model_config, batch_size: int, size):
    """``(step, state, batch, key)``: CORE-MTL's step, jitted anew (so traced anew), with the optimiser's layout."""
    import jax
    from flax import nnx

    from deep import losses, train
    from deep.model import DualStreamModel

    optimizer = train.make_optimizer(train.OptimConfig(), ravel=ravel)
    graphdef, state = train.split_model(DualStreamModel(model_config, nnx.Rngs(0)), optimizer)
    step = jax.jit(lambda state, batch, key: train.core_step(graphdef, optimizer, state, batch, key,
                                                             losses.PRESETS["nyuv2"], independence_weight=1.0,
                                                             counterfactual=True),
                   donate_argnums=0)
    return step, state, batch_arrays(batch_size, size), jax.random.key(0)


def measure(ravel: bool, model_config, batch_size: int, size, repeats: int) -> tuple[dict, object]:
    """One layout's row, and its parameters after the timed steps."""
    import time

    import jax
    import numpy as np

    step, state, batch, key = core_step(ravel, model_config, batch_size, size)
    initial = jax.tree.map(np.array, state.params)  # a copy: the steps donate the state
    start = time.perf_counter()
    traced = step.trace(state, batch, key)
    lowered = traced.lower()
    trace_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start

    def step_once():
        nonlocal state
        state = compiled(state, batch, key)[0]
        jax.block_until_ready(state)

    seconds = median_seconds(step_once, repeats, warmup=True)
    return {"operations": count_operations(traced.jaxpr.jaxpr), "trace_and_lower_seconds": trace_seconds,
            "compile_seconds": compile_seconds, "step_ms": 1e3 * seconds,
            "parameter_arrays": len(jax.tree.leaves(state.params)),
            "optimiser_state_arrays": len(jax.tree.leaves(state.opt_state)),
            "largest_parameter_change": largest_difference(state.params, initial)}, state.params


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_optimizer.py"),
                          argv, out_kind="file")
    model_config, batch_size, size = setting(config.config, "paper")
    # JAX keeps what it traced of the functions a step calls: both layouts are traced once, untimed, so that neither
    # finds the other's work done (the first trace in a process also pays for the initialisers' programs).
    for ravel in LAYOUTS.values():
        step, *args = core_step(ravel, model_config, batch_size, size)
        step.trace(*args)
    rows, params = {}, {}
    for name, ravel in LAYOUTS.items():
        rows[name], params[name] = measure(ravel, model_config, batch_size, size, config.repeats)
        if not config.quiet:
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    # The same steps from the same state: the parameters agree up to rounding, which Adam's first steps (about
    # lr * sign(g) each) turn into whole steps where a gradient is at rounding level (XLA may sum in another order).
    difference = largest_difference(*(params[name] for name in LAYOUTS))
    ratios = {key: rows["raveled"][key] / rows["per_parameter"][key]
              for key in ("operations", "trace_and_lower_seconds", "compile_seconds", "step_ms")}
    write_json(Path(config.out), {"benchmark": "bench_optimizer", "config": config.config, "batch": batch_size,
                                  "image_size": list(size), "repeats": config.repeats, "rows": rows,
                                  "raveled_over_per_parameter": ratios,
                                  "largest_parameter_difference": difference, "environment": environment()})
    if not config.quiet:
        print(f"{'':<24} {'per parameter':>14} {'raveled':>10} {'ratio':>7}")
        for key in ratios:
            print(f"{key:<24} {rows['per_parameter'][key]:>14.4g} {rows['raveled'][key]:>10.4g} {ratios[key]:>7.3f}")
        print(f"largest difference of the parameters after {config.repeats + 1} steps: {difference:.2e} (largest "
              f"change of a parameter: {rows['raveled']['largest_parameter_change']:.2e})")
        print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""The θ sweep's grid: one jitted, vmapped call against a Python loop over configurations, in one run.

    python bench/bench_sweep.py                       # the default sweep's grid (16 θ x 8 seeds), 3 methods
    python bench/bench_sweep.py --methods all --repeats 3

Both paths run the same computation (``theory.simulate.train_and_evaluate``: 800 steps of training on 2048 source
samples, then the exact risks) and are compiled before timing:

* ``vmapped``: ``theory.simulate.sweep``, the whole grid under one ``jit`` of nested ``vmap`` s;
* ``loop``: the same function jitted for one configuration (its 800 steps under ``lax.scan``) and called once per
  (θ, seed) from Python: the strongest loop;
* ``stepwise``: a Python loop over configurations *and* steps, each step one call of a jitted
  ``theory.simulate.train_step``: the training loop as most users write it (timed once: it is slow).

Prints a table of median seconds and the ratios loop / vmapped and stepwise / vmapped per method, and writes
``bench/results/bench_sweep.json``.
Target (issue 2): the vmapped path at least 20x faster.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (environment, median_seconds, parse_choices, parse_config, parser_for,  # noqa: E402
                     require_integer, run_main, write_json)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    methods: str = dataclasses.field(default="ew,pcgrad,mgda", metadata={
        "help": "comma-separated balancing methods, or 'all'"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed repetitions per path (median reported)"})
    out: str = dataclasses.field(default=str(ROOT / "bench" / "results" / "bench_sweep.json"),
                                 metadata={"help": "JSON output path"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        from theory.balancing import METHODS

        object.__setattr__(self, "methods", ",".join(parse_choices("--methods", self.methods, METHODS)))
        require_integer(self, "repeats", 1)


def main(argv: Sequence[str] | None = None) -> int:
    import jax
    import numpy as np

    import sweep_theta
    from theory.balancing import make
    from theory.simulate import (TrainResult, evaluate, init_train_state, moment_least_squares, moment_losses,
                                 seed_keys, sweep, train_and_evaluate, train_step)

    parser = parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_sweep.py")
    config = parse_config(BenchConfig, parser, argv, out_kind="file")
    sweep_config = sweep_theta.SweepConfig()  # the default sweep
    scm = sweep_theta.build_scm(sweep_config)
    thetas = sweep_theta.thetas_of(sweep_config)
    seeds = np.arange(sweep_config.seeds)
    train_config = sweep_theta.train_config_of(sweep_config)
    keys = seed_keys(seeds)

    rows = []
    for name in config.methods.split(","):
        balancer = make(name)

        def vmapped():
            jax.block_until_ready(sweep(scm, balancer, thetas, seeds, train_config))

        single = jax.jit(lambda theta, key: train_and_evaluate(scm, balancer, theta, key, train_config))

        def loop():
            for theta in thetas:
                for key in keys:
                    jax.block_until_ready(single(theta, key))

        init = jax.jit(lambda theta, key: init_train_state(scm, balancer, theta, key, train_config))
        step = jax.jit(lambda state, key: train_step(scm, balancer, train_config, state, key))

        @jax.jit
        def finish(theta, key, state, weights_sum):
            result = TrainResult(state.params, moment_losses(state.params, state.moments), weights_sum,
                                 weights_sum / train_config.steps, moment_least_squares(state.moments))
            return evaluate(scm, theta, result)

        def stepwise(configurations):
            for theta, key in configurations:
                state, balance_key = init(theta, key)
                weights_sum = 0.0
                for step_key in jax.random.split(balance_key, train_config.steps):
                    state, (_, weights) = step(state, step_key)
                    weights_sum = weights_sum + weights
                jax.block_until_ready(finish(theta, key, state, weights_sum))

        start = time.perf_counter()
        vmapped()  # compile (sweep jits internally; the cache keeps the executable)
        vmapped_first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(single(thetas[0], keys[0]))
        loop_compile = time.perf_counter() - start
        vmapped_s = median_seconds(vmapped, config.repeats)
        loop_s = median_seconds(loop, config.repeats)
        configurations = [(theta, key) for theta in thetas for key in keys]
        stepwise(configurations[:1])  # compiles every piece (finish and the loop's own small ops) before timing
        stepwise_s = median_seconds(lambda: stepwise(configurations), 1)
        rows.append({"method": name, "vmapped_s": vmapped_s, "loop_s": loop_s, "stepwise_s": stepwise_s,
                     "loop_over_vmapped": loop_s / vmapped_s, "stepwise_over_vmapped": stepwise_s / vmapped_s,
                     "vmapped_first_call_s": vmapped_first, "loop_compile_s": loop_compile})
        if not config.quiet:
            print(f"{name}: vmapped {vmapped_s:.3f} s, loop {loop_s:.3f} s, stepwise {stepwise_s:.1f} s",
                  file=sys.stderr)

    payload = {
        "benchmark": "bench_sweep",
        "grid": {"thetas": len(thetas), "seeds": len(seeds), "configurations": len(thetas) * len(seeds),
                 "steps": train_config.steps, "samples": train_config.num_samples, "dim": sweep_config.dim,
                 "tasks": len(sweep_config.betas)},
        "repeats": config.repeats,
        "results": rows,
        "environment": environment(),
    }
    write_json(Path(config.out), payload)
    if not config.quiet:
        print(f"{'method':<10} {'vmapped s':>10} {'loop s':>8} {'stepwise s':>11} {'loop/vmapped':>13} "
              f"{'stepwise/vmapped':>17} {'first call s':>13}")
        for row in rows:
            print(f"{row['method']:<10} {row['vmapped_s']:>10.3f} {row['loop_s']:>8.3f} {row['stepwise_s']:>11.1f} "
                  f"{row['loop_over_vmapped']:>12.1f}x {row['stepwise_over_vmapped']:>16.0f}x "
                  f"{row['vmapped_first_call_s']:>13.2f}")
        print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    run_main(main)

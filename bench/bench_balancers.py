"""The full step of every balancing method against task count K and shared-parameter count P, in one run.

    python bench/bench_balancers.py                          # K in {2, 10, 40}, P in {1e4, 1e6}, all methods
    python bench/bench_balancers.py --tasks 40 --params 1000000 --methods ew,pcgrad,mgda

Setting (issue 3): a shared linear layer ``h = x W^T`` with P = out x in parameters (out = 100), batch 32, feeding
K task losses ``L_t = mean_b (h_b . u_t - y_bt)^2``. A *full step* is everything a training step needs from the
method: the per-task gradient information of W and the combined direction (an array shaped like W).

* EW: one backward pass of the summed loss (the reference for the ratios).
* ``gram_matrix``: the forward pass, the per-task cotangents and G = J J^T through the batch, nothing else: the
  least a step on the Gram path (``linear_layer_gram``, generic cotangents) costs. Every row also records XLA's
  FLOP count of the step (``flops``, from the unoptimised HLO), so the floor's arithmetic can be set against EW's.
* Methods with a Gram path (``balancer.weigh``): G = J J^T through the batch (``theory.jacobians.linear_layer_gram``,
  never holding the [K, P] Jacobian), the weights, then the direction as one more product — and, for comparison,
  the same method on the materialised Jacobian (``jacobian path``).
* Methods that need J (``requires == "jacobian"``): the Jacobian from one forward pass (``jax.vjp`` + ``vmap``),
  then ``balancer.step``. GradDrop acts on the representation's Jacobian ``[K, B*out]`` and pulls the result back.

Each time is the median over ``--repeats`` calls of a compiled function (compilation excluded). Memory is XLA's
buffer assignment for the compiled step (arguments + outputs + temporaries, ``memory_analysis()``), the peak the
step needs on any backend. Writes ``bench/results/bench_balancers.json``; LibMTL's figures for K = 40, P = 10^6
(PyTorch 2.13 CPU, same machine kind, from the issue) are printed alongside.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (environment, parse_choices, parse_config, parser_for, require_integer, run_main,  # noqa: E402
                     write_json)

BATCH = 32
OUT_FEATURES = 100
# LibMTL, PyTorch 2.13 CPU, 2-core machine, median ms per step at K = 40, P = 10^6 (issue 3).
LIBMTL_MS_K40_P1E6 = {"ew": 0.76, "per_task_gradients": 80, "pcgrad": 674, "gradvac": 1009, "mgda": 305,
                      "imtl": 478, "cagrad": 255, "nash_mtl": 299, "upgrad": 185, "fairgrad": 123, "gradnorm": 364}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    tasks: str = dataclasses.field(default="2,10,40", metadata={"help": "comma-separated task counts K"})
    params: str = dataclasses.field(default="10000,1000000", metadata={
        "help": "comma-separated shared-parameter counts P (multiples of 100)"})
    methods: str = dataclasses.field(default="all", metadata={"help": "comma-separated methods, or 'all'"})
    repeats: int = dataclasses.field(default=15, metadata={"help": "timed calls per measurement (median)"})
    out: str = dataclasses.field(default=str(ROOT / "bench" / "results" / "bench_balancers.json"),
                                 metadata={"help": "JSON output path"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        from theory.balancing import METHODS

        for name in ("tasks", "params"):
            try:
                values = tuple(int(v) for v in getattr(self, name).split(","))
            except ValueError:
                raise ValueError(f"--{name} must be comma-separated integers; got {getattr(self, name)!r}") from None
            if not values or min(values) < 1:
                raise ValueError(f"--{name} must be integers >= 1; got {getattr(self, name)!r}")
        if any(p % OUT_FEATURES for p in self.param_counts):
            raise ValueError(f"--params must be multiples of {OUT_FEATURES} (the layer has {OUT_FEATURES} outputs); "
                             f"got {self.params!r}")
        object.__setattr__(self, "methods", ",".join(parse_choices("--methods", self.methods, METHODS)))
        require_integer(self, "repeats", 1)

    @property
    def task_counts(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.tasks.split(","))

    @property
    def param_counts(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.params.split(","))


def _problem(num_tasks: int, num_params: int):
    import jax

    in_features = num_params // OUT_FEATURES
    keys = jax.random.split(jax.random.key(0), 4)
    weight = jax.random.normal(keys[0], (OUT_FEATURES, in_features)) / in_features**0.5
    inputs = jax.random.normal(keys[1], (BATCH, in_features))
    heads = jax.random.normal(keys[2], (num_tasks, OUT_FEATURES)) / OUT_FEATURES**0.5
    targets = jax.random.normal(keys[3], (BATCH, num_tasks))
    return weight, inputs, heads, targets


def _step_functions(balancer, num_tasks: int):
    """The compiled full steps of one method: ``{path: fn(weight, inputs, heads, targets, state, key)}``."""
    import jax
    import jax.numpy as jnp

    from theory.jacobians import linear_layer_direction, linear_layer_gram

    one_hots = jnp.eye(num_tasks)

    def task_losses(representation, heads, targets):
        return jnp.mean((representation @ heads.T - targets) ** 2, axis=0)

    def cotangents(weight, inputs, heads, targets):
        """Losses and dL_t/dh ``[K, B, out]`` from one forward pass through the (cheap) heads."""
        losses, pullback = jax.vjp(lambda h: task_losses(h, heads, targets), inputs @ weight.T)
        (per_task,) = jax.vmap(pullback)(one_hots)
        return losses, per_task

    def jacobian_of(weight, inputs, heads, targets):
        losses, pullback = jax.vjp(lambda w: task_losses(inputs @ w.T, heads, targets), weight)
        (per_task,) = jax.vmap(pullback)(one_hots)
        return losses, per_task.reshape(num_tasks, -1)

    def jacobian_path(weight, inputs, heads, targets, state, key):
        losses, jacobian = jacobian_of(weight, inputs, heads, targets)
        direction, _, state = balancer.step(jacobian, losses, state, key)
        return direction.reshape(weight.shape), state

    def gram_path(weight, inputs, heads, targets, state, key):
        losses, per_task = cotangents(weight, inputs, heads, targets)
        gram = None if balancer.requires == "losses" else linear_layer_gram(inputs, per_task)
        weights, state = balancer.weigh(gram, losses, state, key)
        return linear_layer_direction(inputs, per_task, weights), state

    def representation_path(weight, inputs, heads, targets, state, key):
        losses, per_task = cotangents(weight, inputs, heads, targets)
        direction, _, state = balancer.step(per_task.reshape(num_tasks, -1), losses, state, key)
        return direction.reshape(BATCH, OUT_FEATURES).T @ inputs, state

    if balancer.gradient_of == "representation":
        return {"representation": jax.jit(representation_path)}
    if balancer.requires == "losses":  # nothing to gain from the Jacobian
        return {"gram": jax.jit(gram_path)}
    paths = {"jacobian": jax.jit(jacobian_path)}
    if balancer.weigh is not None:
        paths = {"gram": jax.jit(gram_path), **paths}
    return paths


def _reference_functions(num_tasks: int):
    import jax
    import jax.numpy as jnp

    from theory.jacobians import linear_layer_gram

    def summed_loss(weight, inputs, heads, targets):
        return jnp.sum(jnp.mean((inputs @ weight.T @ heads.T - targets) ** 2, axis=0))

    def ew_step(weight, inputs, heads, targets):
        return jax.grad(summed_loss)(weight, inputs, heads, targets)

    def per_task_gradients(weight, inputs, heads, targets):
        losses, pullback = jax.vjp(lambda w: jnp.mean((inputs @ w.T @ heads.T - targets) ** 2, axis=0), weight)
        return jax.vmap(pullback)(jnp.eye(num_tasks))[0]

    def gram_matrix(weight, inputs, heads, targets):
        """The floor of every Gram-path step: the cotangents and G = J J^T through the batch, nothing else."""
        losses, pullback = jax.vjp(lambda h: jnp.mean((h @ heads.T - targets) ** 2, axis=0), inputs @ weight.T)
        (per_task,) = jax.vmap(pullback)(jnp.eye(num_tasks))
        return linear_layer_gram(inputs, per_task)

    return {"ew_backward": jax.jit(ew_step), "per_task_gradients": jax.jit(per_task_gradients),
            "gram_matrix": jax.jit(gram_matrix)}


def _measure(function, args, repeats: int) -> dict:
    import jax

    lowered = function.lower(*args)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    compiled = lowered.compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    peak = None
    if memory is not None:
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes)
    return {"ms": 1e3 * statistics.median(times), "peak_mb": None if peak is None else peak / 2**20,
            "flops": float(cost.get("flops", 0.0)) if cost else None}


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    from theory.balancing import make

    parser = parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_balancers.py")
    config = parse_config(BenchConfig, parser, argv, out_kind="file")
    rows = []
    for num_params in config.param_counts:
        for num_tasks in config.task_counts:
            problem = _problem(num_tasks, num_params)
            reference = {name: _measure(fn, problem, config.repeats)
                         for name, fn in _reference_functions(num_tasks).items()}
            ew_ms = reference["ew_backward"]["ms"]
            for name, result in reference.items():
                rows.append({"method": name, "path": "reference", "tasks": num_tasks, "params": num_params,
                             **result, "ratio_to_ew": result["ms"] / ew_ms})
            for name in config.methods.split(","):
                balancer = make(name)
                num_shared = BATCH * OUT_FEATURES if balancer.gradient_of == "representation" else num_params
                state = balancer.init(num_tasks, num_params=num_shared)
                args = (*problem, state, jax.random.key(1))
                for path, fn in _step_functions(balancer, num_tasks).items():
                    result = _measure(fn, args, config.repeats)
                    rows.append({"method": name, "path": path, "tasks": num_tasks, "params": num_params,
                                 "requires": balancer.requires, **result, "ratio_to_ew": result["ms"] / ew_ms})
                if not config.quiet:
                    print(f"K={num_tasks} P={num_params}: {name} done", file=sys.stderr)

    write_json(Path(config.out), {"benchmark": "bench_balancers", "batch": BATCH, "out_features": OUT_FEATURES,
                                  "repeats": config.repeats, "rows": rows,
                                  "libmtl_ms_k40_p1e6": LIBMTL_MS_K40_P1E6, "environment": environment()})
    if not config.quiet:
        _print_table(rows)
        print(f"wrote {config.out}")
    return 0


def _print_table(rows: list[dict]) -> None:
    sizes = sorted({(r["params"], r["tasks"]) for r in rows})
    by_key = {(r["method"], r["path"], r["params"], r["tasks"]): r for r in rows}
    keys = list(dict.fromkeys((r["method"], r["path"]) for r in rows))
    print("median ms per full step (ratio to EW's backward); last columns: peak MB and LibMTL ms at the largest size")
    print(f"{'method':<20} {'path':<15}" + "".join(f" {f'P={p:.0e} K={k}':>17}" for p, k in sizes)
          + f" {'peak MB':>9} {'LibMTL':>7}")
    largest = sizes[-1]
    for method, path in keys:
        cells = []
        for p, k in sizes:
            r = by_key.get((method, path, p, k))
            cells.append(f" {r['ms']:>8.2f} ({r['ratio_to_ew']:>5.1f}x)" if r else f" {'-':>17}")
        last = by_key.get((method, path, *largest))
        peak = f"{last['peak_mb']:>9.1f}" if last and last["peak_mb"] is not None else f"{'-':>9}"
        libmtl_name = {"ew_backward": "ew"}.get(method, method)
        libmtl = LIBMTL_MS_K40_P1E6.get(libmtl_name) if largest == (10**6, 40) else None
        print(f"{method:<20} {path:<15}" + "".join(cells) + f" {peak} {'' if libmtl is None else libmtl:>7}")


if __name__ == "__main__":
    run_main(main)

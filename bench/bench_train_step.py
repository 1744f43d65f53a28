"""Training-step cost of CORE-MTL against the EW and PCGrad baselines on the same backbone, in one run.

    python bench/bench_train_step.py                      # reduced configuration (CPU-sized)
    python bench/bench_train_step.py --config nyuv2       # the paper's NYUv2 setting: run it on a GPU

    python bench/bench_train_step.py --config nyuv2 --precisions bfloat16,float32 --peak-tflops 989

Up to six steps per compute precision (``--methods``; the first four by default), each compiled before timing (median
over ``--repeats`` calls):

* ``ew``: the model without grounding, one backward pass of the weighted sum of the task losses;
* ``core``: CORE-MTL with hard grounding, λ_ind = 1 and the counterfactual pass on (the paper's stage 2);
* ``core_no_cfa``: the same step on a step that does not run the counterfactual pass. Training compiles exactly
  these two programs and draws on the host which one a step runs; the authors' configurations run the pass with
  probability 0.5, so their average step is the mean of ``core`` and ``core_no_cfa`` (reported as
  ``core_expected``);
* ``pcgrad``: per-task Jacobian of the shared parameters from one forward pass, PCGrad, the optax update;
* ``mtan_ew``, ``mtan_pcgrad``: MTAN, the architecture baseline (each task's attention over the same backbone and its
  own ASPP head), as the training script trains it with EW (one backward pass of the summed losses) and PCGrad; the
  paper's variant only.

Reported per step: milliseconds (the median of calls each waited for, and ``ms_pipelined``: ``--repeats`` steps chained
state to state and waited for once, as a training loop runs them, per step), images per second, the ratio to EW at the
same precision, the FLOPs of the step as defined (XLA's count of its HLO lowered for the CPU, the same on every device:
dilated convolutions as ``lax.conv_general_dilated``, whose count XLA takes over the taps that read the image, whatever
``--dilated-conv`` computes them with — the sub-image form would add its padding rows), the compile time, the memory XLA
assigns (arguments + outputs + temporaries, less the state the step donates and overwrites), and the model FLOP
utilisation against the device's peak (``--peak-tflops``; H100/H200 SXM: ~989 dense bf16 — use the bf16 peak for both
precisions, as MFU is conventionally quoted, or ~67 for plain fp32). ``bfloat16`` computes convolutions and matrix
products in bfloat16 with float32 parameters, optimiser and losses. ``--variant authors`` times the authors'
architecture (multi-scale fusion, DeepLabV3+ heads) instead of the paper's; ``--methods`` times a subset; ``--trace
DIR`` adds each step's device time by kind of kernel and its longest kernels (from a profiler trace of two calls; GPUs
only). Writes ``bench/results/bench_train_step_<config>.json`` (with ``_authors`` for that variant) after each step, so
a run cut short keeps what it measured. Compiling the full-size steps on an H200 takes about a minute each (the CORE-MTL
step two): allow ten minutes for EW's and CORE-MTL's, and choose steps with ``--methods``. ``bench_flops.py`` counts the
same steps, and each part of the model, without compiling or running them (on any machine).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (check_output_path, environment, median_seconds, parse_choices, parse_config,  # noqa: E402
                     parser_for, require_integer, run_main, write_json)

CONFIGS = ("reduced", "nyuv2")
PRECISIONS = ("float32", "bfloat16")
DUAL_STREAM_METHODS = ("ew", "core", "core_no_cfa", "pcgrad")
MTAN_METHODS = ("mtan_ew", "mtan_pcgrad")  # the paper's variant only: MTAN has its own architecture
METHODS = DUAL_STREAM_METHODS + MTAN_METHODS
VARIANT_HELP = ("the architecture: paper (ASPP heads on the semantic stream of c4) or authors (multi-scale fusion, "
                "DeepLabV3+ heads)")


def check_variant(variant: str) -> None:
    from deep.model import VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}; got {variant!r}")


def default_out(benchmark: str, config: str, variant: str) -> str:
    """``bench/results/<benchmark>_<config>.json``, with ``_<variant>`` for a variant other than the paper's."""
    suffix = "" if variant == "paper" else f"_{variant}"
    return str(ROOT / "bench" / "results" / f"{benchmark}_{config}{suffix}.json")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="reduced", metadata={"help": "reduced (CPU) or nyuv2 (288x384, batch "
                                                                         "16, full ResNet-50)"})
    precisions: str = dataclasses.field(default="float32", metadata={
        "help": f"comma-separated compute precisions from {', '.join(PRECISIONS)} (bfloat16 is emulated, slowly, "
                f"on CPUs)"})
    variant: str = dataclasses.field(default="paper", metadata={"help": VARIANT_HELP})
    dilated_conv: str = dataclasses.field(default="", metadata={
        "help": "how dilated convolutions are computed: xla, space_to_batch, shifted_matmul or auto (default: the "
                "model's default, deep.model.ModelConfig)"})
    methods: str = dataclasses.field(default=",".join(DUAL_STREAM_METHODS), metadata={
        "help": f"comma-separated steps to time from {', '.join(METHODS)} (ew is always timed: the ratios are to "
                f"it)"})
    trace: str = dataclasses.field(default="", metadata={
        "help": "folder for a profiler trace of two calls of each step; the JSON rows then hold each step's "
                "device time by kind of kernel and its longest kernels"})
    repeats: int = dataclasses.field(default=5, metadata={"help": "timed steps per method (median)"})
    peak_tflops: float = dataclasses.field(default=0.0, metadata={
        "help": "the device's peak TFLOP/s for model FLOP utilisation (0: not reported)"})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/...)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        if self.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {self.config!r}")
        parse_choices("--precisions", self.precisions, PRECISIONS)
        from deep.atrous import DILATED_CONVS

        check_variant(self.variant)
        if self.dilated_conv and self.dilated_conv not in DILATED_CONVS:
            raise ValueError(f"--dilated-conv must be one of {', '.join(DILATED_CONVS)}; got {self.dilated_conv!r}")
        methods = chosen_methods(self.methods, self.variant)
        if self.variant != "paper" and set(methods) & set(MTAN_METHODS):
            raise ValueError(f"--methods {','.join(m for m in methods if m in MTAN_METHODS)} times MTAN, which has "
                             f"its own architecture; use --variant paper for it")
        require_integer(self, "repeats", 1)
        if not self.peak_tflops >= 0:
            raise ValueError(f"--peak-tflops must be >= 0; got {self.peak_tflops}")
        if self.trace:
            check_output_path(self.trace, "folder", "--trace")
        if not self.out:  # the default filled in here, so that it is checked before the benchmark runs
            object.__setattr__(self, "out", default_out("bench_train_step", self.config, self.variant))


def chosen_methods(methods: str, variant: str) -> tuple[str, ...]:
    """The steps ``--methods`` names (``all``: every step the variant has; MTAN's only with the paper's)."""
    return parse_choices("--methods", methods, METHODS,
                         named=None if variant == "paper" else {"all": DUAL_STREAM_METHODS})


def setting(name: str, variant: str):
    """``(model config, batch size, image size)``: the paper's NYUv2 run, or the reduced model of
    ``deep.trainer.MODEL_SIZES`` for CPUs."""
    from deep.model import ModelConfig
    from deep.trainer import MODEL_SIZES

    if name == "nyuv2":
        return ModelConfig.variant(variant), 16, (288, 384)
    return ModelConfig.variant(variant, **MODEL_SIZES["reduced"]), 4, (64, 80)


def batch_arrays(batch_size: int, size: tuple[int, int]):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    normal = jax.random.normal(keys[3], (batch_size, *size, 3), jnp.float32)
    return {"images": jax.random.uniform(keys[0], (batch_size, *size, 3), jnp.float32),
            "segmentation": jax.random.randint(keys[1], (batch_size, *size), -1, 13, jnp.int32),
            "depth": jax.random.uniform(keys[2], (batch_size, *size, 1), jnp.float32, minval=0.5, maxval=5.0),
            "normal": normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)}


class Step(NamedTuple):
    name: str
    timed: Any  # the jitted step that runs
    counted: Any  # the same step as defined (see training_steps), whose HLO gives the FLOP count
    state: Any


def training_steps(model_config, precision: str, methods: Sequence[str], abstract: bool = False) -> list[Step]:
    """The jitted steps to compare, with their arguments' state (``abstract``: its shapes and dtypes only, nothing
    initialised, for counting FLOPs).

    Each comes with the step whose HLO its FLOPs are counted on: the same step with the dilated convolutions as
    defined (``lax.conv_general_dilated``, whatever computes them)."""
    import jax
    from flax import nnx

    from deep import losses, train
    from deep.atrous import set_dilated_conv
    from deep.trainer import build_model
    from theory.balancing import make

    model_config = dataclasses.replace(model_config, compute_dtype=precision)
    optimizer = train.make_optimizer(train.OptimConfig())
    weights = losses.PRESETS["nyuv2"]

    def split(config, architecture="shared"):
        build = lambda: build_model(config, architecture, 0)
        if abstract:
            # The state from the abstract model's split, not from a second build: building traces every
            # initialiser's draw (about 6 s at the NYUv2 size), splitting and merging does not (0.5 s).
            model = nnx.eval_shape(build)
            graphdef, variables = nnx.split(model)
            state = jax.eval_shape(lambda variables: train.split_model(nnx.merge(graphdef, variables), optimizer)[1],
                                   variables)
        else:
            model = build()
            state = train.split_model(model, optimizer)[1]
        timed = train.split_states(model)[0]  # (only counted, never run, when abstract)
        set_dilated_conv(model, "xla")
        return timed, train.split_states(model)[0], state

    # The timed steps donate their state, as the training script's do: XLA then writes the new state into the old
    # one's buffers, and the memory it reports is the training loop's. Donation changes no FLOP.
    def core(graphdef, step_weights, counterfactual, independence_weight=1.0):
        return jax.jit(lambda state, batch, key: train.core_step(
            graphdef, optimizer, state, batch, key, step_weights, independence_weight=independence_weight,
            counterfactual=counterfactual), donate_argnums=0)

    plain = dataclasses.replace(model_config, grounding="none")
    plain_graphdef, plain_reference, plain_state = split(plain)
    ew_weights = dataclasses.replace(weights, independence=0.0, counterfactual=0.0, edge=0.0)
    steps = [Step("ew", core(plain_graphdef, ew_weights, False, 0.0), core(plain_reference, ew_weights, False, 0.0),
                  plain_state)]
    if "core" in methods or "core_no_cfa" in methods:
        graphdef, reference, core_state = split(model_config)
        if "core" in methods:
            steps.append(Step("core", core(graphdef, weights, True), core(reference, weights, True), core_state))
        if "core_no_cfa" in methods:
            steps.append(Step("core_no_cfa", core(graphdef, weights, False), core(reference, weights, False),
                              core_state))

    def balanced(name, graphdef):
        balancer = make(name)
        return jax.jit(lambda state, batch, key: train.balanced_step(
            graphdef, optimizer, balancer, state, balancer.init(len(plain.tasks)), batch, key), donate_argnums=0)

    if "pcgrad" in methods:
        steps.append(Step("pcgrad", balanced("pcgrad", plain_graphdef), balanced("pcgrad", plain_reference),
                          plain_state))
    if "mtan_ew" in methods or "mtan_pcgrad" in methods:
        graphdef, reference, mtan_state = split(plain, "mtan")
        for name in ("ew", "pcgrad"):
            if f"mtan_{name}" in methods:
                steps.append(Step(f"mtan_{name}", balanced(name, graphdef), balanced(name, reference), mtan_state))
    return steps


def lowered_flops(jitted, args) -> float:
    """XLA's FLOP count of the jitted function's HLO for ``args``, lowered for the CPU: before any backend's
    optimisation, so the same on every device (a GPU's compiled module leaves out the convolutions handed to cuDNN
    as custom calls). ``args`` may be abstract (``jax.ShapeDtypeStruct``): nothing is compiled or run."""
    cost = jitted.trace(*args).lower(lowering_platforms=("cpu",)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) if cost else 0.0


_DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "Framework Name Scope", "Framework Ops",
                  "Source code", "Launch Stats", "TensorFlow Name Scope", "TensorFlow Ops"}


def _kernel_summary(trace_dir: Path, calls: int) -> dict | None:
    """Device time per step from a profiler trace: the total over the device's streams, by kind of kernel, and the
    25 kernels that take longest (None when the trace has no GPU plane, as on CPUs)."""
    from jax.profiler import ProfileData

    # XLA's fusions first: their names can hold "convert" or "conv" (a bf16 cast), which is no convolution.
    kinds = (("xla_fusion", ("fusion", "loop_", "input_", "wrapped_")),
             ("convolution", ("cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "fprop", "_convolution")),
             ("matmul", ("gemm", "nvjet", "cublas", "cutlass")), ("triton", ("triton",)),
             ("copy", ("memcpy", "memset")))
    per_kernel: dict[str, list[float]] = {}
    lines = set()
    for path in trace_dir.rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if line.name in _DERIVED_LINES:  # summaries of the kernels on the streams: not counted twice
                    continue
                lines.add(line.name)
                for event in line.events:
                    entry = per_kernel.setdefault(event.name, [0.0, 0])
                    entry[0] += event.duration_ns / 1e6 / calls
                    entry[1] += 1
    if not per_kernel:
        return None
    by_kind = {}
    for name, (ms, _) in per_kernel.items():
        lower = name.lower()
        kind = next((k for k, marks in kinds if any(m in lower for m in marks)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    top = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:25]
    return {"device_ms_per_step": sum(ms for ms, _ in per_kernel.values()),
            "kernels_per_step": sum(n for _, n in per_kernel.values()) / calls,
            "lines": sorted(lines), "ms_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            "top_kernels": [{"name": name[:160], "ms_per_step": ms, "calls_per_step": n / calls}
                            for name, (ms, n) in top]}


def _measure(step: Step, args, batch_size: int, repeats: int, peak_tflops: float, trace: Path | None) -> dict:
    import time

    import jax
    import jax.numpy as jnp

    start = time.perf_counter()
    compiled = step.timed.lower(*args).compile()
    compile_seconds = time.perf_counter() - start
    flops = lowered_flops(step.counted, args)
    memory = compiled.memory_analysis()
    peak = None if memory is None else (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                        + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**20
    # The step donates (deletes) the state it is given, so each call takes the state the one before returned,
    # starting from a copy: the steps of one model share their initial state.
    state = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))(args[0])  # one program, not one per leaf shape
    rest = args[1:]

    def step_once():
        nonlocal state
        state = compiled(state, *rest)[0]
        jax.block_until_ready(state)

    seconds = median_seconds(step_once, repeats, warmup=True)

    def chained():
        # As a training loop runs: nothing waits in between, so the host dispatches step i + 1 while the device
        # runs step i.
        nonlocal state
        for _ in range(repeats):
            state = compiled(state, *rest)[0]
        jax.block_until_ready(state)

    pipelined = median_seconds(chained, 3) / repeats
    row = {"method": step.name, "ms": 1e3 * seconds, "ms_pipelined": 1e3 * pipelined,
           "images_per_second": batch_size / seconds, "gflops": flops / 1e9, "peak_mb": peak,
           "compile_seconds": compile_seconds}
    if peak_tflops > 0 and flops > 0:
        row["model_flop_utilisation"] = flops / seconds / (peak_tflops * 1e12)
        row["model_flop_utilisation_pipelined"] = flops / pipelined / (peak_tflops * 1e12)
    if trace is not None:
        calls = 2
        shutil.rmtree(trace, ignore_errors=True)  # an earlier run's trace there would be summed with this one
        with jax.profiler.trace(str(trace)):
            for _ in range(calls):
                step_once()
        row["kernels"] = _kernel_summary(trace, calls)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_train_step.py"),
                          argv, out_kind="file")
    model_config, batch_size, size = setting(config.config, config.variant)
    if config.dilated_conv:
        model_config = dataclasses.replace(model_config, dilated_conv=config.dilated_conv)
    batch = batch_arrays(batch_size, size)
    key = jax.random.key(1)
    out = Path(config.out)
    methods = chosen_methods(config.methods, config.variant)
    payload = lambda rows: {"benchmark": "bench_train_step", "config": config.config, "variant": config.variant,
                            "dilated_conv": model_config.dilated_conv, "batch": batch_size,
                            "image_size": list(size), "peak_tflops": config.peak_tflops, "rows": rows,
                            "environment": environment()}
    rows = []
    for precision in parse_choices("--precisions", config.precisions, PRECISIONS):
        measured = []
        for step in training_steps(model_config, precision, methods):
            trace = Path(config.trace) / f"{precision}_{step.name}" if config.trace else None
            row = _measure(step, (step.state, batch, key), batch_size, config.repeats, config.peak_tflops, trace)
            measured.append({**row, "precision": precision})
            if not config.quiet:
                print(f"{precision} {step.name}: {row['ms']:.1f} ms", file=sys.stderr, flush=True)
            write_json(out, payload(rows + measured))
        by_name = {row["method"]: row for row in measured}
        if "core" in by_name and "core_no_cfa" in by_name:
            expected_ms, expected_pipelined = (0.5 * (by_name["core"][key] + by_name["core_no_cfa"][key])
                                               for key in ("ms", "ms_pipelined"))
            measured.append({"method": "core_expected", "precision": precision, "ms": expected_ms,
                             "ms_pipelined": expected_pipelined,
                             "images_per_second": batch_size / expected_ms * 1e3,
                             "note": "mean of core and core_no_cfa: the authors' CFA probability 0.5"})
        for row in measured:
            row["ratio_to_ew"] = row["ms"] / by_name["ew"]["ms"]
            row["ratio_to_ew_pipelined"] = row["ms_pipelined"] / by_name["ew"]["ms_pipelined"]
        rows += measured
        write_json(out, payload(rows))
    if not config.quiet:
        print(f"{'precision':<9} {'step':<12} {'ms':>9} {'ms piped':>9} {'img/s':>8} {'x EW':>6} {'GFLOP':>9} "
              f"{'peak MB':>9} {'MFU':>6}")
        for row in rows:
            peak = f"{row['peak_mb']:>9.0f}" if row.get("peak_mb") is not None else f"{'-':>9}"
            gflops = f"{row['gflops']:>9.1f}" if "gflops" in row else f"{'-':>9}"
            mfu = f"{row['model_flop_utilisation']:>6.1%}" if "model_flop_utilisation" in row else f"{'-':>6}"
            piped = f"{row['ms_pipelined']:>9.1f}" if "ms_pipelined" in row else f"{'-':>9}"
            print(f"{row['precision']:<9} {row['method']:<12} {row['ms']:>9.1f} {piped} "
                  f"{row['images_per_second']:>8.1f} {row['ratio_to_ew']:>6.2f} {gflops} {peak} {mfu}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

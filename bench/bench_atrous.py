"""The dilated convolutions of the NYUv2 model, three ways, forward and backward, in one run.

    python bench/bench_atrous.py                          # batch 2 (CPU-sized)
    python bench/bench_atrous.py --batch 16 --precisions bfloat16,float32      # the paper's setting, on a GPU

Every 3×3 convolution with a dilation in the model at output stride 8 on a 288×384 image (36×48 grid): the
backbone's layer3 (rate 2) and layer4 (rates 2 and 4), and the ASPP branches of each task head (rates 12, 24, 36;
both variants' ASPP reads 512 channels). For each, the median time of one jitted forward + backward pass (the
gradients of ⟨y, g⟩ for the input and the kernel, g random) of ``deep.atrous.DILATED_CONVS``:

* ``xla``: ``lax.conv_general_dilated`` with the dilation (what XLA hands to cuDNN on GPUs);
* ``space_to_batch``: undilated convolutions of the r² sub-images, after dropping taps that only read padding;
* ``shifted_matmul``: one matrix product per tap on the overlap of the image with its shifted copy.

``per_step`` weighs each shape by how often a training step runs it (the paper variant's three heads; layer3 has
five rate-2 blocks); the totals say what a step can gain. Each implementation's relative deviation from ``xla`` on
the same inputs is reported. Writes ``bench/results/bench_atrous.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (environment, median_seconds, parse_choices, parse_config, parser_for,  # noqa: E402
                     require_integer, run_main, write_json)

PRECISIONS = ("float32", "bfloat16")
# (name, input channels, output channels, rate, how many a forward pass of the model runs)
SHAPES = (("layer3", 256, 256, 2, 5), ("layer4_first", 512, 512, 2, 1), ("layer4", 512, 512, 4, 2),
          ("aspp_r12", 512, 256, 12, 3), ("aspp_r24", 512, 256, 24, 3), ("aspp_r36", 512, 256, 36, 3))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    batch: int = dataclasses.field(default=2, metadata={"help": "batch size (the paper's NYUv2 run: 16)"})
    height: int = dataclasses.field(default=36, metadata={"help": "feature-grid height (288 / 8)"})
    width: int = dataclasses.field(default=48, metadata={"help": "feature-grid width (384 / 8)"})
    precisions: str = dataclasses.field(default="float32", metadata={
        "help": f"comma-separated precisions from {', '.join(PRECISIONS)}"})
    repeats: int = dataclasses.field(default=10, metadata={"help": "timed calls per row (median)"})
    out: str = dataclasses.field(default=str(ROOT / "bench" / "results" / "bench_atrous.json"),
                                 metadata={"help": "JSON output path"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        for name in ("batch", "height", "width", "repeats"):
            require_integer(self, name, 1)
        parse_choices("--precisions", self.precisions, PRECISIONS)


def _forward_backward(implementation, rate: int):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def loss(x, kernel, cotangent):
        numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        y = implementation(x, kernel, (1, 1), ((rate, rate), (rate, rate)), rhs_dilation=(rate, rate),
                           dimension_numbers=numbers)
        return jnp.vdot(y.astype(jnp.float32), cotangent), y

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def main(argv: Sequence[str] | None = None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from deep.atrous import DILATED_CONVS, conv_flops

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_atrous.py"),
                          argv, out_kind="file")
    rows = []
    for precision in parse_choices("--precisions", config.precisions, PRECISIONS):
        dtype = jnp.dtype(precision)
        for name, cin, cout, rate, count in SHAPES:
            keys = jax.random.split(jax.random.key(rate * 1000 + cin), 3)
            x = jax.random.normal(keys[0], (config.batch, config.height, config.width, cin), dtype)
            kernel = (jax.random.normal(keys[1], (3, 3, cin, cout), jnp.float32) / np.sqrt(9 * cin)).astype(dtype)
            cotangent = jax.random.normal(keys[2], (config.batch, config.height, config.width, cout), jnp.float32)
            reference = None
            for implementation, function in DILATED_CONVS.items():
                step = _forward_backward(function, rate)
                (grad_x, grad_kernel), y = jax.block_until_ready(step(x, kernel, cotangent))
                outputs = [np.asarray(a, np.float32) for a in (y, grad_x, grad_kernel)]
                if reference is None:
                    reference = outputs
                deviation = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                                for a, b in zip(outputs, reference))
                seconds = median_seconds(lambda: jax.block_until_ready(step(x, kernel, cotangent)),
                                         config.repeats)
                rows.append({"precision": precision, "shape": name, "in_channels": cin, "out_channels": cout,
                             "rate": rate, "count_per_forward": count, "implementation": implementation,
                             "ms": 1e3 * seconds, "per_step_ms": 1e3 * seconds * count,
                             "dense_gflops": 3 * conv_flops(x.shape, kernel.shape) / 1e9,
                             "relative_deviation_from_xla": deviation})
                if not config.quiet:
                    print(f"{precision} {name} {implementation}: {rows[-1]['ms']:.3f} ms", file=sys.stderr,
                          flush=True)
            write_json(Path(config.out), {"benchmark": "bench_atrous", "batch": config.batch,
                                          "grid": [config.height, config.width], "rows": rows,
                                          "environment": environment()})
    if not config.quiet:
        names = list(DILATED_CONVS)
        print(f"{'precision':<9} {'shape':<13} {'rate':>4} " + " ".join(f"{n + ' ms':>18}" for n in names)
              + "   best   max deviation")
        totals = {}
        for precision in dict.fromkeys(row["precision"] for row in rows):
            for name, *_ in SHAPES:
                group = {row["implementation"]: row for row in rows
                         if row["precision"] == precision and row["shape"] == name}
                if not group:
                    continue
                best = min(group, key=lambda n: group[n]["ms"])
                for n in names:
                    totals[precision, n] = totals.get((precision, n), 0.0) + group[n]["per_step_ms"]
                print(f"{precision:<9} {name:<13} {group['xla']['rate']:>4} "
                      + " ".join(f"{group[n]['ms']:>18.3f}" for n in names)
                      + f"   {best:<6} {max(r['relative_deviation_from_xla'] for r in group.values()):.1e}")
            print(f"{precision:<9} {'per forward':<18} " + " ".join(f"{totals[precision, n]:>18.3f}" for n in names)
                  + "   (each shape x its count in one forward pass, forward + backward)")
        print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Cost of the W1 estimators and of linear vs debiased CKA as the sample size grows, in one run.

    python bench/bench_measures.py                  # 1-D W1 up to 10^6 points, d-D up to 10^4, CKA up to 10^4
    python bench/bench_measures.py --max-1d 100000 --max-dd 2000 --quiet

Rows: POT's 1-D W1 (sorting, expected O(n log n)); exact OT ``ot.emd2`` with the Euclidean cost (O(n^2) memory,
roughly cubic time, so capped at ``--max-emd``); sliced W1 with 200 projections (O(P n log n)); linear CKA in the
feature form (O(n d^2)) and the Gram form (O(n^2 d)); debiased CKA (unbiased HSIC on n x n Grams, O(n^2 d)). Each
time is the median of 3 calls after one warm-up (JAX functions jitted). The growth order is the least-squares slope
of log time on log n over the measured sizes. Writes ``bench/results/bench_measures.json``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (environment, median_seconds, parse_config, parser_for, require_integer, run_main,  # noqa: E402
                     write_json)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    max_1d: int = dataclasses.field(default=1_000_000, metadata={"help": "largest 1-D sample (>= 10000)"})
    max_dd: int = dataclasses.field(default=10_000, metadata={"help": "largest d-D sample (>= 1000)"})
    max_emd: int = dataclasses.field(default=3_000, metadata={"help": "largest sample for exact OT (>= 300)"})
    dim: int = dataclasses.field(default=8, metadata={"help": "dimension of the d-D samples and CKA codes"})
    out: str = dataclasses.field(default=str(ROOT / "bench" / "results" / "bench_measures.json"),
                                 metadata={"help": "JSON output path"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        # Each row's growth order is a slope over its sizes (1-D from 1000, d-D from 100, exact OT 100, 300, ...),
        # so each needs two of them.
        for name, least in (("max_1d", 10_000), ("max_dd", 1000), ("max_emd", 300)):
            require_integer(self, name, least, "two sample sizes for the growth order")
        require_integer(self, "dim", 1)


def _sizes(start: int, stop: int) -> list[int]:
    sizes, n = [], start
    while n <= stop:
        sizes.append(n)
        n *= 10
    return sizes


def _slope(sizes, seconds) -> float:
    """The growth order: the slope of log time on log size (over two sizes or more, which the flags ensure)."""
    import numpy as np

    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main(argv: Sequence[str] | None = None) -> int:
    import jax
    import numpy as np

    from theory import measures

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_measures.py"),
                          argv, out_kind="file")
    rng = np.random.default_rng(0)
    linear_cka, gram_cka, debiased = (jax.jit(measures.linear_cka), jax.jit(measures.linear_cka_gram),
                                      jax.jit(measures.debiased_cka))
    rows = []

    def record(name, sizes, make_call):
        seconds = []
        for n in sizes:
            call = make_call(n)
            seconds.append(median_seconds(call, 3, warmup=True))
            if not config.quiet:
                print(f"{name}: n={n} {seconds[-1] * 1e3:.2f} ms", file=sys.stderr)
        rows.append({"estimator": name, "sizes": sizes, "seconds": seconds, "growth_order": _slope(sizes, seconds)})

    record("w1_1d (POT wasserstein_1d)", _sizes(1000, config.max_1d),
           lambda n: (lambda x=rng.standard_normal(n), y=2 * rng.standard_normal(n): measures.w1_empirical_1d(x, y)))
    emd_sizes = [n for n in (100, 300, 1000, 3000, 10000) if n <= config.max_emd]
    record(f"w1 exact OT (POT emd2, d={config.dim})", emd_sizes,
           lambda n: (lambda x=rng.standard_normal((n, config.dim)), y=2 * rng.standard_normal((n, config.dim)):
                      measures.w1_empirical(x, y)))
    record(f"sliced w1 (200 projections, d={config.dim})", _sizes(100, config.max_dd),
           lambda n: (lambda x=rng.standard_normal((n, config.dim)), y=2 * rng.standard_normal((n, config.dim)):
                      measures.sliced_w1(x, y)))
    for name, function in ((f"linear CKA, feature form (d={config.dim})", linear_cka),
                           (f"linear CKA, Gram form (d={config.dim})", gram_cka),
                           (f"debiased CKA (d={config.dim})", debiased)):
        record(name, _sizes(100, config.max_dd),
               lambda n, f=function: (lambda x=jax.numpy.asarray(rng.standard_normal((n, config.dim))),
                                      y=jax.numpy.asarray(rng.standard_normal((n, config.dim))):
                                      jax.block_until_ready(f(x, y))))

    write_json(Path(config.out), {"benchmark": "bench_measures", "dim": config.dim, "rows": rows,
                                  "environment": environment()})
    if not config.quiet:
        print(f"{'estimator':<42} {'growth':>7}  " + "  ".join(f"{'n=' + str(n):>12}" for n in _sizes(100, 10**6)))
        for row in rows:
            by_size = dict(zip(row["sizes"], row["seconds"]))
            cells = "  ".join(f"{by_size[n] * 1e3:>10.2f}ms" if n in by_size else f"{'':>12}"
                              for n in _sizes(100, 10**6))
            print(f"{row['estimator']:<42} {row['growth_order']:>7.2f}  {cells}")
        print(f"wrote {config.out}")
    return 0


if __name__ == "__main__":
    run_main(main)

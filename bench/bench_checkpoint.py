"""What saving a checkpoint costs the training loop: synchronous against asynchronous saving, in one run.

    python bench/bench_checkpoint.py                  # a 0.44 GiB state: EW's at the NYUv2 size
    python bench/bench_checkpoint.py --mib 690        # CORE-MTL's (0.67 GiB)

The state is ``--leaves`` float32 arrays on the default device totalling ``--mib`` MiB (their values do not change the
cost), saved ``--repeats`` times through ``deep.checkpoint.Checkpoints`` as the training loop saves it once an epoch
(keeping the newest two), in a temporary folder under ``--dir`` (default: the system's temporary folder; give one on
the disk a run writes to). For each mode, the median of: the time ``save`` holds the training loop (``blocking_ms``),
and the time until the checkpoint is on disk (``durable_ms``). Asynchronous saving holds the loop only while the
arrays are copied to host memory; the rest overlaps the next epoch's steps, as long as an epoch takes longer than
the write. Writes ``bench/results/bench_checkpoint.json``.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import environment, parse_config, parser_for, require_integer, run_main, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    mib: int = dataclasses.field(default=450, metadata={
        "help": "size of the saved state in MiB (default 450: EW's state at the NYUv2 size, 0.44 GiB)"})
    leaves: int = dataclasses.field(default=480, metadata={"help": "number of arrays the state is split into"})
    repeats: int = dataclasses.field(default=5, metadata={"help": "saves per mode (median)"})
    dir: str = dataclasses.field(default="", metadata={
        "help": "folder to write the checkpoints under (default: the system's temporary folder)"})
    out: str = dataclasses.field(default=str(ROOT / "bench" / "results" / "bench_checkpoint.json"),
                                 metadata={"help": "JSON path"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        require_integer(self, "mib", 1)
        require_integer(self, "leaves", 1)
        require_integer(self, "repeats", 1)
        if self.dir and not Path(self.dir).is_dir():
            raise ValueError(f"--dir must be an existing folder; got {self.dir!r}")


def _state(mib: int, leaves: int):
    """``leaves`` float32 arrays on the default device, ``mib`` MiB in all (the last one takes the remainder)."""
    import jax.numpy as jnp

    elements = mib * 2**20 // 4
    sizes = [elements // leaves] * (leaves - 1)
    sizes.append(elements - sum(sizes))
    return [jnp.full((size,), float(index), jnp.float32) for index, size in enumerate(sizes)]


def _measure(state, asynchronous: bool, repeats: int, folder: str) -> dict:
    import jax

    from deep.checkpoint import Checkpoints

    blocking, durable = [], []
    with tempfile.TemporaryDirectory(dir=folder or None) as directory:
        with Checkpoints(Path(directory) / "run", asynchronous=asynchronous) as checkpoints:
            for epoch in range(1, repeats + 2):  # the first save (Orbax's set-up) is not timed
                jax.block_until_ready(state)
                start = time.perf_counter()
                checkpoints.save(epoch, {"state": state})
                returned = time.perf_counter()
                checkpoints.wait()
                done = time.perf_counter()
                if epoch > 1:
                    blocking.append(returned - start)
                    durable.append(done - start)
    return {"mode": "asynchronous" if asynchronous else "synchronous",
            "blocking_ms": 1e3 * statistics.median(blocking), "durable_ms": 1e3 * statistics.median(durable)}


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_checkpoint.py"),
                          argv, out_kind="file")
    state = _state(config.mib, config.leaves)
    rows = []
    for asynchronous in (False, True):
        rows.append(_measure(state, asynchronous, config.repeats, config.dir))
        if not config.quiet:
            print(f"{rows[-1]['mode']}: save holds the loop {rows[-1]['blocking_ms']:.0f} ms", file=sys.stderr,
                  flush=True)
    synchronous, asynchronous = rows
    ratio = synchronous["blocking_ms"] / asynchronous["blocking_ms"]
    out = Path(config.out)
    write_json(out, {"benchmark": "bench_checkpoint", "mib": config.mib, "leaves": config.leaves,
                     "repeats": config.repeats, "rows": rows, "blocking_ratio_sync_to_async": ratio,
                     "environment": environment()})
    if not config.quiet:
        print(f"{'mode':<14} {'blocking ms':>12} {'durable ms':>11}")
        for row in rows:
            print(f"{row['mode']:<14} {row['blocking_ms']:>12.1f} {row['durable_ms']:>11.1f}")
        print(f"the loop waits {ratio:.1f}x less with asynchronous saving; wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Input-pipeline throughput (Loader + jitted augmentation) against the training step's rate, side by side.

    python bench/bench_data.py                                   # NYUv2 setting: 288x384, batch 16
    python bench/bench_data.py --config reduced                  # the reduced step's 64x80, batch 4
    python bench/bench_data.py --step-json bench/results/bench_train_step_nyuv2.json

The data are generated scenes held in memory (``deep.data.nyuv2_arrays``; ``--distinct`` scenes tiled to
``--examples``, since the content does not change the cost). Four pipelines are timed, each compiled first, as the
median over ``--repeats`` epochs of images delivered per second (ready on the device):

* ``host``: the Loader on the host (a numpy gather), then the transfer to the device;
* ``host+augment``: the same, then the jitted NYUv2 augmentations (scale-crop, flip, colour jitter);
* ``device``: the Loader with the whole set on the device (a jitted gather);
* ``device+augment``: the same, then the augmentations.

The step's rate comes from ``bench_train_step``'s JSON (default: the one of ``--config`` if present, else the other);
the reference is its fastest step (the strictest), and the issue's target is a pipeline at least 5x that rate.
Both rates should come from the same machine: a CPU pipeline against a GPU step says little.
Writes ``bench/results/bench_data.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _common import (environment, median_seconds, parse_config, parser_for, require_integer, run_main,  # noqa: E402
                     write_json)

SETTINGS = {"nyuv2": ((288, 384), 16), "reduced": ((64, 80), 4)}
TARGET_RATIO = 5.0


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="nyuv2", metadata={
        "help": "nyuv2 (288x384, batch 16) or reduced (64x80, batch 4)"})
    examples: int = dataclasses.field(default=64, metadata={
        "help": "examples per epoch (at least one batch; a last partial batch is left out, as in training)"})
    distinct: int = dataclasses.field(default=8, metadata={"help": "distinct generated scenes, tiled to --examples"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed epochs per pipeline (median)"})
    step_json: str = dataclasses.field(default="", metadata={
        "help": "bench_train_step JSON with the step's rate (default: that of --config if present, else the other)"})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/bench_data.json)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        if self.config not in SETTINGS:
            raise ValueError(f"--config must be one of {', '.join(SETTINGS)}; got {self.config!r}")
        if not self.out:  # the default filled in here, so that it is checked before the benchmark runs
            object.__setattr__(self, "out", str(ROOT / "bench" / "results" / "bench_data.json"))
        batch = SETTINGS[self.config][1]
        if self.examples < batch:
            raise ValueError(f"--examples must be >= the batch size {batch}; got {self.examples}")
        require_integer(self, "distinct", 1)
        require_integer(self, "repeats", 1)


def _step_reference(path_text: str, config_name: str) -> tuple[Path, dict]:
    """The step JSON (default: the one of the same configuration if present, else the other) and its fastest row."""
    if path_text:
        path = Path(path_text)
    else:
        results = ROOT / "bench" / "results"
        candidates = [results / f"bench_train_step_{name}.json"
                      for name in sorted(SETTINGS, key=lambda name: name != config_name)]
        path = next((candidate for candidate in candidates if candidate.exists()), candidates[0])
    if not path.exists():
        raise FileNotFoundError(f"--step-json: {path} not found; run bench/bench_train_step.py first or pass a path")
    try:
        payload = json.loads(path.read_bytes())  # bytes: a binary file fails to decode, as "not a result"
        rows = [row for row in payload["rows"] if row.get("images_per_second")]
        fastest = max(rows, key=lambda row: row["images_per_second"])
    except OSError as error:  # a folder, or no permission
        raise ValueError(f"--step-json: cannot read {path} ({error.strerror or error}); give a bench_train_step "
                         f"JSON file") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"--step-json: {path} is not a bench_train_step result (no rows with images_per_second)")
    return path, {"method": fastest["method"], "precision": fastest.get("precision", "float32"),
                  "images_per_second": fastest["images_per_second"], "batch": payload.get("batch"),
                  "image_size": payload.get("image_size"),
                  "backend": payload.get("environment", {}).get("backend"),
                  "devices": payload.get("environment", {}).get("devices")}


def _pipelines(arrays: dict, batch: int):
    """``[(name, epoch_function)]``: each runs one epoch and blocks until its last batch is ready."""
    import jax

    from deep.data import AugmentConfig, Loader, augment

    augment_batch = jax.jit(lambda key, batch_: augment(key, batch_, AugmentConfig()))
    key = jax.random.key(0)

    def run(loader: Loader, augmenting: bool, on_device: bool):
        def epoch():
            last = None
            for index, batch_ in enumerate(loader.epoch(0)):
                batch_ = batch_ if on_device else jax.device_put(batch_)
                last = augment_batch(jax.random.fold_in(key, index), batch_) if augmenting else batch_
            jax.block_until_ready(last)
        return epoch

    host = Loader(arrays, batch, seed=0)
    device = Loader(arrays, batch, seed=0, on_device=True)
    return [("host", run(host, False, False)), ("host+augment", run(host, True, False)),
            ("device", run(device, False, True)), ("device+augment", run(device, True, True))]


def main(argv: Sequence[str] | None = None) -> int:
    import numpy as np

    from deep.data import nyuv2_arrays

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_data.py"), argv,
                          out_kind="file")
    size, batch = SETTINGS[config.config]
    step_path, step = _step_reference(config.step_json, config.config)
    scenes = nyuv2_arrays(min(config.distinct, config.examples), *size, seed=0)
    tiles = -(-config.examples // len(scenes["images"]))
    arrays = {name: np.concatenate([value] * tiles)[:config.examples] for name, value in scenes.items()}
    images_per_epoch = (config.examples // batch) * batch

    rows = []
    for name, epoch in _pipelines(arrays, batch):
        seconds = median_seconds(epoch, config.repeats, warmup=True)
        rate = images_per_epoch / seconds
        rows.append({"pipeline": name, "images_per_second": rate, "ms_per_batch": 1e3 * seconds / (images_per_epoch
                                                                                                    // batch),
                     "ratio_to_step": rate / step["images_per_second"],
                     "meets_target": rate >= TARGET_RATIO * step["images_per_second"]})
        if not config.quiet:
            print(f"{name}: {rate:.0f} images/s", file=sys.stderr, flush=True)

    import jax

    backend = jax.default_backend()
    comparable = step["backend"] == backend and list(step["image_size"] or []) == list(size)
    out = Path(config.out)
    write_json(out, {"benchmark": "bench_data", "config": config.config, "image_size": list(size), "batch": batch,
                     "examples": config.examples, "step_json": str(step_path), "step": step,
                     "target_ratio": TARGET_RATIO, "comparable": comparable, "rows": rows,
                     "environment": environment()})
    if not config.quiet:
        print(f"step reference: {step['method']} ({step['precision']}) {step['images_per_second']:.1f} images/s at "
              f"{step['image_size']} batch {step['batch']} on {step['backend']} ({step_path.name})")
        print(f"pipeline: {size[0]}x{size[1]} batch {batch} on {backend}"
              + ("" if comparable else "  [not like for like: a different backend or image size]"))
        print(f"{'pipeline':<16} {'img/s':>9} {'ms/batch':>9} {'x step':>8} {'>= 5x':>6}")
        for row in rows:
            print(f"{row['pipeline']:<16} {row['images_per_second']:>9.0f} {row['ms_per_batch']:>9.2f} "
                  f"{row['ratio_to_step']:>8.2f} {'yes' if row['meets_target'] else 'no':>6}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

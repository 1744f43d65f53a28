"""Where the FLOPs of a training step go: each part of the model's forward pass, the losses, the counterfactual pass,
and the whole EW, CORE-MTL and PCGrad steps, counted without running anything.

    python bench/bench_flops.py                           # the paper's NYUv2 setting (288x384, batch 16)
    python bench/bench_flops.py --variant authors         # the authors' architecture
    python bench/bench_flops.py --config reduced          # bench_train_step.py's CPU-sized model

Every function is traced, lowered for the CPU and counted by XLA's cost analysis, as ``bench_train_step.py``
counts its steps (the same count on every device, with the dilated convolutions as ``lax.conv_general_dilated``,
over the taps that read the image). Nothing is compiled or run, so the paper's full-size setting takes a few minutes
on a laptop and needs no GPU: the FLOP side of the step-time comparison can be checked anywhere.

Parts, each a forward pass in training mode of the hard-grounding CORE-MTL model (the ``ew`` and ``pcgrad`` steps
use the same model without decoders):

* ``backbone`` (the dilated ResNet-50), ``fusion`` (the authors' variant only), ``streams`` (the two projectors),
  ``task heads`` (all of them, with their upsampling to the image);
* ``physical decoder`` (albedo, normals, lighting and the SH rendering of Eq (13)), ``geometry decoder`` and
  ``appearance decoder`` (the generic decoders);
* ``losses``: the gate-closed objective minus the model's forward pass (task losses, CKA, the edge term, the
  grounding terms);
* ``counterfactual pass``: the forward pass of the counterfactual term, Eq (12) (the appearance decoder on shuffled
  codes, then the backbone, streams and heads again on the synthesised images, and their losses).

``parts_sum_to_forward`` checks the split: the model's parts against its own forward pass. The steps are the counted
steps of ``bench_train_step.py`` (``core_expected`` is the mean of ``core`` and ``core_no_cfa``, the paper's gate
probability 0.5). Writes ``bench/results/bench_flops_<config>.json`` (``_authors`` for that variant).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment, parse_config, parser_for, run_main, write_json  # noqa: E402
from bench_train_step import CONFIGS, METHODS, batch_arrays, lowered_flops, setting, training_steps  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="nyuv2", metadata={
        "help": "nyuv2 (288x384, batch 16, full ResNet-50) or reduced (bench_train_step.py's CPU-sized model)"})
    variant: str = dataclasses.field(default="paper", metadata={
        "help": "the architecture: paper (ASPP heads on the semantic stream of c4) or authors (multi-scale fusion, "
                "DeepLabV3+ heads)"})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/...)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        from deep.model import VARIANTS

        if self.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {self.config!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")
        if not self.out:  # the default filled in here, so that it is checked before anything is traced
            suffix = "" if self.variant == "paper" else f"_{self.variant}"
            object.__setattr__(self, "out", str(ROOT / "bench" / "results" / f"bench_flops_{self.config}{suffix}.json"))


def forward_parts(model_config, batch_size: int, size: tuple[int, int]) -> tuple[dict[str, float], float]:
    """``({part: FLOPs}, FLOPs of the model's whole forward pass)`` for a hard-grounding model of ``model_config``
    in training mode, on abstract arrays (nothing is initialised or run)."""
    import jax
    from flax import nnx

    from deep import losses, train
    from deep.atrous import set_dilated_conv
    from deep.model import DualStreamModel

    model_config = dataclasses.replace(model_config, grounding="hard", compute_dtype="float32")
    abstract = nnx.eval_shape(lambda: DualStreamModel(model_config, nnx.Rngs(0)))
    set_dilated_conv(abstract, "xla")  # counted as defined, as bench_train_step.py counts its steps
    graphdef, shared, heads, batch_stats, rest = nnx.split(abstract, train.SHARED, train.HEADS, nnx.BatchStat, ...)
    params = (shared, heads)
    state = nnx.state(abstract)
    batch = jax.eval_shape(lambda: batch_arrays(batch_size, size))
    images = batch["images"]

    def count(part, *inputs) -> float:
        """FLOPs of ``part(model, *inputs)`` with the model in training mode."""
        def run(state, *inputs):
            model = nnx.merge(graphdef, state)
            model.train()
            return part(model, *inputs)

        return lowered_flops(jax.jit(run), (state, *inputs))

    stages = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state).backbone(x), state, images)
    encoded = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)._encode(x), state, images)
    semantic_map, residual_code, features = (encoded[k] for k in ("semantic_map", "residual_code", "features"))
    low_level = encoded["low_level"] if model_config.head == "deeplabv3plus" else None
    parts = {"backbone": count(lambda model, x: model.backbone(x), images)}
    if model_config.fusion != "c4":
        parts["fusion"] = count(lambda model, stages: model.fusion(stages), stages)
    parts["streams"] = count(lambda model, f: model.streams(f), features)
    parts["task heads"] = count(lambda model, s, f, c1: model.predict_from_streams(
        s, None, f, size, low_level=c1), semantic_map, features, low_level)
    parts["physical decoder"] = count(lambda model, s, r, f: model.render(s, r, f, size),
                                      semantic_map, residual_code, features)
    parts["geometry decoder"] = count(lambda model, s: model.geometry_decoder(s, size), semantic_map)
    parts["appearance decoder"] = count(lambda model, s, r: model.appearance_decoder(s, r, size),
                                        semantic_map, residual_code)
    forward = count(lambda model, x: model(x), images)

    weights = losses.PRESETS["nyuv2"]
    key = jax.eval_shape(lambda: jax.random.key(0))
    closed = dataclasses.replace(weights, counterfactual=0.0)
    objective = lowered_flops(jax.jit(lambda p, s, r, b, k: train.core_objective(
        graphdef, p, s, r, b, k, closed, 1.0, False)[0]), (params, batch_stats, rest, batch, key))
    parts["losses"] = objective - forward
    probes = {"semantic_map": semantic_map, "residual_code": residual_code, "features": features}
    parts["counterfactual pass"] = lowered_flops(jax.jit(lambda p, s, r, a, b, k: train.counterfactual_loss(
        graphdef, p, s, r, a, b, k, weights)), (params, batch_stats, rest, probes, batch, key))
    return parts, forward


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_flops.py"),
                          argv, out_kind="file")
    model_config, batch_size, size = setting(config.config, config.variant)
    parts, forward = forward_parts(model_config, batch_size, size)
    model_parts = sum(value for name, value in parts.items() if name not in ("losses", "counterfactual pass"))
    batch, key = jax.eval_shape(lambda: (batch_arrays(batch_size, size), jax.random.key(1)))
    steps = {step.name: lowered_flops(step.counted, (step.state, batch, key))
             for step in training_steps(model_config, "float32", METHODS, abstract=True)}
    steps["core_expected"] = 0.5 * (steps["core"] + steps["core_no_cfa"])
    payload = {"benchmark": "bench_flops", "config": config.config, "variant": config.variant, "batch": batch_size,
               "image_size": list(size),
               "forward_parts": [{"part": name, "gflops": value / 1e9, "share_of_forward": value / forward}
                                 for name, value in parts.items()],
               "forward_gflops": forward / 1e9, "parts_sum_to_forward": model_parts / forward,
               "steps": [{"method": name, "gflops": value / 1e9, "ratio_to_ew": value / steps["ew"]}
                         for name, value in steps.items()],
               "environment": environment()}
    out = Path(config.out)
    write_json(out, payload)
    if not config.quiet:
        print(f"{'forward part':<20} {'GFLOP':>9} {'of forward':>10}")
        for row in payload["forward_parts"]:
            print(f"{row['part']:<20} {row['gflops']:>9.1f} {row['share_of_forward']:>10.1%}")
        print(f"{'whole forward':<20} {forward / 1e9:>9.1f}   (parts / whole: {payload['parts_sum_to_forward']:.4f})")
        print(f"{'step':<20} {'GFLOP':>9} {'x EW':>10}")
        for row in payload["steps"]:
            print(f"{row['method']:<20} {row['gflops']:>9.1f} {row['ratio_to_ew']:>10.2f}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Where the FLOPs of a training step go, counted without running anything.

Each part of the model's forward pass, the losses, the counterfactual pass, and the whole EW, CORE-MTL and PCGrad
steps (and MTAN's EW and PCGrad steps, with the paper's variant):

    python bench/bench_flops.py                           # the paper's NYUv2 setting (288x384, batch 16)
    python bench/bench_flops.py --variant authors         # the authors' architecture
    python bench/bench_flops.py --config reduced          # bench_train_step.py's CPU-sized model

Every function is traced, lowered for the CPU and counted by XLA's cost analysis, as ``bench_train_step.py``
counts its steps (the same count on every device, with the dilated convolutions as ``lax.conv_general_dilated``,
over the taps that read the image). Nothing is compiled or run, so the paper's full-size setting takes a minute or
two on a laptop and needs no GPU: the FLOP side of the step-time comparison can be checked anywhere.

The parts, each a forward pass in training mode of the hard-grounding CORE-MTL model (the ``ew`` and ``pcgrad`` steps
use the same model without decoders):

* ``backbone`` (the dilated ResNet-50), ``fusion`` (the authors' variant only), ``streams`` (the two projectors),
  ``task heads`` (all of them, with their upsampling to the image);
* ``physical decoder`` (albedo, normals, lighting and the SH rendering of Eq (13)), ``geometry decoder`` and
  ``appearance decoder`` (the generic decoders);
* ``losses``: the objective's terms on a step without the counterfactual pass, computed from the forward pass's
  outputs (task losses, CKA, the edge term, the grounding terms; ``deep.train.objective_terms``);
* ``counterfactual pass``: the forward pass of the counterfactual term, Eq (12) (the appearance decoder on shuffled
  codes, then the backbone, streams and heads again on the synthesised images, and their losses).

Two checks of the split: ``parts_sum_to_forward`` (the parts against the model's own forward pass) and
``forward_and_losses_to_objective`` (the forward pass and the losses, each counted alone, against the objective that
computes both). The steps are the counted steps of ``bench_train_step.py`` (``core_expected`` is the mean of ``core``
and ``core_no_cfa``: the authors' probability 0.5 of the counterfactual pass). Writes
``bench/results/bench_flops_<config>.json`` (``_authors`` for that variant).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import environment, parse_config, parser_for, run_main, write_json  # noqa: E402
from bench_train_step import (CONFIGS, DUAL_STREAM_METHODS, METHODS, MTAN_METHODS, VARIANT_HELP,  # noqa: E402
                              batch_arrays, check_variant, default_out, lowered_flops, setting, training_steps)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    config: str = dataclasses.field(default="nyuv2", metadata={
        "help": "nyuv2 (288x384, batch 16, full ResNet-50) or reduced (bench_train_step.py's CPU-sized model)"})
    variant: str = dataclasses.field(default="paper", metadata={"help": VARIANT_HELP})
    out: str = dataclasses.field(default="", metadata={"help": "JSON path (default bench/results/...)"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "print nothing"})

    def __post_init__(self):
        if self.config not in CONFIGS:
            raise ValueError(f"--config must be one of {', '.join(CONFIGS)}; got {self.config!r}")
        check_variant(self.variant)
        if not self.out:  # the default filled in here, so that it is checked before anything is traced
            object.__setattr__(self, "out", default_out("bench_flops", self.config, self.variant))


class Counts(NamedTuple):
    """FLOPs of a training step's pieces (see the module docstring)."""

    parts: dict[str, float]  # the parts of the model's forward pass
    forward: float  # the whole forward pass
    beside: dict[str, float]  # "losses" and "counterfactual pass", not in ``forward``
    objective: float  # the objective without the counterfactual pass: the forward pass and the losses, as one function


def count_flops(model_config, batch_size: int, size: tuple[int, int]) -> Counts:
    """The forward pass of a hard-grounding model of ``model_config`` in training mode, part by part, its losses
    and its counterfactual pass, on abstract arrays (nothing is initialised or run)."""
    import jax
    from flax import nnx

    from deep import losses, train
    from deep.atrous import set_dilated_conv
    from deep.model import DualStreamModel

    model_config = dataclasses.replace(model_config, grounding="hard", compute_dtype="float32")
    abstract = nnx.eval_shape(lambda: DualStreamModel(model_config, nnx.Rngs(0)))
    set_dilated_conv(abstract, "xla")  # counted as defined, as bench_train_step.py counts its steps
    graphdef, params, batch_stats, rest = train.split_states(abstract)
    batch, key = jax.eval_shape(lambda: (batch_arrays(batch_size, size), jax.random.key(0)))
    images = batch["images"]

    def in_training_mode(part):
        def run(params, batch_stats, rest, *inputs):
            model = nnx.merge(graphdef, *params, batch_stats, rest)
            model.train()
            return part(model, *inputs)

        return run

    def count(part, *inputs) -> float:
        """FLOPs of ``part(model, *inputs)`` with the model in training mode."""
        return lowered_flops(jax.jit(in_training_mode(part)), (params, batch_stats, rest, *inputs))

    def shapes(part, *inputs):
        return jax.eval_shape(in_training_mode(part), params, batch_stats, rest, *inputs)

    stages = shapes(lambda model, x: model.backbone(x), images)
    encoded = shapes(lambda model, x: model._encode(x), images)
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
    predictions, aux = shapes(lambda model, x: model(x), images)
    beside = {"losses": count(lambda model, p, a, b: train.objective_terms(model, p, a, b, weights, 1.0)[0],
                              predictions, aux, batch)}
    probes = {"semantic_map": semantic_map, "residual_code": residual_code, "features": features}
    beside["counterfactual pass"] = lowered_flops(jax.jit(lambda p, s, r, a, b, k: train.counterfactual_loss(
        graphdef, p, s, r, a, b, k, weights)), (params, batch_stats, rest, probes, batch, key))
    objective = lowered_flops(jax.jit(lambda p, s, r, b, k: train.core_objective(
        graphdef, p, s, r, b, k, weights, 1.0, counterfactual=False)[0]), (params, batch_stats, rest, batch, key))
    return Counts(parts, forward, beside, objective)


def main(argv: Sequence[str] | None = None) -> int:
    import jax

    config = parse_config(BenchConfig, parser_for(BenchConfig, __doc__.splitlines()[0], prog="bench_flops.py"),
                          argv, out_kind="file")
    model_config, batch_size, size = setting(config.config, config.variant)
    counts = count_flops(model_config, batch_size, size)
    batch, key = jax.eval_shape(lambda: (batch_arrays(batch_size, size), jax.random.key(1)))
    methods = METHODS if config.variant == "paper" else DUAL_STREAM_METHODS  # MTAN is the same in both variants
    counted = {step.name: lowered_flops(step.counted, (step.state, batch, key))
               for step in training_steps(model_config, "float32", methods, abstract=True)}
    counted["core_expected"] = 0.5 * (counted["core"] + counted["core_no_cfa"])
    steps = {name: counted[name] for name in (*DUAL_STREAM_METHODS, "core_expected", *MTAN_METHODS) if name in counted}
    forward = counts.forward
    payload = {"benchmark": "bench_flops", "config": config.config, "variant": config.variant, "batch": batch_size,
               "image_size": list(size),
               "forward_parts": [{"part": name, "gflops": value / 1e9, "share_of_forward": value / forward}
                                 for name, value in counts.parts.items()],
               "forward_gflops": forward / 1e9,
               "beside_forward": [{"part": name, "gflops": value / 1e9, "relative_to_forward": value / forward}
                                  for name, value in counts.beside.items()],
               # Two checks of the split: the parts against the whole forward pass, and the forward pass and the
               # losses, each counted alone, against the objective that computes both.
               "parts_sum_to_forward": sum(counts.parts.values()) / forward,
               "forward_and_losses_to_objective": (forward + counts.beside["losses"]) / counts.objective,
               "steps": [{"method": name, "gflops": value / 1e9, "ratio_to_ew": value / steps["ew"],
                          **({"ratio_to_mtan_ew": value / steps["mtan_ew"]} if name.startswith("mtan_") else {})}
                         for name, value in steps.items()],
               "environment": environment()}
    out = Path(config.out)
    write_json(out, payload)
    if not config.quiet:
        print(f"{'forward part':<20} {'GFLOP':>9} {'of forward':>10}")
        for row in payload["forward_parts"]:
            print(f"{row['part']:<20} {row['gflops']:>9.1f} {row['share_of_forward']:>10.1%}")
        print(f"{'whole forward':<20} {forward / 1e9:>9.1f}   (parts / whole: {payload['parts_sum_to_forward']:.6f})")
        for row in payload["beside_forward"]:
            print(f"{row['part']:<20} {row['gflops']:>9.1f} {row['relative_to_forward']:>10.1%}")
        print(f"(forward + losses) / objective: {payload['forward_and_losses_to_objective']:.6f}")
        print(f"{'step':<20} {'GFLOP':>9} {'x EW':>10}")
        for row in payload["steps"]:
            print(f"{row['method']:<20} {row['gflops']:>9.1f} {row['ratio_to_ew']:>10.2f}")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

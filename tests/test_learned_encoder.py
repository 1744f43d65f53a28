"""The learned-encoder world, the CORE-MTL objective at this scale, and the experiment script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from theory.balancing import make
from theory.learned_encoder import (CoreWeights, EncoderTraining, EncoderWorld, core_objective, encode, evaluate,
                                    init_model, mix, sample_world, train_encoder)

ROOT = Path(__file__).resolve().parents[1]
WORLD = EncoderWorld()


def test_world_has_the_stated_correlations_and_scales():
    source = sample_world(WORLD, jax.random.key(0), 100_000, "source")
    target = sample_world(WORLD, jax.random.key(0), 100_000, "target")
    corr = lambda a, b: float(np.corrcoef(np.asarray(a), np.asarray(b))[0, 1])
    assert abs(corr(source.s[:, 0], source.r[:, 0]) - 0.8) < 0.01
    assert abs(corr(target.s[:, 0], target.r[:, 0])) < 0.01
    assert abs(float(target.r.std()) - 2.0) < 0.02
    np.testing.assert_allclose(source.s, target.s)  # paired across domains


def test_bad_world_fields_are_named():
    with pytest.raises(ValueError, match="rho_source"):
        EncoderWorld(rho_source=1.0)
    with pytest.raises(ValueError, match="mixing"):
        EncoderWorld(mixing="quadratic")
    with pytest.raises(ValueError, match="grounding"):
        CoreWeights(grounding="medium")
    with pytest.raises(ValueError, match="exactly one"):
        train_encoder(WORLD, EncoderTraining(steps=10, eval_every=10), jax.random.key(0))


def test_an_encoder_that_inverts_the_mixing_has_no_leakage_and_no_gap_beyond_noise():
    """Metrics on a hand-built disentangled encoder: θ̂ = 0, κ = 0, and its gap is only the noise it reads."""
    _, m1, _ = WORLD.constants()
    params = init_model(WORLD, jax.random.key(0))
    params["encoder"]["out"] = jnp.asarray(np.linalg.inv(m1))  # linear mixing: code = [s; r] (+ noise)
    betas, _, _ = WORLD.constants()
    params["heads"] = jnp.asarray(betas)
    metrics = evaluate(WORLD, params, jax.random.key(1), 4000)
    assert float(metrics.theta_stream) < 1e-3 and float(metrics.kappa) < 1e-5


def test_hard_grounding_with_the_true_codes_reconstructs_exactly():
    batch = sample_world(EncoderWorld(observation_noise=0.0), jax.random.key(2), 64, "source")
    _, m1, _ = WORLD.constants()
    params = init_model(WORLD, jax.random.key(0))
    params["encoder"]["out"] = jnp.asarray(np.linalg.inv(m1))
    params["decoder_geo"] = jnp.eye(WORLD.dim)
    _, terms = core_objective(EncoderWorld(observation_noise=0.0), params, batch, CoreWeights(), jax.random.key(3))
    assert float(terms["reconstruction"]) < 1e-10 and float(terms["geometry"]) < 1e-10
    z_s, z_r = encode(params["encoder"], batch.x)
    np.testing.assert_allclose(mix(WORLD, z_s, z_r), batch.x, atol=1e-6)


def test_core_with_hard_grounding_leaks_less_than_a_balancing_method():
    training = EncoderTraining(num_samples=512, steps=400, eval_every=400, eval_samples=4000)
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    baseline = jax.vmap(lambda k: train_encoder(WORLD, training, k, balancer=make("ew")))(keys)
    core = jax.vmap(lambda k: train_encoder(WORLD, training, k, core=CoreWeights()))(keys)
    assert float(core.kappa[:, -1].max()) < 0.5 * float(baseline.kappa[:, -1].min())
    assert float(core.gap[:, -1].max()) < float(baseline.gap[:, -1].min())


def test_script_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "learned_encoder.py"), "--methods", "ew",
                             "--seeds", "2", "--samples", "64", "--steps", "20", "--eval-every", "10",
                             "--lambda-ind", "0,1", "--out", str(tmp_path), "--quiet"], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "learned_encoder.json").read_text())
    assert (tmp_path / "learned_encoder.png").stat().st_size > 10_000
    assert payload["steps"] == [10, 20]
    assert len(payload["runs"]) == 2 + 3 + 2  # ew x 2 head inputs, CORE hard/no-CFA/soft, the lambda sweep
    assert set(payload["final"]["CORE-MTL, hard grounding"]) >= {"theta_stream", "kappa", "gap", "gap_sem"}


@pytest.mark.parametrize("flags, message", [(["--methods", "graddrop_x"], "--methods must be"),
                                            (["--steps", "15", "--eval-every", "10"], "multiple of --eval-every"),
                                            (["--rho-source", "1.5"], "rho_source must lie in (-1, 1)")])
def test_script_bad_flags(flags, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "learned_encoder.py"), *flags, "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr

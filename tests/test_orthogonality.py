"""Proposition 2.5 / Eq (10) (theory.orthogonality) and the grad_orthogonality script."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scripts import assert_one_line_error, load_script, run_script, with_out
from theory import closed_forms as cf
from theory.orthogonality import CHAIN_RULE_TOLERANCE, stream_gradients, whiten

ROOT = Path(__file__).resolve().parents[1]


def test_whiten_gives_an_exactly_white_sample():
    x = jax.random.normal(jax.random.key(0), (500, 3)) @ jnp.asarray([[2.0, 0.5, 0], [0, 1, 0.3], [0, 0, 0.2]])
    white = whiten(x + 4.0)
    np.testing.assert_allclose(white.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(white.T @ white / 500, np.eye(3), atol=1e-10)


@given(st.floats(0.0, math.pi / 2), st.floats(0.3, 3.0), st.floats(0.3, 3.0), st.integers(1, 4),
       st.integers(0, 1000))
@settings(max_examples=30)
def test_eq10_inner_product_is_bounded_through_cka(theta, sigma_s, sigma_r, dim, seed):
    result = stream_gradients(theta, sigma_s, sigma_r, dim, jax.random.key(seed), 64 * dim)
    assert abs(float(result.inner_product)) <= float(result.bound) * (1 + 1e-9) + 1e-12
    # The bound's G_i, G_j are the stream gradients autodiff pulls back (D.1): the inequality alone has a margin of
    # 10x at its tightest, so a G too large by a constant would pass it.
    assert float(result.chain_rule_error) < CHAIN_RULE_TOLERANCE
    # On an exactly white sample the streams' CKA is the closed form CKA(θ).
    np.testing.assert_allclose(result.linear_cka, cf.rotation_cka(theta, sigma_s, sigma_r), atol=1e-10)


def test_gradients_are_orthogonal_when_cka_is_zero_even_though_the_stream_leaks():
    result = stream_gradients(0.7, 1.0, 1.0, 3, jax.random.key(1), 300)
    assert abs(float(result.cosine)) < 1e-12 and float(result.linear_cka) < 1e-20
    assert float(cf.oracle_leakage(0.7, 1.0, 1.0)) > 0.4  # ... the semantic stream still reads the residual
    entangled = stream_gradients(0.7, 1.0, 2.0, 3, jax.random.key(1), 300)
    assert abs(float(entangled.cosine)) > 0.01


def test_script_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "grad_orthogonality.py"), "--num-thetas", "3",
                             "--sigma-pairs", "1:2,1:1", "--dim", "2", "--samples", "64", "--num-batches", "4",
                             "--out", str(tmp_path), "--quiet"], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads((tmp_path / "grad_orthogonality.json").read_text())
    assert (tmp_path / "grad_orthogonality.png").stat().st_size > 10_000
    assert len(payload["points"]) == 6
    assert payload["verdict"]["eq10_holds_everywhere"] and payload["verdict"]["orthogonal_where_cka_is_zero"]
    assert payload["verdict"]["bound_reads_the_gradients"]
    assert {(p["sigma_s"], p["sigma_r"]) for p in payload["verdict"]["cka_blind_spots"]} == {(1.0, 1.0)}


@pytest.mark.parametrize("flags, message", [(["--sigma-pairs", "1:0"], "--sigma-pairs must be"),
                                            (["--batch", "2"], "--batch must be an integer >= 4")])
def test_script_bad_flags(flags, message, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "grad_orthogonality.py"), *flags,
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2**63)], "--seed must be an integer in [-2^63, 2^63 - 1]; got 9223372036854775808"),
    (["--num-thetas", "2", "--dim", "1", "--samples", "8", "--num-batches", "2", "--batch", "4", "--out",
      "/proc/x.json"], "--out /proc/x.json cannot be written"),
])
def test_script_refuses_a_seed_jax_cannot_take_and_an_unwritable_out(flags, message, tmp_path):
    assert_one_line_error(run_script("experiments/grad_orthogonality.py", *with_out(flags, tmp_path)), message)


def test_the_scripts_points_against_closed_forms_and_an_independent_batch_cka(tmp_path):
    """At (σ_s, σ_r) = (1, 2) on θ = 0, 0.75, 1.5 (θ_max included): the oracle leakage is theory.md's
    s²σ_r²/(c²σ_s² + s²σ_r²), κ = |sin θ|, and the batch linear CKA (64 batches of 32) matches a numpy Monte Carlo of
    4000 batches of the rotated factors within 4 standard errors, with an SEM of the batch spread / √64."""
    module = load_script("experiments/grad_orthogonality.py")
    config = module.OrthogonalityConfig(num_thetas=3, theta_max=1.5, sigma_pairs="1:2", dim=2, samples=64, batch=32,
                                        num_batches=64, out=str(tmp_path), quiet=True)
    payload = module.run(config)
    points = payload["points"]
    assert [p["theta"] for p in points] == pytest.approx([0.0, 0.75, 1.5], abs=1e-12)
    rng = np.random.default_rng(0)
    s, r = rng.standard_normal((2, 4000, 32, 2)) * np.array([1.0, 2.0])[:, None, None, None]

    def linear_cka(x, y):  # feature form, per batch
        x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        cross = np.einsum("bnp,bnq->bpq", x, y)
        xx, yy = np.einsum("bnp,bnq->bpq", x, x), np.einsum("bnp,bnq->bpq", y, y)
        return (cross**2).sum((1, 2)) / np.sqrt((xx**2).sum((1, 2)) * (yy**2).sum((1, 2)))

    def unbiased_hsic(k, l):  # Song et al. (2012), per batch of n: Gram matrices with zeroed diagonals
        n = k.shape[1]
        k, l = k * (1 - np.eye(n)), l * (1 - np.eye(n))
        trace = np.einsum("bij,bji->b", k, l)
        sums = k.sum((1, 2)) * l.sum((1, 2)) / ((n - 1) * (n - 2))
        cross = 2 * np.einsum("bi,bi->b", k.sum(2), l.sum(2)) / (n - 2)
        return (trace + sums - cross) / (n * (n - 3))

    def debiased_cka(x, y):
        k, l = np.einsum("bnp,bmp->bnm", x, x), np.einsum("bnp,bmp->bnm", y, y)
        return unbiased_hsic(k, l) / np.sqrt(unbiased_hsic(k, k) * unbiased_hsic(l, l))

    for p in points:
        c, sn = math.cos(p["theta"]), math.sin(p["theta"])
        assert p["oracle_leakage"] == pytest.approx(sn**2 * 4 / (c**2 + sn**2 * 4), rel=1e-12, abs=1e-15)
        assert p["kappa"] == pytest.approx(abs(sn), rel=1e-12)
        reference = linear_cka(c * s - sn * r, sn * s + c * r)
        error = math.hypot(p["cka_linear_batch_sem"], reference.std(ddof=1) / math.sqrt(reference.size))
        assert abs(p["cka_linear_batch"] - reference.mean()) < 4 * error, (p["theta"], p["cka_linear_batch"])
        assert 0.5 < p["cka_linear_batch_sem"] / (reference.std(ddof=1) / 8) < 2.0, p["theta"]
        debiased = debiased_cka(c * s - sn * r, sn * s + c * r)
        error = math.hypot(p["cka_debiased_batch_sem"], debiased.std(ddof=1) / math.sqrt(debiased.size))
        assert abs(p["cka_debiased_batch"] - debiased.mean()) < 4 * error, (p["theta"], p["cka_debiased_batch"])
        assert 0.5 < p["cka_debiased_batch_sem"] / (debiased.std(ddof=1) / 8) < 2.0, p["theta"]
    # The summary's figures from the points, and the batch floor theory.md gives, √(pq)/√((B+p)(B+q)) = 2/34 at
    # B = 32, p = q = 2 (of --batch, not --num-batches).
    assert payload["verdict"]["largest_inner_over_bound"] == pytest.approx(max(
        abs(p["gradient_inner_product"]) / p["eq10_bound"] for p in points if p["eq10_bound"] > 0), rel=1e-12)
    assert payload["cka_batch_floor"] == pytest.approx(2 / 34, rel=1e-12)


@pytest.mark.parametrize("theta, sigma_s, sigma_r, dim", [(0.4, 1.0, 2.0, 3), (1.1, 1.5, 0.5, 4)])
def test_eq10_bound_uses_frobenius_norms_of_the_stream_covariances(theta, sigma_s, sigma_r, dim):
    """On the whitened backbone Σ_ss = AAᵀ = v_s I_d and Σ_rr = BBᵀ = v_r I_d (v_s = c²σ_s² + s²σ_r²,
    v_r = s²σ_s² + c²σ_r²), so their Frobenius norms are √d v_s and √d v_r. The gradients are rank one,
    ∇_V L_i = Aᵀ G_i with G_i = w (2/n Σ δ f)ᵀ, so ‖∇_V L_i‖ = √v_s ‖G_i‖ and ‖∇_V L_j‖ = √v_r ‖G_j‖. Hence the
    bound of Eq (10) is exactly √(d·CKA) ‖∇_V L_i‖ ‖∇_V L_j‖: a consistency check of the bound against the CKA and
    gradient norms the same call reports (each checked on its own by the tests above). Spectral norms would drop the
    √d."""
    out = stream_gradients(theta, sigma_s, sigma_r, dim, jax.random.key(5), 400)
    expected = math.sqrt(dim * float(out.linear_cka)) * float(out.task_gradient_norm) * float(
        out.nuisance_gradient_norm)
    assert float(out.bound) == pytest.approx(expected, rel=1e-9)


def test_stream_gradients_against_the_module_docstrings_setting_in_numpy():
    """The gradients and their inner product recomputed in float64 numpy from the module docstring, on the same draws
    (the five sub-keys of stream_gradients): f = x_c Σ̂^{-1/2} (scipy's symmetric square root), streams A f and B f,
    task labels y = z_s β + σ_ε ε, nuisance target z_{r,1} = σ_r f_{d+1}, and
    ∇_V L = (2/n) Σ_k δ_k (Mᵀv) f_kᵀ at V = I for each loss. The other tests check Eq (10)'s inequality and the
    chain rule, which hold for any labels, targets and white sample; this pins the setting (σ_r = 2 and σ_ε = 0.1,
    so a target without σ_r or labels without σ_ε differ). The shapes are those of the Frobenius-norm test above, so
    the op-by-op compilations are shared."""
    import scipy.linalg

    theta, sigma_s, sigma_r, dim, n, noise = 0.7, 1.5, 2.0, 3, 400, 0.1
    key = jax.random.key(3)
    out = stream_gradients(theta, sigma_s, sigma_r, dim, key, n, noise_std=noise)
    keys = jax.random.split(key, 5)
    z = np.asarray(jax.random.normal(keys[0], (n, 2 * dim)), np.float64)
    beta, w, u = (np.asarray(jax.random.normal(k, (dim,)), np.float64) / math.sqrt(dim)
                  for k in (keys[1], keys[3], keys[4]))
    label_noise = np.asarray(jax.random.normal(keys[2], (n,)), np.float64)
    x = z - z.mean(0)
    f = x @ np.linalg.inv(scipy.linalg.sqrtm(x.T @ x / n).real)
    c, s, eye = math.cos(theta), math.sin(theta), np.eye(dim)
    a = np.hstack([c * sigma_s * eye, -s * sigma_r * eye])
    b = np.hstack([s * sigma_s * eye, c * sigma_r * eye])
    y = sigma_s * f[:, :dim] @ beta + noise * label_noise
    grad_i = 2 / n * np.outer(a.T @ w, (f @ a.T @ w - y) @ f)
    grad_j = 2 / n * np.outer(b.T @ u, (f @ b.T @ u - sigma_r * f[:, dim]) @ f)
    inner = np.sum(grad_i * grad_j)
    np.testing.assert_allclose(out.inner_product, inner, rtol=1e-9)
    np.testing.assert_allclose(out.task_gradient_norm, np.linalg.norm(grad_i), rtol=1e-9)
    np.testing.assert_allclose(out.nuisance_gradient_norm, np.linalg.norm(grad_j), rtol=1e-9)
    np.testing.assert_allclose(out.cosine, inner / (np.linalg.norm(grad_i) * np.linalg.norm(grad_j)), rtol=1e-9)


def test_the_scripts_verdicts_see_a_negative_inner_product_over_the_bound_and_a_broken_chain_rule(tmp_path):
    """stream_gradients wrapped so that at θ = 0.75 the inner product is −10 times its value (it was 0.3 to 0.5 of
    the bound: now far beyond it, and negative) and at θ = 1.5 the chain-rule error is 1. Eq (10) bounds |<g_i, g_j>|,
    so it fails at that one point, which eq10_violations lists; the bound no longer reads the gradients; and
    largest_inner_over_bound is read from |inner|. cka_linear is the gradients' own full-sample CKA (of the whitened
    streams: the closed form to rounding), not the batch estimate."""

    import theory.orthogonality

    module = load_script("experiments/grad_orthogonality.py")
    real = theory.orthogonality.stream_gradients

    def tampered(theta, *args):
        result = real(theta, *args)
        middle = (theta > 0.5) & (theta < 1.0)
        return result._replace(inner_product=jnp.where(middle, -10.0, 1.0) * result.inner_product,
                               chain_rule_error=jnp.where(theta > 1.0, 1.0, result.chain_rule_error))

    config = module.OrthogonalityConfig(num_thetas=3, theta_max=1.5, sigma_pairs="1:2", dim=2, samples=64, batch=8,
                                        num_batches=4, out=str(tmp_path), quiet=True)
    with mock.patch("theory.orthogonality.stream_gradients", side_effect=tampered):
        payload = module.run(config)
    points, verdict = payload["points"], payload["verdict"]
    assert points[1]["gradient_inner_product"] < -points[1]["eq10_bound"] < 0
    assert [p["eq10_holds"] for p in points] == [True, False, True]
    assert verdict["eq10_holds_everywhere"] is False and verdict["eq10_violations"] == [points[1]]
    assert verdict["bound_reads_the_gradients"] is False
    assert verdict["largest_inner_over_bound"] == pytest.approx(-points[1]["gradient_inner_product"] /
                                                                points[1]["eq10_bound"], rel=1e-12)
    for p in points:
        assert p["cka_linear"] == pytest.approx(p["cka_closed_form"], abs=1e-9)

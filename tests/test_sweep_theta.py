"""The θ sweep end to end on a tiny grid, its JSON schema, and one-line errors for bad flags."""

import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from scripts import assert_one_line_error, drawn_calls, load_script, run_in_process, run_script
from theory.simulate import Evaluation

SCRIPT = "experiments/sweep_theta.py"
TINY = ["--num-thetas", "3", "--seeds", "2", "--samples", "64", "--steps", "30", "--dim", "2"]


def test_tiny_sweep_writes_json_and_png(tmp_path):
    out = tmp_path / "sweep"
    result = run_script(SCRIPT, *TINY, "--methods", "ew,mgda", "--betas", "1,-2", "--out", str(out),
                        "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # --quiet
    payload = json.loads((out / "sweep_theta.json").read_text())
    assert (out / "sweep_theta.png").stat().st_size > 10_000
    assert set(payload) >= {"config", "theta", "closed_form_gap", "floor", "methods", "verdict"}
    assert payload["config"]["betas"] == [1.0, -2.0] and payload["config"]["methods"] == "ew,mgda"
    assert len(payload["theta"]) == 3 and payload["theta"][0] == 0.0
    assert set(payload["methods"]) == {"ew", "mgda"}
    for name, result in payload["methods"].items():
        assert len(result["gap_mean"]) == len(result["gap_sem"]) == 3
        assert result["gap_mean"][0] == 0.0  # theta = 0: no gap, exactly
        assert set(payload["verdict"][name]) >= {"above_floor", "matches_closed_form", "converged"}
        verdict = payload["verdict"][name]  # judged where training came within 1 SE of the minimiser (30 steps)
        assert verdict["judged"] is (verdict["worst_optimisation_error_over_se"] <= 1.0)
        assert (verdict["above_floor"] is None) is (not verdict["judged"])
    # The floor is below the closed-form gap, and both are zero at theta = 0.
    assert all(f <= g + 1e-12 for f, g in zip(payload["floor"], payload["closed_form_gap"]))
    assert payload["floor"][0] == payload["closed_form_gap"][0] == 0.0
    assert payload["small_theta_limit_of_ratio"] == pytest.approx((1 + 4) / 2)


def test_a_method_whose_training_diverged_is_not_judged(tmp_path):
    """At a learning rate of 10^4 EW's gaps reach 10^14, and their standard error with them: any test within 3 of
    them would pass. Its verdicts are None (n/a), and the summary says why; a converged method beside it is judged."""
    result = run_script(SCRIPT, *TINY, "--methods", "ew", "--learning-rate", "1e4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    verdict = json.loads((tmp_path / "sweep_theta.json").read_text())["verdict"]["ew"]
    assert verdict["judged"] is False and verdict["converged"] is False
    assert verdict["above_floor"] is None and verdict["matches_closed_form"] is None
    assert verdict["worst_optimisation_error_over_se"] > 1
    row = next(line for line in result.stdout.splitlines() if line.startswith("ew "))
    assert row.split()[1:3] == ["n/a", "n/a"]
    assert "n/a: ew ended more than 1 standard error from the least-squares solution" in result.stdout


def test_a_method_whose_gaps_are_not_finite_is_kept_as_nulls(tmp_path):
    """At a learning rate of 10^30 training overflows to NaN. That used to lose the whole sweep (JSON cannot hold
    NaN); now the method's numbers are nulls, it is flagged as diverged and not judged, its diagnostics are null
    rather than the clean 0 the checks compute from NaN, and a warning says so even with --quiet."""
    result = run_script(SCRIPT, *TINY, "--methods", "ew", "--learning-rate", "1e30", "--out", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert ("sweep_theta.py: warning: ew diverged (a gap that is not a finite number at some angle): not judged, and "
            "the values that are not finite are null in the JSON") in result.stderr
    payload = json.loads((tmp_path / "sweep_theta.json").read_text())
    method, verdict = payload["methods"]["ew"], payload["verdict"]["ew"]
    assert method["diverged"] is True and None in method["gap_mean"]
    assert verdict["judged"] is False and verdict["above_floor"] is None and verdict["matches_closed_form"] is None
    assert verdict["max_abs_z_vs_closed_form"] is None and verdict["worst_optimisation_error_over_se"] is None
    assert verdict["floor_violations"] is None
    assert (tmp_path / "sweep_theta.png").stat().st_size > 10_000


def test_progress_and_summary_are_shown_without_quiet(tmp_path):
    result = run_script(SCRIPT, *TINY, "--methods", "pcgrad", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "pcgrad" in result.stdout and "above floor" in result.stdout
    assert "sweep_theta" in result.stderr  # the progress bar


@pytest.mark.parametrize("flags, message", [
    (["--num-thetas", "1"], "--num-thetas must be an integer >= 2"),
    (["--num-thetas", "two"], "an integer is required"),
    (["--theta-max", "2"], "--theta-max must lie in (0, pi/2]"),
    (["--sigma-s", "-1"], "--sigma-s must be a finite number > 0"),
    (["--sigma-r-target", "nan"], "--sigma-r-target must be a finite number > 0"),
    (["--betas", "1,x"], "--betas must be comma-separated numbers"),
    (["--methods", "ew,adam"], "--methods must be 'all' or comma-separated names"),
    (["--seeds", "1"], "--seeds must be an integer >= 2"),
    (["--noise-std", "-0.1"], "--noise-std must be a finite number >= 0"),
    (["--dim", "0"], "--dim must be an integer >= 1"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--dim", "8", "--samples", "4"], "--samples must be at least --dim (8) for least squares; got 4"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_give_one_line_and_a_nonzero_exit(flags, message, tmp_path):
    assert_one_line_error(run_in_process(SCRIPT, *flags, "--out", str(tmp_path)), message)
    assert not (tmp_path / "sweep_theta.json").exists()


def test_equal_residual_variances_are_refused_before_any_work(tmp_path):
    """No residual-variance shift: source and target are one distribution, every gap and the floor are 0 and the
    gap / (sin^2 theta |dsigma^2|) panel would be 0/0; refused up front instead of a vacuous sweep and NaN warnings."""
    result = run_script(SCRIPT, *TINY, "--sigma-r-source", "1", "--sigma-r-target", "1.0",
                        "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sigma-r-target must differ from --sigma-r-source" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", ["file", "file.json"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_work(existing, tmp_path):
    """The sweep writes a folder: an existing file is refused at once, whatever its suffix, as is a folder that
    cannot be created (/proc refuses new entries even to root)."""
    path = tmp_path / existing
    path.write_text("keep")
    outs = [str(path)] + (["/proc/x", "/proc/x.json"] if Path("/proc/self").is_dir() else [])
    for out in outs:
        result = run_in_process(SCRIPT, *TINY, "--methods", "ew", "--out", out)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("sweep_theta.py: error: --out") and out in lines[0], result.stderr
        assert "Errno" not in lines[0]
    assert path.read_text() == "keep"


def test_the_grid_and_the_defaults_are_the_readmes():
    """The θ grid is num_thetas angles from 0 to theta_max, both ends included (the README's "16 angles in [0,
    1.4]"), θ_max = π/2 is allowed (the help says (0, π/2]), and the defaults are the README's default run."""
    module = load_script(SCRIPT)
    config = module.SweepConfig(num_thetas=5, theta_max=1.2, methods="ew")
    np.testing.assert_allclose(module.thetas_of(config), [0.0, 0.3, 0.6, 0.9, 1.2], atol=1e-15)
    assert module.thetas_of(module.SweepConfig(theta_max=math.pi / 2, methods="ew"))[-1] == math.pi / 2
    default = module.SweepConfig()
    assert (default.num_thetas, default.theta_max, default.dim, default.seeds, default.samples, default.steps) == (
        16, 1.4, 4, 8, 2048, 800)
    assert (default.sigma_s, default.sigma_r_source, default.sigma_r_target, default.noise_std) == (1.0, 0.5, 1.5, 0.1)
    assert default.betas == (1.0, 2.0) and default.methods.count(",") == 21  # all 22 methods


def _isotropic_gap(theta, b, sigma_s, sigma_rs, sigma_rt):
    """theory.md Eq (25) with ‖β‖ = |b| (β = b·1/√d): the gap of the source-optimal head."""
    c, s = np.cos(theta), np.sin(theta)
    return b**2 * c**2 * s**2 * sigma_s**4 / (c**2 * sigma_s**2 + s**2 * sigma_rs**2) ** 2 * (sigma_rt**2 - sigma_rs**2)


def _fabricated_sweep(module, config, gap, least_squares_gap=None):
    """``run(config)`` with training replaced by an Evaluation whose gap is ``gap`` [T, S, K] (the least-squares gap
    ``least_squares_gap``, by default the same, so that every method counts as converged), source risk 1 and target
    risk 1 + gap."""
    least_squares_gap = gap if least_squares_gap is None else least_squares_gap

    def fake_sweep(scm, balancer, thetas, seeds, train_config):
        assert np.asarray(thetas).shape[0] == gap.shape[0] and len(seeds) == gap.shape[1]
        weights = np.full(gap.shape, 1.0 / gap.shape[2])
        return Evaluation(source_risk=np.ones_like(gap), target_risk=1.0 + gap, gap=gap,
                          least_squares_gap=least_squares_gap, final_losses=np.ones_like(gap), mean_weights=weights)

    with mock.patch("theory.simulate.sweep", side_effect=fake_sweep):
        return module.run(config)


@pytest.mark.parametrize("shrinking", [False, True])
def test_the_sweeps_statistics_and_verdicts_from_fabricated_gaps(shrinking):
    """Gaps fabricated as theory.md's closed form (Eq (25)) plus seed noise, for 2 tasks, 3 seeds and d = 3 (K, S and
    d all different, so no axis mix-up can hide): the mean and SEM are over seeds of the task-averaged gap (numpy
    here), the θ → 0 limit of gap/(sin²θ|Δσ²|) is mean_t ‖β_t‖² = 2.5, the risks are recorded under their own names,
    and the verdicts hold, also when the nuisance shrinks (a negative gap: the floor bounds its magnitude)."""
    module = load_script(SCRIPT)
    sigma_rs, sigma_rt = (1.5, 0.5) if shrinking else (0.5, 1.5)
    config = module.SweepConfig(num_thetas=4, theta_max=1.2, dim=3, seeds=3, methods="ew", sigma_r_source=sigma_rs,
                                sigma_r_target=sigma_rt, quiet=True)
    thetas = np.linspace(0.0, 1.2, 4)
    closed = np.stack([_isotropic_gap(thetas, b, 1.0, sigma_rs, sigma_rt) for b in (1.0, 2.0)], -1)  # [T, K]
    noise = 0.02 * np.random.default_rng(0).standard_normal((4, 3, 2)) * (thetas[:, None, None] > 0)
    gap = closed[:, None, :] + noise - noise.mean(axis=1, keepdims=True)  # [T, S, K]: mean over seeds exact
    payload = _fabricated_sweep(module, config, gap)
    per_seed = gap.mean(axis=-1)  # uniform task weights: [T, S]
    np.testing.assert_allclose(payload["closed_form_gap"], closed.mean(-1), rtol=1e-9, atol=1e-12)
    result = payload["methods"]["ew"]
    np.testing.assert_allclose(result["gap_mean"], per_seed.mean(-1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(result["gap_sem"], per_seed.std(-1, ddof=1) / np.sqrt(3), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(result["source_risk_mean"], np.ones(4))
    np.testing.assert_allclose(result["target_risk_mean"], 1.0 + gap.mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(result["mean_weights"], [0.5, 0.5], rtol=1e-12)  # per task, over angles and seeds
    assert payload["small_theta_limit_of_ratio"] == pytest.approx((1.0**2 + 2.0**2) / 2)
    assert payload["residual_shift_sign"] == (-1 if shrinking else 1)
    verdict = payload["verdict"]["ew"]
    assert verdict["judged"] is True and verdict["above_floor"] is True and verdict["matches_closed_form"] is True
    assert verdict["floor_violations"] == []


# Three angles (0, 0.5, 1), three seeds, the two default tasks, d = 3: the fabricated sweeps' grid.
THREE_ANGLES = dict(num_thetas=3, theta_max=1.0, dim=3, seeds=3, methods="ew", quiet=True)


def _three_angle_gaps(spread: float, seed: int):
    """THREE_ANGLES' closed-form gap per task, [T, K] (σ_r 0.5 → 1.5, b = 1 and 2), and seed noise of standard
    deviation ``spread``, [T, S, K], none at θ = 0 (where every gap is exactly 0)."""
    thetas = np.linspace(0.0, 1.0, 3)
    closed = np.stack([_isotropic_gap(thetas, b, 1.0, 0.5, 1.5) for b in (1.0, 2.0)], -1)
    noise = spread * np.random.default_rng(seed).standard_normal((3, 3, 2)) * (thetas[:, None, None] > 0)
    return closed, noise


@pytest.mark.parametrize("error_over_se, judged", [(0.9, True), (1.1, False)])
def test_a_method_is_judged_only_within_one_standard_error_of_the_least_squares_gap(error_over_se, judged):
    """JUDGED_WITHIN_SE: the verdicts are given only where the trained gap ends within 1 standard error of the
    least-squares gap at every angle. Fabricated: the least-squares gap is the trained one shifted, at the middle
    angle only, by 0.9 or 1.1 of that angle's SEM (so the worst error over SE is 0.9 or 1.1; neither converges, which
    needs 0.1)."""
    module = load_script(SCRIPT)
    config = module.SweepConfig(**THREE_ANGLES)
    closed, noise = _three_angle_gaps(spread=0.02, seed=2)
    gap = closed[:, None, :] + noise
    sem = gap.mean(-1).std(-1, ddof=1) / np.sqrt(3)  # the SEM of the task-averaged gap over seeds, per angle
    least_squares_gap = gap.copy()
    least_squares_gap[1] += error_over_se * sem[1]
    verdict = _fabricated_sweep(module, config, gap, least_squares_gap)["verdict"]["ew"]
    assert verdict["worst_optimisation_error_over_se"] == pytest.approx(error_over_se, rel=1e-9)
    assert verdict["converged"] is False and verdict["judged"] is judged
    assert (verdict["above_floor"] is None) is (verdict["matches_closed_form"] is None) is (not judged)


def test_above_floor_and_matches_closed_form_are_separate_verdicts():
    """A gap 1.5 times the closed form (and so above the floor, which is at most the closed form) with a small
    spread: above the floor, yet not the closed form; each verdict must say its own."""
    module = load_script(SCRIPT)
    config = module.SweepConfig(**THREE_ANGLES)
    closed, noise = _three_angle_gaps(spread=1e-3, seed=1)
    verdict = _fabricated_sweep(module, config, 1.5 * closed[:, None, :] + noise)["verdict"]["ew"]
    assert verdict["judged"] is True
    assert verdict["above_floor"] is True and verdict["matches_closed_form"] is False


def test_the_left_panel_plots_each_methods_gap_with_its_standard_error(tmp_path):
    """The figure's left panel draws gap_mean with gap_sem as error bars (checked on the call matplotlib receives)."""
    module = load_script(SCRIPT)
    theta = [0.0, 0.5, 1.0]
    payload = {"theta": theta, "residual_shift_sign": 1, "residual_shift": 2.0, "closed_form_gap": [0.0, 0.4, 1.0],
               "floor": [0.0, 0.2, 0.5], "small_theta_limit_of_ratio": 2.5,
               "methods": {"ew": {"gap_mean": [0.0, 0.41, 1.02], "gap_sem": [0.0, 0.01, 0.03]}},
               "config": {"dim": 2, "sigma_s": 1.0, "sigma_r_source": 0.5, "sigma_r_target": 1.5, "betas": [1, 2],
                          "seeds": 2, "samples": 64, "steps": 30}}
    with drawn_calls("errorbar") as drawn:
        module.plot(payload, tmp_path / "sweep.png")
    left = drawn["errorbar"][0]  # the left panel's, drawn first: gap against θ
    np.testing.assert_allclose(left["y"], [0.0, 0.41, 1.02])
    np.testing.assert_allclose(left["yerr"], [0.0, 0.01, 0.03])
    np.testing.assert_allclose(left["x"], theta, atol=0.1)  # offset within a cell only


def test_num_se_sets_the_closed_form_verdicts_slack_and_the_printed_table_is_the_jsons():
    """A gap 1.5 times the closed form fails the agreement check at --num-se 3 (above) but passes at --num-se 10^6:
    the flag reaches the check. main's table prints each verdict under its own column (above floor, then matches
    cf), as the JSON holds them."""
    module = load_script(SCRIPT)
    closed, noise = _three_angle_gaps(spread=1e-3, seed=1)
    config = module.SweepConfig(**THREE_ANGLES, num_se=1e6)
    payload = _fabricated_sweep(module, config, 1.5 * closed[:, None, :] + noise)
    assert payload["verdict"]["ew"]["matches_closed_form"] is True
    payload["verdict"]["ew"].update(above_floor=True, matches_closed_form=False)
    with mock.patch.object(module, "run", return_value=payload), mock.patch.object(module, "plot"), \
            mock.patch.object(module, "write_json"), mock.patch("builtins.print") as printed:
        assert module.main(["--out", "unused"]) == 0
    header, row = (call.args[0] for call in printed.call_args_list[:2])
    assert header.split()[1:5] == ["above", "floor", "matches", "cf"]
    assert row.split()[:3] == ["ew", "True", "False"]


def test_the_right_panel_divides_by_the_signed_shift_and_points_of_several_methods_are_spread_evenly(tmp_path):
    """A shrinking residual (sign -1, the JSON's residual_shift is |Δσ²| = 2): the right panel plots gap / (sin²θ·Δσ²)
    at θ > 0, positive like its θ → 0 limit, with error bars sem / (sin²θ·|Δσ²|); the floor lines carry the gap's sign
    (left: −floor; right: the same positive ratio). Three methods are drawn at θ − c, θ, θ + c with c inside half a
    cell, so overlapping points separate without leaving their angle."""
    module = load_script(SCRIPT)
    theta = np.array([0.0, 0.5, 1.0])
    means = {"ew": [0.0, -0.41, -1.02], "mgda": [0.0, -0.43, -0.98], "pcgrad": [0.0, -0.40, -1.05]}
    sems = {"ew": [0.0, 0.01, 0.03], "mgda": [0.0, 0.02, 0.01], "pcgrad": [0.0, 0.015, 0.025]}
    payload = {"theta": theta.tolist(), "residual_shift_sign": -1, "residual_shift": 2.0,
               "closed_form_gap": [0.0, -0.4, -1.0], "floor": [0.0, 0.2, 0.5], "small_theta_limit_of_ratio": 2.5,
               "methods": {name: {"gap_mean": means[name], "gap_sem": sems[name]} for name in means},
               "config": {"dim": 2, "sigma_s": 1.0, "sigma_r_source": 1.5, "sigma_r_target": 0.5, "betas": [1, 2],
                          "seeds": 2, "samples": 64, "steps": 30}}
    with drawn_calls("errorbar", "plot") as drawn:
        module.plot(payload, tmp_path / "sweep.png")
    bars = [tuple(np.asarray(call[name], float) for name in ("x", "y", "yerr")) for call in drawn["errorbar"]]
    lines = {}
    for call in drawn["plot"]:  # plot(x, y, fmt, label=...): each label's y values, in the order drawn
        lines.setdefault(call["kwargs"].get("label"), []).append(np.asarray(call["args"][1], float))
    scale = np.sin(theta[1:]) ** 2 * 2.0
    offsets = []
    for i, name in enumerate(means):  # each method: the left panel's call, then the right panel's
        (left_x, left_y, _), (right_x, right_y, right_err) = bars[2 * i], bars[2 * i + 1]
        offset = left_x - theta
        assert np.ptp(offset) < 1e-12  # one offset for all of a method's points
        offsets.append(offset[0])
        np.testing.assert_allclose(left_y, means[name], rtol=1e-12)
        np.testing.assert_allclose(right_x, theta[1:] + offset[0], rtol=1e-12)
        np.testing.assert_allclose(right_y, -np.asarray(means[name][1:]) / scale, rtol=1e-12)
        np.testing.assert_allclose(right_err, np.asarray(sems[name][1:]) / scale, rtol=1e-12)
    assert offsets[1] == pytest.approx(0.0, abs=1e-12) and offsets[0] == pytest.approx(-offsets[2], rel=1e-12)
    assert 0 < offsets[2] < 0.25  # half a cell (0.5) split between the methods
    left_floor, right_floor = lines["Theorem 2.3 floor"]
    np.testing.assert_allclose(left_floor, [0.0, -0.2, -0.5])
    np.testing.assert_allclose(right_floor, np.array([0.2, 0.5]) / scale, rtol=1e-12)
    np.testing.assert_allclose(lines["closed form (source-optimal)"][1], np.array([0.4, 1.0]) / scale, rtol=1e-12)


def test_num_se_sets_the_floor_verdicts_slack_and_min_margin_is_in_standard_errors():
    """Gaps of 0 ± 10^-3 at θ > 0 lie far below the floor (0.3 and 0.8 of the task-averaged gap's scale): at the
    default 3 SE both angles violate it, and min_margin_se is the smaller (mean − floor)/SEM; at --num-se 10^6 the
    slack covers the floor, so the same gaps are above it: the flag reaches the floor check too."""
    module = load_script(SCRIPT)
    _, noise = _three_angle_gaps(spread=1e-3, seed=3)
    per_seed = noise.mean(-1)  # [T, S]
    mean, sem = per_seed.mean(-1), per_seed.std(-1, ddof=1) / np.sqrt(3)
    strict = _fabricated_sweep(module, module.SweepConfig(**THREE_ANGLES), noise)
    verdict = strict["verdict"]["ew"]
    assert verdict["judged"] is True and verdict["above_floor"] is False and verdict["floor_violations"] == [1, 2]
    floor = np.asarray(strict["floor"])
    assert floor[1] > 100 * sem[1]  # far below the floor: a violation at any ordinary slack
    assert verdict["min_margin_se"] == pytest.approx(np.min((mean[1:] - floor[1:]) / sem[1:]), rel=1e-9)
    loose = _fabricated_sweep(module, module.SweepConfig(**THREE_ANGLES, num_se=1e6), noise)["verdict"]["ew"]
    assert loose["above_floor"] is True and loose["floor_violations"] == []


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_gap_that_is_not_finite_at_one_angle_nulls_every_diagnostic_of_that_method(value):
    """Fabricated: one seed's gap is NaN, or an overflow's infinity, at the middle angle only. The method is diverged
    and not judged, that angle's mean and SEM are null while the others stay numbers, and all four diagnostics are
    null (the checks, which skip NaN SEMs, would report a clean margin, z and optimisation error from the other
    angles)."""
    module = load_script(SCRIPT)
    closed, noise = _three_angle_gaps(spread=0.02, seed=4)
    gap = closed[:, None, :] + noise
    gap[1, 0, 0] = value
    payload = _fabricated_sweep(module, module.SweepConfig(**THREE_ANGLES), gap)
    method, verdict = payload["methods"]["ew"], payload["verdict"]["ew"]
    assert method["diverged"] is True
    assert method["gap_mean"][1] is None and method["gap_sem"][1] is None
    assert all(isinstance(method[key][i], float) for key in ("gap_mean", "gap_sem") for i in (0, 2))
    assert verdict["judged"] is False and verdict["above_floor"] is None and verdict["matches_closed_form"] is None
    assert [verdict[key] for key in ("floor_violations", "min_margin_se", "max_abs_z_vs_closed_form",
                                     "worst_optimisation_error_over_se")] == [None] * 4


def test_each_method_is_swept_on_seeds_0_to_s_with_the_configured_training_and_judged_by_its_own_se():
    """What run() hands theory.simulate.sweep: the grid, seeds 0..S−1 (the README's numbers are those seeds') and a
    TrainConfig of --samples, --steps and --learning-rate. The optimisation error is over the trained gap's SEM: a
    least-squares gap with a wider spread than the trained one (here 5 times, at every angle) must not widen it."""
    module = load_script(SCRIPT)
    config = module.SweepConfig(**{**THREE_ANGLES, "methods": "ew,mgda"}, samples=96, steps=7, learning_rate=0.03)
    closed, noise = _three_angle_gaps(spread=0.02, seed=5)
    gap = closed[:, None, :] + noise
    least_squares_gap = closed[:, None, :] + 5 * noise[:, ::-1]
    seen = []

    def fake_sweep(scm, balancer, thetas, seeds, train_config):
        seen.append((balancer.name, np.asarray(thetas), list(seeds), train_config))
        return Evaluation(source_risk=np.ones_like(gap), target_risk=1.0 + gap, gap=gap,
                          least_squares_gap=least_squares_gap, final_losses=np.ones_like(gap),
                          mean_weights=np.full(gap.shape, 0.5))

    with mock.patch("theory.simulate.sweep", side_effect=fake_sweep):
        payload = module.run(config)
    assert [name for name, *_ in seen] == ["ew", "mgda"]
    for _, thetas, seeds, train_config in seen:
        np.testing.assert_allclose(thetas, [0.0, 0.5, 1.0], atol=1e-15)
        assert seeds == [0, 1, 2]
        assert (train_config.num_samples, train_config.steps, train_config.learning_rate) == (96, 7, 0.03)
    per_seed, least_squares = gap.mean(-1), least_squares_gap.mean(-1)
    error = np.abs(per_seed - least_squares).mean(-1)
    sem = per_seed.std(-1, ddof=1) / np.sqrt(3)
    verdict = payload["verdict"]["ew"]
    assert verdict["worst_optimisation_error_over_se"] == pytest.approx(np.max(error[1:] / sem[1:]), rel=1e-9)
    np.testing.assert_allclose(payload["methods"]["ew"]["optimisation_error"], error, rtol=1e-9, atol=1e-15)

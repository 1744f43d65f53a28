"""The θ sweep end to end on a tiny grid, its JSON schema, and one-line errors for bad flags."""

import json
from pathlib import Path

import pytest

from scripts import assert_one_line_error, run_in_process, run_script

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

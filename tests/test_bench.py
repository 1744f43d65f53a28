"""The benchmarks' arithmetic, on fabricated timings, clocks, cost analyses and checkpointers: medians after an
untimed warm-up, rates of whole batches, ratios the right way round, FLOPs counted as documented. Nothing is timed
for real, so no assertion depends on this machine's speed (bench_train_step's, bench_flops' and
bench_celeba_scaling's own files hold theirs)."""

import functools
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import deep.atrous
import deep.checkpoint
import deep.data
from scripts import load_script, median_seconds_recording_warmups


class FakeClock:
    """A ``time.perf_counter`` that moves only when the code under test 'runs' something: reading it costs nothing,
    so the measured durations are exactly the ones scripted."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_median_seconds_is_the_median_of_the_timed_calls_after_an_untimed_warm_up(monkeypatch):
    """median_seconds on a scripted clock: the warm-up call (100 s, a compile) is left out and the result is the
    median of the timed calls, not their mean (one slow call, a GC pause, must not move it)."""
    median_seconds = load_script("experiments/_common.py").median_seconds

    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    durations = iter([0.5, 1.0, 2.0, 9.0])
    # Median 2 of the timed calls; their mean would be 4, and timing the warm-up too would give 1.
    assert median_seconds(lambda: clock.advance(next(durations)), 3, warmup=True) == 2.0
    assert next(durations, None) is None
    durations = iter([100.0, 1.0, 2.0])
    assert median_seconds(lambda: clock.advance(next(durations)), 3) == 2.0  # no warm-up asked: every call timed


def test_the_pipelines_rate_counts_only_whole_batches_against_the_fastest_step(monkeypatch, tmp_path):
    """bench_data.main with the scenes, pipelines and timing faked: 10 examples at batch 4 deliver 8 images (the
    partial batch is dropped, as in training), so 0.5 s per epoch is 16 images/s and 250 ms per batch; the reference
    is the step JSON's fastest row (10 images/s), and the 5x target needs 50 images/s."""
    bench = load_script("bench/bench_data.py")
    monkeypatch.setattr(deep.data, "nyuv2_arrays", lambda n, h, w, seed: {
        "images": np.zeros((n, h, w, 3), np.float32), "depth": np.ones((n, h, w, 1), np.float32)})
    monkeypatch.setattr(bench, "_pipelines", lambda arrays, batch: [("host", lambda: None)])
    warmups = []
    monkeypatch.setattr(bench, "median_seconds", median_seconds_recording_warmups(0.5, warmups))
    step_json = tmp_path / "step.json"
    step_json.write_text(json.dumps({"batch": 4, "image_size": [64, 80], "environment": {"backend": "cpu"},
                                     "rows": [{"method": "pcgrad", "images_per_second": 4.0},
                                              {"method": "ew", "images_per_second": 10.0},
                                              {"method": "core_expected", "images_per_second": 7.0}]}))
    out = tmp_path / "data.json"
    assert bench.main(["--config", "reduced", "--examples", "10", "--step-json", str(step_json), "--out", str(out),
                       "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["step"]["method"] == "ew" and result["step"]["images_per_second"] == 10.0
    (row,) = result["rows"]
    assert row["images_per_second"] == pytest.approx(16.0) and row["ms_per_batch"] == pytest.approx(250.0)
    assert row["ratio_to_step"] == pytest.approx(1.6) and row["meets_target"] is False
    assert warmups == [True]  # the first epoch (compiling the augmentation) is not timed
    # Like for like only when both the backend and the image size are the step's: the same backend at another size
    # is not comparable.
    assert result["comparable"] is (jax.default_backend() == "cpu")
    step_json.write_text(json.dumps({"batch": 16, "image_size": [288, 384],
                                     "environment": {"backend": jax.default_backend()},
                                     "rows": [{"method": "ew", "images_per_second": 10.0}]}))
    assert bench.main(["--config", "reduced", "--examples", "10", "--step-json", str(step_json), "--out", str(out),
                       "--quiet"]) == 0
    assert json.loads(out.read_text())["comparable"] is False


def test_the_default_step_json_is_the_same_configurations_when_there_is_one(monkeypatch, tmp_path):
    """Without --step-json, bench_data compares against bench_train_step's JSON of its own configuration when it
    exists (like for like), and falls back on the other one only when it does not."""
    bench = load_script("bench/bench_data.py")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    for config, rate in (("reduced", 30.0), ("nyuv2", 3.0)):
        (results / f"bench_train_step_{config}.json").write_text(json.dumps(
            {"rows": [{"method": "ew", "images_per_second": rate}]}))
    for config, rate in (("reduced", 30.0), ("nyuv2", 3.0)):
        path, step = bench._step_reference("", config)
        assert path.name == f"bench_train_step_{config}.json" and step["images_per_second"] == rate
    (results / "bench_train_step_reduced.json").unlink()
    assert bench._step_reference("", "reduced")[0].name == "bench_train_step_nyuv2.json"


def test_the_balancer_benchmark_reports_the_median_call_after_an_untimed_one(monkeypatch):
    """bench_balancers._measure on a fake lowered function and a scripted clock: the first call (compiled, warming
    caches) is not timed and the time is the median of the rest in ms (one slow call must not move it); FLOPs are
    XLA's count of the lowered function."""
    bench = load_script("bench/bench_balancers.py")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock))
    durations = iter([0.0005, 0.001, 0.002, 0.009])  # timing the first call too would give a median of 1 ms

    def compiled(*args):
        clock.advance(next(durations))
        return jnp.zeros(())

    compiled.memory_analysis = lambda: None
    lowered = types.SimpleNamespace(cost_analysis=lambda: {"flops": 123.0}, compile=lambda: compiled)
    result = bench._measure(types.SimpleNamespace(lower=lambda *args: lowered), (), repeats=3)
    assert next(durations, None) is None
    assert result == {"ms": pytest.approx(2.0), "peak_mb": None, "flops": 123.0}


def test_the_growth_order_is_the_slope_of_log_time_on_log_size():
    """bench_measures' growth order on times that grow exactly as n² (1e-5 n² s) is 2, whatever the constant; the
    sizes run by decades up to and including the largest."""
    bench = load_script("bench/bench_measures.py")
    sizes = bench._sizes(100, 10_000)
    assert sizes == [100, 1000, 10_000]
    assert bench._slope(sizes, [1e-5 * n**2 for n in sizes]) == pytest.approx(2.0)
    assert bench._slope(sizes, [7.0 * n for n in sizes]) == pytest.approx(1.0)


def test_the_checkpoint_benchmark_leaves_out_the_set_up_save_and_times_until_durable(monkeypatch, tmp_path):
    """bench_checkpoint._measure with a fake Checkpoints on a scripted clock: the first save (Orbax's set-up, 100 s)
    is not timed; blocking_ms is the median time save() holds the loop, durable_ms the median until wait() returns
    (the save's time included)."""
    bench = load_script("bench/bench_checkpoint.py")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock))
    saves, waits = {1: 100.0, 2: 0.1, 3: 0.3, 4: 0.2}, {1: 50.0, 2: 1.0, 3: 1.0, 4: 1.0}

    class Checkpoints:
        def __init__(self, path, asynchronous):
            self.epoch = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, epoch, tree):
            self.epoch = epoch
            clock.advance(saves[epoch])

        def wait(self):
            clock.advance(waits[self.epoch])

    monkeypatch.setattr(deep.checkpoint, "Checkpoints", Checkpoints)
    row = bench._measure([jnp.zeros(2)], True, repeats=3, folder=str(tmp_path))
    assert row == {"mode": "asynchronous", "blocking_ms": pytest.approx(200.0), "durable_ms": pytest.approx(1200.0)}


def test_the_checkpoint_ratio_is_how_many_times_longer_synchronous_saving_holds_the_loop(monkeypatch, tmp_path):
    """bench_checkpoint.main's ratio is the synchronous blocking time over the asynchronous one (how many times less
    the loop waits), as it prints it."""
    bench = load_script("bench/bench_checkpoint.py")
    monkeypatch.setattr(bench, "_state", lambda mib, leaves: [])
    monkeypatch.setattr(bench, "_measure", lambda state, asynchronous, repeats, folder: {
        "mode": "asynchronous" if asynchronous else "synchronous", "blocking_ms": 50.0 if asynchronous else 400.0,
        "durable_ms": 450.0})
    out = tmp_path / "checkpoint.json"
    assert bench.main(["--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["blocking_ratio_sync_to_async"] == 8.0


def test_an_atrous_row_weighs_its_time_by_the_count_and_counts_forward_and_both_gradients(monkeypatch, tmp_path):
    """bench_atrous.main on one tiny shape (1x4x5 grid, 2 -> 3 channels, rate 2, run 5 times a forward pass) with
    XLA's convolution only and a fixed median time of 2 ms: per_step_ms is 5 x 2 ms; dense_gflops is the forward
    pass's 2·B·H·W·9·Cin·Cout FLOPs plus the same again for each of the two gradients (input and kernel)."""
    bench = load_script("bench/bench_atrous.py")
    monkeypatch.setattr(bench, "SHAPES", (("tiny", 2, 3, 2, 5),))
    monkeypatch.setattr(deep.atrous, "DILATED_CONVS", {"xla": lax.conv_general_dilated})
    monkeypatch.setattr(bench, "median_seconds", lambda function, repeats, warmup=False: 0.002)
    out = tmp_path / "atrous.json"
    assert bench.main(["--batch", "1", "--height", "4", "--width", "5", "--repeats", "1", "--out", str(out),
                       "--quiet"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ms"] == pytest.approx(2.0) and row["per_step_ms"] == pytest.approx(10.0)
    assert row["dense_gflops"] == pytest.approx(3 * 2 * (1 * 4 * 5) * 9 * 2 * 3 / 1e9)
    assert row["relative_deviation_from_xla"] == 0.0


def test_the_balancer_benchmark_memory_is_xlas_buffers_less_the_aliased_ones(monkeypatch):
    """bench_balancers._measure's peak_mb is XLA's arguments + outputs + temporaries less the bytes outputs alias
    onto arguments (counted once), in MiB: 3 + 2 + 4 - 1 = 8 MiB."""
    bench = load_script("bench/bench_balancers.py")
    compiled = lambda *args: jnp.zeros(())  # noqa: E731
    compiled.memory_analysis = lambda: types.SimpleNamespace(
        argument_size_in_bytes=3 * 2**20, output_size_in_bytes=2 * 2**20, temp_size_in_bytes=4 * 2**20,
        alias_size_in_bytes=1 * 2**20)
    lowered = types.SimpleNamespace(cost_analysis=lambda: None, compile=lambda: compiled)
    result = bench._measure(types.SimpleNamespace(lower=lambda *args: lowered), (), repeats=1)
    assert result["peak_mb"] == pytest.approx(8.0) and result["flops"] is None


def test_the_balancer_benchmark_times_every_row_with_repeats_and_gives_ratios_to_ews_backward(monkeypatch, tmp_path):
    """bench_balancers.main with _measure faked (nothing compiled or run): --repeats reaches every measurement, the
    reference rows' and the methods' too, and each row's ratio is its time over EW's backward pass at the same K, P."""
    bench = load_script("bench/bench_balancers.py")
    repeats = []

    def measure(function, args, repeats_):
        repeats.append(repeats_)
        return {"ms": 2.0 if len(repeats) == 1 else 5.0, "peak_mb": None, "flops": None}  # EW's backward first

    monkeypatch.setattr(bench, "_measure", measure)
    out = tmp_path / "balancers.json"
    assert bench.main(["--tasks", "2", "--params", "100", "--methods", "ew,pcgrad", "--repeats", "7", "--out",
                       str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(repeats) == len(rows) > 3 and set(repeats) == {7}
    assert rows[0]["method"] == "ew_backward" and rows[0]["ratio_to_ew"] == 1.0
    assert all(row["ratio_to_ew"] == 2.5 for row in rows[1:])


def test_the_checkpoint_benchmark_saves_under_dir_a_state_of_exactly_mib(monkeypatch, tmp_path):
    """bench_checkpoint: --dir reaches each measurement (both modes), and _state splits exactly --mib MiB of float32
    into --leaves arrays (the last one takes the remainder: 1 MiB = 262144 floats over 3 leaves)."""
    bench = load_script("bench/bench_checkpoint.py")
    state = bench._state(1, 3)
    assert len(state) == 3 and all(leaf.dtype == jnp.float32 for leaf in state)
    assert [leaf.size for leaf in state] == [87381, 87381, 87382] and sum(leaf.nbytes for leaf in state) == 2**20
    folders = []
    monkeypatch.setattr(bench, "_state", lambda mib, leaves: [])
    monkeypatch.setattr(bench, "_measure", lambda state, asynchronous, repeats, folder: folders.append(folder) or {
        "mode": "asynchronous" if asynchronous else "synchronous", "blocking_ms": 1.0, "durable_ms": 1.0})
    assert bench.main(["--dir", str(tmp_path), "--out", str(tmp_path / "checkpoint.json"), "--quiet"]) == 0
    assert folders == [str(tmp_path)] * 2


def test_the_measures_benchmark_sizes_follow_their_flags_and_leave_out_the_compiling_call(monkeypatch, tmp_path):
    """bench_measures.main with median_seconds faked (nothing timed): each estimator's sizes run up to and including
    its own flag (1-D to --max-1d, exact OT to --max-emd, sliced W1 and the CKAs to --max-dd), and every timing asks
    for an untimed warm-up call (the first call compiles)."""
    bench = load_script("bench/bench_measures.py")
    warmups = []
    monkeypatch.setattr(bench, "median_seconds", median_seconds_recording_warmups(1e-3, warmups))
    out = tmp_path / "measures.json"
    assert bench.main(["--max-1d", "10000", "--max-emd", "300", "--max-dd", "1000", "--dim", "2", "--out", str(out),
                       "--quiet"]) == 0
    sizes = {row["estimator"].split(" (")[0]: row["sizes"] for row in json.loads(out.read_text())["rows"]}
    assert sizes == {"w1_1d": [1000, 10_000], "w1 exact OT": [100, 300], "sliced w1": [100, 1000],
                     "linear CKA, feature form": [100, 1000], "linear CKA, Gram form": [100, 1000],
                     "debiased CKA": [100, 1000]}
    assert len(warmups) == 12 and all(warmups)


def test_the_sweep_benchmark_times_each_path_with_its_repeats_and_divides_by_the_vmapped_time(monkeypatch, tmp_path):
    """bench_sweep.main on the default sweep's shape shrunk (2 angles x 3 seeds, 2 steps on 8 samples: each path
    compiles and runs once for real) with median_seconds scripted: vmapped 0.5 s and loop 2 s timed with --repeats,
    stepwise 40 s timed once; the JSON's ratios are loop/vmapped = 4 and stepwise/vmapped = 80, and its grid is the
    sweep's."""
    bench = load_script("bench/bench_sweep.py")
    import sweep_theta  # the benchmark put experiments/ on the import path; main reads the default sweep from it

    small = functools.partial(sweep_theta.SweepConfig, num_thetas=2, seeds=3, steps=2, samples=8)
    monkeypatch.setattr(sweep_theta, "SweepConfig", small)
    scripted, timed = iter([0.5, 2.0, 40.0]), []

    def median_seconds(function, repeats):
        timed.append(repeats)
        return next(scripted)

    monkeypatch.setattr(bench, "median_seconds", median_seconds)
    out = tmp_path / "sweep.json"
    assert bench.main(["--methods", "ew", "--repeats", "5", "--out", str(out), "--quiet"]) == 0
    assert timed == [5, 5, 1]
    payload = json.loads(out.read_text())
    row, = payload["results"]
    assert (row["vmapped_s"], row["loop_s"], row["stepwise_s"]) == (0.5, 2.0, 40.0)
    assert row["loop_over_vmapped"] == pytest.approx(4.0) and row["stepwise_over_vmapped"] == pytest.approx(80.0)
    assert payload["grid"] == {"thetas": 2, "seeds": 3, "configurations": 6, "steps": 2, "samples": 8, "dim": 4,
                               "tasks": 2}
    assert payload["repeats"] == 5


def test_each_balancer_paths_step_is_the_methods_direction_for_the_layers_weight():
    """bench_balancers' timed functions on a small problem (K = 3, P = 200) against the same quantities computed
    here: EW's backward pass is the sum of the per-task gradients, the Gram floor is J J^T, and every path of a
    method (EW's Gram path; PCGrad's Gram and Jacobian paths; GradDrop's through the representation) returns the
    method's own step on J, shaped like W."""
    bench = load_script("bench/bench_balancers.py")
    from theory.balancing import make

    weight, inputs, heads, targets = bench._problem(3, 200)
    task_losses = lambda w: jnp.mean((inputs @ w.T @ heads.T - targets) ** 2, axis=0)  # noqa: E731
    losses, jacobian = task_losses(weight), jax.jacrev(task_losses)(weight).reshape(3, -1)
    reference = bench._reference_functions(3)
    np.testing.assert_allclose(reference["ew_backward"](weight, inputs, heads, targets),
                               jacobian.sum(0).reshape(weight.shape), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(reference["per_task_gradients"](weight, inputs, heads, targets).reshape(3, -1),
                               jacobian, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(reference["gram_matrix"](weight, inputs, heads, targets), jacobian @ jacobian.T,
                               rtol=1e-6)
    key = jax.random.key(1)
    for name, paths in (("ew", {"gram"}), ("pcgrad", {"gram", "jacobian"})):
        balancer = make(name)
        state = balancer.init(3, num_params=200)
        expected = balancer.step(jacobian, losses, state, key)[0].reshape(weight.shape)
        functions = bench._step_functions(balancer, 3)
        assert set(functions) == paths, name
        for path, function in functions.items():
            np.testing.assert_allclose(function(weight, inputs, heads, targets, state, key)[0], expected, rtol=1e-6,
                                       atol=1e-12, err_msg=f"{name} {path}")
    # GradDrop's path takes the representation's Jacobian and pulls the direction back through the layer; with a
    # leak of 1 it keeps every gradient, so the step is EW's gradient of W.
    graddrop = make("graddrop", leak=1.0)
    functions = bench._step_functions(graddrop, 3)
    assert set(functions) == {"representation"}
    np.testing.assert_allclose(functions["representation"](weight, inputs, heads, targets, graddrop.init(3), key)[0],
                               jacobian.sum(0).reshape(weight.shape), rtol=1e-6, atol=1e-12)


def test_the_pipelines_run_on_the_examples_asked_for_whatever_the_distinct_scenes(monkeypatch, tmp_path):
    """bench_data.main with the scenes and timing faked: 10 examples from 4 distinct scenes are the scenes tiled
    (4 + 4 + 2), all 10 handed to the pipelines; a pipeline exactly 5x the step's rate meets the target (at least
    5x)."""
    bench = load_script("bench/bench_data.py")
    monkeypatch.setattr(deep.data, "nyuv2_arrays", lambda n, h, w, seed: {
        "images": np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, h, w, 3), np.float32)})
    handed = []
    monkeypatch.setattr(bench, "_pipelines", lambda arrays, batch: handed.append((arrays, batch)) or [
        ("host", lambda: None)])
    # 8 images (two whole batches of 4) in 0.4 s: 20 images/s, exactly 5x the step's 4 images/s.
    monkeypatch.setattr(bench, "median_seconds", lambda function, repeats, warmup=False: 0.4)
    step_json = tmp_path / "step.json"
    step_json.write_text(json.dumps({"rows": [{"method": "ew", "images_per_second": 4.0}]}))
    out = tmp_path / "data.json"
    assert bench.main(["--config", "reduced", "--examples", "10", "--distinct", "4", "--step-json", str(step_json),
                       "--out", str(out), "--quiet"]) == 0
    ((arrays, batch),) = handed
    assert batch == 4 and arrays["images"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["images_per_second"] == pytest.approx(20.0) and row["meets_target"] is True


def test_each_checkpoint_mode_times_repeats_saves_after_the_set_up_one_in_that_mode(monkeypatch, tmp_path):
    """bench_checkpoint._measure with a fake Checkpoints on a scripted clock: the Checkpoints is made in the mode
    measured (synchronous here), and --repeats saves are timed after the untimed first one (4 saves for 3 repeats):
    blocking the median of 0.1, 0.5, 0.2 s, not of the first two (0.3 s)."""
    bench = load_script("bench/bench_checkpoint.py")
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=clock))
    saves, modes = {1: 100.0, 2: 0.1, 3: 0.5, 4: 0.2}, []

    class Checkpoints:
        def __init__(self, path, asynchronous):
            modes.append(asynchronous)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def save(self, epoch, tree):
            clock.advance(saves.pop(epoch))

        def wait(self):
            pass

    monkeypatch.setattr(deep.checkpoint, "Checkpoints", Checkpoints)
    row = bench._measure([jnp.zeros(2)], False, repeats=3, folder=str(tmp_path))
    assert saves == {} and modes == [False]
    assert row == {"mode": "synchronous", "blocking_ms": pytest.approx(200.0), "durable_ms": pytest.approx(200.0)}


def test_each_measures_row_times_its_own_estimator_three_times_after_a_warm_up(monkeypatch, tmp_path):
    """bench_measures.main with the estimators replaced by recorders and median_seconds calling the function once
    (nothing timed): each row's calls reach its own estimator (the three CKAs not all the last one of the loop), at
    each of its sizes, with the medians of 3 calls its docstring states."""
    import theory.measures

    bench = load_script("bench/bench_measures.py")
    called = []
    for name in ("w1_empirical_1d", "w1_empirical", "sliced_w1", "linear_cka", "linear_cka_gram", "debiased_cka"):
        monkeypatch.setattr(theory.measures, name,
                            lambda x, y, name=name: called.append((name, x.shape[0])) or jnp.zeros(()))
    repeats = []
    monkeypatch.setattr(bench, "median_seconds", lambda function, repeats_, warmup=False: (
        repeats.append((repeats_, warmup)), function(), 1e-3)[2])
    assert bench.main(["--max-1d", "10000", "--max-emd", "300", "--max-dd", "1000", "--dim", "2", "--out",
                       str(tmp_path / "measures.json"), "--quiet"]) == 0
    assert called == [("w1_empirical_1d", 1000), ("w1_empirical_1d", 10_000), ("w1_empirical", 100),
                      ("w1_empirical", 300), ("sliced_w1", 100), ("sliced_w1", 1000), ("linear_cka", 100),
                      ("linear_cka", 1000), ("linear_cka_gram", 100), ("linear_cka_gram", 1000),
                      ("debiased_cka", 100), ("debiased_cka", 1000)]
    assert set(repeats) == {(3, True)}


def test_an_atrous_rows_deviation_is_relative_to_xlas_result_and_its_time_takes_repeats(monkeypatch, tmp_path):
    """bench_atrous.main on one tiny shape with XLA's convolution and one 10 % too large: the second's deviation is
    ‖1.1 y - y‖ / ‖y‖ = 0.1 (over XLA's norm, for the output and both gradients), XLA's own 0; --repeats reaches each
    timing."""
    bench = load_script("bench/bench_atrous.py")
    monkeypatch.setattr(bench, "SHAPES", (("tiny", 2, 3, 2, 5),))
    scaled = lambda *args, **kwargs: 1.1 * lax.conv_general_dilated(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(deep.atrous, "DILATED_CONVS", {"xla": lax.conv_general_dilated, "scaled": scaled})
    repeats = []
    monkeypatch.setattr(bench, "median_seconds", lambda function, repeats_, warmup=False: repeats.append(repeats_)
                        or 0.002)
    out = tmp_path / "atrous.json"
    assert bench.main(["--batch", "1", "--height", "4", "--width", "5", "--repeats", "7", "--out", str(out),
                       "--quiet"]) == 0
    rows = {row["implementation"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["xla"]["relative_deviation_from_xla"] == 0.0
    assert rows["scaled"]["relative_deviation_from_xla"] == pytest.approx(0.1, rel=1e-4)
    assert repeats == [7, 7]


def test_each_pipeline_is_named_for_where_its_loader_holds_the_set_and_whether_it_augments(monkeypatch):
    """bench_data._pipelines with the Loader, the augmentation and the transfer replaced by recorders: host
    pipelines gather on the host and transfer each batch, device ones hold the set on the device and transfer
    nothing, and only the +augment ones run the augmentation, once per batch (two batches an epoch here)."""
    bench = load_script("bench/bench_data.py")
    events = []

    class Loader:
        def __init__(self, arrays, batch_size, seed, on_device=False):
            self.on_device, self.batch_size = on_device, batch_size

        def epoch(self, epoch):
            for _ in range(2):
                events.append(("batch", self.on_device, self.batch_size))
                yield {"x": jnp.ones((self.batch_size, 2))}

    def augment(key, batch, config):
        jax.debug.callback(lambda: events.append("augment"))
        return batch

    monkeypatch.setattr(deep.data, "Loader", Loader)
    monkeypatch.setattr(deep.data, "augment", augment)
    monkeypatch.setattr(jax, "device_put", lambda batch: events.append("transfer") or batch)
    seen = {}
    for name, epoch in bench._pipelines({"x": np.ones((4, 2), np.float32)}, 2):
        events.clear()
        epoch()
        jax.effects_barrier()
        seen[name] = list(events)
    host, device = ("batch", False, 2), ("batch", True, 2)
    assert seen == {"host": [host, "transfer"] * 2, "host+augment": [host, "transfer", "augment"] * 2,
                    "device": [device] * 2, "device+augment": [device, "augment"] * 2}


def test_the_optimiser_benchmark_counts_nested_operations_and_divides_raveled_by_per_parameter(monkeypatch, tmp_path):
    """bench_optimizer: count_operations counts the equations of nested programs too (a jitted call is its own
    equation plus its body's); main, with each layout's measurement fabricated (nothing traced), writes each row,
    the raveled layout's figures over the per-parameter layout's, and the largest difference of their parameters."""
    bench = load_script("bench/bench_optimizer.py")
    inner = jax.jit(lambda x: jnp.sin(x) * 2.0)  # its equation holds a closed program
    jaxpr = jax.make_jaxpr(lambda x: inner(x) + 1.0)(jnp.ones(3))
    assert bench.count_operations(jaxpr.jaxpr) == 1 + 2 + 1
    rematerialised = jax.checkpoint(lambda x: jnp.sin(x) * 2.0)  # its equation holds an open one
    jaxpr = jax.make_jaxpr(lambda x: rematerialised(x) + 1.0)(jnp.ones(3))
    assert bench.count_operations(jaxpr.jaxpr) == 1 + 2 + 1
    rows = {False: {"operations": 200, "trace_and_lower_seconds": 4.0, "compile_seconds": 10.0, "step_ms": 50.0},
            True: {"operations": 150, "trace_and_lower_seconds": 3.0, "compile_seconds": 8.0, "step_ms": 45.0}}
    params = {False: {"w": np.zeros(3)}, True: {"w": np.array([0.0, -0.25, 0.125])}}
    monkeypatch.setattr(bench, "core_step", lambda *args: (types.SimpleNamespace(trace=lambda *a: None), None))
    monkeypatch.setattr(bench, "measure", lambda ravel, *args: (rows[ravel], params[ravel]))
    out = tmp_path / "optimizer.json"
    assert bench.main(["--config", "reduced", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == {"per_parameter": rows[False], "raveled": rows[True]}
    assert result["raveled_over_per_parameter"] == {"operations": 0.75, "trace_and_lower_seconds": 0.75,
                                                    "compile_seconds": 0.8, "step_ms": 0.9}
    assert result["largest_parameter_difference"] == 0.25

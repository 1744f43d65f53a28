"""bench/bench_train_step.py times the steps as training runs them: each donates the state it is given, so the memory
XLA reports is the training loop's (the state's buffers reused for the new state, not held twice)."""

import json
import time
import types

import jax
import jax.numpy as jnp
import pytest
from scripts import load_script
from test_bench import FakeClock


def test_both_step_builders_donate_each_array_of_the_state():
    bench = load_script("bench/bench_train_step.py")
    model_config, batch_size, size = bench.setting("reduced", "paper")
    batch = jax.eval_shape(lambda: bench.batch_arrays(batch_size, size))
    key = jax.eval_shape(lambda: jax.random.key(1))
    # EW's step comes from the builder of CORE-MTL's steps; PCGrad's from the builder of MTAN's (tracing MTAN too
    # would double the test's time).
    steps = bench.training_steps(model_config, "float32", ("pcgrad",), abstract=True)
    assert [step.name for step in steps] == ["ew", "pcgrad"]
    for step in steps:
        lowered = step.timed.trace(step.state, batch, key).lower().as_text()
        signature = next(line for line in lowered.splitlines() if "func.func public @main" in line)
        # Each donated argument that an output of the same shape takes over is marked with that output's index.
        assert signature.count("tf.aliasing_output") == len(jax.tree.leaves(step.state)), step.name


def test_a_steps_row_is_its_median_time_its_images_per_second_memory_and_flop_utilisation(monkeypatch):
    """bench_train_step._measure on a fake compiled step and a scripted clock, against hand arithmetic: the median
    blocking time (the warm-up call not timed), the pipelined time per step (a chain of ``repeats`` steps), images/s
    of the batch, XLA's memory less the donated state in MiB, and MFU = FLOPs / s / (TFLOP/s * 1e12)."""
    bench = load_script("bench/bench_train_step.py")
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    # The warm-up call, the 5 timed calls (median 0.02 s, mean 0.024 s), then 3 chains of 5 calls of 0.01 s each.
    durations = iter([5.0, 0.02, 0.03, 0.01, 0.04, 0.02] + [0.01] * 15)
    memory = types.SimpleNamespace(argument_size_in_bytes=3 * 2**20, output_size_in_bytes=2 * 2**20,
                                   temp_size_in_bytes=4 * 2**20, alias_size_in_bytes=1 * 2**20)

    def compiled(state, batch, key):
        clock.advance(next(durations))
        return (state,)

    compiled.memory_analysis = lambda: memory
    lowered = types.SimpleNamespace(compile=lambda: (clock.advance(7.0), compiled)[1])
    step = bench.Step("ew", types.SimpleNamespace(lower=lambda *args: lowered), "counted", None)
    # FLOPs of the step as defined (Step.counted), not of the form --dilated-conv runs (Step.timed).
    monkeypatch.setattr(bench, "lowered_flops", lambda counted, args: {"counted": 2e12}[counted])
    row = bench._measure(step, ({"w": jnp.ones(3)}, {}, None), batch_size=4, repeats=5, peak_tflops=100.0,
                         trace=None)
    assert next(durations, None) is None  # every scripted call was made
    assert row["method"] == "ew" and row["compile_seconds"] == 7.0
    assert row["ms"] == pytest.approx(20.0) and row["ms_pipelined"] == pytest.approx(10.0)
    assert row["images_per_second"] == pytest.approx(4 / 0.02)
    assert row["gflops"] == pytest.approx(2000.0) and row["peak_mb"] == pytest.approx(3 + 2 + 4 - 1)
    assert row["model_flop_utilisation"] == pytest.approx(2e12 / 0.02 / 100e12)
    assert row["model_flop_utilisation_pipelined"] == pytest.approx(2e12 / 0.01 / 100e12)
    # Without --peak-tflops (0) no utilisation is reported (not a division by zero).
    durations = iter([5.0] + [0.02] * 5 + [0.01] * 15)
    row = bench._measure(step, ({"w": jnp.ones(3)}, {}, None), batch_size=4, repeats=5, peak_tflops=0.0, trace=None)
    assert "model_flop_utilisation" not in row and "model_flop_utilisation_pipelined" not in row


def test_the_rows_ratios_are_to_ews_step_and_core_expected_is_the_mean_of_the_two_core_programs(monkeypatch,
                                                                                              tmp_path):
    """bench_train_step.main with the steps and their measurement faked: each row's ratio is its time over EW's (at
    the same precision, blocking and pipelined each against its own kind), and ``core_expected`` is the mean of
    ``core`` and ``core_no_cfa`` (the authors' probability 0.5), with images/s of that mean time in ms."""
    bench = load_script("bench/bench_train_step.py")
    times = {"ew": (10.0, 8.0), "core": (30.0, 20.0), "core_no_cfa": (20.0, 16.0), "pcgrad": (25.0, 24.0)}
    monkeypatch.setattr(bench, "training_steps", lambda config, precision, methods: [
        bench.Step(name, None, None, None) for name in times])
    monkeypatch.setattr(bench, "_measure", lambda step, args, batch, repeats, peak, trace: {
        "method": step.name, "ms": times[step.name][0], "ms_pipelined": times[step.name][1],
        "images_per_second": batch / times[step.name][0] * 1e3, "gflops": 1.0, "peak_mb": 1.0})
    out = tmp_path / "step.json"
    assert bench.main(["--methods", "ew,core,core_no_cfa,pcgrad", "--out", str(out), "--quiet"]) == 0
    payload = json.loads(out.read_text())
    rows = {row["method"]: row for row in payload["rows"]}
    assert payload["batch"] == 4 and list(rows) == ["ew", "core", "core_no_cfa", "pcgrad", "core_expected"]
    assert rows["core"]["ratio_to_ew"] == 3.0 and rows["core"]["ratio_to_ew_pipelined"] == 2.5
    assert rows["pcgrad"]["ratio_to_ew"] == 2.5 and rows["pcgrad"]["ratio_to_ew_pipelined"] == 3.0
    expected = rows["core_expected"]
    assert (expected["ms"], expected["ms_pipelined"]) == (25.0, 18.0)
    assert expected["images_per_second"] == pytest.approx(4 / 0.025)
    assert expected["ratio_to_ew"] == 2.5 and expected["ratio_to_ew_pipelined"] == pytest.approx(18 / 8)


def test_the_kernel_summary_is_per_step_and_leaves_out_the_derived_lines(monkeypatch, tmp_path):
    """_kernel_summary on a fabricated profiler trace of 2 calls: a GPU stream's kernels (ns -> ms, halved per
    step, by kind), the derived 'XLA Ops' line not counted again, the host's plane ignored; no GPU plane: None."""
    bench = load_script("bench/bench_train_step.py")
    event = lambda name, ms: types.SimpleNamespace(name=name, duration_ns=ms * 1e6)
    line = lambda name, *events: types.SimpleNamespace(name=name, events=events)
    gpu = types.SimpleNamespace(name="/device:GPU:0", lines=[
        line("Stream #7", event("loop_fusion_3", 2.0), event("cudnn_conv_fprop", 6.0), event("sm90_gemm", 1.0),
             event("loop_fusion_3", 2.0)),
        line("XLA Ops", event("loop_fusion_3", 9.0))])
    host = types.SimpleNamespace(name="/host:CPU", lines=[line("python", event("cudnn_conv_fprop", 50.0))])
    planes = {"gpu": [host, gpu], "cpu": [host]}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "t.xplane.pb").write_bytes(b"")
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "t.xplane.pb").write_bytes(b"")
    fake = types.SimpleNamespace(from_file=lambda path: types.SimpleNamespace(planes=planes[path.split("/")[-2]]))
    monkeypatch.setattr(jax.profiler, "ProfileData", fake)
    summary = bench._kernel_summary(tmp_path / "gpu", calls=2)
    assert summary["device_ms_per_step"] == pytest.approx((2 + 6 + 1 + 2) / 2)
    assert summary["kernels_per_step"] == 2.0 and summary["lines"] == ["Stream #7"]
    assert summary["ms_by_kind"] == pytest.approx({"xla_fusion": 2.0, "convolution": 3.0, "matmul": 0.5})
    assert summary["top_kernels"][0] == {"name": "cudnn_conv_fprop", "ms_per_step": 3.0, "calls_per_step": 0.5}
    assert bench._kernel_summary(tmp_path / "cpu", calls=2) is None


def test_main_passes_its_flags_to_each_measurement_and_prints_the_jsons_ratios(monkeypatch, capsys, tmp_path):
    """bench_train_step.main with the steps and their measurement faked: --repeats and --peak-tflops reach each
    step's measurement, and the printed table's "x EW" column is the JSON's ratio_to_ew (blocking time), not the
    pipelined ratio (EW 10 ms blocking / 8 ms pipelined, CORE-MTL 30 / 20: 3.00 against 2.50)."""
    bench = load_script("bench/bench_train_step.py")
    times = {"ew": (10.0, 8.0), "core": (30.0, 20.0)}
    calls = []
    monkeypatch.setattr(bench, "training_steps", lambda config, precision, methods: [
        bench.Step(name, None, None, None) for name in times])

    def measure(step, args, batch, repeats, peak, trace):
        calls.append((step.name, repeats, peak))
        return {"method": step.name, "ms": times[step.name][0], "ms_pipelined": times[step.name][1],
                "images_per_second": batch / times[step.name][0] * 1e3, "gflops": 1.0, "peak_mb": 1.0}

    monkeypatch.setattr(bench, "_measure", measure)
    out = tmp_path / "step.json"
    assert bench.main(["--methods", "ew,core", "--repeats", "7", "--peak-tflops", "123", "--out", str(out)]) == 0
    assert calls == [("ew", 7, 123.0), ("core", 7, 123.0)]
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    printed = {line.split()[1]: line.split() for line in capsys.readouterr().out.splitlines()
               if line.startswith("float32 ")}
    assert set(printed) == set(rows) == {"ew", "core"}
    for name, row in rows.items():
        # precision, step, ms, ms piped, img/s, x EW, ...
        assert printed[name][2:6] == [f"{row['ms']:.1f}", f"{row['ms_pipelined']:.1f}",
                                      f"{row['images_per_second']:.1f}", f"{row['ratio_to_ew']:.2f}"]
    assert printed["core"][5] == "3.00"

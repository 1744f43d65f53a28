"""bench/bench_train_step.py times the steps as training runs them: each donates the state it is given, so the memory
XLA reports is the training loop's (the state's buffers reused for the new state, not held twice)."""

import dataclasses
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
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

    given = []

    def compiled(state, batch, key):
        given.append(state)
        clock.advance(next(durations))
        return (state,)

    compiled.memory_analysis = lambda: memory
    lowered = types.SimpleNamespace(compile=lambda: (clock.advance(7.0), compiled)[1])
    step = bench.Step("ew", types.SimpleNamespace(lower=lambda *args: lowered), "counted", None)
    # FLOPs of the step as defined (Step.counted), not of the form --dilated-conv runs (Step.timed).
    monkeypatch.setattr(bench, "lowered_flops", lambda counted, args: {"counted": 2e12}[counted])
    state = {"w": jnp.ones(3)}
    row = bench._measure(step, (state, {}, None), batch_size=4, repeats=5, peak_tflops=100.0, trace=None)
    assert next(durations, None) is None  # every scripted call was made
    # The steps of one model share their initial state: each measurement runs on a copy of it, which the step then
    # donates, not on the state the next step needs.
    assert given[0] is not state and np.array_equal(given[0]["w"], state["w"]) and not state["w"].is_deleted()
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


def test_the_settings_are_the_papers_nyuv2_run_and_the_reduced_model_of_the_variant_asked_for():
    """setting: the NYUv2 run is batch 16 at 288x384 (height before width, as the batch arrays are laid out) on the
    full model; the reduced one batch 4 at 64x80 on MODEL_SIZES' reduced model, of the variant asked for."""
    from deep.model import ModelConfig
    from deep.trainer import MODEL_SIZES

    bench = load_script("bench/bench_train_step.py")
    assert bench.setting("nyuv2", "authors") == (ModelConfig.variant("authors"), 16, (288, 384))
    assert bench.setting("reduced", "authors") == (ModelConfig.variant("authors", **MODEL_SIZES["reduced"]), 4,
                                                   (64, 80))
    assert bench.setting("reduced", "authors")[0] != bench.setting("reduced", "paper")[0]


def test_each_step_runs_its_own_model_weights_and_counterfactual_flag_and_is_counted_as_defined(monkeypatch):
    """training_steps with the model, its split and the steps replaced by recorders (nothing built, traced or run):
    EW is the model without grounding with every term but the task losses off (the edge term too) and no
    counterfactual pass; core and core_no_cfa the grounded model with the preset's weights, λ_ind = 1, the pass on
    and off; PCGrad the plain model and MTAN its own; all at the precision asked for. Each counted step is the same
    step on the model whose dilated convolutions were set to XLA's (the timed one keeps the configured form)."""
    from deep import atrous, losses, train, trainer

    bench = load_script("bench/bench_train_step.py")

    class Model:
        def __init__(self, config, architecture):
            self.config, self.architecture, self.dilated_conv = config, architecture, config.dilated_conv

    monkeypatch.setattr(trainer, "build_model", lambda config, architecture, seed: Model(config, architecture))
    states = iter(range(100))  # each model split its own state
    monkeypatch.setattr(train, "split_model", lambda model, optimizer: (None, f"state {next(states)}"))
    # The graphdef records what the model was when split: its config, architecture and dilated convolutions.
    monkeypatch.setattr(train, "split_states", lambda model: (
        (model.config.grounding, model.config.compute_dtype, model.architecture, model.dilated_conv),))
    monkeypatch.setattr(atrous, "set_dilated_conv", lambda model, how: setattr(model, "dilated_conv", how))
    monkeypatch.setattr(train, "core_step", lambda graphdef, optimizer, state, batch, key, weights,
                        independence_weight, counterfactual: ("core_step", graphdef, state, weights,
                                                              independence_weight, counterfactual))
    monkeypatch.setattr(train, "balanced_step", lambda graphdef, optimizer, balancer, state, balancer_state, batch,
                        key: ("balanced_step", graphdef, state, balancer.name))
    monkeypatch.setattr(jax, "jit", lambda function, **options: function)  # each step called as defined
    model_config = dataclasses.replace(bench.setting("reduced", "paper")[0], grounding="hard",
                                       dilated_conv="shifted_matmul")
    steps = bench.training_steps(model_config, "bfloat16", bench.METHODS)
    assert [step.name for step in steps] == list(bench.METHODS)
    run = {step.name: (step.timed(step.state, None, None), step.counted(step.state, None, None)) for step in steps}
    preset = losses.PRESETS["nyuv2"]
    ew_weights = dataclasses.replace(preset, independence=0.0, counterfactual=0.0, edge=0.0)
    for name, (timed, counted) in run.items():
        assert timed[1][1] == "bfloat16" and timed[1][3] == "shifted_matmul" and counted[1][3] == "xla", name
        assert (timed[0], timed[1][:3], timed[2:]) == (counted[0], counted[1][:3], counted[2:]), name
    assert run["ew"][0][1][:3] == ("none", "bfloat16", "shared") and run["ew"][0][3:] == (ew_weights, 0.0, False)
    for name, counterfactual in (("core", True), ("core_no_cfa", False)):
        assert run[name][0][1][:3] == ("hard", "bfloat16", "shared")
        assert run[name][0][3:] == (preset, 1.0, counterfactual), name
    assert run["core"][0][2] == run["core_no_cfa"][0][2] != run["ew"][0][2]  # one grounded model, its own state
    assert run["pcgrad"][0] == ("balanced_step", run["ew"][0][1], run["ew"][0][2], "pcgrad")
    for name in ("ew", "pcgrad"):
        (kind, graphdef, state, balancer), _ = run[f"mtan_{name}"]
        assert (graphdef[:3], balancer) == (("none", "bfloat16", "mtan"), name)
        assert state not in (run["ew"][0][2], run["core"][0][2])
    # Either CORE-MTL step alone builds the grounded model (--methods core_no_cfa times that step, and EW's).
    assert [step.name for step in bench.training_steps(model_config, "float32", ("core_no_cfa",))] == [
        "ew", "core_no_cfa"]


def test_all_methods_of_the_authors_variant_are_its_dual_stream_steps():
    """--methods all with --variant authors names every step that variant has (MTAN's are the paper's only), so it
    is accepted rather than refused for naming MTAN."""
    bench = load_script("bench/bench_train_step.py")
    assert bench.chosen_methods("all", "authors") == bench.DUAL_STREAM_METHODS
    assert bench.chosen_methods("all", "paper") == bench.METHODS
    assert bench.BenchConfig(variant="authors", methods="all", out="unused.json").methods == "all"


def test_each_precisions_ratios_are_to_its_own_ew_and_the_flags_reach_the_steps_and_the_json(monkeypatch, tmp_path):
    """bench_train_step.main over two precisions with the steps and their measurement faked: each row's ratio is to
    EW's time at its own precision (EW float32 10 ms, bfloat16 4 ms), left as it was once the next precision is
    measured; --dilated-conv reaches the model the steps are built from, and the JSON names the form the steps ran
    (the model's default without the flag); --trace gives each step of each precision a folder of its own (each
    measurement empties its folder first)."""
    from deep.model import ModelConfig

    bench = load_script("bench/bench_train_step.py")
    times = {"float32": {"ew": 10.0, "core": 30.0}, "bfloat16": {"ew": 4.0, "core": 6.0}}
    configs, traces = [], []
    monkeypatch.setattr(bench, "training_steps", lambda config, precision, methods: configs.append(config) or [
        bench.Step(name, None, None, None) for name in times[precision]])

    def measure(step, args, batch, repeats, peak, trace):
        traces.append(trace)
        # The precision is not passed: the times follow the order main measures the precisions in.
        precision = "float32" if len(traces) <= 2 else "bfloat16"
        ms = times[precision][step.name]
        return {"method": step.name, "ms": ms, "ms_pipelined": ms / 2, "images_per_second": batch / ms * 1e3}

    monkeypatch.setattr(bench, "_measure", measure)
    out = tmp_path / "step.json"
    assert bench.main(["--methods", "ew,core", "--precisions", "float32,bfloat16", "--out", str(out), "--quiet"]) == 0
    payload = json.loads(out.read_text())
    ratios = {(row["precision"], row["method"]): (row["ratio_to_ew"], row["ratio_to_ew_pipelined"])
              for row in payload["rows"]}
    assert ratios == {("float32", "ew"): (1.0, 1.0), ("float32", "core"): (3.0, 3.0),
                      ("bfloat16", "ew"): (1.0, 1.0), ("bfloat16", "core"): (1.5, 1.5)}
    assert payload["dilated_conv"] == ModelConfig().dilated_conv and traces == [None] * 4
    configs.clear(), traces.clear()
    assert bench.main(["--methods", "ew,core", "--precisions", "float32,bfloat16", "--dilated-conv", "space_to_batch",
                       "--trace", str(tmp_path / "trace"), "--out", str(out), "--quiet"]) == 0
    assert [config.dilated_conv for config in configs] == ["space_to_batch"] * 2
    assert json.loads(out.read_text())["dilated_conv"] == "space_to_batch"
    assert [trace.relative_to(tmp_path / "trace").as_posix() for trace in traces] == [
        "float32_ew", "float32_core", "bfloat16_ew", "bfloat16_core"]


def test_a_traced_measurement_sums_a_fresh_trace_of_the_calls_it_made(monkeypatch, tmp_path):
    """bench_train_step._measure with --trace, the profiler and the trace's reading faked: the step's folder is
    emptied of an earlier run's trace before the profiler writes there, and the kernels are summed per step over as
    many calls as were traced. A step of no FLOPs (a count that failed) reports no utilisation, even with a peak."""
    bench = load_script("bench/bench_train_step.py")
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    calls, traced, summaries = [], [], []

    def compiled(state, batch, key):
        clock.advance(0.01)
        calls.append(1)
        return (state,)

    compiled.memory_analysis = lambda: None
    lowered = types.SimpleNamespace(compile=lambda: compiled)
    step = bench.Step("ew", types.SimpleNamespace(lower=lambda *args: lowered), "counted", None)
    monkeypatch.setattr(bench, "lowered_flops", lambda counted, args: 0.0)

    class Profiler:
        def __init__(self, folder):
            assert not (tmp_path / "t" / "old.xplane.pb").exists()  # an earlier run's trace, gone before this one
            self.folder = folder

        def __enter__(self):
            traced.append((self.folder, len(calls)))

        def __exit__(self, *exc):
            traced[-1] = traced[-1] + (len(calls),)

    monkeypatch.setattr(jax.profiler, "trace", Profiler)
    monkeypatch.setattr(bench, "_kernel_summary", lambda folder, calls: summaries.append((folder, calls)) or "summary")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "old.xplane.pb").write_bytes(b"")
    row = bench._measure(step, ({"w": jnp.ones(3)}, {}, None), batch_size=4, repeats=3, peak_tflops=100.0,
                         trace=tmp_path / "t")
    ((folder, before, after),) = traced
    assert folder == str(tmp_path / "t") and before == 1 + 3 + 3 * 3  # warm-up, timed calls, three chains
    assert summaries == [(tmp_path / "t", after - before)] and row["kernels"] == "summary"
    assert "model_flop_utilisation" not in row and "model_flop_utilisation_pipelined" not in row


def test_a_kernel_is_of_the_first_kind_whose_marks_its_name_holds(monkeypatch, tmp_path):
    """_kernel_summary's kinds in order: an XLA fusion whose name holds a convolution's mark is a fusion (XLA's
    fusions come first), and cuDNN's implicit-GEMM convolution kernels are convolutions, not matrix products."""
    bench = load_script("bench/bench_train_step.py")
    event = lambda name: types.SimpleNamespace(name=name, duration_ns=1e6)
    gpu = types.SimpleNamespace(name="/device:GPU:0", lines=[types.SimpleNamespace(name="Stream #7", events=[
        event("loop_convolution_fusion"), event("sm90_xmma_fprop_implicit_gemm_bf16"), event("nvjet_tst_gemm")])])
    monkeypatch.setattr(jax.profiler, "ProfileData", types.SimpleNamespace(
        from_file=lambda path: types.SimpleNamespace(planes=[gpu])))
    (tmp_path / "t.xplane.pb").write_bytes(b"")
    summary = bench._kernel_summary(tmp_path, calls=1)
    assert summary["ms_by_kind"] == {"xla_fusion": 1.0, "convolution": 1.0, "matmul": 1.0}

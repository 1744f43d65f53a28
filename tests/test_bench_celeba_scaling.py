"""bench/bench_celeba_scaling.py on the tiny model: the costs grow with the number of attributes as the paper's
Table 4 says they should, for the reason it gives."""

import json
import types

import pytest
from scripts import load_script, median_seconds_recording_warmups


def test_only_pcgrad_grows_with_the_attributes_and_by_one_backward_pass_each(tmp_path):
    out = tmp_path / "scaling.json"
    bench = load_script("bench/bench_celeba_scaling.py")
    assert bench.main(["--config", "tiny", "--tasks", "2,4,6", "--out", str(out), "--quiet"]) == 0
    rows = {(row["tasks"], row["method"]): row["gflops"] for row in json.loads(out.read_text())["rows"]}
    assert {method for _, method in rows} == {"ew", "stch", "pcgrad", "core", "core_lpips"}
    for method in ("ew", "stch", "core", "core_lpips"):
        # One backward pass whatever T: only the heads' last layer (T logits) grows, a negligible part.
        assert rows[6, method] == pytest.approx(rows[2, method], rel=1e-3), method
    # EW and STCH weigh the losses and take one backward pass; CORE-MTL adds the decoder, LPIPS its VGG16.
    assert rows[2, "stch"] == pytest.approx(rows[2, "ew"], rel=1e-3)
    assert rows[2, "ew"] < rows[2, "core"] < rows[2, "core_lpips"]
    # PCGrad pulls each attribute's gradient back through the shared encoder: every 2 more attributes add two
    # backward passes of the encoder (each about twice its forward pass; an EW step is a forward and a backward pass,
    # about three forward passes), so 1-1.5 EW steps; plus PCGrad's own pairwise projections, T² products of the
    # gradients, the small quadratic term (0.7 % of the increment at this size).
    step_2_to_4, step_4_to_6 = rows[4, "pcgrad"] - rows[2, "pcgrad"], rows[6, "pcgrad"] - rows[4, "pcgrad"]
    assert step_2_to_4 < step_4_to_6 < 1.02 * step_2_to_4
    assert 1.0 * rows[2, "ew"] < step_2_to_4 < 1.5 * rows[2, "ew"]


def test_bad_task_counts_are_refused():
    config = load_script("bench/bench_celeba_scaling.py").BenchConfig
    with pytest.raises(ValueError, match="--tasks must be comma-separated integers in 1..40; got '0,41'"):
        config(tasks="0,41")


def test_the_scaling_ratios_are_to_ew_at_the_same_t_to_the_fewest_t_and_the_papers_table_4():
    """with_ratios on fabricated rows, against hand arithmetic and the paper's Table 4 (A800 seconds per epoch:
    PCGrad 690 / EW 86 at T = 10, 1396 / 91 at T = 20)."""
    bench = load_script("bench/bench_celeba_scaling.py")
    rows = bench.with_ratios([
        {"tasks": 10, "method": "ew", "gflops": 2.0, "seconds": 0.5},
        {"tasks": 10, "method": "pcgrad", "gflops": 6.0, "seconds": 2.0},
        {"tasks": 20, "method": "ew", "gflops": 2.0, "seconds": 0.5},
        {"tasks": 20, "method": "pcgrad", "gflops": 10.0, "seconds": 3.0}])
    pcgrad_10, pcgrad_20 = rows[1], rows[3]
    assert pcgrad_20["ratio_to_ew"] == 5.0 and pcgrad_20["seconds_ratio_to_ew"] == 6.0
    assert pcgrad_20["ratio_to_fewest_tasks"] == pytest.approx(10 / 6) and pcgrad_10["ratio_to_fewest_tasks"] == 1.0
    assert pcgrad_10["paper_seconds_ratio_to_ew"] == pytest.approx(690 / 86)
    assert pcgrad_20["paper_seconds_ratio_to_ew"] == pytest.approx(1396 / 91)
    assert rows[2]["paper_seconds_ratio_to_ew"] == 1.0


def test_main_passes_jacobian_chunk_to_each_step_and_times_after_an_untimed_call(monkeypatch, tmp_path):
    """bench_celeba_scaling.main with the steps, their FLOP count and the timing faked (nothing traced or run):
    --jacobian-chunk reaches every step's builder, and --time's median asks for an untimed first call (the one that
    warms the device's caches after the compile)."""
    bench = load_script("bench/bench_celeba_scaling.py")
    chunks, warmups = [], []
    compiled = lambda *args: None  # noqa: E731
    compiled.memory_analysis = lambda: None
    step = types.SimpleNamespace(trace=lambda *args: types.SimpleNamespace(
        lower=lambda: types.SimpleNamespace(compile=lambda: compiled)))

    def arguments(method, variant, size, attributes, batch, image_size, abstract, jacobian_chunk=None):
        chunks.append(jacobian_chunk)
        return step, ()

    monkeypatch.setattr(bench, "step_and_arguments", arguments)
    monkeypatch.setattr(bench, "lowered_flops", lambda step, args: 1e9)
    monkeypatch.setattr(bench, "payload_device", lambda: "fake")
    monkeypatch.setattr(bench, "median_seconds", median_seconds_recording_warmups(0.1, warmups))
    out = tmp_path / "scaling.json"
    assert bench.main(["--config", "tiny", "--tasks", "2", "--time", "--jacobian-chunk", "3", "--out", str(out),
                       "--quiet"]) == 0
    assert chunks == [3] * 2 * len(bench.METHODS)  # abstract, then initialised, per method
    assert warmups == [True] * len(bench.METHODS)
    assert json.loads(out.read_text())["jacobian_chunk"] == 3
    # A chunk of 3 at two tasks runs the pull-backs at once (no loop), so the FLOPs are whole and no note says
    # otherwise; at 4 tasks they run in a loop, whose body XLA counts once.
    assert "gflops_note" not in json.loads(out.read_text())
    assert bench.main(["--config", "tiny", "--tasks", "2,4", "--jacobian-chunk", "3", "--out", str(out),
                       "--quiet"]) == 0
    assert json.loads(out.read_text())["gflops_note"] == ("XLA counts the body of the chunked pull-backs' loop once: "
                                                          "PCGrad's gflops are undercounted at more than 3 tasks")

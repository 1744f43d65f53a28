"""bench/bench_celeba_scaling.py on the tiny model: the costs grow with the number of attributes as the paper's
Table 4 says they should, for the reason it gives."""

import json

import pytest
from scripts import load_script


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

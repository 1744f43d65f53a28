"""bench/bench_flops.py's split of the training step's FLOPs, on the reduced model: the parts make up the forward
pass, and the steps cost what backpropagation should."""

import json

import pytest
from scripts import load_script


def test_the_parts_make_up_the_forward_pass_and_each_step_costs_what_backpropagation_should(tmp_path):
    out = tmp_path / "flops.json"
    assert load_script("bench/bench_flops.py").main(["--config", "reduced", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    parts = {row["part"]: row["gflops"] for row in result["forward_parts"]}
    steps = {row["method"]: row["gflops"] for row in result["steps"]}
    assert set(parts) == {"backbone", "streams", "task heads", "physical decoder", "geometry decoder",
                          "appearance decoder", "losses", "counterfactual pass"}
    assert min(parts.values()) > 0
    # Each part traced on its own, against the model's own forward pass: a part left out, counted twice or run on
    # the wrong module would not add up.
    assert result["parts_sum_to_forward"] == pytest.approx(1.0, abs=1e-3)
    # The baselines' model is the encoder and heads alone; its step is a forward and a backward pass (about twice
    # the forward's FLOPs: gradients of the inputs and of the weights) plus the optimiser's update.
    encoder_and_heads = parts["backbone"] + parts["streams"] + parts["task heads"]
    assert 2.5 < steps["ew"] / encoder_and_heads < 3.5
    # The counterfactual pass is the appearance decoder, then the encoder and heads again on the synthesised images
    # (in eval mode, where BatchNorm costs a little less: it reads its running statistics), then the task losses;
    # its backward pass goes through the encoder and heads alone, about twice their forward pass (1.8 at this size:
    # the first convolution needs no input gradient). Through the appearance decoder too (the synthesised images
    # not detached) it would be 2.2.
    assert parts["counterfactual pass"] == pytest.approx(encoder_and_heads + parts["appearance decoder"], rel=0.05)
    assert 1.5 < (steps["core"] - steps["core_no_cfa"] - parts["counterfactual pass"]) / encoder_and_heads < 2.05
    assert steps["core_expected"] == pytest.approx(0.5 * (steps["core"] + steps["core_no_cfa"]))
    # PCGrad's step takes one backward pass per task through the shared parameters.
    assert steps["pcgrad"] > steps["ew"] + encoder_and_heads

"""bench/bench_flops.py's split of the training step's FLOPs, on the reduced model: the parts make up the forward
pass, and the steps (MTAN's too) cost what backpropagation should."""

import json

import pytest
from scripts import load_script


def test_the_parts_make_up_the_forward_pass_and_each_step_costs_what_backpropagation_should(tmp_path):
    out = tmp_path / "flops.json"
    assert load_script("bench/bench_flops.py").main(["--config", "reduced", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    parts = {row["part"]: row["gflops"] for row in result["forward_parts"]}
    beside = {row["part"]: row["gflops"] for row in result["beside_forward"]}
    steps = {row["method"]: row["gflops"] for row in result["steps"]}
    assert set(parts) == {"backbone", "streams", "task heads", "physical decoder", "geometry decoder",
                          "appearance decoder"}
    assert min(parts.values()) > 0 and min(beside.values()) > 0
    # Each part is traced on its own, against the model's own forward pass: a part left out or counted twice would
    # not add up. The forward pass and the losses, each traced on its own, against the objective that computes both:
    # this ties the parts' training mode to the training step's.
    assert result["parts_sum_to_forward"] == pytest.approx(1.0, abs=1e-4)
    assert result["forward_and_losses_to_objective"] == pytest.approx(1.0, abs=1e-4)
    # The baselines' model is the encoder and heads alone; its step is a forward and a backward pass (about twice
    # the forward's FLOPs: gradients of the inputs and of the weights) plus the optimiser's update.
    encoder_and_heads = parts["backbone"] + parts["streams"] + parts["task heads"]
    assert 2.5 < steps["ew"] / encoder_and_heads < 3.5
    # The counterfactual pass is the appearance decoder, then the encoder and heads again on the synthesised images
    # (in eval mode, where BatchNorm costs a little less: it reads its running statistics), then the task losses;
    # its backward pass goes through the encoder and heads alone, about twice their forward pass (1.8 at this size,
    # 2.0 at the NYUv2 size). Through the appearance decoder too (the synthesised images not detached) it would add
    # about twice the decoder's forward pass.
    counterfactual = beside["counterfactual pass"]
    assert counterfactual == pytest.approx(encoder_and_heads + parts["appearance decoder"], rel=0.05)
    backward = steps["core"] - steps["core_no_cfa"] - counterfactual
    assert 1.5 * encoder_and_heads < backward < 2 * encoder_and_heads + 0.5 * parts["appearance decoder"]
    # PCGrad's step pulls each task's loss back through its own head alone, then the K representation gradients
    # through the shared encoder: beyond EW's step, K - 1 more backward passes of the encoder (about twice its forward
    # pass each; 0.93 of that at this size). The same holds for MTAN, whose shared encoder is the same backbone (its
    # shared transition blocks run inside each task's branch). Pulling the K losses back through the whole model
    # would add K - 1 backward passes of everything (MTAN's step: 2.4 GFLOP more than its EW step instead of 0.34).
    tasks = len(load_script("bench/bench_train_step.py").setting("reduced", "paper")[0].tasks)
    encoder_backwards = lambda encoder: (tasks - 1) * 2 * encoder
    assert 0.75 < (steps["pcgrad"] - steps["ew"]) / encoder_backwards(parts["backbone"] + parts["streams"]) < 1.25
    assert 0.75 < (steps["mtan_pcgrad"] - steps["mtan_ew"]) / encoder_backwards(parts["backbone"]) < 1.25

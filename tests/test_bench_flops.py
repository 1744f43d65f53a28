"""bench/bench_flops.py's split of the training step's FLOPs, on the reduced model: the parts make up the forward
pass, and the steps (MTAN's too) cost what backpropagation should."""

import dataclasses
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


def test_the_flops_json_shares_ratios_and_core_expected_follow_from_the_counts(monkeypatch, tmp_path):
    """bench_flops.main with its counts fabricated (nothing traced): each part's share is over the forward pass, the
    two checks of the split are (parts) / forward and (forward + losses) / objective, core_expected is the mean of
    the two CORE-MTL steps, and MTAN's steps are also given over MTAN's own EW step."""
    bench = load_script("bench/bench_flops.py")
    counts = bench.Counts(parts={"backbone": 6e9, "streams": 2e9, "task heads": 2e9}, forward=10e9,
                          beside={"losses": 1e9, "counterfactual pass": 4e9}, objective=11e9)
    steps = {"ew": 30e9, "core": 60e9, "core_no_cfa": 40e9, "pcgrad": 45e9, "mtan_ew": 36e9, "mtan_pcgrad": 54e9}
    monkeypatch.setattr(bench, "count_flops", lambda config, batch, size: counts)
    monkeypatch.setattr(bench, "training_steps", lambda config, precision, methods, abstract: [
        load_script("bench/bench_train_step.py").Step(name, None, name, None) for name in steps])
    monkeypatch.setattr(bench, "lowered_flops", lambda counted, args: steps[counted])
    out = tmp_path / "flops.json"
    assert bench.main(["--config", "reduced", "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert {row["part"]: row["share_of_forward"] for row in result["forward_parts"]} == pytest.approx(
        {"backbone": 0.6, "streams": 0.2, "task heads": 0.2})
    assert result["forward_gflops"] == pytest.approx(10.0)
    assert {row["part"]: row["relative_to_forward"] for row in result["beside_forward"]} == pytest.approx(
        {"losses": 0.1, "counterfactual pass": 0.4})  # over the forward pass (10), not the objective (11)
    assert result["parts_sum_to_forward"] == pytest.approx(1.0)
    assert result["forward_and_losses_to_objective"] == pytest.approx(1.0)
    rows = {row["method"]: row for row in result["steps"]}
    assert rows["core_expected"]["gflops"] == pytest.approx(50.0)
    assert rows["core_expected"]["ratio_to_ew"] == pytest.approx(50 / 30)
    assert rows["mtan_pcgrad"]["ratio_to_ew"] == pytest.approx(1.8)
    assert rows["mtan_pcgrad"]["ratio_to_mtan_ew"] == pytest.approx(1.5)
    assert "ratio_to_mtan_ew" not in rows["pcgrad"]


def test_the_flops_count_the_abstract_steps_of_the_variant_mtans_only_with_the_papers(monkeypatch, tmp_path):
    """bench_flops.main with its counts fabricated: the steps are asked for abstractly (nothing initialised: the
    paper's full size would take minutes), in float32, every step with the paper's variant and the dual-stream
    ones alone with the authors' (MTAN has its own architecture, the same in both)."""
    bench = load_script("bench/bench_flops.py")
    step_script = load_script("bench/bench_train_step.py")
    counts = bench.Counts(parts={"backbone": 1e9}, forward=1e9, beside={"losses": 1e8}, objective=1.1e9)
    monkeypatch.setattr(bench, "count_flops", lambda config, batch, size: counts)
    asked = []

    def training_steps(config, precision, methods, abstract=False):
        asked.append((config.fusion, precision, tuple(methods), abstract))
        return [step_script.Step(name, None, name, None) for name in methods]

    monkeypatch.setattr(bench, "training_steps", training_steps)
    monkeypatch.setattr(bench, "lowered_flops", lambda counted, args: 1e9)
    for variant in ("paper", "authors"):
        assert bench.main(["--config", "reduced", "--variant", variant, "--out", str(tmp_path / f"{variant}.json"),
                           "--quiet"]) == 0
    paper, authors = (bench.setting("reduced", variant)[0] for variant in ("paper", "authors"))
    assert asked == [(paper.fusion, "float32", step_script.METHODS, True),
                     (authors.fusion, "float32", step_script.DUAL_STREAM_METHODS, True)]
    methods = [row["method"] for row in json.loads((tmp_path / "authors.json").read_text())["steps"]]
    assert methods == [*step_script.DUAL_STREAM_METHODS, "core_expected"]


def test_the_parts_are_counted_on_the_model_with_xlas_dilated_convolutions(monkeypatch):
    """count_flops counts the parts as bench_train_step counts its steps, with the dilated convolutions as defined
    (XLA's), whatever form the configuration computes them with: the model it traces has them set so before
    anything is counted (the count stops there, at the recorder)."""
    import deep.atrous
    import deep.model  # noqa: F401  (imported before the patch: the model's own set-up keeps the real function)

    bench = load_script("bench/bench_flops.py")
    seen = []

    class Counted(Exception):
        pass

    def set_dilated_conv(model, implementation):
        seen.append((model.config.dilated_conv, model.config.grounding, implementation))
        raise Counted

    monkeypatch.setattr(deep.atrous, "set_dilated_conv", set_dilated_conv)
    config = dataclasses.replace(bench.setting("reduced", "paper")[0], dilated_conv="shifted_matmul", grounding="none")
    with pytest.raises(Counted):
        bench.count_flops(config, 2, (16, 16))
    assert seen == [("shifted_matmul", "hard", "xla")]  # the hard-grounding model, whose decoders are parts too

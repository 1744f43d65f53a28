"""The README's worked examples run as written (the trained-model example runs in test_train_nyuv2.py, on the run
that file makes)."""

from scripts import run_readme_example as run_example


def test_readme_training_step_example_runs():
    assert run_example("readme-training-step")["losses"].shape == (3,)


def test_readme_theory_example_runs_and_its_trained_gaps_sit_on_the_closed_form():
    namespace = run_example("readme-theory")
    from theory import checks

    assert namespace["gap"].shape == namespace["floor"].shape == (5, 2)  # [angles, tasks]
    verdict = checks.agreement_check(namespace["trained_gap"], namespace["gap"].mean(axis=-1), num_se=4)
    assert verdict["holds"], verdict


def test_readme_deep_example_runs_both_steps():
    namespace = run_example("readme-deep-step")
    assert namespace["method"] == "pcgrad" and float(namespace["metrics"]["finite"]) == 1.0
    assert {name: p.shape for name, p in namespace["predictions"].items()} == {
        "segmentation": (4, 32, 48, 13), "depth": (4, 32, 48, 1), "normal": (4, 32, 48, 3)}

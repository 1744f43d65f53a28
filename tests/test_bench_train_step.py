"""bench/bench_train_step.py times the steps as training runs them: each donates the state it is given, so the memory
XLA reports is the training loop's (the state's buffers reused for the new state, not held twice)."""

import jax
from scripts import load_script


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

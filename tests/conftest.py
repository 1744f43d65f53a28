"""Test configuration: float64 for comparisons against scipy and closed forms, and a hypothesis profile.

JAX compiles on the first call, so hypothesis deadlines are off (a registered profile, loaded here).
"""

import os

# The suite is dominated by XLA compiling many small programs. Without the backend's optimisation passes a compile
# takes about half as long on the CPU, and these programs run about as fast; subprocesses inherit the setting. A
# user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# The heaviest files first (measured: each is dominated by XLA compiles), so that the two workers of the suite's
# file-by-file schedule (pytest-xdist, `-n 2 --dist loadfile` in pyproject.toml) finish at about the same time.
# Order within a file is kept; unlisted files follow in collection order.
HEAVIEST_FIRST = ("test_train_nyuv2.py", "test_deep_train.py", "test_deep_trainer.py", "test_deep_model.py",
                  "test_learned_encoder.py", "test_deep_mtan.py", "test_deep_sharding.py", "test_deep_baselines.py",
                  "test_balancing.py", "test_perceptual.py", "test_bench_flops.py", "test_orthogonality.py",
                  "test_sweep_theta.py", "test_deep_decoders.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

"""Test configuration: float64 for comparisons against scipy and closed forms, and a hypothesis profile.

JAX compiles on the first call, so hypothesis deadlines are off (a registered profile, loaded here).
"""

import os
import subprocess
import sys

# The suite is dominated by XLA compiling many small programs. Without the backend's optimisation passes, and with
# XLA's older elemental emitters in place of the CPU fusion emitters, a compile takes about a third as long (the tiny
# CORE-MTL step: 7.4 s against 23.6 s) and these programs run about as fast. XLA also splits a program's machine code
# into parts compiled on parallel threads, which the suite's two workers leave no core to run: one part saves about a
# tenth of a compile (the tiny CORE-MTL step alone: 13.4 s against 15.0 s; test_deep_train and test_deep_trainer side
# by side: 107-109 s against 112-116 s). Subprocesses inherit the setting.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                      "--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1")


def accepted_by_xla(flags) -> bool:
    """Whether XLA starts with ``flags``: it aborts the whole process on a flag it does not know (a later jaxlib may
    drop one of these), so each set is tried first in a short-lived process."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=120,
                               env=dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu"))
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


# Decided once, by pytest's main process: the xdist workers and every subprocess inherit the variable. A user's own
# XLA_FLAGS replace these flags.
if "XLA_FLAGS" not in os.environ:
    accepted = FAST_COMPILE_FLAGS if accepted_by_xla(FAST_COMPILE_FLAGS) else [
        flag for flag in FAST_COMPILE_FLAGS if accepted_by_xla([flag])]
    if len(accepted) < len(FAST_COMPILE_FLAGS):
        dropped = " ".join(flag for flag in FAST_COMPILE_FLAGS if flag not in accepted)
        # To the real stderr: pytest already captures sys.stderr while it loads this file.
        print(f"conftest.py: XLA refused {dropped}; the suite compiles without it (slower)", file=sys.__stderr__)
    os.environ["XLA_FLAGS"] = " ".join(accepted)

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile("default", deadline=None, max_examples=60, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# The heaviest files first (measured with --durations=0; each is dominated by XLA compiles), so that the two
# workers of the suite's file-by-file schedule (pytest-xdist, `-n 2 --dist loadfile` in pyproject.toml) finish at
# about the same time. Order within a file is kept; unlisted files (each under 15 s) follow in collection order.
HEAVIEST_FIRST = ("test_train_nyuv2.py", "test_train_celeba.py", "test_deep_train.py", "test_balancing.py",
                  "test_deep_sharding.py", "test_deep_attributes.py", "test_deep_mtan.py", "test_deep_model.py",
                  "test_deep_trainer.py", "test_deep_baselines.py", "test_torch_reference.py",
                  "test_learned_encoder.py", "test_bench_flops.py", "test_deep_atrous.py", "test_readme_example.py",
                  "test_deep_decoders.py", "test_sweep_theta.py", "test_bench_celeba_scaling.py", "test_perceptual.py",
                  "test_leakage.py", "test_balancing_loss_based.py", "test_measures.py", "test_orthogonality.py",
                  "test_balancing_solvers.py", "test_data.py", "test_deep_functional.py",
                  "test_balancing_manipulation.py", "test_trained.py")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

"""The CORE-MTL step sharded over four CPU devices gives the update of one device (in a subprocess, since the
device count is fixed when XLA starts)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_sharded_step_equals_the_single_device_step():
    script = textwrap.dedent("""
        import functools, jax, jax.numpy as jnp, numpy as np, optax
        from flax import nnx
        from deep import losses, train
        from deep.backbone import BackboneConfig
        from deep.model import DualStreamModel, ModelConfig
        assert len(jax.devices()) == 4, jax.devices()
        config = ModelConfig(backbone=BackboneConfig(depths=(1, 1, 1, 1), width=2), semantic_channels=6,
                             residual_channels=3, head_channels=4, aspp_rates=(1, 2, 3), grounding="none")
        # Plain SGD: Adam's first step is lr * sign(g), which turns rounding noise in tiny gradients into whole steps.
        optimizer = optax.sgd(1e-2)
        graphdef, state = train.split_model(DualStreamModel(config, nnx.Rngs(0)), optimizer)
        keys = jax.random.split(jax.random.key(1), 4)
        normal = jax.random.normal(keys[3], (4, 16, 16, 3))
        batch = {"images": jax.random.uniform(keys[0], (4, 16, 16, 3)),
                  "segmentation": jax.random.randint(keys[1], (4, 16, 16), 0, 13),
                  "depth": jax.random.uniform(keys[2], (4, 16, 16, 1), minval=0.5),
                  "normal": normal / jnp.linalg.norm(normal, axis=-1, keepdims=True)}
        core_step = functools.partial(train.core_step, graphdef, optimizer, weights=losses.PRESETS["nyuv2"])
        # Compiled per placement with XLA's backend optimisation off, which halves the compile time on the CPU.
        step = lambda *args, **kwargs: jax.jit(core_step).lower(*args, **kwargs).compile(
            {"xla_backend_optimization_level": 0})(*args, **kwargs)
        single, _ = step(state, batch, jax.random.key(0), independence_weight=1.0, counterfactual_on=False)
        mesh = train.data_mesh()
        sharded_batch, sharded_state = train.shard(mesh, batch, state)
        assert len(sharded_batch["images"].sharding.device_set) == 4
        sharded, _ = step(sharded_state, sharded_batch, jax.random.key(0), independence_weight=1.0,
                          counterfactual_on=False)
        pairs = list(zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params),
                         jax.tree.leaves(state.params)))
        worst = max(float(jnp.max(jnp.abs(a - b))) for a, b, _ in pairs)
        largest_update = max(float(jnp.max(jnp.abs(a - p))) for a, _, p in pairs)
        print("max difference", worst, "largest update", largest_update)
        assert largest_update > 0 and worst < 1e-4 * largest_update, (worst, largest_update)
    """)
    # Four CPU devices, keeping the suite's fast-compile flags (tests/conftest.py).
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max difference" in result.stdout

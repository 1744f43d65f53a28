"""The port against PyTorch's own code, through outputs that ``tests/torch_reference.py`` recorded with torch
(``tests/data/torch_reference.npz``), so these checks run without torch: the backbone loaded with torchvision's
weights gives torchvision's features, and LPIPS gives the lpips package's distances. Where torch, torchvision and
lpips are installed, one more test recomputes the record and checks the committed file against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch_reference
from deep.backbone import resnet50
from deep.perceptual import load_lpips_npz, lpips_distance
from deep.weights import load_torchvision_npz

# float32 on both sides: the stages' outputs agree to about 1e-6 (relative, measured), LPIPS's distances to 1e-7.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def record():
    with np.load(torch_reference.REFERENCE) as stored:
        return dict(stored)


def relative_difference(got, expected) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected))


def test_the_backbone_with_torchvisions_weights_gives_torchvisions_features(tmp_path, record):
    np.savez(tmp_path / "resnet50.npz", **torch_reference.backbone_arrays())
    backbone = resnet50(nnx.Rngs(0))
    load_torchvision_npz(backbone, tmp_path / "resnet50.npz")  # the loader users run, OIHW -> HWIO included
    backbone.eval()
    graphdef, state = nnx.split(backbone)
    forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
    with jax.default_matmul_precision("highest"):
        stages = forward(state, jnp.asarray(torch_reference.backbone_images()))
    for name, output in zip(torch_reference.STAGES, stages, strict=True):
        expected = record[f"backbone_{name}"]
        got = torch_reference.project(np.asarray(output))
        assert got.shape == expected.shape, f"{name}: {got.shape} vs torchvision's {expected.shape}"
        difference = relative_difference(got, expected)
        assert difference < TOLERANCE, f"{name}: relative difference {difference:.2e} from torchvision"


def test_lpips_gives_the_lpips_packages_distances(tmp_path, record):
    np.savez(tmp_path / "lpips.npz", **torch_reference.lpips_arrays())
    weights = load_lpips_npz(tmp_path / "lpips.npz")
    x, y = torch_reference.lpips_images()
    with jax.default_matmul_precision("highest"):
        distance = jax.jit(lpips_distance)(weights, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(distance, np.float64), record["lpips_distance"], rtol=TOLERANCE)


def test_the_record_is_what_torch_computes_today(record):
    for package in ("torch", "torchvision", "lpips"):
        pytest.importorskip(package)
    today = torch_reference.compute_reference()
    assert set(today) == set(record)
    for key in sorted(set(record) - {"versions"}):
        assert relative_difference(today[key], record[key]) < TOLERANCE, (key, record["versions"], today["versions"])

"""Hard grounding (Eq (13)): albedo from the residual code, normals from the semantic map, lighting from backbone
features, composed by the SH shading model into a rendered image.

Shapes follow the authors' physics path, with widths configurable for tests:

* ``AlbedoHead``: ẑ_r ``[B, C_r]`` → dense → ``[B, s, s, w]`` → ``upsamples`` × (bilinear ×2 → 3×3 conv → BN → ReLU)
  → 3×3 conv → sigmoid: a square albedo map (128×128 in the authors' code), resized to the image by the model.
* ``NormalHead``: ẑ_s map → ``upsamples`` × (bilinear ×2 → 3×3 conv → BN → ReLU) → 3×3 conv → unit normals.
* ``LightHead``: pooled backbone features → MLP (ReLU, ReLU, LayerNorm) → 27 SH coefficients (9 per colour).

Bilinear ×2 upsampling uses ``align_corners=False`` (:func:`deep.resize.resize_bilinear`), as PyTorch's default.
"""

from __future__ import annotations

import jax
from flax import nnx

from deep.resize import resize_bilinear
from deep.shading import NUM_SH, lambertian_shading, render, unit_vectors


class _UpBlock(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, rngs: nnx.Rngs):
        self.conv = nnx.Conv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x):
        x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
        return jax.nn.relu(self.bn(self.conv(x)))


class AlbedoHead(nnx.Module):
    """ẑ_r ``[B, C_r]`` → albedo ``[B, S, S, 3]`` in [0, 1], with ``S = seed_size · 2^(len(widths) - 1)``."""

    def __init__(self, residual_channels: int, rngs: nnx.Rngs, seed_size: int = 16,
                 widths: tuple[int, ...] = (128, 128, 64, 32)):
        self.seed_size, self.seed_width = seed_size, widths[0]
        self.dense = nnx.Linear(residual_channels, seed_size * seed_size * widths[0], rngs=rngs)
        self.blocks = nnx.List([_UpBlock(a, b, rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Conv(widths[-1], 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, residual_code):
        x = jax.nn.relu(self.dense(residual_code))
        x = x.reshape(-1, self.seed_size, self.seed_size, self.seed_width)
        for block in self.blocks:
            x = block(x)
        return jax.nn.sigmoid(self.out(x))


class NormalHead(nnx.Module):
    """Semantic map ``[B, h, w, C_s]`` → unit normals ``[B, h·2^n, w·2^n, 3]`` (n = ``len(widths)``)."""

    def __init__(self, semantic_channels: int, rngs: nnx.Rngs, widths: tuple[int, ...] = (128, 128, 64, 32)):
        channels = (semantic_channels, *widths)
        self.blocks = nnx.List([_UpBlock(a, b, rngs) for a, b in zip(channels[:-1], channels[1:])])
        self.out = nnx.Conv(widths[-1], 3, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, semantic_map):
        x = semantic_map
        for block in self.blocks:
            x = block(x)
        normals = self.out(x)
        return unit_vectors(normals, 1e-6)


class LightHead(nnx.Module):
    """Pooled features ``[B, C]`` → SH lighting ``[B, 3, 9]``."""

    def __init__(self, in_channels: int, rngs: nnx.Rngs, hidden: int = 128):
        self.fc1 = nnx.Linear(in_channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, epsilon=1e-5, rngs=rngs)
        self.fc3 = nnx.Linear(hidden, 3 * NUM_SH, rngs=rngs)

    def __call__(self, pooled):
        x = self.norm(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(pooled)))))
        return self.fc3(x).reshape(-1, 3, NUM_SH)


class PhysicalDecoder(nnx.Module):
    """Hard grounding: ``(semantic_map, residual_code, pooled_features, image_size) → (rendered, parts)``.

    ``parts`` holds ``albedo``, ``normals``, ``shading`` (each at the image size) and ``lighting``.
    """

    def __init__(self, semantic_channels: int, residual_channels: int, feature_channels: int, rngs: nnx.Rngs,
                 widths: tuple[int, ...] = (128, 128, 64, 32), albedo_seed: int = 16, light_hidden: int = 128):
        self.albedo = AlbedoHead(residual_channels, rngs, albedo_seed, widths)
        self.normals = NormalHead(semantic_channels, rngs, widths)
        self.light = LightHead(feature_channels, rngs, light_hidden)

    def __call__(self, semantic_map, residual_code, pooled_features, image_size):
        albedo = resize_bilinear(self.albedo(residual_code), image_size)
        normals_full = self.normals(semantic_map)
        lighting = self.light(pooled_features)
        shading = resize_bilinear(lambertian_shading(normals_full, lighting), image_size)
        normals = resize_bilinear(normals_full, image_size)  # not renormalised, as the authors' code
        return render(albedo, shading), {"albedo": albedo, "normals": normals, "shading": shading,
                                         "lighting": lighting}

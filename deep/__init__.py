"""The Flax (NNX) port of CORE-MTL's dual-stream vision model: backbone, streams, heads, grounding decoders, losses,
the jitted training steps of CORE-MTL and of the gradient-balancing baselines, devices, data, metrics, checkpoints, a
run's trained model loaded from its folder (:mod:`deep.trained`); and the CelebA attribute model
(:mod:`deep.attributes`).
"""

"""The Flax (NNX) port of CORE-MTL's dual-stream vision model.

Not built yet: the backbone, streams, heads, grounding decoders, losses and the jitted training step are the
subject of a later issue (see the README's roadmap). Importing this package gives nothing else for now.
"""

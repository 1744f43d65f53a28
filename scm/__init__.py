"""Data-generating processes (structural causal models) that the theory checks run on. Nothing about learning."""

from scm.linear_gaussian import (
    DOMAINS,
    LinearGaussianSCM,
    Samples,
    check_theta,
    rotation_encoder,
    sample,
)

__all__ = ["DOMAINS", "LinearGaussianSCM", "Samples", "check_theta", "rotation_encoder", "sample"]

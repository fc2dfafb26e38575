"""Frozen mean/std of calibrated rewards on a reference distribution: the reward transform."""

from calibrated_rlhf.pipelines.normalization.pipeline import create_pipeline

__all__ = ["create_pipeline"]

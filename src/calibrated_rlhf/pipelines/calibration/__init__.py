"""One temperature fitted on the held-out calibration pairs; NLL, Brier, ECE and reliability diagrams."""

from calibrated_rlhf.pipelines.calibration.pipeline import create_pipeline

__all__ = ["create_pipeline"]

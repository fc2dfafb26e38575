"""Runs of an MLflow experiment side by side: table, overlaid curves of every RL method and the verdicts the
scenarios support, per method."""

from calibrated_rlhf.pipelines.reporting.pipeline import create_pipeline

__all__ = ["create_pipeline"]

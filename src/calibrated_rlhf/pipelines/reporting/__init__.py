"""Runs of an MLflow experiment side by side: table, overlaid PPO curves and the verdicts the scenarios support."""

from calibrated_rlhf.pipelines.reporting.pipeline import create_pipeline

__all__ = ["create_pipeline"]

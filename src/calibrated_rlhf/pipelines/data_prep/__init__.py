"""Preference pairs in, validated train / validation / calibration / test splits and a tokenizer out."""

from calibrated_rlhf.pipelines.data_prep.pipeline import create_pipeline

__all__ = ["create_pipeline"]

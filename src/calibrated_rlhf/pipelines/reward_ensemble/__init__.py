"""Reward-model ensembles: K namespaced reward-model members, aggregated, calibrated and reported."""

from calibrated_rlhf.pipelines.reward_ensemble.pipeline import assembly_pipeline, create_pipeline, member_pipeline, namespace

__all__ = ["assembly_pipeline", "create_pipeline", "member_pipeline", "namespace"]

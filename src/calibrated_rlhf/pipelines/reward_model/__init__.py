"""A centered Bradley-Terry reward model trained with TRL's RewardTrainer, evaluated on the test split."""

from calibrated_rlhf.pipelines.reward_model.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""The reference policy PPO starts from (and is anchored to): a short SFT, or a given model."""

from calibrated_rlhf.pipelines.policy_init.pipeline import create_pipeline

__all__ = ["create_pipeline"]

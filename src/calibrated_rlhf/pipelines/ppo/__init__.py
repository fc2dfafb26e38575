"""PPO with an adaptive KL controller on calibrated, normalized rewards."""

from calibrated_rlhf.pipelines.ppo.pipeline import create_pipeline

__all__ = ["create_pipeline"]

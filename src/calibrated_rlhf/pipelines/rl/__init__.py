"""``rl``: RLOO or GRPO (TRL) on the frozen reward transform, with the project's adaptive KL controller."""

from calibrated_rlhf.pipelines.rl.pipeline import create_pipeline

__all__ = ["create_pipeline"]

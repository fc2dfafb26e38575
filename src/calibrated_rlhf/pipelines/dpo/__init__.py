"""``dpo``: DPO (TRL) from the reference policy; its implicit reward calibrated and evaluated like a reward model."""

from calibrated_rlhf.pipelines.dpo.pipeline import create_pipeline

__all__ = ["create_pipeline"]

"""``best_of_n``: the reference policy's samples ranked by the calibrated reward, for n up to the pool's size."""

from calibrated_rlhf.pipelines.best_of_n.pipeline import create_pipeline

__all__ = ["create_pipeline"]

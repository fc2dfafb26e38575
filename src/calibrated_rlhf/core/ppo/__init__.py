"""PPO for language models with an adaptive KL controller (plain library: no Kedro, no MLflow).

Entry points: :class:`PPOConfig` (every hyperparameter) and :class:`PPOTrainer`
(``step()`` runs one update, ``train()`` runs many, with checkpoints and resume).
"""

from calibrated_rlhf.core.ppo.config import PPOConfig
from calibrated_rlhf.core.ppo.gae import compute_gae, masked_mean, masked_whiten
from calibrated_rlhf.core.ppo.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    make_kl_controller,
)
from calibrated_rlhf.core.ppo.losses import clipped_policy_loss, clipped_value_loss
from calibrated_rlhf.core.ppo.rollout import PolicyAndValue, sample_responses
from calibrated_rlhf.core.ppo.trainer import (
    PPOEarlyStop,
    PPOResult,
    PPOTrainer,
    ScoreFn,
    latest_checkpoint,
    list_checkpoints,
)

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PPOConfig",
    "PPOEarlyStop",
    "PPOResult",
    "PPOTrainer",
    "PolicyAndValue",
    "ScoreFn",
    "clipped_policy_loss",
    "clipped_value_loss",
    "compute_gae",
    "kl_per_token",
    "latest_checkpoint",
    "list_checkpoints",
    "make_kl_controller",
    "masked_mean",
    "masked_whiten",
    "sample_responses",
]

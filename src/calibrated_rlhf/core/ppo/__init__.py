"""PPO for language models with an adaptive KL controller (plain library: no Kedro, no MLflow).

Usage::

    config = PPOConfig(num_updates=200, batch_size=16, kl_target=6.0, checkpoint_dir="ckpt",
                       checkpoint_every=50, sample_every=10)
    trainer = PPOTrainer(config, policy, tokenizer, prompts, score_fn)
    result = trainer.train()                      # or trainer.train(resume_from="latest")
    result.history[-1]["ppo/objective/beta"], result.stopped_early, result.samples

``score_fn(prompts: list[str], responses: list[str]) -> dict[str, Tensor]`` returns at least
``"normalized"`` (shape [batch]: the reward in normalized units, i.e. the units ``beta`` is in;
``config.score_key`` names another entry to optimize instead); every entry (``"raw"``,
``"calibrated"``, ``"gold"``, ``"ensemble_std"``, ...) is logged as a batch mean under
``ppo/rewards/<key>``. A response is cut at its first EOS, decoded without special tokens, as the
continuation of its prompt (``prompt + response`` is the decoded text, leading space included).
Under several processes each rank scores its own shard; the keys must be the same every call. A
``score_fn`` with state (``state_dict()`` / ``load_state_dict()``, as ``core.scoring.RLScoreFn`` keeps the
running moments of ``running_zscore``) has it saved in every checkpoint and restored on resume.

The per-token reward is ``-beta * reward_scale * KL_t`` with the normalized score (minus
``missing_eos_penalty * reward_scale`` when a response has no EOS) added on its last token.

Metrics (``step()`` returns them, ``trainer.history`` keeps them) are named ``ppo/<group>/<name>``
so they map onto MLflow keys: ``objective/{kl,beta,beta_effective,kl_target,score,
non_score_reward,rlhf_reward,beta_next}``, ``rewards/<key>``, ``policy/{entropy,clipfrac,approx_kl,
ratio}``, ``value/{loss,clipfrac,explained_variance,mean}``, ``losses/{policy,total}``,
``rollout/{response_length,eos_fraction}``, ``optim/{grad_norm,lr}``, ``perf/{episodes_per_s,
update_s,rollout_s,generate_s,score_s}``, ``step``, ``episodes``.

Checkpoints, run folders and the resume fingerprint: ``core.checkpointing`` (shared with RLOO and GRPO);
the KL estimators and controllers: ``core.kl`` and ``core.kl_controller``.
"""

from calibrated_rlhf.core.ppo.config import PPOConfig
from calibrated_rlhf.core.ppo.gae import compute_gae, masked_mean, masked_whiten
from calibrated_rlhf.core.ppo.losses import clipped_policy_loss, clipped_value_loss
from calibrated_rlhf.core.ppo.rollout import PolicyAndValue, sample_responses
from calibrated_rlhf.core.ppo.trainer import PPOEarlyStop, PPOResult, PPOTrainer, ScoreFn

__all__ = ["PPOConfig", "PPOEarlyStop", "PPOResult", "PPOTrainer", "PolicyAndValue", "ScoreFn", "clipped_policy_loss",
           "clipped_value_loss", "compute_gae", "masked_mean", "masked_whiten", "sample_responses"]

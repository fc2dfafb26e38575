"""Checkpoints, run folders, atomic writes and resume fingerprints, shared by PPO (``core.ppo``) and by RLOO and
GRPO (``core.rl``): ``checkpoints`` holds the layout and the lookups, ``trl_checkpoints`` fits TRL's trainers to it.

Layout under a checkpoint root (one folder per run)::

    <root>/<run>/run.json          who trains into this folder (host, pid) and what it resumed from
    <root>/<run>/update_000040/    one complete checkpoint: policy/ and value_model/ (``save_pretrained``),
                                   optimizer.pt, trainer_state.json (update, KL controller, data position,
                                   history, samples, config, resume fingerprint), rng_state_<rank>.pt,
                                   score_state_<rank>.json; RLOO and GRPO keep TRL's own under trl/
    <root>/<run>/COMPLETE          written once the run has finished

``find_resumable(root, fingerprint)`` finds the newest interrupted run of the same configuration.
"""

from calibrated_rlhf.core.checkpointing.checkpoints import (
    COMPLETE_FILE,
    ResumeMismatchError,
    ResumePoint,
    describe_mismatches,
    digest,
    find_resumable,
    latest_checkpoint,
    list_checkpoints,
    resolve_resume,
)

__all__ = [
    "COMPLETE_FILE",
    "ResumeMismatchError",
    "ResumePoint",
    "describe_mismatches",
    "digest",
    "find_resumable",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_resume",
]

"""RLOO and GRPO checkpoints in PPO's layout, so that one lookup (``core.checkpointing.checkpoints``) serves both.

A run folder (``run.json`` and ``COMPLETE`` as PPO's) holds::

    update_000040/trainer_state.json        update, resume fingerprint, the log so far, what this run resumed from
    update_000040/trl/                      TRL's own checkpoint: weights, optimizer, scheduler, RNG states, and
                                            the callbacks' ExportableState (the KL controller, core.rl.kl_control)
    update_000040/score_state_<rank>.json   the reward's own state (running_zscore's moments), per process

TRL writes ``checkpoint-<step>`` into its ``output_dir``, a staging folder inside the run folder;
:class:`PublishCheckpoints` moves it, with the rest, into a staging checkpoint and publishes that by PPO's
fsync-and-rename (``write_checkpoint``), so a killed run leaves a complete checkpoint or none, and
``resume_from: latest`` finds an interrupted RL run as it finds a PPO one. The reward's state is written by
every process (each scores its own completions) rather than kept as an ``ExportableState``, which only the
main process saves.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel
from transformers import TrainerCallback

from calibrated_rlhf.core.checkpointing import checkpoints as ckpt
from calibrated_rlhf.core.checkpointing.checkpoints import ResumePoint
from calibrated_rlhf.core.staging import make_staging_dir

TRL_DIR = "trl"


def resume_fingerprint(config: BaseModel, reference_policy: Any, tokenizer: Any, prompts: Sequence[Any],
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """PPO's resume fingerprint (``checkpoints.resume_fingerprint``) of an RL run: every field of its ``config``
    (``core.rl.config.RLConfig``; ``num_updates`` too: a linear schedule decays to 0 at the last update), the reference
    policy's weights (the policy starts from them), the tokenizer and its chat template, the prompts, the
    number of processes, and ``extra`` (the reward model, the reward transform, ...)."""
    from accelerate import PartialState

    weights = ckpt.weights_fingerprint(reference_policy)
    return ckpt.resume_fingerprint(
        config, reference_policy=weights, initial_policy=weights, tokenizer=ckpt.tokenizer_fingerprint(tokenizer),
        prompts=prompts, world_size=PartialState().num_processes, exclude=(),
        extra={"chat_template": ckpt.digest(getattr(tokenizer, "chat_template", None)), **(extra or {})})


@dataclass
class Checkpointing:
    """Where an RL run checkpoints (``run_dir``, every ``every`` updates, the newest ``keep``; ``every`` None:
    no checkpoints) and which checkpoint it continues (``resume``), under its ``fingerprint``."""

    run_dir: Path
    fingerprint: dict[str, Any]
    every: int | None = None
    keep: int | None = None
    resume: ResumePoint | None = None

    @property
    def saving(self) -> bool:
        return self.every is not None


@contextmanager
def trl_output_dir(run_dir: Path) -> Iterator[Path]:
    """TRL's ``output_dir``: a staging folder in the run folder (one filesystem, so checkpoints are moved, not
    copied), named by the main process (every rank writes its RNG state into it); removed on exit, or by
    ``sweep_stale`` once its writer is gone."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    box = [str(make_staging_dir(run_dir, TRL_DIR)) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    try:
        yield Path(box[0])
    finally:
        if state.is_main_process:
            shutil.rmtree(box[0], ignore_errors=True)


class PublishCheckpoints(TrainerCallback):
    """After TRL saves ``checkpoint-<step>``, publishes ``update_<step>/`` in the run folder (module docstring).

    ``reward``: the reward callable, whose ``state_dict`` (if any) goes to ``score_state_<rank>.json``;
    ``points``: the log records so far (``HistoryCallback.points``), kept so a resumed run reports the whole run."""

    def __init__(self, trainer: Any, plan: Checkpointing, reward: Any, points: list[dict[str, float]]) -> None:
        self.trainer, self.plan, self.reward, self.points = trainer, plan, reward, points

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        step = int(state.global_step)
        saved = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        acc = self.trainer.accelerator
        acc.wait_for_everyone()  # every rank has written its RNG state into ``saved``
        record = {"update": step, "fingerprint": self.plan.fingerprint, "world_size": acc.num_processes,
                  "saved_at": time.time(), "history": self.points,
                  "resumed_from": self.plan.resume.as_dict() if self.plan.resume is not None else None}

        def write_shared(folder: Path) -> None:
            os.replace(saved, folder / TRL_DIR)
            (folder / ckpt.STATE_FILE).write_text(json.dumps(record, indent=1))

        def write_own(folder: Path) -> None:
            ckpt.save_score_state(self.reward, folder, acc.process_index)

        ckpt.write_checkpoint(self.plan.run_dir, ckpt.ckpt_name(step), acc, write_shared, write_own, self.plan.keep)


def attach(trainer: Any, plan: Checkpointing, reward: Any, points: list[dict[str, float]]) -> str | None:
    """Wire ``plan`` into a built TRL trainer before ``train``: restore what it resumes (:func:`restore`),
    publish its checkpoints, mark the run folder started; returns TRL's checkpoint to resume from, or None."""
    resume = restore(plan, reward, points)
    if plan.saving:
        trainer.add_callback(PublishCheckpoints(trainer, plan, reward, points))
    mark_started(plan)
    return resume


def restore(plan: Checkpointing, reward: Any, points: list[dict[str, float]]) -> str | None:
    """Before training: check the resumed checkpoint's fingerprint, restore the reward's state and the log so
    far (into ``points``); returns TRL's checkpoint folder for ``train(resume_from_checkpoint=...)``, or None."""
    if plan.resume is None:
        return None
    from accelerate import PartialState

    path = plan.resume.checkpoint
    saved = ckpt.read_state(path)
    ckpt.check_fingerprint(path, saved.get("fingerprint") or {}, plan.fingerprint)
    if not (path / TRL_DIR).is_dir():
        raise FileNotFoundError(f"cannot resume from {path}: no {TRL_DIR}/ in it (a PPO checkpoint?)")
    ckpt.load_score_state(reward, path, PartialState().process_index)
    points[:] = saved.get("history", [])
    return str(path / TRL_DIR)


def mark_started(plan: Checkpointing) -> None:
    from accelerate import PartialState

    if plan.saving and PartialState().is_main_process:
        ckpt.mark_started(plan.run_dir, plan.resume.as_dict() if plan.resume is not None else None)


def mark_complete(plan: Checkpointing, update: int) -> None:
    from accelerate import PartialState

    if plan.saving and PartialState().is_main_process:
        ckpt.mark_complete(plan.run_dir, {"update": update, "stopped_early": False, "stop_reason": None})

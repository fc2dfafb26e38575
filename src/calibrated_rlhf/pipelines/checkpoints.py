"""Run folders and resuming for the training stages that checkpoint (ppo, rl): one design, one lookup.

Each run checkpoints into ``<checkpoint_root>/<MLflow run id>/`` and ``resume_from`` picks what it continues
(``core.checkpointing.checkpoints.resolve_resume``: ``latest`` is the newest interrupted run of the same resume
fingerprint). The run folder and what was resumed are logged to the run as ``<stage>.checkpoint_dir`` and
``<stage>.resumed_from_{run,update,checkpoint}`` params (and ``<stage>/resumed_from_*`` tags) as soon as they
are known, so a run killed later still says where its checkpoints are.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from calibrated_rlhf.core.checkpointing import ResumePoint, describe_mismatches, resolve_resume
from calibrated_rlhf.core.staging import sweep_stale
from calibrated_rlhf.pipelines import tracking

log = logging.getLogger(__name__)


class CheckpointParams(BaseModel):
    """How often a stage checkpoints and what it resumes; its ``checkpoint_root`` is the stage's own."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must fail, not leave the default in force

    checkpoint_every: int | None = Field(20, gt=0, description="Updates between checkpoints; null = none.")
    keep_checkpoints: int | None = Field(2, gt=0, description="Newest checkpoints kept per run; null = all.")
    resume_from: str | None = Field(
        None,
        description="null: a fresh run. 'latest': the newest interrupted run (not COMPLETE) under "
        "checkpoint_root with this exact configuration (see core.checkpointing.checkpoints.find_resumable). "
        "A checkpoint folder, or a run folder (its newest checkpoint). Any configuration difference is an error naming "
        "the field; the resumed run's own checkpoints go to its own folder.")


def checkpoint_folder(root: Path) -> Path:
    """This run's checkpoint folder under ``root``, after clearing what dead writers left there."""
    if is_main_process():
        for path in sweep_stale(root):
            log.warning("removed %s, a checkpoint staging folder left by a process that is gone", path)
    return root / run_folder_name()


def prepare_resume(stage: str, label: str, resume_from: str | None, root: Path, fingerprint: dict[str, Any],
                   run_dir: Path, saving: bool) -> ResumePoint | None:
    """Say where this run checkpoints (when ``saving``); choose what it resumes from, and say that too.

    ``stage`` prefixes the logged params (``ppo``, ``rl``); ``label`` names the trainer in messages."""
    if saving:
        log.info("%s checkpoints of this run go to %s", label, run_dir)
        track(params={f"{stage}.checkpoint_dir": str(run_dir)})
    resume = resume_point(resume_from, root, fingerprint, run_dir)
    if resume is not None:
        log_resume(stage, label, resume, run_dir if saving else None)
    return resume


def resume_point(resume_from: str | None, root: Path, fingerprint: dict[str, Any],
                 run_dir: Path) -> ResumePoint | None:
    """Chosen on the main process (it decides which writers are alive) and shared with every rank, errors
    included, so that no rank waits for one that has given up."""
    outcome: Any = None
    if is_main_process():
        try:
            outcome = resolve_resume(resume_from, root, fingerprint, exclude=[run_dir])
        except (OSError, ValueError) as e:
            outcome = e
    outcome = from_main_process(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def log_resume(stage: str, label: str, resume: ResumePoint, run_dir: Path | None) -> None:
    for run, diffs in resume.skipped:
        log.warning("resume_from=latest passed over the newer interrupted run %s: another configuration (%s)",
                    run, describe_mismatches(diffs))
    log.info("%s resumes run %s from update %d (%s); %s", label, resume.run, resume.update, resume.checkpoint,
             f"its new checkpoints go to {run_dir}" if run_dir is not None else "no new checkpoints")
    values = {f"{stage}.resumed_from_run": resume.run, f"{stage}.resumed_from_update": resume.update,
              f"{stage}.resumed_from_checkpoint": str(resume.checkpoint)}
    track(params=values, tags={k.replace(f"{stage}.", f"{stage}/"): v for k, v in values.items()})


def track(params: dict[str, Any] | None = None, tags: dict[str, Any] | None = None) -> None:
    """Log to the active MLflow run from the main process; nothing when no run is tracked."""
    if is_main_process():
        tracking.log_params_and_tags(params, tags)


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def from_main_process(value: Any) -> Any:
    """The main process's ``value`` on every rank (as is, in a single process)."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    box = [value]
    if PartialState().num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def run_folder_name() -> str:
    """This run's checkpoint folder name, the same on every rank: the active MLflow run's id (kedro-mlflow
    opens it, on the main process only under ``calibrated_rlhf.runtime.launch``), else a fresh uuid. Never a clock:
    two runs started in the same second would share a folder."""
    run_id = tracking.active_run_id() if is_main_process() else None
    return from_main_process(run_id if run_id is not None else uuid.uuid4().hex)

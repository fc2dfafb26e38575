"""Any training stage on several processes (GPUs), under ``accelerate launch``: a real ``kedro run`` on every rank.

    accelerate launch --num_processes 4 -m calibrated_rlhf.runtime.launch --pipelines ppo \\
        [--env ENV] [--params k=v,...] [--load-versions ds:version,...]
    python -m torch.distributed.run --nproc_per_node 2 -m calibrated_rlhf.runtime.launch --env tiny \\
        --pipelines reward_model

Every rank runs the same ``KedroSession.run``, so every project hook applies as in ``kedro run``: versions
pinned at start and completion markers (``run_integrity``), provenance and ``run_config/`` (so
``python -m calibrated_rlhf.runtime.replay RUN_ID`` replays a launched run), crash recovery, the tracking-server
check. The ranks differ in two ways:

- **Versions.** The main process resolves the upstream versions once (the ``--load-versions`` pins, else
  the newest version of a completed run) and broadcasts them; every rank runs with them as its
  ``load_versions``, so no rank can load a version another run completed in between.
- **Outputs and tracking.** Only the main process saves outputs and tracks: on the other ranks kedro-mlflow
  is disabled (``settings.DISABLE_HOOKS_FOR_PLUGINS``) and the pipeline's outputs are kept in memory
  (``hooks.LaunchedRanks``). N processes give one version of each output and one MLflow run.

What trains data-parallel is the nodes' business: TRL's RewardTrainer and SFTTrainer (``reward_model``,
``policy_init``) and the PPO trainer use accelerate, so batch sizes are per process. Nodes that do not
(data_prep, calibration, evaluation) run on every rank alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from calibrated_rlhf.core import metric_keys

T = TypeVar("T")

# "<process index>/<number of processes>", set by the launcher on every rank before Kedro reads the settings.
LAUNCH_ENV = "CALIBRATED_RLHF_LAUNCH"

# Metrics that say how many processes trained a stage, where the stage's results depend on it (PPO's
# batch is per process); logged by the main process.
STAGE_NUM_PROCESSES_METRIC = {"ppo": metric_keys.PPO_NUM_PROCESSES}


@dataclass(frozen=True)
class Rank:
    """This process's place in a launch."""

    index: int
    processes: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def current_rank() -> Rank | None:
    """This process's rank in a launch; None outside one (a plain ``kedro run``)."""
    value = os.environ.get(LAUNCH_ENV)
    if not value:
        return None
    index, processes = value.split("/")
    return Rank(int(index), int(processes))


def is_secondary_rank() -> bool:
    """A launched process other than the main one: it trains, but neither saves nor tracks."""
    rank = current_rank()
    return rank is not None and not rank.is_main


def launch_tags() -> dict[str, str]:
    """Tags of a launched run (empty for a plain ``kedro run``)."""
    rank = current_rank()
    if rank is None:
        return {}
    return {"provenance/launcher": f"accelerate, {rank.processes} process{'es' if rank.processes != 1 else ''}",
            "provenance/num_processes": str(rank.processes)}


def stage_metrics(pipeline_names: list[str] | None) -> dict[str, float]:
    """The number-of-processes metric of each launched stage that has one."""
    rank = current_rank()
    if rank is None:
        return {}
    return {STAGE_NUM_PROCESSES_METRIC[name]: float(rank.processes)
            for name in pipeline_names or () if name in STAGE_NUM_PROCESSES_METRIC}


# ---- the launch -------------------------------------------------------------------------------------


def _join_processes() -> Any:
    """accelerate's process state, shared by every ``Accelerator`` the nodes build."""
    import torch
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        # On CPU, accelerate joins the launched processes only when asked to. transformers' TrainingArguments
        # (TRL's trainers) rebuilds accelerate's state and asks only when this says so, as `accelerate
        # launch --cpu` sets it; without it the reward model and SFT would train once per rank, not in DDP.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=on_cpu)


def _from_main(compute: Callable[[], T], state: Any) -> T:
    """``compute()`` on the main process, its result on every rank; its error too, so no rank waits for
    one that has given up (the other ranks get the message, the main one the exception itself)."""
    result: Any = None
    error: BaseException | None = None
    if state.is_main_process:
        try:
            result = compute()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
            result = ("error", f"{type(err).__name__}: {err}")
        else:
            result = ("ok", result)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result]
        broadcast_object_list(box, from_process=0)
        result = box[0]
    if error is not None:
        raise error
    kind, value = result
    if kind == "error":
        raise RuntimeError(f"the main process failed: {value}")
    return value


def upstream_versions(project: Path, env: str | None, runtime_params: dict[str, Any] | None,
                      pipeline_names: list[str], pins: dict[str, str]) -> dict[str, str]:
    """The versions every rank loads: the user's pins, and every other versioned input of the pipelines at
    the newest version of a completed run (what ``run_integrity`` pins at the start of a run).

    An input that no completed run has produced is an error here, naming it, before any rank starts.
    """
    from kedro.framework.project import pipelines
    from kedro.pipeline import Pipeline

    from calibrated_rlhf.runtime.run_integrity import quiet_catalog, resolve_versions

    pipeline = sum((pipelines[name] for name in pipeline_names), Pipeline([]))
    resolved = resolve_versions(pipeline, quiet_catalog(project, env, runtime_params), pins)
    produced = pipeline.all_outputs()
    return {**pins, **{name: v for name, v in resolved.items() if name not in produced}}


def launch(pipeline_names: list[str], env: str | None = None, runtime_params: dict[str, Any] | None = None,
           load_versions: dict[str, str] | None = None, project_path: str | os.PathLike[str] = ".") -> None:
    """Run ``pipeline_names`` as one ``kedro run`` on every launched process (or on this one alone)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro.runner import SequentialRunner

    state = _join_processes()
    # Before Kedro reads the settings: they disable kedro-mlflow on secondary ranks.
    os.environ[LAUNCH_ENV] = f"{state.process_index}/{state.num_processes}"
    project = Path(project_path).resolve()
    env = env or os.environ.get("KEDRO_ENV")
    bootstrap_project(project)
    pins = _from_main(lambda: upstream_versions(project, env, runtime_params, pipeline_names, load_versions or {}),
                      state)
    with KedroSession.create(project_path=project, env=env, runtime_params=runtime_params or None) as session:
        # The runner kedro run would build, named in the run's record as kedro run names it.
        session.run(pipeline_names=pipeline_names, load_versions=pins, runner=SequentialRunner())
    # Leave the process group before the interpreter exits: left to exit, the collective backend's threads
    # can abort a rank that has finished ("terminate called without an active exception").
    state.wait_for_everyone()
    state.destroy_process_group()


# ---- command line -----------------------------------------------------------------------------------


# kedro run's own parsers, so that --pipelines, --params and --load-versions mean exactly what they mean
# there; imported when called, since settings import this module in every `kedro` command.


def _split_string(ctx: click.Context, param: Any, value: str) -> list[str]:
    from kedro.framework.cli.utils import split_string

    return split_string(ctx, param, value)


def _split_params(ctx: click.Context, param: Any, value: Any) -> Any:
    from kedro.framework.cli.utils import _split_params

    return _split_params(ctx, param, value)


def _split_load_versions(ctx: click.Context, param: Any, value: str) -> dict[str, str]:
    from kedro.framework.cli.utils import _split_load_versions

    return _split_load_versions(ctx, param, value)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__.split("\n\n")[0])
@click.option("--pipelines", "-p", required=True, callback=_split_string,
              help="Registered pipelines to run, comma separated (reward_model, policy_init, ppo, ...).")
@click.option("--env", "-e", default=None, envvar="KEDRO_ENV", help="Kedro environment (conf/<env>).")
@click.option("--params", type=click.UNPROCESSED, default="", callback=_split_params,
              help="key=value,... as for kedro run (dotted keys for nested parameters).")
@click.option("--load-versions", "-lv", default="", callback=_split_load_versions,
              help="dataset:version,... as for kedro run.")
@click.option("--project-path", default=".", type=click.Path(file_okay=False), help="The Kedro project (default: here).")
def cli(pipelines: list[str], env: str | None, params: dict[str, Any], load_versions: dict[str, str],
        project_path: str) -> None:
    launch(pipelines, env=env, runtime_params=params, load_versions=load_versions, project_path=project_path)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=sys.argv[1:] if argv is None else argv, prog_name="python -m calibrated_rlhf.runtime.launch")


if __name__ == "__main__":
    main()

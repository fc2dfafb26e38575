"""The ``ppo`` stage on several processes (GPUs), under ``accelerate launch``.

    accelerate launch --num_processes 4 -m calibrated_rlhf.ppo_launch [--env ENV] [--load-versions ds:ver,...]
    python -m torch.distributed.run --nproc_per_node 2 -m calibrated_rlhf.ppo_launch --env tiny   # CPU check

Every process loads the same upstream artifacts from the catalog (the latest versions, or those pinned
with ``--load-versions``) and runs the same ``train_ppo`` node; the trainer's ``Accelerator`` wraps the
models in DDP and reduces the statistics the KL controller sees, so every rank holds the same beta.
With a reward ensemble the members are loaded by the names the transform's ensemble implies
(``member_<i>.reward_model``). Only the main process saves the node's outputs through the catalog (versioned, as ``kedro run`` would)
and logs the run to MLflow, so N processes give one policy version and one MLflow run. That run is opened
before training: its id, broadcast to every rank, names the run's checkpoint folder
(``<ppo.checkpoint_root>/<run id>/``), and a resume is recorded on it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

INPUTS = ("reference_policy", "tokenizer", "reward_transform", "reference_responses", "train_pairs", "test_pairs",
          "synthetic_task")


def load_reward_model(catalog: Any, reward_transform: dict[str, Any]) -> Any:
    """The reward model the transform was computed for: one model, or the ensemble of its members."""
    from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble

    if not reward_transform.get("ensemble"):
        return catalog.load("reward_model")
    spec = EnsembleSpec.from_dict(reward_transform["ensemble"])
    return RewardEnsemble([catalog.load(f"member_{i}.reward_model") for i in range(spec.size)], spec)


def _load_versions(text: str | None) -> dict[str, str]:
    pairs = [item.split(":", 1) for item in (text or "").split(",") if item]
    return {name: version for name, version in pairs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=None, help="Kedro environment (conf/<env>)")
    parser.add_argument("--load-versions", default=None, help="ds:version,... as for kedro run")
    parser.add_argument("--project-path", default=".", help="the Kedro project (default: here)")
    args = parser.parse_args(argv)

    from accelerate import PartialState
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    from calibrated_rlhf.pipelines.ppo import nodes

    import torch

    # On CPU, accelerate joins the launched processes only when asked to (cpu=True); the trainer's
    # Accelerator then shares this state.
    state = PartialState(cpu=not torch.cuda.is_available())
    project = Path(args.project_path).resolve()
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=args.env) as session:
        context = session.load_context()  # kedro-mlflow's hook sets the tracking URI here
        catalog = context._get_catalog(load_versions=_load_versions(args.load_versions))
        data: dict[str, Any] = {name: catalog.load(name) for name in INPUTS}
        raw = context.params["ppo"]  # Kedro has already built the typed model
        params = raw if isinstance(raw, nodes.PPOParams) else nodes.PPOParams(**raw)
        reward_model = load_reward_model(catalog, data["reward_transform"])
        # The main process's MLflow run is open during training (the node names the checkpoint folder
        # after it and records a resume on it); a failure ends it FAILED, a kill leaves it RUNNING.
        with _mlflow_run(state.is_main_process, state.num_processes):
            policy, history, samples, figure, summary = nodes.train_ppo(
                data["reference_policy"], data["tokenizer"], reward_model, data["reward_transform"],
                data["reference_responses"], data["train_pairs"], data["synthetic_task"], params)
            if not state.is_main_process:
                return
            evaluation = nodes.evaluate_policy(policy, data["reference_policy"], data["tokenizer"],
                                               data["test_pairs"], data["synthetic_task"], params)
            _publish(catalog, context.params, state.num_processes, policy, history, samples, figure,
                     {**summary, **evaluation})


def _mlflow_run(is_main: bool, n_processes: int) -> contextlib.AbstractContextManager:
    """One MLflow run, on the main process only; tagged with its host and pid so that the next run can
    mark it KILLED if this process is killed (``calibrated_rlhf.crash_recovery``)."""
    if not is_main:
        return contextlib.nullcontext()
    import mlflow

    from calibrated_rlhf.core.staging import host_name

    run = mlflow.start_run(run_name=f"ppo ({n_processes} processes)")
    mlflow.set_tags({"provenance/launcher": f"accelerate, {n_processes} processes",
                     "run/host": host_name(), "run/pid": str(os.getpid())})
    return run


def _publish(catalog: Any, params: dict[str, Any], n_processes: int, policy: Any, history: dict, samples: Any,
             figure: Any, metrics: dict) -> None:
    """Save the outputs through the catalog and log them to the active MLflow run."""
    import mlflow

    from calibrated_rlhf.hooks import flatten

    for name, value in (("policy", policy), ("ppo_samples", samples), ("kl_control_diagram", figure)):
        catalog.save(name, value)
    ppo = params.get("ppo")
    ppo = ppo.model_dump(mode="json") if hasattr(ppo, "model_dump") else dict(ppo or {})
    mlflow.log_params({k: str(v)[:6000] for k, v in flatten(ppo, "ppo").items()})
    for key, points in {**history, **metrics}.items():
        for p in points if isinstance(points, list) else [points]:
            mlflow.log_metric(key, p["value"], step=p["step"])
    mlflow.log_figure(figure, "plots/kl_control_diagram.png")
    mlflow.log_metric("ppo/perf/num_processes", n_processes)


if __name__ == "__main__":
    main()

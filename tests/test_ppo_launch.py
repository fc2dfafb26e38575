"""The ppo stage on two CPU processes through the launcher: one policy version, one MLflow run."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.project import kedro, make_project

pytestmark = pytest.mark.slow


def test_two_processes_train_one_policy_and_log_one_run(tmp_path):
    project = make_project(tmp_path)
    assert kedro(project, "--env", "tiny", "--pipelines", "data_prep,reward_model,calibration,policy_init,"
                 "normalization").returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "KEDRO_DISABLE_TELEMETRY": "true",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "calibrated_rlhf.ppo_launch", "--env", "tiny"],
        cwd=project, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((project / "data" / "06_models" / "policy").iterdir())) == 1  # saved once, by rank 0
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("calibrated_rlhf").experiment_id],
                              filter_string="tags.`provenance/launcher` != ''")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["ppo/perf/num_processes"] == 2
    betas = client.get_metric_history(run.info.run_id, "ppo/objective/beta")
    assert len(betas) == 3
    # one checkpoint folder, named after the main process's MLflow run, written by both ranks
    (run_dir,) = list((project / "data" / "06_models" / "ppo_checkpoints").iterdir())
    assert run_dir.name == run.info.run_id and run.data.params["ppo.checkpoint_dir"].endswith(run_dir.name)
    assert (run_dir / "COMPLETE").is_file() and not list(run_dir.glob(".*"))
    last = sorted(run_dir.glob("update_*"))[-1]
    assert last.name == "update_000003" and {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in last.iterdir()}
    # the ranks' logs show the same KL statistics: the controller saw globally reduced values
    import re

    text = re.sub(r"\s+", " ", proc.stdout + proc.stderr)
    kls = re.findall(r"'ppo/eval/kl_second_half_mean': ([-0-9.e]+)", text)
    betas_logged = re.findall(r"'ppo/eval/final_beta': ([-0-9.e]+)", text)
    assert len(kls) == 2 and len(set(kls)) == 1, kls  # one summary per rank, equal
    assert len(betas_logged) == 2 and len(set(betas_logged)) == 1, betas_logged

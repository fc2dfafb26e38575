"""Training stages on two CPU processes through the launcher (`python -m calibrated_rlhf.runtime.launch`).

Every rank runs a real `kedro run`: one version of each output (saved by rank 0, with its completion
marker), one MLflow run with the project's provenance and `run_config/`, so the run replays. The reward
model and the SFT policy train data-parallel; PPO's ranks see globally reduced KL statistics.
"""

from __future__ import annotations

import math
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.project import kedro_env, make_project

pytestmark = pytest.mark.slow

UPSTREAM = "data_prep,reward_model,calibration,policy_init,normalization"


def launch(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m calibrated_rlhf.runtime.launch ARGS` in ``project``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**kedro_env(project), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "calibrated_rlhf.runtime.launch", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=600)


def versions(project: Path, folder: str) -> list[str]:
    return sorted(p.name for p in (project / "data" / folder).iterdir())


def launched_runs(client, pipelines: str) -> list:
    exp = client.get_experiment_by_name("calibrated_rlhf")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`provenance/launcher` != '' and "
                                                                 f"tags.`provenance/pipelines` = '{pipelines}'")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """Every stage before PPO, launched on two processes (data_prep and calibration run on both ranks alike)."""
    from mlflow import MlflowClient

    project = make_project(tmp_path_factory.mktemp("launch"))
    proc = launch(project, "--env", "tiny", "--pipelines", UPSTREAM)
    assert proc.returncode == 0, proc.stderr[-4000:]
    client = MlflowClient(kedro_env(project)["MLFLOW_TRACKING_URI"])
    return project, client


@pytest.fixture(scope="module")
def ppo(upstream):
    """The ppo stage launched with --params; what it left, listed before anything else runs."""
    project, client = upstream
    proc = launch(project, "--env", "tiny", "--pipelines", "ppo",
                  "--params", "scenario=launched,ppo.evaluation.seed=7")
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoints = project / "data" / "06_models" / "ppo_checkpoints"
    return proc, versions(project, "06_models/policy"), sorted(checkpoints.iterdir())


def test_reward_model_and_sft_train_data_parallel_and_save_once(upstream):
    from kedro.config import OmegaConfigLoader

    from calibrated_rlhf.settings import CONFIG_LOADER_ARGS

    project, client = upstream
    (run,) = launched_runs(client, ",".join(sorted(UPSTREAM.split(","))))
    # the secondary rank opened no run of its own
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert run.data.tags["provenance/num_processes"] == "2"
    for folder in ("06_models/reward_model", "06_models/reference_policy", "06_models/tokenizer",
                   "06_models/reward_transform.json", "03_primary/train_pairs.parquet"):
        (version,) = versions(project, folder)  # saved once, by rank 0
        assert version == run.data.tags["run_id"], folder
        assert (project / "data" / folder / version / "_complete.json").is_file(), folder
    # one optimizer step per global batch of 2 processes x per-device batch: the trainers ran in DDP
    params = OmegaConfigLoader(str(project / "conf"), env="tiny", **CONFIG_LOADER_ARGS)["parameters"]
    n_train = run.data.metrics["data/n_train"]
    for key, block in (("rm/train/runtime_s", params["reward_model"]["training"]),
                       ("policy_init/train/runtime_s", params["policy_init"]["sft"])):
        (point,) = client.get_metric_history(run.info.run_id, key)
        assert point.step == math.ceil(n_train / (2 * block["per_device_train_batch_size"])) * \
            block.get("num_train_epochs", 1), key


def test_two_processes_train_one_policy_and_log_one_run(upstream, ppo):
    project, client = upstream
    proc, policy_versions, checkpoint_dirs = ppo
    assert len(policy_versions) == 1  # saved once, by rank 0
    runs = launched_runs(client, "ppo")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["ppo/perf/num_processes"] == 2
    betas = client.get_metric_history(run.info.run_id, "ppo/objective/beta")
    assert len(betas) == 3
    # one checkpoint folder, named after the main process's MLflow run, written by both ranks
    (run_dir,) = checkpoint_dirs
    assert run_dir.name == run.info.run_id and run.data.params["ppo.checkpoint_dir"].endswith(run_dir.name)
    assert "ppo.trainer.checkpoint_dir" not in run.data.params  # set by the stage, not a null parameter
    assert (run_dir / "COMPLETE").is_file() and not list(run_dir.glob(".*"))
    last = sorted(run_dir.glob("update_*"))[-1]
    assert last.name == "update_000003" and {"rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in last.iterdir()}
    # the ranks' logs show the same KL statistics: the controller saw globally reduced values
    text = re.sub(r"\s+", " ", proc.stdout + proc.stderr)
    kls = re.findall(r"'eval/kl_second_half_mean': ([-0-9.e]+)", text)
    betas_logged = re.findall(r"'eval/final_beta': ([-0-9.e]+)", text)
    assert len(kls) == 2 and len(set(kls)) == 1, kls  # one summary per rank, equal
    assert len(betas_logged) == 2 and len(set(betas_logged)) == 1, betas_logged


def test_a_launched_run_has_the_runs_provenance_and_upstream_pins(upstream, ppo):
    project, client = upstream
    (run,) = launched_runs(client, "ppo")
    tags, params = run.data.tags, run.data.params
    assert tags["scenario"] == "launched" and params["ppo.evaluation.seed"] == "7"  # --params
    assert tags["provenance/command"].startswith("python -m calibrated_rlhf.runtime.launch --env tiny --pipelines ppo")
    assert tags["provenance/launcher"] == "accelerate, 2 processes" and tags["provenance/version/kedro"]
    (upstream_run,) = launched_runs(client, ",".join(sorted(UPSTREAM.split(","))))
    # the main process pinned every upstream input to the completed run's version, for every rank
    for name in ("reward_model", "reference_policy", "tokenizer", "reward_transform", "train_pairs"):
        assert tags[f"provenance/load_version/{name}"] == upstream_run.data.tags["run_id"], name
        assert tags[f"provenance/loaded/{name}"] == upstream_run.data.tags["run_id"], name
    names = {a.path for a in client.list_artifacts(run.info.run_id, "run_config")}
    assert {"run_config/parameters.json", "run_config/run_params.json"} <= names


def test_a_launched_run_replays(upstream, ppo):
    """The replay of a launched run says how it was launched and how to launch it again (a dry run: replaying
    itself, upstream pins included, is tests/test_replay.py's)."""
    project, client = upstream
    (run,) = launched_runs(client, "ppo")
    proc = subprocess.run([sys.executable, "-m", "calibrated_rlhf.runtime.replay", run.info.run_id, "--dry-run"],
                          cwd=project, env={**kedro_env(project), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    env = f"replay_{run.info.run_id[:8]}"
    assert f"kedro run --env {env} --pipelines ppo --load-versions " in proc.stdout
    assert f"CALIBRATED_RLHF_REPLAY_OF={run.info.run_id}" in proc.stdout
    assert "was launched on 2 processes; this replay runs in one" in proc.stderr
    assert f"accelerate launch --num_processes 2 -m calibrated_rlhf.runtime.launch --env {env}" in proc.stderr
    assert not (project / "conf" / env).exists()

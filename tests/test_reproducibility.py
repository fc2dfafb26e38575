"""Two `kedro run --env tiny`s of the whole DAG (PPO and reporting included), in separate copies of the project
and interpreters with different hash seeds, give byte-identical versioned files and identical metrics; a later
stage reruns against a pinned earlier version and its MLflow run records which version it used."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import kedro_run, preload
from tests.project import make_project

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.compile(r"\d{4}-\d\d-\d\dT\d\d\.\d\d\.\d\d\.\d{3}Z")
# Folders named per run: Kedro's version stamps, and PPO's checkpoint folder ppo_checkpoints/<MLflow run id>/
# (a uuid without a run). Both are fresh for every run by design.
STAMP_FOLDER = re.compile(rf"^({VERSION.pattern}|[0-9a-f]{{32}}|[0-9a-f-]{{36}})$")
# Wall-clock measurements (TRL's train_runtime and throughput, PPO's per-phase seconds and episodes/s), not
# results: they differ run to run by design.
TIMING = re.compile(r"^ppo/perf/|(runtime(_s)?|_per_s(econd)?)$")
TOL = 1e-6

pytestmark = pytest.mark.slow




def kedro(project: Path, *args: str, hash_seed: str = "0", **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
                "KEDRO_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONHASHSEED": hash_seed, "COLUMNS": "200", **env}
    return subprocess.run([sys.executable, "-m", "kedro", "run", *args], cwd=project, env=full_env,
                          capture_output=True, text=True, timeout=600)


def run_config(client, run_id: str, name: str) -> dict:
    """One of the run's ``run_config/*.json`` artifacts."""
    return json.loads(Path(client.download_artifacts(run_id, f"run_config/{name}")).read_text())


def metric_differences(client_a, run_a: str, client_b, run_b: str) -> tuple[set[str], list[str]]:
    """Metric keys of both runs, and every difference beyond TOL (timing metrics: steps only)."""
    keys_a = set(client_a.get_run(run_a).data.metrics)
    keys_b = set(client_b.get_run(run_b).data.metrics)
    problems = [f"only in one run: {sorted(keys_a ^ keys_b)}"] if keys_a != keys_b else []
    for key in sorted(keys_a & keys_b):
        ha = sorted((m.step, m.value) for m in client_a.get_metric_history(run_a, key))
        hb = sorted((m.step, m.value) for m in client_b.get_metric_history(run_b, key))
        if [s for s, _ in ha] != [s for s, _ in hb]:
            problems.append(f"{key}: steps {[s for s, _ in ha]} != {[s for s, _ in hb]}")
        elif not TIMING.search(key):
            for (step, a), (_, b) in zip(ha, hb):
                same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=TOL, abs_tol=TOL)
                if not same:
                    problems.append(f"{key} step {step}: {a!r} != {b!r}")
    return keys_a | keys_b, problems


def only_run(project: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("calibrated_rlhf")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def two_runs(tiny_run_template, tmp_path_factory):
    """The same tiny run of the whole DAG twice: separate project folders, interpreters, hash seeds. The
    first is the session's shared run (hash seed 1, only read here); the second runs here (hash seed 2)."""
    out = []
    for seed in ("1", "2"):  # a result that depends on set / str-hash order shows up here
        project = tiny_run_template if seed == "1" else make_project(tmp_path_factory.mktemp(f"repro{seed}"))
        if seed == "2":
            proc = kedro(project, "--env", "tiny", hash_seed=seed)
            assert proc.returncode == 0, proc.stderr[-3000:]
        client, run = only_run(project)
        out.append((project, client, run, run_config(client, run.info.run_id, "run_params.json")["session_id"]))
    return out


def stripped(rel: Path) -> Path:
    """The path without its clock-named folders: the same artifact of two runs has the same stripped path."""
    return Path(*(part for part in rel.parts if not STAMP_FOLDER.match(part)))


# Files that legitimately hold run-specific values. Each is compared after replacing this run's identifiers
# (its project folder, its Kedro version, its MLflow run id, MLflow's logged-model id) with placeholders and
# dropping exactly the wall-clock / process fields named here; everything else in them must match.
def _ids_out(text: str, project: Path, version: str, run_id: str) -> str:
    text = text.replace(str(project), "<project>").replace(version, "<version>").replace(run_id, "<run_id>")
    return re.sub(r"m-[0-9a-f]{32}", "<model_id>", text)


def _json_without(*keys: str):
    def fix(text: str) -> str:
        doc = json.loads(text)
        for key in keys:
            doc.pop(key, None)
        if "history" in doc:  # PPO trainer state: ppo/perf/* in each update's record are timings (see TIMING)
            doc["history"] = [{k: v for k, v in rec.items() if not TIMING.search(k)} for rec in doc["history"]]
        return json.dumps(doc, sort_keys=True)
    return fix


NORMALIZE = {
    # run_integrity's completion marker of every versioned dataset: the run's version, MLflow run id, lineage
    "_complete.json": _json_without(),
    # PPO checkpoint state: config.checkpoint_dir is ppo_checkpoints/<run id>; history holds per-phase timings;
    # saved_at is the wall clock
    "trainer_state.json": _json_without("saved_at"),
    # PPO run folder markers: who and when (host, pid, wall-clock start / finish)
    "run.json": _json_without("pid", "host", "started_at"),
    "COMPLETE": _json_without("finished_at"),
    # where the pyfunc went: MLflow's run id and logged-model id
    "published_reward_model.json": _json_without(),
    # the comparison report names its tracking store (inside the project folder) and when it was generated
    "comparison_report.md": lambda t: re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "generated <time>", t),
    "comparison_report.html": lambda t: re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "generated <time>", t),
}


def versioned_files(project: Path) -> dict[Path, Path]:
    files = [p for p in (project / "data").rglob("*") if p.is_file()]
    unstamped = [p for p in files if not any(STAMP_FOLDER.match(x) for x in p.relative_to(project).parts)]
    assert not unstamped, f"outputs outside a version folder cannot be compared run to run: {unstamped}"
    by_path = {stripped(p.relative_to(project)): p for p in files}
    assert len(by_path) == len(files), "one run wrote two versions of the same file"
    return by_path


def test_data_artifacts_are_identical_byte_for_byte(two_runs):
    (pa, _, ra, va), (pb, _, rb, vb) = two_runs
    first, second = versioned_files(pa), versioned_files(pb)
    assert sorted(first) == sorted(second)
    assert len(first) >= 40
    suffixes = {p.suffix for p in first}
    assert {".parquet", ".json", ".safetensors", ".png", ".csv", ".pt", ".md", ".html"} <= suffixes
    stages = {rel.parts[2] for rel in first}  # data/<layer>/<dataset>/...
    assert {"reward_model", "policy", "reference_policy", "ppo_checkpoints", "reward_transform.json",
            "ppo_samples.csv", "comparison_report.md"} <= stages, stages
    differing, normalized = [], []
    for rel in sorted(first):
        a, b = first[rel].read_bytes(), second[rel].read_bytes()
        if a == b:
            continue
        fix = NORMALIZE.get(rel.name)
        if fix is not None:
            normalized.append(str(rel))
            if (fix(_ids_out(a.decode(), pa, va, ra.info.run_id))
                    == fix(_ids_out(b.decode(), pb, vb, rb.info.run_id))):
                continue
        differing.append(str(rel))
    assert not differing, f"differ between two identical runs: {differing}"
    # only the files listed above needed their run-specific values taken out
    assert {Path(n).name for n in normalized} <= set(NORMALIZE), normalized


def test_metric_histories_are_identical(two_runs):
    (_, ca, a, _), (_, cb, b, _) = two_runs
    keys, problems = metric_differences(ca, a.info.run_id, cb, b.info.run_id)
    assert not problems, problems
    assert len(keys) >= 60 and {"rm/train/loss", "rm/test_accuracy", "calibration/test_ece_after",
                                "ppo/objective/kl", "ppo/rewards/gold", "eval/gold_policy"} <= keys
    assert len(ca.get_metric_history(a.info.run_id, "rm/train/loss")) >= 3
    assert len(ca.get_metric_history(a.info.run_id, "ppo/objective/kl")) >= 3  # one point per PPO update
    timing = sorted(k for k in keys if TIMING.search(k))
    # nothing else is exempt
    assert timing == ["eval/episodes_per_s", "policy_init/train/runtime_s", "ppo/perf/episodes_per_s",
                      "ppo/perf/generate_s", "ppo/perf/rollout_s", "ppo/perf/score_s", "ppo/perf/update_s",
                      "rm/train/pairs_per_s", "rm/train/runtime_s"], timing


def test_parameters_and_data_hashes_are_identical(two_runs):
    (_, _, a, _), (_, _, b, _) = two_runs

    def params(run):
        # ppo.checkpoint_dir is ppo_checkpoints/<this run's MLflow run id>: fresh per run by design
        return {k: v.replace(run.info.run_id, "<run_id>") for k, v in run.data.params.items()}

    assert "ppo.checkpoint_dir" in a.data.params
    assert params(a) == params(b)
    hashes = {k: v for k, v in a.data.tags.items() if k.startswith("data/content_hash/")}
    assert len(hashes) == 4
    assert hashes == {k: v for k, v in b.data.tags.items() if k.startswith("data/content_hash/")}


def test_run_records_what_is_needed_to_redo_it(two_runs):
    (_, client, a, v1), _ = two_runs
    tags = a.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags.get("provenance/git_commit") or tags["provenance/package_git_commit"])
    assert tags.get("provenance/git_dirty", tags.get("provenance/package_git_dirty")) in ("True", "False")
    for pkg in ("kedro", "kedro-mlflow", "mlflow", "torch", "transformers", "trl"):
        assert tags[f"provenance/version/{pkg}"], pkg
    assert tags["provenance/command"] == "kedro run --env tiny"
    assert tags["provenance/env"] == "tiny"
    assert tags["provenance/pipelines"] == "__default__"
    assert tags["provenance/loaded/train_pairs"] == v1

    parameters = run_config(client, a.info.run_id, "parameters.json")
    assert parameters["backbone"]["hidden_size"] == 32  # the tiny environment's override, resolved
    assert parameters["reward_model"]["training"]["learning_rate"] == 1e-3
    run_params = run_config(client, a.info.run_id, "run_params.json")
    assert run_params["env"] == "tiny"
    assert run_params["load_versions"] == {} and run_params["runtime_params"] == {}
    assert run_params["upstream_versions"] == {}  # the whole DAG produces everything it reads
    for key in ("tags", "from_nodes", "to_nodes", "node_names", "runner", "pipeline_names"):
        assert key in run_params


def test_later_stage_reruns_against_a_pinned_earlier_version(two_runs):
    _, (project, client, _, v1) = two_runs  # the run made here: the shared one stays as it is
    # a second reward model, newer than the full run's
    preload()  # the reruns go through the forked harness: the same CLI, no interpreter start-up each
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "reward_model", name="newer_reward_model")
    assert code == 0, out[-3000:]
    exp = client.get_experiment_by_name("calibrated_rlhf")
    newer = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    v2 = run_config(client, newer.info.run_id, "run_params.json")["session_id"]
    assert v2 > v1
    # the reward model pinned, and its test scores with it (the latest test scores are the newer model's, and
    # the run refuses inputs that do not belong together)
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "calibration",
                          "--load-versions", f"reward_model:{v1},test_scores:{v1}", name="pinned_calibration")
    assert code == 0, out[-3000:]
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    tags = run.data.tags
    assert tags["provenance/loaded/reward_model"] == v1  # the pinned version, not the latest (v2)
    assert tags["provenance/load_version/reward_model"] == v1
    assert tags["provenance/loaded/tokenizer"] == v1  # unpinned: the latest, which only the full run wrote
    assert tags["provenance/input_sha256/reward_model"]
    run_params = run_config(client, run.info.run_id, "run_params.json")
    assert run_params["load_versions"] == {"reward_model": v1, "test_scores": v1}
    assert run_params["upstream_versions"]["reward_model"] == v1
    assert run_params["upstream_versions"]["tokenizer"] == v1

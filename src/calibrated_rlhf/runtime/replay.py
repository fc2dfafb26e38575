"""Replay a past ``kedro run`` from its MLflow run id: same parameters, same upstream data versions.

    python -m calibrated_rlhf.runtime.replay RUN_ID [--tracking-uri URI] [--project-path DIR] [--dry-run]

It reads ``run_config/parameters.json`` and ``run_config/run_params.json`` (logged by the project's
``ProvenanceHooks``), writes the recorded parameters to a new Kedro environment
``conf/replay_<first 8 characters of RUN_ID>/`` (never overwriting one that exists), and runs
``kedro run --env replay_<id>`` with the same pipelines, node filters and runtime ``--params``, and
``--load-versions`` pinning every upstream dataset the original run loaded. The new MLflow run is
tagged ``replay_of=<RUN_ID>``.

Code is not replayed: check out the recorded ``provenance/git_commit`` (and apply
``run_config/git_diff.patch`` when the run was dirty) first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from calibrated_rlhf.runtime.provenance import REPLAY_OF_ENV, RUN_CONFIG_DIR, flatten

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # as conf/base/mlflow.yml when MLFLOW_TRACKING_URI is unset
SEQUENTIAL = "kedro.runner.sequential_runner.SequentialRunner"


class ReplayError(RuntimeError):
    """The run cannot be replayed as recorded."""


def resolve_tracking_uri(uri: str | None, project: Path) -> str:
    """The URI to read from and log to; a relative sqlite path is taken from the project folder, as kedro runs there."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((project / uri[len(prefix):]).resolve())
    return uri


def fetch_run_config(run_id: str, tracking_uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recorded ``(parameters, run_params)`` of a run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # two small files: no bar
    client = mlflow.MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise ReplayError(f"no MLflow run {run_id} at {tracking_uri}: {err.message}") from err
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RUN_CONFIG_DIR,
                                                        tracking_uri=tracking_uri, dst_path=tmp)
            parameters = json.loads(Path(local, "parameters.json").read_text())
            run_params = json.loads(Path(local, "run_params.json").read_text())
        except (MlflowException, OSError) as err:
            raise ReplayError(f"run {run_id} has no {RUN_CONFIG_DIR}/parameters.json and run_params.json "
                              f"(it predates replay support or was not made by this project): {err}") from err
    return parameters, run_params


def replay_env_name(run_id: str) -> str:
    return f"replay_{run_id[:8]}"


def _escape_interpolations(value: Any) -> Any:
    """Recorded values are already resolved: keep a literal ``${...}`` from being resolved again."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: _escape_interpolations(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(v) for v in value]
    return value


class _ParamsDumper(yaml.SafeDumper):
    """Quotes strings that read as numbers: OmegaConf (which Kedro reads YAML with) takes '1e-3' as a float."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    try:
        float(value)
        style: str | None = '"'
    except ValueError:
        style = None  # PyYAML quotes the other look-alikes (true, null, 012) by itself
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ParamsDumper.add_representer(str, _represent_str)


def parameters_yaml(parameters: dict[str, Any], run_id: str) -> str:
    """The recorded parameters as a Kedro parameters file, checked to load back to exactly the same values."""
    from omegaconf import OmegaConf

    text = (f"# The resolved parameters of MLflow run {run_id}, written by calibrated_rlhf.runtime.replay.\n"
            + yaml.dump(_escape_interpolations(parameters), Dumper=_ParamsDumper, sort_keys=False,
                        default_flow_style=False, allow_unicode=True))
    # Kedro reads YAML through OmegaConf, whose resolvers differ from PyYAML's (e.g. '1e-3' is a float there).
    loaded = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    if loaded != parameters:
        raise ReplayError("the recorded parameters do not survive a YAML round trip; replay by hand from "
                          f"{RUN_CONFIG_DIR}/parameters.json")
    return text


def _reads_as_itself(text: str) -> bool:
    """Whether ``text`` unquoted reads back as the same string in OmegaConf (which parses ``--params``)."""
    try:
        float(text)
        return False
    except ValueError:
        pass
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _params_arg(runtime_params: dict[str, Any]) -> str | None:
    """``--params`` as the original run got it. Values with commas cannot travel on the command line
    (Kedro splits ``--params`` on commas); they are in the environment's parameters.yml anyway."""
    items = []
    for key, value in flatten(runtime_params).items():
        text = value if isinstance(value, str) and _reads_as_itself(value) else json.dumps(value)
        if "," in text:
            print(f"replay: --params {key} has a comma; it is replayed through parameters.yml only", file=sys.stderr)
            continue
        items.append(f"{key}={text}")
    return ",".join(items) or None


def replay_load_versions(run_params: dict[str, Any]) -> dict[str, str]:
    """Every upstream dataset at the version the run loaded, and the run's own ``--load-versions`` as given."""
    produced = set(run_params.get("produced_datasets") or ())
    versions = {k: v for k, v in (run_params.get("upstream_versions") or {}).items() if k not in produced}
    versions.update(run_params.get("load_versions") or {})
    return dict(sorted(versions.items()))


def kedro_args(run_params: dict[str, Any], env: str) -> list[str]:
    """The ``kedro run`` arguments that redo the recorded run in environment ``env``."""
    args = ["run", "--env", env]
    if run_params.get("pipeline_names"):
        args += ["--pipelines", ",".join(run_params["pipeline_names"])]
    for option, key in (("--tags", "tags"), ("--nodes", "node_names"), ("--from-nodes", "from_nodes"),
                        ("--to-nodes", "to_nodes"), ("--from-inputs", "from_inputs"),
                        ("--to-outputs", "to_outputs"), ("--namespaces", "namespaces")):
        if run_params.get(key):
            args += [option, ",".join(run_params[key])]
    versions = replay_load_versions(run_params)
    if versions:
        args += ["--load-versions", ",".join(f"{k}:{v}" for k, v in versions.items())]
    params = _params_arg(run_params.get("runtime_params") or {})
    if params:
        args += ["--params", params]
    # "None": a session run without a runner (Kedro then uses the sequential one) recorded as text
    if run_params.get("runner") not in (None, "None", SEQUENTIAL):
        args += ["--runner", run_params["runner"]]
    if run_params.get("only_missing_outputs"):
        args.append("--only-missing-outputs")
    return args


def write_replay_env(conf: Path, env: str, source_env: str | None, parameters_text: str) -> Path:
    """Create ``conf/<env>/`` with the recorded parameters; an existing one is used as it is.

    The original environment's other files (catalog, mlflow, globals overrides) are copied, since
    ``--env`` replaces that environment rather than stacking on it. Credentials are never copied.
    """
    env_dir = conf / env
    params_file = env_dir / "parameters.yml"
    if params_file.exists():
        if params_file.read_text() != parameters_text:
            print(f"replay: {params_file} exists and differs from the recorded parameters; using it as it is",
                  file=sys.stderr)
        return env_dir
    env_dir.mkdir(parents=True, exist_ok=True)
    source = conf / source_env if source_env and source_env != "base" else None
    if source is not None and source.is_dir():
        for f in sorted(source.rglob("*")):
            rel = f.relative_to(source)
            if (f.is_file() and not rel.name.startswith("parameters") and "credentials" not in rel.name
                    and not (env_dir / rel).exists()):
                (env_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, env_dir / rel)
    # Written last and atomically: its presence means the environment is complete.
    tmp = params_file.with_suffix(".yml.tmp")
    tmp.write_text(parameters_text)
    os.replace(tmp, params_file)
    return env_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.replay",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the project's sqlite:///mlflow.db")
    parser.add_argument("--project-path", type=Path, default=Path.cwd(), help="the Kedro project (default: here)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, write and run nothing")
    args = parser.parse_args(argv)

    if not re.fullmatch(r"[0-9A-Za-z_-]+", args.run_id):  # it names a folder and goes into a search filter
        parser.error(f"not an MLflow run id: {args.run_id!r}")
    project = args.project_path.resolve()
    uri = resolve_tracking_uri(args.tracking_uri, project)
    try:
        parameters, run_params = fetch_run_config(args.run_id, uri)
        env = replay_env_name(args.run_id)
        text = parameters_yaml(parameters, args.run_id)
    except ReplayError as err:
        print(f"replay: {err}", file=sys.stderr)
        return 2
    cmd_args = kedro_args(run_params, env)
    child_env = {"MLFLOW_TRACKING_URI": uri, REPLAY_OF_ENV: args.run_id}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in child_env.items())
    shown = prefix + " " + shlex.join(["kedro", *cmd_args])
    processes = launched_processes(args.run_id, uri)
    if processes and processes > 1:
        # batch sizes are per process: one process gives other numbers
        launched = ["accelerate", "launch", "--num_processes", str(processes), "-m", "calibrated_rlhf.runtime.launch",
                    *cmd_args[1:]]
        print(f"replay: run {args.run_id} was launched on {processes} processes; this replay runs in one. "
              f"As launched: {prefix} {shlex.join(launched)}", file=sys.stderr)
    if args.dry_run:
        print(f"# would write {project / 'conf' / env / 'parameters.yml'} (if absent), then run:")
        print(shown)
        return 0

    write_replay_env(project / "conf", env, run_params.get("env"), text)
    print(shown, flush=True)
    proc = subprocess.run([sys.executable, "-m", "kedro", *cmd_args], cwd=project, env={**os.environ, **child_env})
    if proc.returncode == 0:
        replay_id = latest_replay(args.run_id, uri)
        if replay_id:
            print(f"replay of {args.run_id}: MLflow run {replay_id}")
    return proc.returncode


def launched_processes(run_id: str, tracking_uri: str) -> int | None:
    """How many processes ``python -m calibrated_rlhf.runtime.launch`` ran the run on; None for a ``kedro run``."""
    import mlflow

    value = mlflow.MlflowClient(tracking_uri).get_run(run_id).data.tags.get("provenance/num_processes", "")
    return int(value) if value.isdigit() else None


def latest_replay(run_id: str, tracking_uri: str) -> str | None:
    """The id of the newest run tagged ``replay_of=<run_id>``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, filter_string=f"tags.replay_of = '{run_id}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


if __name__ == "__main__":
    sys.exit(main())

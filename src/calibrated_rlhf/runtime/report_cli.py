"""The run-comparison report outside Kedro.

    python -m calibrated_rlhf.runtime.report_cli --experiment calibrated_rlhf --last 10 --out reports/
    python -m calibrated_rlhf.runtime.report_cli --runs ID1,ID2 --out reports/
    python -m calibrated_rlhf.runtime.report_cli --filter "tags.scenario != ''" --out reports/ --log-to-mlflow

Writes the same four files as ``kedro run --pipelines reporting`` (comparison_report.md/.html,
comparison_table.csv, comparison_curves.png) into ``--out``. Which scenario plays which part in the
verdicts is read from the project's ``conf/base/parameters_reporting.yml`` (``--parameters``), as the
pipeline reads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from calibrated_rlhf.reporting import render
from calibrated_rlhf.reporting.runs import RunSelection, load_histories, load_runs
from calibrated_rlhf.reporting.verdicts import ScenarioRoles

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the project's store, as in conf/base/mlflow.yml
DEFAULT_PARAMETERS = "conf/base/parameters_reporting.yml"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.report_cli",
                                     description=__doc__.split("\n")[1])
    parser.add_argument("--experiment", default="calibrated_rlhf", help="MLflow experiment to read.")
    parser.add_argument("--runs", default="", help="Comma-separated run ids: exactly these runs.")
    parser.add_argument("--last", type=int, default=None, help="Only the N most recent matching runs.")
    parser.add_argument("--filter", dest="filter_string", default="", help="MLflow search filter.")
    parser.add_argument("--scenarios", default="", help="Comma-separated scenario tags to keep.")
    parser.add_argument("--out", default="reports", help="Folder for the report files (created if needed).")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else %(default)s).")
    parser.add_argument("--tolerance", type=float, default=0.10, help="Scale verdict's relative spread.")
    parser.add_argument("--ece-margin", type=float, default=0.01, help="Calibration verdict's margin over oracle ECE.")
    parser.add_argument("--parameters", default=DEFAULT_PARAMETERS,
                        help="The project's reporting parameters, for the scenario roles (default: %(default)s).")
    parser.add_argument("--log-to-mlflow", action="store_true",
                        help="Also log the files under report/ in a new MLflow run of the experiment.")
    args = parser.parse_args(argv)
    if args.runs and (args.last or args.filter_string or args.scenarios):
        parser.error("--runs names the runs exactly; drop --last, --filter and --scenarios")
    if args.last is not None and args.last < 1:
        parser.error("--last must be at least 1")
    return args


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def scenario_roles(parameters: str | Path) -> ScenarioRoles:
    """The ``reporting.scenario_roles`` block of a parameters file, validated as the pipeline validates it."""
    from calibrated_rlhf.pipelines.reporting.nodes import ScenarioRolesParams

    path = Path(parameters)
    if not path.is_file():
        raise SystemExit(f"no reporting parameters at {path}: run from the project root or pass --parameters")
    block = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("reporting", {})
    if "scenario_roles" not in block:
        raise SystemExit(f"{path} has no reporting.scenario_roles")
    return ScenarioRolesParams(**block["scenario_roles"]).roles()


def main(argv: Sequence[str] | None = None) -> int:
    import mlflow

    args = parse_args(argv)
    roles = scenario_roles(args.parameters)
    mlflow.set_tracking_uri(args.tracking_uri)
    selection = RunSelection(experiment=args.experiment, run_ids=_split(args.runs), last=args.last,
                             filter_string=args.filter_string, scenarios=_split(args.scenarios))
    runs, notes = load_runs(selection)
    result = render.build_report(runs, load_histories(runs["run_id"]), roles=roles, experiment=args.experiment,
                                 source=args.tracking_uri, selection=selection.describe(), notes=notes,
                                 tolerance=args.tolerance, ece_margin=args.ece_margin)
    paths = render.save_report(result, args.out)
    if args.log_to_mlflow:
        mlflow.set_experiment(args.experiment)
        with mlflow.start_run(run_name="comparison_report") as run:
            for path in paths.values():
                mlflow.log_artifact(str(path), artifact_path="report")
        print(f"logged to MLflow run {run.info.run_id}")
    print(f"{len(result.table)} run(s) compared")
    for verdict in result.verdicts:
        print(f"- {verdict.topic}: {verdict.status}. {verdict.evidence}")
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Nodes of ``reporting``: a thin adapter over ``calibrated_rlhf.reporting``."""

from __future__ import annotations

import logging

import pandas as pd
from matplotlib.figure import Figure
from pydantic import Field

from calibrated_rlhf.core.normalization import NormalizationMethod
from calibrated_rlhf.pipelines import tracking
from calibrated_rlhf.pipelines.params import StrictParams
from calibrated_rlhf.reporting import render
from calibrated_rlhf.reporting.runs import RunSelection, load_histories, load_runs
from calibrated_rlhf.reporting.verdicts import ScenarioRoles

log = logging.getLogger(__name__)


class ScaleScenarioParams(StrictParams):
    """One run of the scale experiment."""

    scenario: str
    method: str = Field(pattern="^(zscore|raw)$", description="normalization.method: through the transform "
                        "(zscore) or the raw reward.")
    multiplier: float = Field(gt=0)


class EnsembleRegimeParams(StrictParams):
    """A one-model scenario and the prefix of the ensemble scenarios compared with it."""

    single_model: str
    ensemble_prefix: str = Field(min_length=1)


class ScenarioRolesParams(StrictParams):
    """Which scenario tag plays which part in the verdicts (see ``reporting.verdicts.ScenarioRoles``)."""

    reference: str
    no_centering: str
    no_normalization: str
    minmax_normalization: str
    fixed_kl: str
    normalizations: dict[NormalizationMethod, str] = Field(
        default_factory=dict, description="normalization.method -> the scenario that sets it, for the methods "
        "besides zscore, none and minmax_batch (the normalization-methods verdict).")
    scale: list[ScaleScenarioParams] = Field(min_length=2)
    ensembles: list[EnsembleRegimeParams] = Field(min_length=1)

    def roles(self) -> ScenarioRoles:
        return ScenarioRoles.from_dict(self.model_dump())


class ReportingParams(StrictParams):
    """Which runs the comparison reads, and the thresholds of its verdicts."""

    experiment: str = Field("calibrated_rlhf", description="MLflow experiment to read.")
    run_ids: list[str] = Field(default_factory=list,
                               description="Exactly these runs (any experiment); the other selectors are ignored.")
    last: int | None = Field(20, ge=1, description="Only the N most recent matching runs; null for all.")
    filter_string: str = Field("", description="MLflow search filter, e.g. \"tags.scenario != ''\".")
    scenarios: list[str] = Field(default_factory=list, description="Only runs tagged with these scenarios.")
    tolerance: float = Field(0.10, gt=0, description="Relative spread across a that the scale verdict calls "
                             "'the same'.")
    ece_margin: float = Field(0.01, ge=0, description="How far above the oracle ECE a calibrated run may be.")
    scenario_roles: ScenarioRolesParams = Field(description="Which scenario plays which part in the verdicts.")

    def selection(self) -> RunSelection:
        return RunSelection(experiment=self.experiment, run_ids=tuple(self.run_ids), last=self.last,
                            filter_string=self.filter_string, scenarios=tuple(self.scenarios))


def compare_runs(params: ReportingParams) -> tuple[str, str, pd.DataFrame, Figure]:
    """Markdown and HTML reports, the comparison table and the curves, from the current tracking URI.

    The run this node is logged to is left out: under ``__default__`` it is still training.
    """
    active = tracking.active_run_id()
    selection = params.selection()
    runs, notes = load_runs(selection, exclude_run_ids=[active] if active else [])
    histories = load_histories(runs["run_id"])
    result = render.build_report(runs, histories, roles=params.scenario_roles.roles(), experiment=params.experiment,
                                 source=tracking.tracking_uri(), selection=selection.describe(), notes=notes,
                                 tolerance=params.tolerance, ece_margin=params.ece_margin)
    for verdict in result.verdicts:
        log.info("%s: %s. %s", verdict.topic, verdict.status, verdict.evidence)
    if result.table.empty:
        log.warning("no matching runs for %s", selection.describe())
    return result.markdown, result.html, result.table, result.figure

"""The scenario roles of conf/base/parameters_reporting.yml name the conf/scenario_<name>/ folders, which
tag their runs with that name and set what the role says (the report's library knows no scenario names)."""

from __future__ import annotations

from pathlib import Path

import yaml

from calibrated_rlhf.pipelines.reporting.nodes import ScenarioRolesParams

ROOT = Path(__file__).resolve().parents[2]
ROLES = ScenarioRolesParams(
    **yaml.safe_load((ROOT / "conf/base/parameters_reporting.yml").read_text())["reporting"]["scenario_roles"]).roles()


def scenario_parameters(name: str) -> dict:
    folder = ROOT / "conf" / f"scenario_{name}"
    assert folder.is_dir(), f"role names {name}, but there is no {folder.relative_to(ROOT)}/"
    merged: dict = {}
    for path in sorted(folder.glob("parameters*.yml")):
        merged |= yaml.safe_load(path.read_text()) or {}
    return merged


def test_every_named_scenario_is_a_conf_folder_that_tags_its_runs_so():
    for name in ROLES.names():
        assert scenario_parameters(name).get("scenario") == name, name


def test_scale_roles_match_what_their_folders_set():
    for role in ROLES.scale:
        params = scenario_parameters(role.scenario)
        ppo = params.get("ppo", {})
        assert params.get("normalization", {}).get("method", "zscore") == role.method, role
        assert float(ppo.get("raw_reward_multiplier", 1.0)) == role.multiplier, role


def test_each_ensemble_prefix_names_ensemble_folders():
    folders = [p.name.removeprefix("scenario_") for p in (ROOT / "conf").glob("scenario_*")]
    for regime in ROLES.ensembles:
        members = [f for f in folders if f.startswith(regime.ensemble_prefix)]
        assert members, regime
        for name in members:
            assert scenario_parameters(name)["reward_model"]["ensemble_size"] > 1, name


def test_normalization_roles_match_what_their_folders_set():
    scenarios = ROLES.normalization_scenarios()
    assert set(scenarios.values()) >= {"zscore", "none", "minmax_batch", "running_zscore", "whiten_batch",
                                       "calibrated_clip", "raw"}
    for name, method in scenarios.items():
        assert scenario_parameters(name).get("normalization", {}).get("method", "zscore") == method, name

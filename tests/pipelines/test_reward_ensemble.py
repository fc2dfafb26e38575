"""Reward-model ensembles as namespaced instances of the reward_model and calibration pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kedro.config import OmegaConfigLoader
from kedro.framework.project import configure_project
from kedro.io import DataCatalog

from calibrated_rlhf import pipeline_registry
from calibrated_rlhf.core.backbone import BackboneParams
from calibrated_rlhf.core.ensemble import RewardEnsemble
from calibrated_rlhf.core.reward_model import RewardTrainingParams
from calibrated_rlhf.pipelines import reward_ensemble
from calibrated_rlhf.pipelines.calibration.nodes import CalibrationParams
from calibrated_rlhf.pipelines.data_prep import create_pipeline as data_prep
from calibrated_rlhf.pipelines.data_prep.nodes import SourceParams, SyntheticParams
from calibrated_rlhf.pipelines.reward_ensemble.nodes import member_key
from calibrated_rlhf.pipelines.reward_model.nodes import RewardModelSize
from calibrated_rlhf.core.ensemble import EnsembleParams
from tests.conftest import TINY_BACKBONE
from tests.pipelines.helpers import data_prep_params, run

PROJECT = Path(__file__).resolve().parents[2]


class Config(dict):
    """The part of a config loader the registry reads."""


def registered(size) -> dict:
    configure_project("calibrated_rlhf")
    pipeline_registry.use_config(Config(parameters={"reward_model": {"ensemble_size": size}}))
    try:
        return pipeline_registry.register_pipelines()
    finally:
        pipeline_registry.use_config(None)


def test_size_one_is_the_single_model_dag():
    single = registered(1)
    names = {n.name for n in single["__default__"].nodes}
    assert {"train_reward_model", "score_calibration_pairs", "fit_temperature"} <= names
    assert not any("member_" in n or "ensemble" in n for n in names)
    assert "reward_model" in single["ppo"].inputs() and "reward_ensemble" not in single["__default__"].all_outputs()


@pytest.mark.parametrize("size", [2, 3])
def test_members_are_namespaced_and_never_collide(size):
    dag = registered(size)["__default__"]
    members = [f"member_{i}" for i in range(size)]
    writers: dict[str, str] = {}
    for node in dag.nodes:
        for out in node.outputs:
            assert out not in writers, f"{out} written by {writers[out]} and {node.name}"
            writers[out] = node.name
        if node.namespace:
            assert node.namespace in members
            # a member writes only into its own namespace
            assert all(o.startswith(f"{node.namespace}.") for o in node.outputs), node.name
            # and reads only shared data, shared parameters, or its own outputs
            for name in node.inputs:
                assert (name.startswith(f"{node.namespace}.") or name in reward_ensemble.pipeline.SHARED_DATA
                        or name in reward_ensemble.pipeline.SHARED_PARAMS), (node.name, name)
    for m in members:
        assert f"{m}.reward_model" in writers and f"{m}.temperature_fit" in writers
    # parameters are shared, never namespaced copies that config would have to repeat
    assert not [p for p in dag.inputs() if p.startswith("params:member_")]
    # downstream reads the ensemble; nothing reads or writes a single reward_model
    assert "reward_model" not in dag.all_inputs() | dag.all_outputs()
    assert {"reward_ensemble", "temperature_fit", "test_scores", "ensemble_metrics"} <= set(writers)


def test_ppo_alone_assembles_the_ensemble_from_the_members_versions():
    ppo = registered(3)["ppo"]
    assert "assemble_reward_ensemble" in {n.name for n in ppo.nodes}
    assert {f"member_{i}.reward_model" for i in range(3)} <= ppo.inputs()
    assert "reward_ensemble" not in ppo.inputs()


def test_members_artifacts_resolve_to_distinct_files_and_mlflow_paths():
    conf = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="base")
    catalog = DataCatalog.from_config(conf["catalog"])
    where = {}
    for name in ("reward_model", "temperature_fit", "test_scores", "calibration_scores",
                 "reliability_diagram", "margin_histograms"):
        for owner in ("", "member_0.", "member_1."):
            ds = catalog.get(owner + name)
            path = str(getattr(ds, "_filepath", None) or ds._describe().get("filepath"))
            assert path not in where, f"{owner + name} and {where[path]} share {path}"
            where[path] = owner + name
    for owner in ("member_0.", "member_1."):
        metrics = catalog.get(owner + "member_metrics")
        assert type(metrics).__name__ == "MlflowMetricsHistoryDataset"
    assert catalog.get("member_1.reward_model").metadata["mlflow_artifact_path"] == "reward_model/member_1"


def test_member_metric_keys_never_meet_the_ensembles():
    keys = ["rm/test_accuracy", "rm/train/loss", "calibration/test_nll_after"]
    renamed = {member_key(k, i) for k in keys for i in range(3)}
    assert len(renamed) == 9 and not renamed & set(keys)
    assert member_key("rm/train/loss", 2) == "rm/member_2/train/loss"


def test_members_scores_of_other_pairs_are_refused_naming_the_member():
    import pandas as pd

    from calibrated_rlhf.core.ensemble import EnsembleSpec
    from calibrated_rlhf.pipelines.reward_ensemble.nodes import aggregate_scores

    ens = RewardEnsemble([None, None], EnsembleSpec("mean", (1.0, 2.0)))
    a = pd.DataFrame({"pair_id": [0, 1, 2], "reward_chosen": [1.0, 2.0, 3.0], "reward_rejected": [0.0, 0.0, 0.0]})
    out = aggregate_scores(ens, a, a.assign(reward_chosen=[2.0, 4.0, 6.0]))
    np.testing.assert_allclose(out["reward_chosen"], [1.0, 2.0, 3.0])  # (r / 1 + 2r / 2) / 2
    np.testing.assert_allclose(out["ensemble_std_chosen"], 0.0)
    with pytest.raises(ValueError, match="member_1's scores are not of the same pairs"):
        aggregate_scores(ens, a, a.iloc[::-1])


def test_bad_ensemble_size_is_named():
    for bad in (0, 2.5, "3", True):
        with pytest.raises(ValueError, match="reward_model.ensemble_size must be an integer >= 1"):
            registered(bad)


TRAINING = RewardTrainingParams(num_train_epochs=2, per_device_train_batch_size=16, logging_steps=4,
                                learning_rate=3e-3)


@pytest.fixture(scope="module")
def ensemble_run():
    source = SourceParams(synthetic=SyntheticParams(n_pairs=400, n_words=8, max_words=4))
    prepared = run(data_prep(), data_prep_params(source))
    dag = registered(2)
    pipe = dag["reward_model"] + dag["calibration"]
    inputs = {k: prepared[k] for k in ("tokenizer", "train_pairs", "validation_pairs", "test_pairs",
                                       "calibration_pairs", "synthetic_task")}
    return run(pipe, {
        **inputs,
        "params:backbone": BackboneParams(**TINY_BACKBONE),
        "params:reward_model.training": TRAINING,
        "params:reward_model.ensemble": EnsembleParams(aggregation="mean_minus_std", std_penalty=0.5, bootstrap=True),
        "params:reward_model.size": RewardModelSize(),
        "params:calibration": CalibrationParams(),
    })


@pytest.mark.slow
def test_two_members_train_calibrate_and_aggregate(ensemble_run):
    out = ensemble_run
    ens = out["reward_ensemble"]
    assert isinstance(ens, RewardEnsemble) and ens.spec.size == 2
    # different seeds (and resamples): different members
    assert ens.spec.member_versions[0] != ens.spec.member_versions[1]
    assert ens.spec.member_temperatures == (out["member_0.temperature_fit"]["temperature"],
                                            out["member_1.temperature_fit"]["temperature"])
    # the aggregate is mean - 0.5 std of the members' calibrated rewards
    m0, m1 = out["member_0.test_scores"], out["member_1.test_scores"]
    c = np.stack([m0["reward_chosen"] / ens.spec.member_temperatures[0],
                  m1["reward_chosen"] / ens.spec.member_temperatures[1]], axis=1)
    np.testing.assert_allclose(out["test_scores"]["reward_chosen"], c.mean(1) - 0.5 * c.std(1))
    np.testing.assert_allclose(out["test_scores"]["ensemble_std_chosen"], c.std(1))
    # the aggregate is calibrated and reported like one model; members under their own keys
    assert out["temperature_fit"]["temperature"] > 0
    assert "calibration/test_nll_after" in out["calibration_metrics"]
    assert "rm/test_accuracy" in out["rm_test_metrics"]
    for i in (0, 1):
        keys = set(out[f"member_{i}.member_metrics"])
        assert {f"rm/member_{i}/test_accuracy", f"calibration/member_{i}/test_nll_after",
                f"rm/member_{i}/train/loss"} <= keys
    metrics = {k: v["value"] for k, v in out["ensemble_metrics"].items()}
    assert metrics["ensemble/size"] == 2
    assert metrics["ensemble/nll_gain_over_best_member"] == pytest.approx(
        metrics["ensemble/best_member_test_nll_after"] - metrics["ensemble/test_nll_after"])
    assert metrics["ensemble/test_std_mean"] > 0

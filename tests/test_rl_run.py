"""The RL branches through the real `kedro run --env tiny` of a copy of the shared tiny run (its reward model,
transform and reference policy reused), read back from MLflow: GRPO and DPO here; RLOO's is
``tests/test_rl_resume.py`` (killed and resumed)."""

from __future__ import annotations

import re

import pytest

from tests.harness import kedro_run, latest_run, preload, saved

pytestmark = pytest.mark.slow


def _history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_grpo_runs_on_the_tiny_run_with_the_pi_controller_and_the_evaluation_protocol(tiny_run_project):
    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys
    from calibrated_rlhf.core.kl_controller import PIKLController, initial_beta

    project = tiny_run_project
    template = latest_run(project)
    assert not any(k.startswith(("rl/", "dpo/")) for k in template.data.metrics)  # outside the default DAG
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "rl", "--params",
                          "rl.algorithm=grpo,rl.scale_rewards=batch,rl.kl_target=0.05", name="grpo")
    assert code == 0, out[-4000:]
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    run = latest_run(project)
    assert run.info.run_id != template.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags[keys.RL_ALGORITHM_TAG] == "grpo" and run.data.params["rl.scale_rewards"] == "batch"
    # started from the completed run's reference policy, scored through its transform
    for name in ("reference_policy", "reward_transform"):
        assert run.data.tags[f"provenance/loaded/{name}"] == template.data.tags["run_id"]
    # conf/base's GRPO settings reach the run: advantages unscaled unless asked (here: batch), k3's KL gradient,
    # a constant step that a slow climb may raise
    assert (run.data.params["rl.lr_schedule"], run.data.params["rl.kl_bias_correction"]) == ("constant", "False")
    assert run.data.params["rl.kl_climb_episodes"] == "1200"
    # the controller's formula on the logged per-sequence KL gives the logged betas and learning rates (tiny: 8
    # episodes an update; conf/base rl: pi, beta null, horizon 400, 1e-3 times the climb's step)
    kl, beta, lr = (_history(client, run, k) for k in (keys.RL_KL, keys.RL_BETA, keys.RL_LR))
    assert len(kl) == len(beta) == len(lr) == 3
    controller = PIKLController(initial_beta(0.05), 0.05, 400, gain=2.0, climb_episodes=1200)
    for k, b, rate in zip(kl, beta, lr):
        assert b == pytest.approx(controller.value, rel=1e-9)
        assert rate == pytest.approx(1e-3 * controller.step_scale, rel=1e-9)
        controller.update(k, 8)
    assert run.data.metrics[keys.EVAL_FINAL_BETA] == pytest.approx(beta[-1])
    assert kl[-1] > 0 and beta[-1] != 0.1
    # rewards per step, every form, gold included
    for name in ("raw", "calibrated", "normalized", "gold", "gold_gap"):
        assert len(_history(client, run, keys.rl_reward(name))) == 3, name
    # scored raw -> calibrated -> normalized through the completed run's frozen transform (before GRPO's own
    # batch scaling): the logged per-update means follow the transform's formula
    transform = saved(project, "data/06_models/reward_transform.json")
    raw, calibrated, normalized = (_history(client, run, keys.rl_reward(n)) for n in ("raw", "calibrated", "normalized"))
    assert len(set(raw)) > 1
    for r, c, z in zip(raw, calibrated, normalized):
        assert c == pytest.approx(r / transform["temperature"], rel=1e-6)
        # the mean of z-scores is the z-score of the mean while no reward reaches the clip (tiny rewards do not)
        assert z == pytest.approx((c - transform["mean"]) / transform["std"], rel=1e-5, abs=1e-6)
    # the console: the project's terse progress lines, not TRL's log dicts printed at every update
    assert re.search(r"GRPO 3/3 \([0-9.]+/s\) kl=", out) and "'step_time':" not in out
    # the one evaluation protocol, under the eval/ keys every method uses
    m = run.data.metrics
    assert m[keys.EVAL_GOLD_GAIN_CI_LOW] <= m[keys.EVAL_GOLD_GAIN] <= m[keys.EVAL_GOLD_GAIN_CI_HIGH]
    assert m[keys.EVAL_KL_REFERENCE_CI_LOW] <= m[keys.EVAL_KL_REFERENCE] <= m[keys.EVAL_KL_REFERENCE_CI_HIGH]
    # the policy is versioned under the run's own version, completed, and logged
    version = run.data.tags["run_id"]
    assert (project / "data/06_models/rl_policy" / version / "_complete.json").exists()
    assert (project / "data/06_models/rl_policy" / version / "rl_policy" / "model.safetensors").exists()
    assert "rl_policy" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_dpo_trains_and_its_implicit_reward_is_calibrated_from_what_the_run_saved(tiny_run_project):
    """DPO from the completed run's reference policy; the temperature it logs is the fit of the implicit-reward
    margins it saved, and those margins are what its saved policy and the reference give."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibrated_rlhf.core import metric_keys as keys
    from calibrated_rlhf.core.calibration import fit_temperature
    from calibrated_rlhf.core.rl.dpo import score_pairs

    project = tiny_run_project
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "dpo", name="dpo")
    assert code == 0, out[-4000:]
    run = latest_run(project)
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags[keys.RL_ALGORITHM_TAG] == "dpo"
    assert re.search(r"DPO (\d+)/\1 \(", out) and "'rewards/margins':" not in out
    scores = saved(project, "data/07_model_output/dpo/calibration_scores.parquet")
    fit = fit_temperature(scores["reward_chosen"] - scores["reward_rejected"])
    assert m[keys.DPO_CALIBRATION_TEMPERATURE] == pytest.approx(fit.temperature, rel=1e-6)
    assert m[keys.dpo_key("calibration/test_ece_before")] >= 0 and m[keys.DPO_CALIBRATION_TEST_ECE_AFTER] >= 0
    assert keys.EVAL_KL_REFERENCE in m and keys.EVAL_GOLD_GAIN in m  # the one protocol, every method's keys
    version = run.data.tags["run_id"]
    policy_folder = project / "data/06_models/dpo_policy" / version / "dpo_policy"
    assert (policy_folder.parent / "_complete.json").exists()
    folder = lambda name: max(p for p in (project / "data/06_models" / name).iterdir()  # noqa: E731
                              if (p / "_complete.json").exists()) / name
    tokenizer = AutoTokenizer.from_pretrained(folder("tokenizer"))
    policy = AutoModelForCausalLM.from_pretrained(policy_folder)
    reference = AutoModelForCausalLM.from_pretrained(folder("reference_policy"))
    pairs = saved(project, "data/03_primary/calibration_pairs.parquet").head(8)
    again = score_pairs(policy, reference, tokenizer, pairs, beta=float(run.data.params["dpo.trainer.beta"]))
    head = scores.set_index("pair_id").loc[again["pair_id"]]
    assert again["reward_chosen"].to_numpy() == pytest.approx(head["reward_chosen"].to_numpy(), abs=1e-4)
    assert (again["reward_chosen"] != 0).any()

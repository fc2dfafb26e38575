"""The KL-control sweep report (reporting.kl_sweep) from MLflow-shaped run rows."""

from __future__ import annotations

import pandas as pd
import pytest

from calibrated_rlhf.reporting import kl_sweep
from tests.reporting.test_report import rl_run, run_row


def sweep_run(run_id: str, method: str, control: str, target: float, seed: int, error: float,
              lr: float = 1e-3) -> dict[str, object]:
    prefix = "ppo.trainer" if method == "ppo" else "rl"
    row = rl_run(run_id, "kl_control", method, kl=target * (1 + error), error=error, target=target)
    return row | {f"params.{prefix}.kl_control": control, f"params.{prefix}.seed": str(seed),
                  f"params.{prefix}.learning_rate": str(lr)}


def test_a_setting_holds_only_when_every_seed_is_within_tolerance(tmp_path):
    runs = pd.DataFrame([
        sweep_run("p0", "ppo", "pi", 4.0, 0, 0.05), sweep_run("p1", "ppo", "pi", 4.0, 1, -0.12),  # mean -3.5%
        sweep_run("r0", "rloo", "pi", 4.0, 0, 0.02), sweep_run("r1", "rloo", "pi", 4.0, 1, -0.08),
        sweep_run("a0", "rloo", "adaptive", 4.0, 0, -0.30),
        sweep_run("g0", "grpo", "pi", 4.0, 0, 0.09), sweep_run("g1", "grpo", "pi", 4.0, 0, 0.40, lr=1e-4),
        sweep_run("g2", "grpo", "pi", 4.0, 1, -0.04),
        run_row("d", "kl_control", metrics={"eval/gold_gain": 0.1}) | {"tags.rl/algorithm": "dpo"},
    ])
    table = kl_sweep.sweep_runs(runs)
    assert list(table["run_id"]) == ["p0", "p1", "a0", "r0", "r1", "g1", "g0", "g2"]  # DPO has no KL target
    summary = kl_sweep.summary(table).set_index(["method", "kl_control", "learning_rate"])
    assert summary.loc[("ppo", "pi", 1e-3), "worst_abs_error"] == pytest.approx(0.12)
    assert not summary.loc[("ppo", "pi", 1e-3), "within_tolerance"]  # the seeds' mean is within; one seed is not
    assert summary.loc[("rloo", "pi", 1e-3), "within_tolerance"] and summary.loc[("rloo", "pi", 1e-3), "seeds"] == 2
    assert not summary.loc[("grpo", "pi", 1e-4), "within_tolerance"] and summary.loc[("grpo", "pi", 1e-3),
                                                                                        "within_tolerance"]
    paths = kl_sweep.write_report(table, tmp_path)
    text = (tmp_path / "kl_control.md").read_text()
    assert "**pi: 2 of 4 settings held within 10% on every seed** (largest error 40%)" in text
    assert "**adaptive: 0 of 1 settings" in text
    assert "| 4 | 4.20 (+5%), 3.52 (-12%) | 4.08 (+2%), 3.68 (-8%) | 2.80 (-30%) | 4.36 (+9%), 3.84 (-4%) |" in text
    assert "| grpo | pi | 0.0001 | 4.0 | 0 | 5.6 | 0.4 |" in text  # the step most GRPO runs did not use
    assert (tmp_path / "kl_control.png").stat().st_size > 0 and paths["figure"].endswith("kl_control.png")
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 8


def test_an_earlier_sweeps_runs_join_the_store_once_in_order_and_a_foreign_file_is_refused(tmp_path):
    store = kl_sweep.sweep_runs(pd.DataFrame([sweep_run("p1", "ppo", "pi", 4.0, 1, 0.05),
                                              sweep_run("g1", "grpo", "pi", 4.0, 1, -0.02)]))
    earlier = kl_sweep.sweep_runs(pd.DataFrame([sweep_run("p1", "ppo", "pi", 4.0, 1, 0.30),  # the store's wins
                                                sweep_run("r0", "rloo", "pi", 4.0, 0, 0.03),
                                                sweep_run("p0", "ppo", "pi", 4.0, 0, -0.04)]))
    earlier.to_csv(tmp_path / "runs.csv", index=False)
    merged = kl_sweep.with_earlier_runs(store, [tmp_path / "runs.csv"])
    assert list(merged["run_id"]) == ["p0", "p1", "r0", "g1"]
    assert merged.set_index("run_id").loc["p1", "kl_tracking_error"] == pytest.approx(0.05)
    assert list(merged["seed"]) == ["0", "1", "0", "1"]  # read back as the store gives them, so seeds group alike
    summary = kl_sweep.summary(merged).set_index(["method", "kl_control"])
    assert summary.loc[("ppo", "pi"), "seeds"] == 2 and summary.loc[("ppo", "pi"), "within_tolerance"]
    earlier.drop(columns=["kl_tracking_error"]).to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match=r"other\.csv: not a KL-sweep runs.csv, it lacks \['kl_tracking_error'\]"):
        kl_sweep.with_earlier_runs(store, [tmp_path / "other.csv"])

"""The metric-key registry covers what the "Tracking" section of docs/runs-and-tracking.md promises, and names each
key once."""

from __future__ import annotations

import re
from pathlib import Path

from calibrated_rlhf.core import metric_keys as keys

ROOT = Path(__file__).resolve().parents[2]


def registered() -> dict[str, str]:
    return {name: value for name, value in vars(keys).items() if name.isupper() and isinstance(value, str)}


def tracking_keys() -> list[str]:
    """The backticked keys of the "Tracking" section (``ppo/objective/*`` stays a pattern)."""
    text = (ROOT / "docs" / "runs-and-tracking.md").read_text(encoding="utf-8")
    section = text.split("## Tracking", 1)[1].split("\n## ", 1)[0]
    return [k for k in re.findall(r"`([a-z_]+/[a-z_/*<>]*)`", section) if not k.startswith("plots/")]


def test_every_key_the_tracking_section_lists_is_registered():
    values = set(registered().values())
    members = {keys.member_key(v, 0) for v in values}
    for key in tracking_keys():
        if key.startswith("data/content_hash/"):
            assert keys.data_content_hash_tag("train").startswith(key.split("<")[0]), key
        elif "*" in key or key.endswith("/") or "member_i" in key:
            prefix = key.split("*")[0].replace("member_i", "member_0")
            assert any(v.startswith(prefix) for v in values | members), key
        else:
            assert key in values, key


def test_each_key_is_registered_once_and_builders_agree_with_constants():
    values = list(registered().values())
    assert len(values) == len(set(values))
    assert keys.rm_test("accuracy") == keys.RM_TEST_ACCURACY == "rm/test_accuracy"
    assert keys.calibration_test("ece", "after") == keys.CALIBRATION_TEST_ECE_AFTER
    assert keys.ppo_reward("gold_gap") == keys.PPO_REWARD_GOLD_GAP
    assert keys.member_key("rm/train/loss", 2) == "rm/member_2/train/loss"
    assert keys.data_n_dropped("too_long") == "data/n_dropped_too_long"

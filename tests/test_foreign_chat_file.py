"""A conversational preference file no project code generated (another domain, a system message, labels
drawn at another true scale) through the whole DAG by configuration alone: one real `kedro run`.

Off the synthetic task there is no gold reward; every stage must still run, and PPO's evaluation still
reports the final policy's KL to the reference on its own samples.
"""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest

from calibrated_rlhf.core.preferences import is_conversational, plain
from tests.harness import kedro_run, latest_run, preload, saved
from tests.project import make_project

pytestmark = pytest.mark.slow

STAGES = "data_prep,reward_model,calibration,policy_init,normalization,ppo"
SYSTEM = {"role": "system", "content": "You are a music curator."}


def music_pairs(n: int, seed: int = 7, scale: float = 2.0) -> list[dict]:
    """Pairs of replies to music requests, labelled by sigmoid(scale * utility gap) of hidden word utilities."""
    rng = random.Random(seed)
    words = {w: rng.uniform(-1, 1) for w in ("jazz drums violin hum static echo lullaby anthem chorus riff "
                                             "ballad noise bass whistle waltz tango opera chime drone hymn").split()}
    asks = ["Music for a rainy evening?", "What to play at a wedding?", "Music for studying?", "A road-trip tune?"]

    def reply() -> tuple[str, float]:
        chosen = rng.sample(sorted(words), rng.randint(2, 5))
        return " ".join(chosen), sum(words[w] for w in chosen) / len(chosen)

    rows = []
    while len(rows) < n:
        (a, ga), (b, gb) = reply(), reply()
        if a == b:
            continue
        first = rng.random() < 1 / (1 + math.exp(-scale * (ga - gb)))
        chosen, rejected = (a, b) if first else (b, a)
        rows.append({"prompt": [SYSTEM, {"role": "user", "content": f"{rng.choice(asks)} ({len(rows) % 60})"}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def test_a_foreign_chat_file_goes_through_every_stage(tmp_path):
    preload()
    project = make_project(tmp_path / "project", store=True)
    source = tmp_path / "music_prefs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in music_pairs(240)))
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", STAGES, "--params",
                          f"data_prep.source.kind=file,data_prep.source.path={source},ppo.trainer.num_updates=2,"
                          "ppo.evaluation.n_prompts=4", name="foreign")
    assert code == 0, out[-4000:]
    train = saved(project, "data/03_primary/train_pairs.parquet")
    assert all(is_conversational(p) and plain(p)[0] == SYSTEM for p in train["prompt"])  # the system turn kept
    transform = saved(project, "data/06_models/reward_transform.json")
    assert transform["temperature"] > 0 and math.isfinite(transform["mean"]) and transform["std"] > 0
    reference = saved(project, "data/07_model_output/reference_responses.parquet")
    assert all(plain(p)[0] == SYSTEM for p in reference["prompt"])
    samples = pd.read_csv(sorted((project / "data/07_model_output/ppo_samples.csv").glob("*/ppo_samples.csv"))[-1])
    assert len(samples) and all(json.loads(p)[0] == SYSTEM for p in samples["prompt"])
    run = latest_run(project)
    assert run.data.params["data_prep.source.kind"] == "file"
    metrics = run.data.metrics
    assert "eval/gold_gain" not in metrics  # no gold reward off the synthetic task
    assert math.isfinite(metrics["eval/kl_reference"]) and math.isfinite(metrics["rm/test_accuracy"])

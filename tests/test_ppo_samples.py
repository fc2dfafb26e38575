"""A real `kedro run` of the ppo stage with fewer updates than ``sample_every`` samples nothing, and still saves
``ppo_samples.csv`` as a table that reads back: the header, no rows."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.harness import kedro_run, preload

pytestmark = pytest.mark.slow


def test_no_sampled_update_still_saves_a_readable_samples_table(tiny_run_project):
    project = tiny_run_project
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "ppo", "--params",
                          "ppo.trainer.num_updates=1,ppo.trainer.sample_every=5,ppo.checkpoint_every=null",
                          name="no_samples")
    assert code == 0, out[-3000:]
    root = project / "data" / "07_model_output" / "ppo_samples.csv"
    newest = sorted(p for p in root.iterdir() if (p / "_complete.json").exists())[-1]
    samples = pd.read_csv(newest / root.name)
    assert samples.empty and list(samples.columns) == ["update", "prompt", "response", "score"]

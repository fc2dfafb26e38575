"""Upstream artifacts that do not belong together, refused by a real `kedro run`: after a finished tiny run, a
`data_prep`-only run makes a newer tokenizer; the ppo, rl and dpo stages would then load it beside a reference
policy made from the older one. Each is refused before it starts, naming both versions, and writes nothing."""

from __future__ import annotations

import pytest

from tests.harness import kedro_run, listing, preload, squash

pytestmark = pytest.mark.slow


def test_stages_refuse_a_tokenizer_newer_than_their_policy(tiny_run_project):
    project = tiny_run_project
    preload()
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          "data_prep.source.synthetic.seed=7", name="newer_data_prep")
    assert code == 0, out[-3000:]
    before = listing(project)
    for stage in ("ppo", "rl", "dpo"):
        code, out = kedro_run(project, "--env", "tiny", "--pipelines", stage, name=f"{stage}_mismatched")
        assert code != 0, out[-3000:]
        text = squash(out)
        assert squash("its inputs do not belong together") in text and "InconsistentArtifacts" in text, out[-3000:]
        # both versions named (which two inputs disagree depends on the stage's inputs)
        assert squash("was made from") in text and squash("Rerun the stages after") in text, out[-3000:]
        assert "Running node:" not in out  # refused before the first node
        assert listing(project) == before, sorted(listing(project) - before)

"""``python -m calibrated_rlhf.runtime.real_task``: the model's samples become pairs with a known gold, written for
data_prep, whose file source reads the gold beside them (``data_prep.source.gold_task``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from calibrated_rlhf.core import preferences as prefs
from calibrated_rlhf.core.completions import CompletionParams
from calibrated_rlhf.core.gold import load_gold
from calibrated_rlhf.datasets.gold_task import GoldTaskError, read_gold_task
from calibrated_rlhf.datasets import GoldTaskDataset, PreferenceFileDataset
from calibrated_rlhf.pipelines.data_prep.nodes import SourceParams, load_pairs
from calibrated_rlhf.runtime.real_task import main


def _generate(model, dest, *extra):
    return subprocess.run([sys.executable, "-m", "calibrated_rlhf.runtime.real_task", str(model), str(dest),
                           "--n-prompts", "8",
                           "--samples-per-prompt", "3", "--max-new-tokens", "12", "--n-words", "20",
                           "--min-word-length", "3", "--bayes-accuracy", "0.7", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=["hidden_state", "words"])
def real_task_dir(chat_checkpoint, tmp_path_factory, request):
    dest = tmp_path_factory.mktemp("real_task") / "task"
    proc = _generate(chat_checkpoint, dest, "--gold", request.param)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


def _read(folder):
    source = SourceParams(kind="file", path=str(folder / "pairs.jsonl"), gold_task=str(folder / "gold_task.json"))
    return load_pairs(PreferenceFileDataset(filepath=source.path).load(), GoldTaskDataset(filepath=source.gold_task).load(),
                      source, prefs.MarginParams(), prefs.ValidationParams(), CompletionParams())


@pytest.mark.slow
def test_the_samples_become_pairs_that_data_prep_reads_with_their_gold(real_task_dir, chat_checkpoint):
    assert sorted(p.name for p in real_task_dir.iterdir()) == ["generation.json", "gold_task.json", "pairs.jsonl",
                                                               "samples.jsonl"]
    info = json.loads((real_task_dir / "generation.json").read_text())
    assert info["n_samples"] == 24 and info["bayes_accuracy"] == pytest.approx(0.7, abs=1e-6)
    gold = json.loads((real_task_dir / "gold_task.json").read_text())
    pairs, _, task = _read(real_task_dir)
    assert task == {k: v for k, v in gold.items()} and len(pairs) == info["n_pairs"]
    assert {"true_prob", "gold_chosen", "gold_rejected"} <= set(pairs.columns)
    # the gold every stage reads (load_gold) gives back the gold the labels were drawn from
    read = load_gold(task)
    np.testing.assert_allclose(read.gold_rewards(list(pairs["prompt"]), list(pairs["chosen"])), pairs["gold_chosen"],
                               atol=1e-6)
    np.testing.assert_allclose(pairs["true_prob"], 1 / (1 + np.exp(-read.scale * (pairs["gold_chosen"]
                                                                                  - pairs["gold_rejected"]))))
    if info["spec"]["gold"] == "words":
        samples = [json.loads(line) for line in (real_task_dir / "samples.jsonl").read_text().splitlines()]
        used = {w for s in samples for r in s["samples"] for w in r.lower().split()}
        assert set(gold["words"]) & used  # the gold is over words the model wrote
    else:
        assert task["kind"] == "hidden_state" and task["model"] == str(chat_checkpoint)
        assert len(task["direction"]) == json.loads((chat_checkpoint / "config.json").read_text())["hidden_size"]
        # standardized over the samples it was drawn from: the pairs' gold spreads about 1
        assert 0.3 < np.std(np.concatenate([pairs["gold_chosen"], pairs["gold_rejected"]])) < 3


def test_an_existing_destination_is_refused_before_the_model_loads(tmp_path, capsys):
    dest = tmp_path / "task"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "no-model-here"), str(dest)]) == 1
    assert f"{dest} exists" in capsys.readouterr().out and [p.name for p in dest.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("text, fault", [
    ('{"words": ["a"], "scale": 1.0}', ", field 'utilities': missing"),
    ('{"words": ["a", "b"], "utilities": [0.5], "scale": 1.0}', ", field 'utilities': 1 utilities for 2 words"),
    ('{"words": ["a"], "utilities": ["high"], "scale": 1.0}', ", field 'utilities': expected a list of finite"),
    ('{"words": ["a"], "utilities": [0.5], "scale": 0}', ", field 'scale': expected a positive number, got 0"),
    ('{"words": ["a"],\n "utilities": [0.5,]}', " line 2: not valid JSON"),
    ('["a", 0.5]', ": expected a JSON object"),
])
def test_a_bad_gold_file_is_named_with_its_field(tmp_path, text, fault):
    bad = tmp_path / "gold.json"
    bad.write_text(text)
    with pytest.raises(GoldTaskError) as err:
        read_gold_task(str(bad))
    assert str(err.value).startswith(f"data_prep.source.gold_task '{bad}'{fault}"), str(err.value)


@pytest.mark.parametrize("change, fault", [
    ({"model": "no/such/folder"}, "field 'model': expected the folder of the gold's model, got 'no/such/folder'"),
    ({"direction": [1.0, 2.0]}, "field 'direction': 2 entries for the model's hidden size"),
    ({"direction": [1.0, "x"]}, "field 'direction': expected a non-empty list of finite numbers"),
    ({"offset": None}, "field 'offset': expected a finite number, got None"),
    ({"scale": -1.0}, "field 'scale': expected a positive number, got -1.0"),
])
def test_a_bad_hidden_state_gold_is_named_with_its_field(tmp_path, chat_checkpoint, change, fault):
    width = json.loads((chat_checkpoint / "config.json").read_text())["hidden_size"]
    good = {"kind": "hidden_state", "model": str(chat_checkpoint), "direction": [0.1] * width, "offset": 0.5,
            "scale": 2.0}
    bad = tmp_path / "gold.json"
    bad.write_text(json.dumps({**good, **change}))
    with pytest.raises(GoldTaskError) as err:
        read_gold_task(str(bad))
    assert str(err.value).startswith(f"data_prep.source.gold_task '{bad}', {fault}"), str(err.value)
    bad.write_text(json.dumps(good))
    assert read_gold_task(str(bad)) == good


def test_the_gold_read_must_be_the_one_the_parameters_name(tmp_path):
    """An environment that moves data_prep.source.gold_task but not the catalog's gold_task (or back) would log
    one gold and report against another: refused, naming both."""
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({"words": ["a"], "utilities": [0.5], "scale": 2.0}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a b", "rejected": "c d"}) + "\n")
    read = GoldTaskDataset(filepath=str(gold)).load()
    rest = (prefs.MarginParams(), prefs.ValidationParams(), CompletionParams())
    with pytest.raises(ValueError, match=rf"gold_task is None but the catalog's gold_task read '{gold}'"):
        load_pairs(PreferenceFileDataset(filepath=str(pairs)).load(), read, SourceParams(kind="file", path=str(pairs)),
                   *rest)
    source = SourceParams(kind="file", path=str(pairs), gold_task=str(gold))
    with pytest.raises(ValueError, match="the catalog's gold_task read None"):
        load_pairs(PreferenceFileDataset(filepath=str(pairs)).load(), None, source, *rest)
    _, _, task = load_pairs(PreferenceFileDataset(filepath=str(pairs)).load(), read, source, *rest)
    assert task == {"words": ["a"], "utilities": [0.5], "scale": 2.0}


@pytest.mark.slow
def test_a_kedro_run_on_a_hidden_state_task_reports_its_policies_gold(tiny_run_project, chat_checkpoint,
                                                                       tmp_path_factory):
    """The path a user takes: a task written by the generator, then `kedro run`s that read its pairs and gold from
    the files and evaluate PPO's and RLOO's policies on that gold, which runs the gold's model on their samples."""
    import math

    from mlflow import MlflowClient

    from calibrated_rlhf.core import metric_keys as keys
    from tests.harness import kedro_run, latest_run, preload

    task = tmp_path_factory.mktemp("hidden_state_task") / "task"
    proc = _generate(chat_checkpoint, task, "--n-prompts", "32", "--samples-per-prompt", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    preload()
    project = tiny_run_project
    params = ",".join([
        f"backbone.name_or_path={chat_checkpoint}", f"policy_init.name_or_path={chat_checkpoint}",
        "data_prep.source.kind=file", f"data_prep.source.path={task / 'pairs.jsonl'}",
        f"data_prep.source.gold_task={task / 'gold_task.json'}", "reward_model.training.lora={r: 4}",
        "ppo.trainer.lora={r: 4}", "ppo.trainer.num_updates=2", "normalization.max_new_tokens=8",
        "ppo.evaluation.n_prompts=4", "rl.evaluation.n_prompts=4", "rl.algorithm=rloo"])
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    gold = json.loads((task / "gold_task.json").read_text())
    for pipelines in ("data_prep,reward_model,calibration,policy_init,normalization,ppo", "rl"):
        code, log = kedro_run(project, "--env", "tiny", "--params", params, "--pipelines", pipelines,
                              name=f"hidden_state_{pipelines[-3:]}")
        assert code == 0, log[-4000:]
        run = latest_run(project)
        for key in (keys.EVAL_GOLD_REFERENCE, keys.EVAL_GOLD_POLICY):  # 0 would be a gold never computed
            assert math.isfinite(run.data.metrics[key]) and run.data.metrics[key] != 0, key
        assert math.isfinite(run.data.metrics[keys.EVAL_GOLD_GAIN])
        rollout_gold = keys.PPO_REWARD_GOLD if pipelines != "rl" else keys.RL_REWARD_GOLD
        history = client.get_metric_history(run.info.run_id, rollout_gold)
        assert history and all(math.isfinite(m.value) for m in history)
        if pipelines != "rl":
            assert run.data.metrics[keys.CALIBRATION_TRUE_SCALE] == pytest.approx(gold["scale"])

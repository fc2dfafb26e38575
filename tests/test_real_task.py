"""``python -m calibrated_rlhf.runtime.real_task``: the model's samples become pairs with a known gold, written for
data_prep, whose file source reads the gold beside them (``data_prep.source.gold_task``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from calibrated_rlhf.core import preferences as prefs
from calibrated_rlhf.core.completions import CompletionParams
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


@pytest.fixture(scope="module")
def real_task_dir(chat_checkpoint, tmp_path_factory):
    dest = tmp_path_factory.mktemp("real_task") / "task"
    proc = _generate(chat_checkpoint, dest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


@pytest.mark.slow
def test_the_samples_become_pairs_that_data_prep_reads_with_their_gold(real_task_dir):
    assert sorted(p.name for p in real_task_dir.iterdir()) == ["generation.json", "gold_task.json", "pairs.jsonl",
                                                               "samples.jsonl"]
    info = json.loads((real_task_dir / "generation.json").read_text())
    assert info["n_samples"] == 24 and info["bayes_accuracy"] == pytest.approx(0.7, abs=1e-6)
    gold = json.loads((real_task_dir / "gold_task.json").read_text())
    source = SourceParams(kind="file", path=str(real_task_dir / "pairs.jsonl"),
                          gold_task=str(real_task_dir / "gold_task.json"))
    pairs, _, task = load_pairs(PreferenceFileDataset(filepath=source.path).load(),
                                GoldTaskDataset(filepath=source.gold_task).load(), source, prefs.MarginParams(),
                                prefs.ValidationParams(), CompletionParams())
    assert task["words"] == gold["words"] and task["scale"] == gold["scale"]
    assert len(pairs) == info["n_pairs"] and {"true_prob", "gold_chosen", "gold_rejected"} <= set(pairs.columns)
    samples = [json.loads(line) for line in (real_task_dir / "samples.jsonl").read_text().splitlines()]
    used = {w for s in samples for r in s["samples"] for w in r.lower().split()}
    assert set(gold["words"]) & used  # the gold is over words the model wrote


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

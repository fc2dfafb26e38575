"""Every data format and every validation check through the real `kedro run --pipelines data_prep`.

Each source format (JSON lines, a JSON array, Parquet, CSV, a Hugging Face `save_to_disk` folder), with
plain text or conversational messages, goes through the catalog (Parquet round trip included) and
comes back as the pairs it was written from. One file holding one bad row of every kind is an error
naming the file, row and field when set to `error`, and is dropped and counted per kind when set to
`drop`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.harness import kedro_run, latest_run, listing, preload, saved, squash
from tests.project import make_project

pytestmark = pytest.mark.slow

N_PROMPTS, PER_PROMPT = 12, 4


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    preload()
    root = make_project(tmp_path_factory.mktemp("formats") / "project", store=True)
    (root / "inputs").mkdir()
    return root


def rows(conversational: bool) -> list[dict]:
    def text(role: str, value: str):
        return [{"role": role, "content": value}] if conversational else value

    return [{"prompt": text("user", f"Describe city {i % N_PROMPTS}."), "chosen": text("assistant", f" calm bright {i}"),
             "rejected": text("assistant", f" dull grey {i}"), "chosen_rating": 4, "rejected_rating": 2}
            for i in range(N_PROMPTS * PER_PROMPT)]


def write(rows_: list[dict], path: Path, kind: str) -> Path:
    df = pd.DataFrame(rows_)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    elif kind == "json":
        path.write_text(json.dumps(rows_))
    elif kind == "parquet":
        df.to_parquet(path)
    elif kind == "csv":  # messages travel as JSON text in CSV
        for col in ("prompt", "chosen", "rejected"):
            df[col] = [json.dumps(v) if isinstance(v, list) else v for v in df[col]]
        df.to_csv(path, index=False)
    else:
        from datasets import Dataset

        Dataset.from_pandas(df).save_to_disk(str(path))
    return path


def source_params(path: Path, kind: str) -> str:
    return ",".join([f"data_prep.source.kind={'huggingface' if kind == 'hf' else 'file'}",
                     f"data_prep.source.path={path}"])


# Every format once; messages where the format makes them hardest to keep (CSV as JSON text, Parquet and
# Arrow as arrays), plain text in JSON lines and a JSON array.
@pytest.mark.parametrize("kind, conversational", [("jsonl", False), ("json", False), ("parquet", True),
                                                  ("csv", True), ("hf", True)])
def test_each_format_comes_back_as_the_pairs_it_was_written_from(project, kind, conversational):
    written = rows(conversational)
    suffix = {"hf": ""}.get(kind, f".{kind}")
    path = write(written, project / "inputs" / f"pairs_{kind}_{conversational}{suffix}", kind)
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          source_params(path, kind), name=f"{kind}_{conversational}")
    assert code == 0, out[-3000:]
    splits = pd.concat([saved(project, f"data/03_primary/{s}_pairs.parquet")
                        for s in ("train", "validation", "calibration", "test")])
    assert len(splits) == len(written)
    by_id = splits.set_index("pair_id").sort_index()
    for i, row in enumerate(written):  # the Parquet round trip gives back lists of dicts, not arrays
        got = by_id.loc[i]
        assert [_plain(got[c]) for c in ("prompt", "chosen", "rejected")] == [row[c] for c in ("prompt", "chosen",
                                                                                              "rejected")]
    assert (by_id["margin"] == 2.0).all()  # from the ratings, rating_scale 1


def _plain(value):
    """Plain Python for comparing (pandas hands list columns back as numpy arrays)."""
    import numpy as np

    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


BAD = {  # one bad row of each kind: row index -> (kind, field, what)
    3: ("bad_text", "chosen", lambda r: r.update(chosen="")),
    5: ("identical", "chosen/rejected", lambda r: r.update(rejected=r["chosen"])),
    9: ("bad_margin", "chosen_rating/rejected_rating", lambda r: r.update(chosen_rating=1, rejected_rating=5)),
}


def bad_rows() -> list[dict]:
    out = rows(False)
    for index, (_, _, spoil) in BAD.items():
        spoil(out[index])
    out.append(dict(out[20]))  # a duplicate of row 20 (row 48)
    return out


def test_every_check_set_to_error_names_file_row_and_field_and_writes_nothing(project):
    path = write(bad_rows(), project / "inputs" / "bad.jsonl", "jsonl")
    before = listing(project)
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params", source_params(path, "jsonl"),
                          name="bad_error")
    assert code != 0
    assert squash(f"invalid preference data in '{path}'") in squash(out), out[-3000:]
    for index, (_, field, _) in BAD.items():
        assert squash(f"in field '{field}': rows {index}") in squash(out), (field, out[-3000:])
    assert squash("rows 48") in squash(out)  # the duplicate
    assert listing(project) == before


def test_every_check_set_to_drop_is_counted_per_kind(project):
    path = write(bad_rows(), project / "inputs" / "bad_drop.jsonl", "jsonl")
    drop = ",".join(f"data_prep.validation.{k}=drop" for k in ("bad_text", "identical", "bad_margin", "duplicate"))
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          f"{source_params(path, 'jsonl')},{drop}", name="bad_drop")
    assert code == 0, out[-3000:]
    m = latest_run(project).data.metrics
    for kind, _, _ in BAD.values():
        assert m[f"data/n_dropped_{kind}"] == 1, kind
    assert m["data/n_dropped_duplicate"] == 1
    assert m["data/n_dropped"] == 4
    assert sum(m[f"data/n_{s}"] for s in ("train", "validation", "calibration", "test")) == len(bad_rows()) - 4


# ---- Hugging Face data and the gold task come through the catalog (preference_file, gold_task) -----------


def test_a_save_to_disk_split_is_read_by_the_catalog_and_named_in_the_run(project):
    """The split the parameters name is the one trained on, and the run's parameters name it; a split the
    folder lacks fails naming it and the folder, writing nothing."""
    from datasets import Dataset, DatasetDict

    def split(start: int, n: int) -> Dataset:
        return Dataset.from_dict({k: [r[k] for r in rows(False)[start:start + n]]
                                  for k in ("prompt", "chosen", "rejected")})

    folder = project / "inputs" / "hub_copy"
    DatasetDict({"train": split(0, 40), "test": split(20, 28)}).save_to_disk(str(folder))
    hub = f"data_prep.source.kind=huggingface,data_prep.source.path={folder}"
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          f"{hub},data_prep.source.split=test", name="hf_split")
    assert code == 0, out[-3000:]
    assert squash(f"read 28 pairs from Hugging Face data '{folder}'") in squash(out), out[-3000:]
    splits = pd.concat([saved(project, f"data/03_primary/{s}_pairs.parquet")
                        for s in ("train", "validation", "calibration", "test")])
    assert sorted(splits["chosen"]) == sorted(r["chosen"] for r in rows(False)[20:48])
    params = latest_run(project).data.params
    assert (params["data_prep.source.kind"], params["data_prep.source.path"], params["data_prep.source.split"]) \
        == ("huggingface", str(folder), "test")

    before = listing(project)
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          f"{hub},data_prep.source.split=dev", name="hf_no_split")
    assert code != 0
    assert squash(f"data_prep.source.split 'dev' not in ['train', 'test'] of '{folder}'") in squash(out), out[-3000:]
    assert listing(project) == before


GOLD = {"words": ["calm", "bright", "dull", "grey"], "utilities": [0.5, 0.25, -0.5, -0.25], "scale": 3.0}


def test_the_gold_task_is_read_by_the_catalog_and_a_malformed_one_names_file_and_field(project):
    pairs = write(rows(False), project / "inputs" / "gold_pairs.jsonl", "jsonl")
    gold = project / "inputs" / "gold_task.json"
    gold.write_text(json.dumps(GOLD))
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          f"{source_params(pairs, 'jsonl')},data_prep.source.gold_task={gold}", name="gold_good")
    assert code == 0, out[-3000:]
    assert saved(project, "data/01_raw/synthetic_task.json") == GOLD
    assert latest_run(project).data.params["data_prep.source.gold_task"] == str(gold)

    bad = project / "inputs" / "gold_bad.json"
    bad.write_text(json.dumps({**GOLD, "utilities": GOLD["utilities"][:3]}))
    before = listing(project)
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          f"{source_params(pairs, 'jsonl')},data_prep.source.gold_task={bad}", name="gold_bad")
    assert code != 0
    assert squash(f"data_prep.source.gold_task '{bad}', field 'utilities': 3 utilities for 4 words") in squash(out), \
        out[-3000:]
    assert listing(project) == before


def test_files_named_relative_to_the_project_are_read(project):
    # conf/real_model names its pairs and gold relative to the project folder. Kedro's catalog makes a relative
    # filepath absolute and leaves the parameters as written: the check that both name one file once refused
    # every such run.
    write(rows(False), project / "inputs" / "relative_pairs.jsonl", "jsonl")
    (project / "inputs" / "relative_gold.json").write_text(json.dumps(GOLD))
    code, out = kedro_run(project, "--env", "tiny", "--pipelines", "data_prep", "--params",
                          "data_prep.source.kind=file,data_prep.source.path=inputs/relative_pairs.jsonl,"
                          "data_prep.source.gold_task=inputs/relative_gold.json", name="relative")
    assert code == 0, out[-3000:]
    assert saved(project, "data/01_raw/synthetic_task.json") == GOLD
    assert latest_run(project).data.params["data_prep.source.path"] == "inputs/relative_pairs.jsonl"

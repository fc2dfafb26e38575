import json

import pandas as pd
import pytest
from kedro.io import DatasetError

from calibrated_rlhf.core.completions import CompletionParams
from calibrated_rlhf.core.preferences import MarginParams, PreferenceDataError, SplitParams, ValidationParams
from calibrated_rlhf.datasets import PreferenceFileDataset
from calibrated_rlhf.pipelines.data_prep import create_pipeline
from calibrated_rlhf.pipelines.data_prep import nodes
from tests.pipelines.helpers import data_prep_params, run


def params(source: nodes.SourceParams, **validation) -> dict:
    return data_prep_params(source, **validation)


def read_source(source: nodes.SourceParams) -> tuple[pd.DataFrame, str]:
    """The node's reading of a source, the file read by the catalog's dataset as in a run. Kedro wraps a
    dataset's error in a DatasetError that repeats its message; the original is raised here, to test its type."""
    try:
        loaded = PreferenceFileDataset(filepath=source.path, kind=source.kind, split=source.split).load()
    except DatasetError as e:
        assert str(e.__cause__) in str(e)  # what the run prints names the file as the reader did
        raise e.__cause__ from None
    return nodes.read_source(source, loaded)


def load_pairs(source: nodes.SourceParams, *rest):
    return nodes.load_pairs(PreferenceFileDataset(filepath=source.path, kind=source.kind).load(), None, source, *rest)


def synthetic(**kw) -> nodes.SourceParams:
    return nodes.SourceParams(synthetic=nodes.SyntheticParams(n_pairs=240, n_words=12, max_words=5, **kw))


def test_data_prep_on_synthetic_task_gives_disjoint_splits_and_metrics():
    out = run(create_pipeline(), params(synthetic()))
    splits = [out[f"{s}_pairs"] for s in ("train", "validation", "calibration", "test")]
    prompts = [set(df["prompt"]) for df in splits]
    assert all(not (a & b) for i, a in enumerate(prompts) for b in prompts[i + 1:])
    metrics = {k: v["value"] for k, v in out["data_metrics"].items()}
    assert metrics["data/n_train"] + metrics["data/n_validation"] + metrics["data/n_calibration"] \
        + metrics["data/n_test"] == 240
    assert metrics["data/n_dropped"] == 0
    assert set(out["data_tags"]) == {f"data/content_hash/{s}" for s in ("train", "validation", "calibration", "test")}
    assert out["synthetic_task"]["scale"] == 4.0 and "true_prob" in out["test_pairs"].columns
    ids = out["tokenizer"](out["train_pairs"]["prompt"][0] + out["train_pairs"]["chosen"][0])["input_ids"]
    assert out["tokenizer"].unk_token_id not in ids  # trained on this text


def test_too_long_pairs_are_dropped_and_counted():
    out = run(create_pipeline(), params(synthetic(), max_length=14))
    metrics = {k: v["value"] for k, v in out["data_metrics"].items()}
    assert metrics["data/n_dropped"] == metrics["data/n_dropped_too_long"] > 0
    assert sum(metrics[f"data/n_{s}"] for s in ("train", "validation", "calibration", "test")) \
        == 240 - metrics["data/n_dropped"]


def write(df: pd.DataFrame, path, kind: str) -> None:
    if kind == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif kind == "parquet":
        df.to_parquet(path)
    else:
        out = df.copy()
        for col in ("prompt", "chosen", "rejected"):
            out[col] = [json.dumps(v) if isinstance(v, list) else v for v in out[col]]
        out.to_csv(path, index=False)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
@pytest.mark.parametrize("conversational", [False, True])
def test_file_sources_by_configuration(tmp_path, synthetic_pairs, kind, conversational):
    df = synthetic_pairs[["prompt", "chosen", "rejected"]].copy()
    if conversational:
        df = pd.DataFrame({
            "prompt": [[{"role": "user", "content": p}] for p in df["prompt"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in df["chosen"]],
            "rejected": [[{"role": "assistant", "content": r}] for r in df["rejected"]],
        })
    path = tmp_path / f"pairs.{kind}"
    write(df, path, kind)
    valid, dropped, task = load_pairs(nodes.SourceParams(kind="file", path=str(path)), MarginParams(),
                                            ValidationParams(), CompletionParams())
    assert task == {} and dropped == {} and len(valid) == len(df)
    assert valid.loc[0, "chosen"] == df.loc[0, "chosen"]
    assert all(type(v) is type(df.loc[0, "chosen"]) for v in valid["chosen"])  # lists, not numpy arrays


def test_huggingface_save_to_disk_folder(tmp_path, synthetic_pairs):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_pandas(synthetic_pairs[["prompt", "chosen", "rejected"]])
    DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(tmp_path / "hf")
    raw, _ = read_source(nodes.SourceParams(kind="huggingface", path=str(tmp_path / "hf"), split="test"))
    assert len(raw) == 10 and list(raw["chosen"]) == list(synthetic_pairs["chosen"][:10])
    with pytest.raises(ValueError, match="split 'dev' not in"):
        read_source(nodes.SourceParams(kind="huggingface", path=str(tmp_path / "hf"), split="dev"))
    # the catalog read another split, or a file, than the parameters name: refused, naming both
    train = PreferenceFileDataset(filepath=str(tmp_path / "hf"), kind="huggingface").load()
    with pytest.raises(ValueError, match="names Hugging Face split 'test' but the catalog's preference_file read "
                                         "Hugging Face split 'train'"):
        nodes.read_source(nodes.SourceParams(kind="huggingface", path=str(tmp_path / "hf"), split="test"), train)
    with pytest.raises(ValueError, match="names a file but the catalog's preference_file read Hugging Face split"):
        nodes.read_source(nodes.SourceParams(kind="file", path=str(tmp_path / "hf")), train)


def test_a_hub_id_is_read_as_written_though_the_catalog_made_its_filepath_absolute(tmp_path, synthetic_pairs,
                                                                                   monkeypatch):
    # Kedro's catalog turns filepath 'org/prefs' into '<project>/org/prefs'; the hub (out of reach here) must
    # still be asked for 'org/prefs', and the node must see the setting it names.
    import datasets
    from kedro.framework.context.context import _convert_paths_to_absolute_posix

    asked = []

    def load_dataset(path, split):
        asked.append((path, split))
        return datasets.Dataset.from_pandas(synthetic_pairs[["prompt", "chosen", "rejected"]].head(6))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    conf = _convert_paths_to_absolute_posix(tmp_path, {"preference_file": {
        "kind": "huggingface", "filepath": "org/prefs", "split": "train", "hub_id": "org/prefs"}})["preference_file"]
    assert conf["filepath"] == f"{tmp_path.as_posix()}/org/prefs" and conf["hub_id"] == "org/prefs"
    raw = PreferenceFileDataset(**conf).load()
    assert asked == [("org/prefs", "train")] and len(raw) == 6
    got, _ = nodes.read_source(nodes.SourceParams(kind="huggingface", path="org/prefs", split="train"), raw)
    assert len(got) == 6
    # a local save_to_disk folder given relative is read from where the catalog put it
    datasets.Dataset.from_pandas(synthetic_pairs[["prompt", "chosen", "rejected"]].head(4)).save_to_disk(
        tmp_path / "org" / "local")
    local = dict(conf, filepath=f"{tmp_path.as_posix()}/org/local", hub_id="org/local")
    assert len(PreferenceFileDataset(**local).load()) == 4 and len(asked) == 1


def test_list_of_files_tags_source_file(tmp_path, synthetic_pairs):
    a, b = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    write(synthetic_pairs[:200], a, "jsonl")
    write(synthetic_pairs[200:], b, "jsonl")
    raw, where = read_source(nodes.SourceParams(kind="file", path=[str(a), str(b)]))
    assert where == f"'{a}' (pair_id 0-199), '{b}' (pair_id 200-239)"
    assert raw["source_file"].value_counts().to_dict() == {"train": 200, "heldout": 40}


def test_bad_file_data_fails_naming_rows(tmp_path, synthetic_pairs):
    df = synthetic_pairs[["prompt", "chosen", "rejected"]].copy()
    df.loc[7, "chosen"] = ""
    write(df, tmp_path / "bad.jsonl", "jsonl")
    inputs = params(nodes.SourceParams(kind="file", path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(PreferenceDataError, match=r"(?s)'.*bad\.jsonl'.*field 'chosen': rows 7 \(row 7: empty text\)"):
        run(create_pipeline(), inputs)


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="path is required"):
        nodes.SourceParams(kind="file")
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_source(nodes.SourceParams(kind="file", path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_source(nodes.SourceParams(kind="file", path=str(tmp_path / "x.txt")))


def test_the_file_read_must_be_the_one_the_parameters_name(tmp_path, synthetic_pairs):
    """An environment that moves data_prep.source.path but not the catalog's preference_file (or back) would
    log one file and train on another: refused, naming both."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write(synthetic_pairs[:20], a, "jsonl")
    write(synthetic_pairs[20:40], b, "jsonl")
    read_b = PreferenceFileDataset(filepath=str(b)).load()
    with pytest.raises(ValueError, match=rf"data_prep.source.path is '{a}' but the catalog's preference_file read '{b}'"):
        nodes.read_source(nodes.SourceParams(kind="file", path=str(a)), read_b)
    with pytest.raises(ValueError, match="preference_file read None"):
        nodes.read_source(nodes.SourceParams(kind="file", path=str(a)), None)
    assert PreferenceFileDataset(filepath=str(a), kind="synthetic").load() is None  # not a file source: not read
    raw, where = nodes.read_source(nodes.SourceParams(kind="file", path=str(b)), read_b)
    assert where == f"'{b}'" and list(raw["chosen"]) == list(synthetic_pairs["chosen"][20:40])


def test_read_errors_name_the_file_and_the_line_or_row(tmp_path):
    def read(name: str, text: str):
        (tmp_path / name).write_text(text)
        return read_source(nodes.SourceParams(kind="file", path=str(tmp_path / name)))

    good = '{"prompt": "Q", "chosen": " a", "rejected": " b"}\n'
    with pytest.raises(PreferenceDataError, match=r"'.*bad\.jsonl' line 3: not valid JSON \(Expecting"):
        read("bad.jsonl", good + "\n" + '{"prompt": "Q", "chosen": " a",\n')
    with pytest.raises(PreferenceDataError, match=r"'.*list\.jsonl' line 2: expected a JSON object, got list"):
        read("list.jsonl", good + "[1, 2]\n")
    for name in ("empty.csv", "empty.jsonl", "blank.json"):
        with pytest.raises(PreferenceDataError, match=rf"'.*{name}' is empty"):
            read(name, "" if name.startswith("empty") else "\n \n")
    with pytest.raises(PreferenceDataError, match=r"'.*header\.csv' has no rows"):
        read("header.csv", "prompt,chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match=r"'.*msgs\.csv' row 1 \(0-based, header excluded\), field 'chosen': "
                                                  r"messages are not valid JSON"):
        read("msgs.csv", 'prompt,chosen,rejected\nQ,"[{""role"": ""a"", ""content"": ""x""}]",b\n'
                         'Q,"[{""role"": ""a"", ",b\n')
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(PreferenceDataError, match="empty.parquet' is empty"):
        read_source(nodes.SourceParams(kind="file", path=str(tmp_path / "empty.parquet")))


def test_parquet_message_lists_come_back_as_lists_and_split(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"Q{i % 8}"}], "chosen": [{"role": "assistant", "content": f"a{i}"}],
             "rejected": [{"role": "assistant", "content": f"b{i}"}]} for i in range(32)]
    pd.DataFrame(rows).to_parquet(tmp_path / "conv.parquet")
    pairs, dropped, _ = load_pairs(nodes.SourceParams(kind="file", path=str(tmp_path / "conv.parquet")),
                                         MarginParams(), ValidationParams(), CompletionParams())
    assert pairs.loc[5, "chosen"] == rows[5]["chosen"] and isinstance(pairs.loc[5, "prompt"], list)
    pairs.to_parquet(tmp_path / "saved.parquet")  # as the catalog saves raw_pairs and split_pairs reads it back
    splits = nodes.split_pairs(pd.read_parquet(tmp_path / "saved.parquet"), SplitParams())
    assert sum(len(s) for s in splits) == 32 and isinstance(splits[0].loc[0, "chosen"], list)

"""Nodes of ``data_prep``: thin adapters over ``calibrated_rlhf.core``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, Field, model_validator

from calibrated_rlhf.core import preferences as prefs
from calibrated_rlhf.core.backbone import BackboneParams, load_tokenizer, train_tokenizer
from calibrated_rlhf.core.synthetic import SyntheticSpec, make_pairs, make_task
from calibrated_rlhf.pipelines.metrics import as_metrics

log = logging.getLogger(__name__)


class SyntheticParams(BaseModel):
    seed: int = 0
    n_pairs: int = Field(9600, ge=8)
    n_words: int = Field(40, ge=2)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(8, ge=1)
    scale: float = Field(4.0, gt=0, description="True preference scale s: p = sigmoid(s * (g_chosen - g_rejected)).")
    pairs_per_prompt: int = Field(4, ge=1)
    n_rating_levels: int = Field(0, ge=0, description="> 0 adds per-response ratings (graded preferences).")


class SourceParams(BaseModel):
    """Where the preference pairs come from."""

    kind: Literal["synthetic", "file", "huggingface"] = Field(
        "synthetic", description="synthetic task, a local .jsonl/.json/.parquet/.csv file, or a Hugging Face data set."
    )
    path: str | list[str] | None = Field(
        None,
        description="file: its path, or a list of files (each row gets a source_file column: the file's stem); "
        "huggingface: a hub id or a save_to_disk folder.",
    )
    split: str = Field("train", description="huggingface: which split to read.")
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _path_given(self) -> SourceParams:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"data_prep.source.path is required when kind is '{self.kind}'")
        return self


def _read_file(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data_prep.source.path: no file at '{path}'")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        try:
            return pd.read_json(p, lines=suffix == ".jsonl" or p.read_text()[:1] != "[")
        except ValueError as e:
            raise prefs.PreferenceDataError(f"'{path}' is not valid JSON lines: {e}") from e
    if suffix == ".parquet":
        return pd.read_parquet(p)
    if suffix == ".csv":
        df = pd.read_csv(p, keep_default_na=False)
        # Conversational data in CSV can only travel as JSON text; decode it back into messages.
        for col in prefs.TEXT_FIELDS:
            if col in df.columns:
                df[col] = [json.loads(v) if isinstance(v, str) and v.lstrip().startswith("[{") else v for v in df[col]]
        return df
    raise ValueError(f"data_prep.source.path: unsupported file type '{suffix}' (use .jsonl, .json, .parquet or .csv)")


def _read_huggingface(path: str, split: str) -> pd.DataFrame:
    import datasets

    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data_prep.source.split '{split}' not in {list(ds)} of '{path}'")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(path, split=split)
    return ds.to_pandas()


def load_raw_pairs(source: SourceParams) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Raw pairs from the configured source, and the synthetic task's ground truth (empty otherwise)."""
    if source.kind == "synthetic":
        spec = SyntheticSpec(**source.synthetic.model_dump())
        task = make_task(spec)
        return make_pairs(spec, task), {**task.to_dict(), "spec": spec.to_dict()}
    if source.kind == "file":
        paths = [source.path] if isinstance(source.path, str) else source.path
        frames = [_read_file(p) for p in paths]
        if len(paths) > 1:
            frames = [f.assign(source_file=Path(p).stem) for f, p in zip(frames, paths)]
        raw = pd.concat(frames, ignore_index=True)
    else:
        raw = _read_huggingface(source.path, source.split)
    log.info("read %d pairs from %s '%s'", len(raw), source.kind, source.path)
    return raw, {}


def validate_pairs(
    raw_pairs: pd.DataFrame, margin: prefs.MarginParams, validation: prefs.ValidationParams
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Canonical, valid pairs; raises on problems set to ``error``, drops and counts the rest."""
    pairs = prefs.standardize(raw_pairs, margin)
    clean, dropped = prefs.apply_validation(pairs, prefs.find_problems(pairs), validation)
    for kind, n in dropped.items():
        log.warning("dropped %d pair(s): %s", n, kind)
    return clean, dropped


def split_pairs(pairs: pd.DataFrame, split: prefs.SplitParams) -> tuple[pd.DataFrame, ...]:
    """Train, validation, calibration and test pairs; no prompt in two splits."""
    assignment = prefs.assign_splits(pairs, split)
    return tuple(pairs[assignment == s].reset_index(drop=True) for s in prefs.SPLITS)


def build_tokenizer(train_pairs: pd.DataFrame, backbone: BackboneParams) -> Any:
    """The backbone's tokenizer, or a BPE tokenizer trained on the training text for the tiny default."""
    if backbone.name_or_path:
        return load_tokenizer(backbone.name_or_path)

    def texts(value: Any) -> list[str]:
        if prefs.is_conversational(value):
            return [m["content"] for m in value]
        return [value] if isinstance(value, str) else []

    corpus = [t for col in prefs.TEXT_FIELDS for v in train_pairs[col] for t in texts(v)]
    return train_tokenizer(corpus, backbone.vocab_size)


def check_lengths(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    calibration: pd.DataFrame,
    test: pd.DataFrame,
    tokenizer: Any,
    params: prefs.ValidationParams,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, int]]:
    """Enforce ``max_length`` with the real tokenizer: an error naming the rows, or a counted drop."""
    frames = (train, validation, calibration, test)
    too_long = [p for df in frames for p in prefs.find_too_long(df, tokenizer, params.max_length)]
    frames = tuple(prefs.apply_validation(df, too_long, params)[0] for df in frames)
    n = len({r for p in too_long for r in p.rows})
    if n:
        log.warning("dropped %d pair(s) longer than %d tokens", n, params.max_length)
    return (*frames, {"too_long": n})


def report_data(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    calibration: pd.DataFrame,
    test: pd.DataFrame,
    dropped_invalid: dict[str, int],
    dropped_length: dict[str, int],
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Split sizes and drop counts as metrics; the data's content hash per split as tags."""
    dropped = {**dropped_invalid, **{k: v for k, v in dropped_length.items() if v}}
    values = {
        "data/n_train": len(train),
        "data/n_validation": len(validation),
        "data/n_calibration": len(calibration),
        "data/n_test": len(test),
        "data/n_dropped": sum(dropped.values()),
        **{f"data/n_dropped_{k}": v for k, v in dropped.items()},
    }
    tags = {f"data/content_hash/{s}": prefs.content_hash(df)
            for s, df in zip(prefs.SPLITS, (train, validation, calibration, test))}
    return as_metrics(values), tags

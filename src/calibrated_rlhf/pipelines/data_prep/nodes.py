"""Nodes of ``data_prep``: thin adapters over ``calibrated_rlhf.core``."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any, Literal

import pandas as pd
from pydantic import Field, model_validator

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core import preferences as prefs
from calibrated_rlhf.core.backbone import BackboneParams, chat_corpus_text, load_tokenizer, train_tokenizer
from calibrated_rlhf.core.completions import CompletionParams, completions_to_pairs, is_rated_completions
from calibrated_rlhf.core.synthetic import SyntheticSpec, make_pairs, make_task
from calibrated_rlhf.datasets.preference_file import FILEPATH_ATTR, SOURCE_ATTR, SPLIT_ATTR
from calibrated_rlhf.pipelines.metrics import as_metrics
from calibrated_rlhf.pipelines.params import StrictParams

log = logging.getLogger(__name__)


class SyntheticParams(StrictParams):
    seed: int = 0
    n_pairs: int = Field(9600, ge=8)
    n_words: int = Field(40, ge=2)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(8, ge=1)
    scale: float = Field(4.0, gt=0, description="True preference scale s: p = sigmoid(s * (g_chosen - g_rejected)).")
    pairs_per_prompt: int = Field(4, ge=1)
    n_rating_levels: int = Field(0, ge=0, description="> 0 adds per-response ratings (graded preferences).")
    format: Literal["text", "conversational"] = Field(
        "text", description="text pairs, or the same pairs as chat messages (a user prompt, assistant replies) "
        "rendered with the tokenizer's chat template in every stage.")
    max_repeats: int = Field(0, ge=0, description="> 0: a word's occurrences past this many in one response carry "
                             "repeat_utility in the gold (the over-optimization task); 0: off.")
    repeat_utility: float = Field(-1.0, description="The gold utility of a repeat past max_repeats.")


class SourceParams(StrictParams):
    """Where the preference pairs come from."""

    kind: Literal["synthetic", "file", "huggingface"] = Field(
        "synthetic", description="synthetic task, a local .jsonl/.json/.parquet/.csv file, or a Hugging Face data set."
    )
    path: str | list[str] | None = Field(
        None,
        description="file: its path, or a list of files (each row gets a source_file column: the file's stem); "
        "huggingface: a hub id or a save_to_disk folder.",
    )
    split: str = Field("train", description="huggingface: which split to read (the catalog's preference_file "
                       "reads it).")
    gold_task: str | None = Field(
        None, description="file or hub data: a JSON file with the hidden gold the pairs were labelled with (words, "
        "utilities, scale; written by `python -m calibrated_rlhf.runtime.real_task`), so the gold figures are reported "
        "as on the synthetic task; read and checked by the catalog's gold_task.")
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _path_given(self) -> SourceParams:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"data_prep.source.path is required when kind is '{self.kind}'")
        return self


def _same_path(read: Any, configured: Any) -> bool:
    """Whether the catalog read what the parameters name. Kedro's catalog makes a relative ``filepath`` absolute
    against the project folder (``project / path``) and leaves the parameters as written, so a relative setting
    matches the absolute path that ends with it."""
    if read == configured or not (isinstance(read, str) and isinstance(configured, str)):
        return read == configured
    relative = PurePosixPath(configured)
    return not relative.is_absolute() and read.endswith(f"/{relative.as_posix()}")


def read_source(source: SourceParams, preference_file: pd.DataFrame | None) -> tuple[pd.DataFrame, str]:
    """A file or Hugging Face source's rows, read by the catalog's ``preference_file``, and how to name them in
    errors. What it read must be what ``data_prep.source`` names (both follow one setting; an environment that
    moves only one is refused here)."""
    read = None if preference_file is None else preference_file.attrs.get(FILEPATH_ATTR)
    if not _same_path(read, source.path):
        raise ValueError(f"data_prep.source.path is {source.path!r} but the catalog's preference_file read {read!r}: "
                         "set both through --params data_prep.source.path=... or the environment's globals.yml "
                         "(preference_source.path)")
    wanted, split = source.split if source.kind == "huggingface" else None, preference_file.attrs.get(SPLIT_ATTR)
    if split != wanted:
        def named(s: str | None) -> str:
            return "a file" if s is None else f"Hugging Face split {s!r}"

        raise ValueError(f"data_prep.source names {named(wanted)} but the catalog's preference_file read "
                         f"{named(split)}: set both through --params data_prep.source.kind=...,data_prep.source.split="
                         "... or the environment's globals.yml (preference_source)")
    return preference_file, preference_file.attrs[SOURCE_ATTR]


def gold_of(source: SourceParams, gold_task: dict[str, Any] | None) -> dict[str, Any]:
    """The gold the catalog's ``gold_task`` read (already checked), {} without; refused unless it read the file
    ``data_prep.source.gold_task`` names."""
    read = None if gold_task is None else gold_task["filepath"]
    if not _same_path(read, source.gold_task):
        raise ValueError(f"data_prep.source.gold_task is {source.gold_task!r} but the catalog's gold_task read "
                         f"{read!r}: set both through --params data_prep.source.gold_task=... or the environment's "
                         "globals.yml (preference_source.gold_task)")
    return {} if gold_task is None else gold_task["task"]


def load_pairs(
    preference_file: pd.DataFrame | None, gold_task: dict[str, Any] | None, source: SourceParams,
    margin: prefs.MarginParams, validation: prefs.ValidationParams, completions: CompletionParams,
) -> tuple[pd.DataFrame, dict[str, int], dict[str, Any]]:
    """Validated canonical pairs from the configured source, the drop counts, and the synthetic task's
    ground truth (for a file or hub data, the catalog's ``gold_task``; empty without). Rated completions
    (prompt, completions, ratings) become pairs first.
    Validation happens here, before the first save: bad data fails the run naming the source, rows and
    field, and leaves no artifact behind."""
    ties = 0
    if source.kind == "synthetic":
        spec = SyntheticSpec(**source.synthetic.model_dump())
        task = make_task(spec)
        raw, task_dict, where = make_pairs(spec, task), {**task.to_dict(), "spec": spec.to_dict()}, "synthetic task"
    else:
        (raw, where), task_dict = read_source(source, preference_file), gold_of(source, gold_task)
        if is_rated_completions(raw, completions):
            n_rows = len(raw)
            raw, ties = completions_to_pairs(raw, completions, where)
            log.info("built %d pairs from %d rated rows (%s), %d tie(s) dropped", len(raw), n_rows, completions.rule,
                     ties)
    log.info("read %d pairs from %s", len(raw), where)
    # The synthetic task's ratings bin the gold reward while its labels are sampled: they disagree by design.
    pairs, dropped = prefs.validate(raw, margin, validation, check_ratings=source.kind != "synthetic", source=where)
    dropped = {**dropped, "ties": ties} if ties else dropped
    for kind, n in dropped.items():
        log.warning("dropped %d pair(s): %s", n, kind)
    return pairs, dropped, task_dict


def split_pairs(pairs: pd.DataFrame, split: prefs.SplitParams) -> tuple[pd.DataFrame, ...]:
    """Train, validation, calibration and test pairs; no prompt in two splits."""
    pairs = prefs.plain_frame(pairs)  # read back from Parquet: message lists arrive as numpy arrays
    assignment = prefs.assign_splits(pairs, split)
    return tuple(pairs[assignment == s].reset_index(drop=True) for s in prefs.SPLITS)


def build_tokenizer(train_pairs: pd.DataFrame, backbone: BackboneParams, validation: prefs.ValidationParams) -> Any:
    """The backbone's tokenizer, or a BPE tokenizer trained on the training text for the tiny default.

    Its ``model_max_length`` records ``max_length``, the longest pair training sees, so the served model
    can refuse longer inputs.
    """
    if backbone.name_or_path:
        tokenizer = load_tokenizer(backbone.name_or_path, backbone.gguf_file)
    else:
        def texts(value: Any) -> list[str]:
            if prefs.is_conversational(value):
                return [chat_corpus_text(m) for m in value]
            return [value] if isinstance(value, str) else []

        corpus = [t for col in prefs.TEXT_FIELDS for v in train_pairs[col] for t in texts(v)]
        tokenizer = train_tokenizer(corpus, backbone.vocab_size)
    tokenizer.model_max_length = min(tokenizer.model_max_length, validation.max_length)
    return tokenizer


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
        keys.DATA_N_TRAIN: len(train),
        keys.DATA_N_VALIDATION: len(validation),
        keys.DATA_N_CALIBRATION: len(calibration),
        keys.DATA_N_TEST: len(test),
        keys.DATA_N_DROPPED: sum(dropped.values()),
        **{keys.data_n_dropped(k): v for k, v in dropped.items()},
    }
    tags = {keys.data_content_hash_tag(s): prefs.content_hash(df)
            for s, df in zip(prefs.SPLITS, (train, validation, calibration, test))}
    return as_metrics(values), tags

"""Preference pairs: the formats people have, validation with errors that name rows, splits by prompt.

Canonical form after :func:`standardize`: one row per pair with ``prompt``, ``chosen``, ``rejected``
(each a string, or a list of ``{"role", "content"}`` messages for conversational data), an optional
``margin`` and ``pair_id`` (the row's position in the source). Any other source columns ride along.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

TEXT_FIELDS = ("prompt", "chosen", "rejected")
Action = Literal["error", "drop"]
# Parameter models reject unknown keys: a typo in a YAML key must fail the run, not fall back to a default.
STRICT = ConfigDict(extra="forbid")


class PreferenceDataError(ValueError):
    """Bad preference data; the message names the problem, the field and the rows."""


class ValidationParams(BaseModel):
    """What to do with each kind of bad row: fail the run (``error``) or drop, count and log it (``drop``)."""

    model_config = STRICT

    bad_text: Action = Field("error", description="Empty or non-string text, or a malformed message list.")
    identical: Action = Field("error", description="Chosen identical to rejected.")
    duplicate: Action = Field("error", description="The same (prompt, chosen, rejected) more than once.")
    bad_margin: Action = Field("error", description="NaN, infinite or out-of-bounds margin or rating, or ratings that "
                               "contradict the label.")
    too_long: Action = Field("drop", description="Chosen or rejected longer than max_length tokens.")
    repeated_header: Action = Field("error", description="A row whose values are the column names (a CSV header "
                                    "repeated, e.g. where files were concatenated).")
    max_length: int = Field(128, ge=8, description="Longest prompt + response in tokens, EOS included.")
    max_abs_margin: float = Field(
        100.0, gt=0, description="Largest |margin| accepted (reward logits). Past about 40 the margin loss's sigmoid "
        "is 1 in float64: a larger margin is a unit or parse mistake (a percentage, 1e30), not a preference.")
    max_abs_rating: float = Field(
        1000.0, gt=0, description="Largest |rating| accepted in the rating columns; wide enough for 0-100 scales, "
        "narrow enough to catch a sentinel (1e30, -9999) standing in for a missing rating.")


class MarginParams(BaseModel):
    """Where graded preference strengths come from, if anywhere."""

    model_config = STRICT

    enabled: bool = Field(True, description="Use margins when the data has them (a margin column or ratings).")
    column: str = Field("margin", description="Column holding a per-pair margin.")
    rating_columns: tuple[str, str] = Field(
        ("chosen_rating", "rejected_rating"),
        description="Per-response ratings; margin = rating_scale * (chosen - rejected), as in Llama 2's RM.",
    )
    rating_scale: float = Field(1.0, gt=0, description="Margin per rating point.")


class SplitParams(BaseModel):
    """Fractions of prompts per split; no prompt lands in two splits."""

    model_config = STRICT

    train: float = Field(0.6, ge=0)
    validation: float = Field(0.1, ge=0)
    calibration: float = Field(0.15, ge=0, description="Held out for the temperature fit only.")
    test: float = Field(0.15, ge=0)
    seed: int = 0
    fixed_column: str | None = Field(
        None, description="Column whose values pin rows to a split (e.g. source_file when the data ships its own)."
    )
    fixed: dict[str, str] = Field(
        default_factory=dict,
        description="fixed_column value -> split name; those rows go there, the rest are split by prompt "
        "among the splits with a fraction > 0.",
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        fractions = {s: getattr(self, s) for s in SPLITS}
        total = sum(fractions.values())
        # All zero is meaningful only when split.fixed pins every row; assign_splits checks that.
        if abs(total - 1.0) > 1e-9 and not (total == 0 and self.fixed):
            shown = " + ".join(f"{s} {v:g}" for s, v in fractions.items())
            raise ValueError(f"data_prep.split fractions must sum to 1: {shown} = {total:.12g}")
        return self


SPLITS = ("train", "validation", "calibration", "test")


# ---------------------------------------------------------------------------------------------------------
# Formats


def plain(value: Any) -> Any:
    """``value`` with numpy arrays and tuples turned into lists, recursively (dict values included).

    Parquet and Arrow hand nested lists back as numpy arrays (of dicts, for messages), which compare,
    hash and serialize unlike the lists the data was written from.
    """
    if isinstance(value, (np.ndarray, list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def plain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every object column's values made :func:`plain`; call it where pairs are read."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = pd.Series([plain(v) for v in out[col]], index=out.index, dtype=object)
    return out


def is_conversational(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0 and isinstance(value[0], dict)


def _as_messages(value: Any) -> list[dict]:
    return [plain(dict(m)) for m in value]


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected) at their shared prefix.

    Text is cut at the last whitespace inside the common prefix so no word is split; messages are
    cut before the first message that differs.
    """
    if is_conversational(chosen) and is_conversational(rejected):
        c, r = _as_messages(chosen), _as_messages(rejected)
        n = _common_prefix_len(c, r)
        return c[:n], c[n:], r[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = _common_prefix_len(chosen, rejected)
        cut = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1))
        cut = cut if cut > 0 else 0
        return chosen[:cut], chosen[cut:], rejected[cut:]
    return None, chosen, rejected


def standardize(raw: pd.DataFrame, margin: MarginParams) -> pd.DataFrame:
    """Bring explicit- or implicit-prompt data, text or conversational, into the canonical form."""
    missing = [c for c in ("chosen", "rejected") if c not in raw.columns]
    if missing:
        raise PreferenceDataError(
            f"preference data is missing column(s) {missing}; found {list(raw.columns)}. "
            "Expected prompt/chosen/rejected (explicit prompt) or chosen/rejected (implicit prompt)."
        )
    df = raw.reset_index(drop=True).copy()
    df.insert(0, "pair_id", np.arange(len(df), dtype=np.int64))
    if "true_prob" not in df.columns and "true_prob_chosen" in df.columns:
        df = df.rename(columns={"true_prob_chosen": "true_prob"})
    if "prompt" not in df.columns:
        split = [split_implicit_prompt(c, r) for c, r in zip(df["chosen"], df["rejected"])]
        df["prompt"] = [s[0] for s in split]
        df["chosen"] = [s[1] for s in split]
        df["rejected"] = [s[2] for s in split]
    for col in TEXT_FIELDS:
        df[col] = [_as_messages(v) if is_conversational(v) else v for v in df[col]]

    if not margin.enabled:
        return df.drop(columns=[margin.column], errors="ignore")
    chosen_col, rejected_col = margin.rating_columns
    if margin.column not in df.columns and chosen_col in df.columns and rejected_col in df.columns:
        diff = pd.to_numeric(df[chosen_col], errors="coerce") - pd.to_numeric(df[rejected_col], errors="coerce")
        df["margin"] = margin.rating_scale * diff.astype(float)
    elif margin.column in df.columns and margin.column != "margin":
        df["margin"] = df[margin.column]
    if "margin" in df.columns:
        df["margin"] = pd.to_numeric(df["margin"], errors="coerce").astype(float)
    return df


# ---------------------------------------------------------------------------------------------------------
# Validation


def text_problem(value: Any, field: str) -> str | None:
    """Why ``value`` is not usable text for ``field``, or None. Prompts may be empty; responses may not."""
    if is_conversational(value):
        for i, m in enumerate(value):
            if not isinstance(m, dict) or set(m) < {"role", "content"}:
                return f"message {i} lacks role/content"
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                return f"message {i} has a non-string role or content"
            if field != "prompt" and not m["content"].strip():
                return f"message {i} has empty content"
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            return None if field == "prompt" else "empty message list"
        return "list is not a list of {role, content} messages"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "missing value"
    if not isinstance(value, str):
        return f"{type(value).__name__} instead of text"
    if field != "prompt" and not value.strip():
        return "empty text"
    return None


def text_key(value: Any) -> str:
    """A hashable, comparable key for text or a message list (numpy arrays from Parquet included)."""
    return value if isinstance(value, str) else json.dumps(plain(value), sort_keys=True)


def _describe(rows: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")


WHAT = {
    "bad_text": "empty, non-string or malformed text",
    "identical": "chosen identical to rejected",
    "duplicate": "a duplicate of an earlier pair",
    "bad_margin": "a NaN or infinite margin",
    "too_long": "more tokens than max_length",
    "repeated_header": "the column names as values (a repeated header row)",
}


@dataclass
class Problem:
    """One kind of problem in one field: the rows (pair_id) and, for the first of them, what is wrong."""

    kind: str  # a field name of ValidationParams: bad_text, identical, duplicate, bad_margin, too_long, ...
    field: str
    rows: list[int]
    example: str = ""
    what: str = ""  # what the rows have, when it differs from the kind's usual wording

    def message(self) -> str:
        detail = f" (row {self.rows[0]}: {self.example})" if self.example else ""
        return (f"{len(self.rows)} row(s) have {self.what or WHAT[self.kind]} in field '{self.field}': "
                f"rows {_describe(sorted(self.rows))}{detail}")


def find_header_rows(raw: pd.DataFrame) -> list[int]:
    """Positions of rows whose every value is its column's name: a header repeated inside the data."""
    cols = [c for c in raw.columns if c != "source_file"]  # added by the reader, never a header
    if not cols:
        return []
    same = np.ones(len(raw), dtype=bool)
    for c in cols:
        same &= np.array([isinstance(v, str) and v.strip() == str(c) for v in raw[c]], dtype=bool)
    return np.flatnonzero(same).tolist()


def _contradicting_ratings(df: pd.DataFrame, rating_columns: tuple[str, str]) -> list[tuple[int, str]]:
    chosen_col, rejected_col = rating_columns
    if chosen_col not in df.columns or rejected_col not in df.columns:
        return []
    c = pd.to_numeric(df[chosen_col], errors="coerce").to_numpy(dtype=float)
    r = pd.to_numeric(df[rejected_col], errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(c < r)  # NaN compares False: missing ratings show up as a NaN margin instead
    return [(int(df["pair_id"].iloc[i]), f"{chosen_col} {c[i]:g} < {rejected_col} {r[i]:g}") for i in bad]


def find_problems(df: pd.DataFrame, rating_columns: tuple[str, str] | None = None,
                  bounds: ValidationParams | None = None) -> list[Problem]:
    """Every problem found, one :class:`Problem` per kind and field.

    ``rating_columns``: check that the chosen response is not rated below the rejected one (a label the
    ratings contradict), when both columns are present. ``bounds``: check margins and ratings against
    ``max_abs_margin`` and ``max_abs_rating`` (kind ``bad_margin``).
    """
    found: dict[tuple[str, str, str], Problem] = {}

    def add(kind: str, field: str, pair_id: int, why: str = "", what: str = "") -> None:
        p = found.setdefault((kind, field, what), Problem(kind, field, [], why, what))
        p.rows.append(int(pair_id))

    for field in TEXT_FIELDS:
        for pid, value in zip(df["pair_id"], df[field]):
            why = text_problem(value, field)
            if why:
                add("bad_text", field, pid, why)
    bad = {r for p in found.values() for r in p.rows}
    ok = df[~df["pair_id"].isin(bad)]
    for pid, c, r in zip(ok["pair_id"], ok["chosen"], ok["rejected"]):
        if text_key(c) == text_key(r):
            add("identical", "chosen/rejected", pid)
    keys = pd.Series([text_key(p) + "\x00" + text_key(c) + "\x00" + text_key(r) for p, c, r in
                      zip(ok["prompt"], ok["chosen"], ok["rejected"])], index=ok.index)
    for pid in ok.loc[keys.duplicated(keep="first").to_numpy(), "pair_id"]:
        add("duplicate", "prompt/chosen/rejected", pid)
    if "margin" in df.columns:
        m = df["margin"].to_numpy(dtype=float)
        for pid, value in zip(df.loc[~np.isfinite(m), "pair_id"], m[~np.isfinite(m)]):
            add("bad_margin", "margin", pid, f"margin is {value}")
    if bounds is not None:
        for field, limit in _bounded_fields(df, rating_columns, bounds):
            v = pd.to_numeric(df[field], errors="coerce").to_numpy(dtype=float)
            past = np.isfinite(v) & (np.abs(v) > limit)  # NaN and inf are reported above or as missing
            for pid, value in zip(df.loc[past, "pair_id"], v[past]):
                add("bad_margin", field, pid, f"{field} {value:g} is past ±{limit:g}", f"a value past ±{limit:g}")
    if rating_columns is not None:
        for pid, why in _contradicting_ratings(df, rating_columns):
            add("bad_margin", "/".join(rating_columns), pid, why,
                "ratings that contradict the label (chosen rated below rejected)")
    return list(found.values())


def _bounded_fields(df: pd.DataFrame, rating_columns: tuple[str, str] | None,
                    bounds: ValidationParams) -> list[tuple[str, float]]:
    """The margin and rating columns present, each with its bound; ratings before the margin they make."""
    ratings = [(c, bounds.max_abs_rating) for c in (rating_columns or ()) if c in df.columns]
    return ratings + ([("margin", bounds.max_abs_margin)] if "margin" in df.columns else [])


def apply_validation(
    df: pd.DataFrame, problems: list[Problem], params: ValidationParams, source: str = ""
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Raise on every kind set to ``error``; drop the rest. Returns the clean frame and drop counts.

    ``source`` (e.g. the file's path) is named in the error.
    """
    errors = [p.message() for p in problems if getattr(params, p.kind) == "error"]
    if errors:
        where = f" in {source}" if source else ""
        raise PreferenceDataError(f"invalid preference data{where} (rows are pair_id, the 0-based source row):\n- "
                                  + "\n- ".join(errors))
    dropped: dict[str, set[int]] = {}
    for p in problems:
        dropped.setdefault(p.kind, set()).update(p.rows)
    all_dropped = set().union(*dropped.values()) if dropped else set()
    clean = df[~df["pair_id"].isin(all_dropped)].reset_index(drop=True)
    return clean, {kind: len(rows) for kind, rows in dropped.items()}


def _value_kind(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "list"
    return type(value).__name__


def check_column_types(df: pd.DataFrame, source: str = "") -> None:
    """Raise naming the column and row where a column mixes kinds of values (text and numbers, say).

    Columnar storage needs one type per column; without this check the first save fails inside pyarrow
    ("Expected bytes, got a 'int' object") with no row named.
    """
    for col in df.columns:
        if df[col].dtype != object:
            continue
        kinds = [_value_kind(v) for v in df[col]]
        seen = pd.Series([k for k in kinds if k is not None])
        if seen.nunique() > 1:
            rare = seen.value_counts().index[-1]
            row = next(i for i, k in enumerate(kinds) if k == rare)
            where = f" in {source}" if source else ""
            raise PreferenceDataError(
                f"invalid preference data{where}: column '{col}' mixes {sorted(seen.unique())} values; "
                f"row {int(df['pair_id'].iloc[row]) if 'pair_id' in df.columns else row} holds "
                f"{df[col].iloc[row]!r}")


def validate(
    raw: pd.DataFrame, margin: MarginParams, params: ValidationParams, check_ratings: bool = True, source: str = ""
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Canonical, valid pairs from rows as read: every check but ``too_long`` (which needs a tokenizer).

    Raises :class:`PreferenceDataError` naming ``source``, the rows (pair_id) and the field on every kind
    set to ``error``; drops and counts the rest. Runs before anything is saved, so the returned frame
    always stores (one type per column).
    """
    if raw.empty:
        raise PreferenceDataError(f"no preference pairs{' in ' + source if source else ''}: the data has no rows")
    pairs = standardize(raw, margin)
    headers = find_header_rows(raw)
    body = pairs[~pairs["pair_id"].isin(headers)]
    problems = find_problems(body, margin.rating_columns if check_ratings else None, params)
    if headers:
        problems.insert(0, Problem("repeated_header", "all columns", headers, "values equal the column names"))
    clean, dropped = apply_validation(pairs, problems, params, source)
    check_column_types(clean, source)
    return clean, dropped


# ---------------------------------------------------------------------------------------------------------
# Splits


def distinct_prompts(pairs: pd.DataFrame) -> list[Any]:
    """The pairs' distinct prompts, in first-seen order: the prompts a policy samples from.

    Text or message lists (as plain lists), one kind for the whole frame: a policy run renders every prompt
    the same way (see ``core.chat``). A frame mixing the two raises, naming the rows of the rarer kind.
    """
    ids = list(pairs["pair_id"]) if "pair_id" in pairs.columns else list(range(len(pairs)))
    prompts = [plain(p) for p in pairs["prompt"]]
    chat = [is_conversational(p) for p in prompts]
    if 0 < sum(chat) < len(chat):
        rare = sum(chat) < len(chat) / 2
        rows = [int(pid) for pid, c in zip(ids, chat) if c == rare]
        kind = "conversational (message list)" if rare else "text"
        raise PreferenceDataError(f"prompts mix text and message lists: {len(rows)} pair(s) have a {kind} prompt "
                                  f"unlike the rest: rows {_describe(rows)}")
    seen: dict[str, Any] = {}
    for p in prompts:
        seen.setdefault(text_key(p), p)
    return list(seen.values())


def prompt_group(prompt: Any, pair_id: int) -> str:
    """The key that keeps a prompt's pairs together; pairs with no prompt each form their own group."""
    key = text_key(prompt) if prompt is not None else ""
    return key if key not in ("", "[]") else f"\x00pair-{pair_id}"


def assign_splits(df: pd.DataFrame, params: SplitParams) -> pd.Series:
    """Split name per row, by prompt: groups are ordered by a seeded hash, then cut at the target sizes.

    Hashing the prompt (rather than shuffling positions) keeps a prompt's split stable when rows are
    added to or removed from the source. Rows pinned by ``fixed_column`` keep their split.
    """
    out = pd.Series(pd.NA, index=df.index, dtype=object)
    if params.fixed_column:
        if params.fixed_column not in df.columns:
            raise PreferenceDataError(f"split.fixed_column '{params.fixed_column}' is not a column of the data")
        bad = sorted(set(params.fixed.values()) - set(SPLITS))
        if bad:
            raise PreferenceDataError(f"split.fixed maps to unknown split(s) {bad}; use {list(SPLITS)}")
        out = df[params.fixed_column].map(params.fixed).astype(object)
    free = out.isna()
    names = [s for s in SPLITS if getattr(params, s) > 0]
    if free.any():
        if not names:
            raise PreferenceDataError("every split fraction is 0 but some rows are not pinned by split.fixed")
        out[free] = _split_by_prompt(df[free], names, [getattr(params, s) for s in names], params.seed)
    wanted = set(names) | set(params.fixed.values())
    empty = [s for s in SPLITS if s in wanted and not (out == s).any()]
    if empty:
        raise PreferenceDataError(f"split(s) {empty} came out empty: too few prompts for the fractions")
    return out


def _split_by_prompt(df: pd.DataFrame, names: list[str], fractions: list[float], seed: int) -> pd.Series:
    frac = np.asarray(fractions, dtype=float) / sum(fractions)
    groups = pd.Series([prompt_group(p, i) for p, i in zip(df["prompt"], df["pair_id"])], index=df.index)
    sizes = groups.value_counts()
    if len(sizes) < len(names):
        raise PreferenceDataError(f"need at least {len(names)} distinct prompts to split, found {len(sizes)}")
    order = sorted(sizes.index, key=lambda g: hashlib.sha256(f"{seed}\x00{g}".encode()).hexdigest())
    cum = np.cumsum([sizes[g] for g in order])
    bounds = np.cumsum(frac)[:-1] * cum[-1]
    # A group goes to the split whose share of the cumulative count holds the group's midpoint.
    split_of = {g: names[min(int(np.searchsorted(bounds, c - sizes[g] / 2)), len(names) - 1)]
                for g, c in zip(order, cum)}
    return groups.map(split_of)


# ---------------------------------------------------------------------------------------------------------
# Tokenization, exactly as TRL's RewardTrainer does it, so scoring matches training.


def render_ids(tokenizer: Any, prompt: Any, completion: Any) -> list[int]:
    """Token ids of prompt + completion: text gets an EOS appended, messages go through the chat template."""
    return render_many(tokenizer, [prompt], [completion])[0]


def render_many(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[int]]:
    """:func:`render_ids` of each row, with one template call and one tokenizer call per kind of row: a call's
    overhead in the tokenizer's Python wrapper is more than the tokenizing of a short row (the reward server's
    hot path). The chat template's ``tokenize=True`` is its rendered text tokenized without special tokens."""
    chats, texts = {}, {}
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if is_conversational(completion):
            chats[i] = _as_messages(prompt if prompt is not None else []) + _as_messages(completion)
        else:
            text = (prompt or "") + completion
            texts[i] = text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token
    out: list[list[int]] = [[] for _ in completions]
    if chats:
        rendered = tokenizer.apply_chat_template(list(chats.values()), tokenize=False)
        for i, ids in zip(chats, tokenizer(rendered, add_special_tokens=False)["input_ids"]):
            out[i] = list(ids)
    if texts:
        for i, ids in zip(texts, tokenizer(list(texts.values()))["input_ids"]):
            out[i] = list(ids)
    return out


def tokenize_pairs(df: pd.DataFrame, tokenizer: Any) -> pd.DataFrame:
    """``chosen_ids`` and ``rejected_ids`` for every pair (and ``margin`` when present)."""
    out = pd.DataFrame(
        {
            "chosen_ids": [render_ids(tokenizer, p, c) for p, c in zip(df["prompt"], df["chosen"])],
            "rejected_ids": [render_ids(tokenizer, p, r) for p, r in zip(df["prompt"], df["rejected"])],
        },
        index=df.index,
    )
    if "margin" in df.columns:
        out["margin"] = df["margin"].astype(float)
    return out


def find_too_long(df: pd.DataFrame, tokenizer: Any, max_length: int) -> list[Problem]:
    """Pairs whose chosen or rejected side (prompt included) exceeds ``max_length`` tokens."""
    ids = tokenize_pairs(df, tokenizer)
    out = []
    for field in ("chosen", "rejected"):
        n_tokens = ids[f"{field}_ids"].map(len)
        long = n_tokens > max_length
        if long.any():
            rows = df.loc[long, "pair_id"].astype(int).tolist()
            out.append(Problem("too_long", field, rows, f"{int(n_tokens[long].iloc[0])} tokens > {max_length}"))
    return out


def content_hash(df: pd.DataFrame) -> str:
    """SHA-256 of the pairs' content, independent of storage format and column order."""
    h = hashlib.sha256()
    for col in sorted(df.columns):
        h.update(col.encode())
        for v in df[col]:
            if isinstance(v, float) and math.isnan(v):
                v = None
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
    return h.hexdigest()

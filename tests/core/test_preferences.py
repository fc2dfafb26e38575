import numpy as np
import pandas as pd
import pytest

from calibrated_rlhf.core import preferences as prefs
from calibrated_rlhf.core.preferences import MarginParams, PreferenceDataError, SplitParams, ValidationParams


def explicit(n=6):
    return pd.DataFrame({"prompt": [f"Q{i}?" for i in range(n)],
                         "chosen": [f" good {i}" for i in range(n)],
                         "rejected": [f" bad {i}" for i in range(n)]})


def validate(df, **actions):
    pairs = prefs.standardize(df, MarginParams())
    return prefs.apply_validation(pairs, prefs.find_problems(pairs), ValidationParams(**actions))


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ---- formats -----------------------------------------------------------------------------------------


def test_explicit_text_passes_through_with_pair_ids():
    out = prefs.standardize(explicit(), MarginParams())
    assert list(out["pair_id"]) == list(range(6))
    assert out.loc[2, "prompt"] == "Q2?" and out.loc[2, "chosen"] == " good 2"


def test_implicit_text_prompt_is_the_shared_prefix_cut_at_a_word():
    df = pd.DataFrame({"chosen": ["Rate Paris: lovely city"], "rejected": ["Rate Paris: lousy city"]})
    out = prefs.standardize(df, MarginParams())
    assert out.loc[0, "prompt"] == "Rate Paris:"
    assert out.loc[0, "chosen"] == " lovely city" and out.loc[0, "rejected"] == " lousy city"
    # prompt + completion is the original text, as TRL concatenates them
    assert out.loc[0, "prompt"] + out.loc[0, "chosen"] == df.loc[0, "chosen"]


def test_implicit_conversational_prompt_is_the_shared_messages():
    user = ("user", "Hi?")
    df = pd.DataFrame({"chosen": [msgs(user, ("assistant", "Hello!"))],
                       "rejected": [msgs(user, ("assistant", "Go away."))]})
    out = prefs.standardize(df, MarginParams())
    assert out.loc[0, "prompt"] == msgs(user)
    assert out.loc[0, "chosen"] == msgs(("assistant", "Hello!"))


def test_margin_column_and_ratings_become_margin():
    df = explicit(3).assign(margin=[0.5, 1.0, 2.0])
    assert list(prefs.standardize(df, MarginParams())["margin"]) == [0.5, 1.0, 2.0]
    rated = explicit(3).assign(chosen_rating=[5, 4, 3], rejected_rating=[1, 3, 3])
    out = prefs.standardize(rated, MarginParams(rating_scale=0.5))
    assert list(out["margin"]) == [2.0, 0.5, 0.0]
    assert "margin" not in prefs.standardize(df, MarginParams(enabled=False)).columns


# ---- validation: every error names the field and rows -------------------------------------------------


def test_missing_columns_is_an_error_naming_them():
    with pytest.raises(PreferenceDataError, match=r"missing column\(s\) \['rejected'\]"):
        prefs.standardize(pd.DataFrame({"prompt": ["x"], "chosen": ["y"]}), MarginParams())


@pytest.mark.parametrize(
    "field,value,kind",
    [
        ("chosen", "", "empty text"),
        ("rejected", "   ", "empty text"),
        ("chosen", 42, "int instead of text"),
        ("prompt", None, "missing value"),
        ("chosen", [{"role": "user"}], "message 0 lacks role/content"),
        ("rejected", [{"role": "user", "content": 3}], "message 0 has a non-string role or content"),
        ("chosen", ["plain", "strings"], "list is not a list of {role, content} messages"),
    ],
)
def test_bad_text_names_field_row_and_reason(field, value, kind):
    df = explicit()
    df[field] = df[field].astype(object)
    df.at[4, field] = value
    with pytest.raises(PreferenceDataError) as err:
        validate(df)
    assert f"1 row(s) have empty, non-string or malformed text in field '{field}': rows 4 (row 4: {kind})" in str(err.value)


def test_identical_duplicate_and_bad_margin_are_each_reported():
    df = explicit()
    df.loc[1, "rejected"] = df.loc[1, "chosen"]
    df = pd.concat([df, df.iloc[[3]]], ignore_index=True)  # row 6 duplicates row 3
    df["margin"] = [0.0, 1.0, np.nan, 1.0, np.inf, 1.0, 1.0]
    with pytest.raises(PreferenceDataError) as err:
        validate(df)
    msg = str(err.value)
    assert "chosen identical to rejected in field 'chosen/rejected': rows 1" in msg
    assert "a duplicate of an earlier pair in field 'prompt/chosen/rejected': rows 6" in msg
    assert "a NaN or infinite margin in field 'margin': rows 2, 4" in msg


def test_drop_counts_instead_of_failing():
    df = explicit()
    df.loc[1, "rejected"] = df.loc[1, "chosen"]
    df.loc[2, "chosen"] = ""
    clean, dropped = validate(df, identical="drop", bad_text="drop")
    assert dropped == {"identical": 1, "bad_text": 1}
    assert list(clean["pair_id"]) == [0, 3, 4, 5]


def test_too_long_is_measured_in_real_tokens(tiny_tokenizer):
    df = prefs.standardize(explicit(3), MarginParams())
    df.loc[1, "rejected"] = " good" * 200
    problems = prefs.find_too_long(df, tiny_tokenizer, max_length=40)
    assert [(p.field, p.rows) for p in problems] == [("rejected", [1])]
    with pytest.raises(PreferenceDataError, match=r"more tokens than max_length in field 'rejected': rows 1 \(row 1: \d+ tokens > 40\)"):
        prefs.apply_validation(df, problems, ValidationParams(too_long="error"))
    clean, dropped = prefs.apply_validation(df, problems, ValidationParams(too_long="drop"))
    assert dropped == {"too_long": 1} and list(clean["pair_id"]) == [0, 2]


def rated(chosen, rejected):
    return explicit(len(chosen)).assign(chosen_rating=chosen, rejected_rating=rejected)


def test_ratings_that_contradict_the_label_are_a_bad_margin():
    df = rated([5, 2, 3, 1, 4, 4], [1, 4, 3, 2, 4, 1])  # rows 1 and 3: chosen rated below rejected
    with pytest.raises(PreferenceDataError) as err:
        prefs.validate(df, MarginParams(), ValidationParams(), source="'pairs.csv'")
    assert ("invalid preference data in 'pairs.csv' (rows are pair_id, the 0-based source row):\n"
            "- 2 row(s) have ratings that contradict the label (chosen rated below rejected) in field "
            "'chosen_rating/rejected_rating': rows 1, 3 (row 1: chosen_rating 2 < rejected_rating 4)"
            ) in str(err.value)
    clean, dropped = prefs.validate(df, MarginParams(), ValidationParams(bad_margin="drop"))
    assert dropped == {"bad_margin": 2} and list(clean["pair_id"]) == [0, 2, 4, 5]
    assert list(clean["margin"]) == [4.0, 0.0, 0.0, 3.0]  # ties are no contradiction


def test_contradiction_and_nan_margin_count_once_per_row():
    df = rated([1, 2, 5, 4], [3, 1, 5, 1])
    df["chosen_rating"] = df["chosen_rating"].astype(object)
    df.at[3, "chosen_rating"] = "n/a"
    clean, dropped = prefs.validate(df, MarginParams(), ValidationParams(bad_margin="drop"))
    assert dropped == {"bad_margin": 2} and list(clean["pair_id"]) == [1, 2]


def test_ratings_are_not_checked_when_asked_not_to():
    clean, dropped = prefs.validate(rated([1, 5], [5, 1]), MarginParams(), ValidationParams(), check_ratings=False)
    assert dropped == {} and list(clean["margin"]) == [-4.0, 4.0]


def test_plain_turns_arrow_arrays_into_lists_recursively():
    df = pd.DataFrame({"prompt": [msgs(("user", "Hi?"))], "chosen": [msgs(("assistant", "a"))],
                       "rejected": [msgs(("assistant", "b"))], "tags": [["x", "y"]]})
    path_like = pa_roundtrip(df)
    assert isinstance(path_like.loc[0, "chosen"], np.ndarray)
    back = prefs.plain_frame(path_like)
    assert back.loc[0, "chosen"] == msgs(("assistant", "a")) and back.loc[0, "tags"] == ["x", "y"]
    assert prefs.plain({"a": np.array([np.array([1, 2])])}) == {"a": [[1, 2]]}
    assert prefs.text_key(path_like.loc[0, "prompt"]) == prefs.text_key(msgs(("user", "Hi?")))


def pa_roundtrip(df):
    import io

    buf = io.BytesIO()
    df.to_parquet(buf)
    return pd.read_parquet(io.BytesIO(buf.getvalue()))


def test_repeated_header_rows_are_found_and_reported_or_dropped():
    df = pd.concat([explicit(3), pd.DataFrame({"prompt": ["prompt"], "chosen": ["chosen"],
                                               "rejected": ["rejected"]}), explicit(2)], ignore_index=True)
    df.loc[4:, "prompt"] = ["Q8?", "Q9?"]
    assert prefs.find_header_rows(df) == [3]
    with pytest.raises(PreferenceDataError, match=r"the column names as values \(a repeated header row\) in field "
                                                  r"'all columns': rows 3 "):
        prefs.validate(df, MarginParams(), ValidationParams())
    clean, dropped = prefs.validate(df, MarginParams(), ValidationParams(repeated_header="drop"))
    assert dropped == {"repeated_header": 1} and list(clean["pair_id"]) == [0, 1, 2, 4, 5]


def test_a_column_mixing_kinds_of_values_is_named_with_its_row():
    df = explicit(4).assign(source=["a", "b", 7, "d"])
    with pytest.raises(PreferenceDataError, match=r"in 'x.jsonl': column 'source' mixes \['number', 'str'\] "
                                                  r"values; row 2 holds 7"):
        prefs.validate(df, MarginParams(), ValidationParams(), source="'x.jsonl'")


def test_no_rows_is_an_error_naming_the_source():
    with pytest.raises(PreferenceDataError, match="no preference pairs in 'e.csv'"):
        prefs.validate(explicit(0), MarginParams(), ValidationParams(), source="'e.csv'")


def test_unknown_parameter_keys_are_refused():
    with pytest.raises(ValueError, match="bad_txt"):
        ValidationParams(bad_txt="drop")
    with pytest.raises(ValueError, match="rating_column"):
        MarginParams(rating_column=["a", "b"])
    with pytest.raises(ValueError, match="trian"):
        SplitParams(trian=0.6)


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match=r"fractions must sum to 1: train 0.6 \+ validation 0.1 \+ calibration "
                                         r"0.15 \+ test 0.2 = 1.05"):
        SplitParams(test=0.2)
    SplitParams(train=0.7, validation=0.1, calibration=0.1, test=0.1)  # sums to 1 up to rounding
    SplitParams(train=0, validation=0, calibration=0, test=0, fixed_column="f", fixed={"a": "train"})
    with pytest.raises(ValueError, match="= 0"):
        SplitParams(train=0, validation=0, calibration=0, test=0)


# ---- splits ------------------------------------------------------------------------------------------


def test_splits_keep_prompts_together_and_are_deterministic(synthetic_pairs):
    df = prefs.standardize(synthetic_pairs, MarginParams())
    split = prefs.assign_splits(df, SplitParams())
    assert set(split) == set(prefs.SPLITS)
    per_prompt = pd.DataFrame({"p": df["prompt"], "s": split}).groupby("p")["s"].nunique()
    assert (per_prompt == 1).all()
    assert split.equals(prefs.assign_splits(df, SplitParams()))
    assert not split.equals(prefs.assign_splits(df, SplitParams(seed=1)))
    share = split.value_counts(normalize=True)
    assert share["train"] == pytest.approx(0.6, abs=0.08)


def test_a_prompt_keeps_its_split_when_other_rows_are_added(synthetic_pairs):
    df = prefs.standardize(synthetic_pairs, MarginParams())
    before = pd.Series(prefs.assign_splits(df, SplitParams()).values, index=df["prompt"]).groupby(level=0).first()
    bigger = prefs.standardize(pd.concat([synthetic_pairs, explicit(20)], ignore_index=True), MarginParams())
    after = pd.Series(prefs.assign_splits(bigger, SplitParams()).values, index=bigger["prompt"]).groupby(level=0).first()
    moved = (before != after.loc[before.index]).mean()
    assert moved < 0.15  # only prompts near a cut point move


def test_fixed_column_pins_rows_and_splits_the_rest(synthetic_pairs):
    df = prefs.standardize(synthetic_pairs.assign(source_file=["train"] * 200 + ["heldout"] * 40), MarginParams())
    split = prefs.assign_splits(df, SplitParams(fixed_column="source_file", fixed={"train": "train"},
                                                train=0, validation=0, calibration=0.5, test=0.5))
    assert (split[:200] == "train").all()
    assert set(split[200:]) == {"calibration", "test"}
    with pytest.raises(PreferenceDataError, match="unknown split"):
        prefs.assign_splits(df, SplitParams(fixed_column="source_file", fixed={"train": "dev"}))


def test_too_few_prompts_is_a_clear_error():
    df = prefs.standardize(explicit(3), MarginParams())
    with pytest.raises(PreferenceDataError, match="distinct prompts"):
        prefs.assign_splits(df, SplitParams())


# ---- tokenization is TRL's own ---------------------------------------------------------------------


@pytest.mark.parametrize("conversational", [False, True])
def test_tokenize_pairs_matches_trl_reward_trainer(tiny_tokenizer, conversational):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    if conversational:
        df = pd.DataFrame({"prompt": [msgs(("user", "Describe Paris."))] * 2,
                           "chosen": [msgs(("assistant", "bright calm"))] * 2,
                           "rejected": [msgs(("assistant", "dull grey")), msgs(("assistant", "cold"))]})
    else:
        df = pd.DataFrame({"prompt": ["Describe Paris."] * 2, "chosen": [" bright calm"] * 2,
                           "rejected": [" dull grey", " cold"]})
    mine = prefs.tokenize_pairs(prefs.standardize(df, MarginParams()), tiny_tokenizer)
    args = RewardConfig(output_dir="/tmp/unused", report_to=[], bf16=False, max_length=None, use_cpu=True)
    trainer = RewardTrainer.__new__(RewardTrainer)  # only the dataset preparation is exercised
    theirs = trainer._prepare_dataset(Dataset.from_pandas(df), tiny_tokenizer, args, "check")
    assert list(mine["chosen_ids"]) == theirs["chosen_ids"]
    assert list(mine["rejected_ids"]) == theirs["rejected_ids"]


def test_content_hash_changes_with_content_only():
    a = prefs.standardize(explicit(), MarginParams())
    assert prefs.content_hash(a) == prefs.content_hash(a[list(reversed(a.columns))])
    b = a.copy()
    b.loc[0, "chosen"] = " other"
    assert prefs.content_hash(a) != prefs.content_hash(b)


def test_distinct_prompts_keep_order_take_messages_and_refuse_a_mix():
    df = prefs.standardize(pd.concat([explicit(3), explicit(2)], ignore_index=True), MarginParams())
    assert prefs.distinct_prompts(df) == ["Q0?", "Q1?", "Q2?"]
    chat = df.copy()
    chat["prompt"] = pd.Series([np.array([{"role": "user", "content": p}]) for p in df["prompt"]], dtype=object)
    assert prefs.distinct_prompts(chat) == [[{"role": "user", "content": f"Q{i}?"}] for i in range(3)]
    df["prompt"] = df["prompt"].astype(object)
    df.at[4, "prompt"] = msgs(("user", "Hi?"))
    with pytest.raises(PreferenceDataError, match=r"1 pair\(s\) have a conversational .* rows 4"):
        prefs.distinct_prompts(df)

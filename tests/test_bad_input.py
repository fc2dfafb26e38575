"""Bad preference data through a real `kedro run --pipelines data_prep` over a real file.

Each bad input must fail the run with an error naming the file, the row (or line) and the field, and
leave nothing new under the project's data/ folder. A conversational JSON-lines file must go through.

Every case runs through the catalog-backed harness (`tests.harness`: kedro's own command line in a copy
of the project, forked with the heavy modules imported once). The positive case runs as a fresh
`python -m kedro run` process (in the background, on its own copy), so both paths are covered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.harness import ENV, kedro_run, latest_run, listing, preload, saved, squash
from tests.project import make_project

N_PROMPTS, PER_PROMPT = 12, 4


def run(project: Path, *params: str, name: str) -> tuple[int, str]:
    """`kedro run --env tiny --pipelines data_prep --params ...` in ``project``: exit code and output."""
    args = ["--env", "tiny", "--pipelines", "data_prep"] + (["--params", ",".join(params)] if params else [])
    return kedro_run(project, *args, name=name)


def source(path: Path) -> tuple[str, str]:
    return "data_prep.source.kind=file", f"data_prep.source.path={path}"


def msgs(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def conversational_rows() -> list[dict]:
    return [{"prompt": msgs("user", f"Describe city {i % N_PROMPTS}."),
             "chosen": msgs("assistant", f"calm bright {i}"),
             "rejected": msgs("assistant", f"dull grey {i}")} for i in range(N_PROMPTS * PER_PROMPT)]


def text_rows() -> list[dict]:
    return [{"prompt": f"Describe city {i % N_PROMPTS}.", "chosen": f" calm bright {i}",
             "rejected": f" dull grey {i}"} for i in range(N_PROMPTS * PER_PROMPT)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Iterator[tuple[Path, list[dict], subprocess.Popen]]:
    """A conversational JSON-lines file through `python -m kedro run` in a fresh process of its own, on its
    own project copy; started first so that it runs while the other cases do."""
    root = make_project(tmp_path_factory.mktemp("real_run") / "project")
    rows = conversational_rows()
    path = write_jsonl(root.parent / "conversational.jsonl", rows)
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with open(root.parent / "kedro_run.log", "w") as log:  # a file, not a pipe nobody reads meanwhile
        proc = subprocess.Popen([sys.executable, "-m", "kedro", "run", "--env", "tiny", "--pipelines", "data_prep",
                                 "--params", ",".join(source(path))], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    yield root, rows, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def project(tmp_path_factory, real_run) -> Path:
    """One copy of the project for the module's failing cases; inputs live outside data/."""
    preload()  # shared by every forked run
    root = make_project(tmp_path_factory.mktemp("bad_input") / "project", store=True)
    (root / "inputs").mkdir()
    return root


def fails_cleanly(project: Path, *params: str, name: str, expect: list[str]) -> str:
    """The run fails naming ``expect``, before anything is saved: no node completed and no dataset save began
    (an artifact saved and then swept by the failure hook would leave the listing unchanged, not the log)."""
    before = listing(project)
    code, out = run(project, *params, name=name)
    assert code != 0, out[-3000:]
    for text in expect:
        assert squash(text) in squash(out), f"{text!r} not in:\n{out[-3000:]}"
    assert listing(project) == before, f"new files under data/: {sorted(listing(project) - before)}"
    # the first node at most started (a bad parameter fails before it does), and nothing was handed to a dataset
    assert out.count("Running node:") <= 1 and "Saving data to" not in out and " out of " not in out, out[-3000:]
    return out


# ---- bad rows: error naming file, row and field; nothing written ------------------------------------


@pytest.mark.slow
def test_malformed_message_list(project):
    rows = conversational_rows()
    rows[3]["chosen"] = [{"role": "assistant"}]  # no content
    path = write_jsonl(project / "inputs" / "malformed.jsonl", rows)
    fails_cleanly(project, *source(path), name="malformed", expect=[
        f"invalid preference data in '{path}'",
        "empty, non-string or malformed text in field 'chosen': rows 3 (row 3: message 0 lacks role/content)"])


@pytest.mark.slow
def test_a_number_where_text_belongs(project):
    rows = text_rows()
    rows[5]["rejected"] = 7  # pyarrow would fail the save with "Expected bytes, got a 'int' object"
    path = write_jsonl(project / "inputs" / "number.jsonl", rows)
    out = fails_cleanly(project, *source(path), name="number", expect=[
        f"invalid preference data in '{path}'", "in field 'rejected': rows 5 (row 5: int instead of text)"])
    assert "ArrowTypeError" not in out


@pytest.mark.slow
def test_ratings_that_contradict_the_label(project):
    rows = [dict(r, chosen_rating=4, rejected_rating=2) for r in text_rows()]
    rows[2]["chosen_rating"] = 1
    path = write_jsonl(project / "inputs" / "ratings.jsonl", rows)
    fails_cleanly(project, *source(path), name="ratings", expect=[
        f"invalid preference data in '{path}'",
        "ratings that contradict the label (chosen rated below rejected) in field 'chosen_rating/rejected_rating': "
        "rows 2 (row 2: chosen_rating 1 < rejected_rating 2)"])


@pytest.mark.slow
def test_json_lines_parse_error_names_the_line(project):
    path = write_jsonl(project / "inputs" / "broken.jsonl", text_rows())
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:-1]  # line 7 loses its closing brace
    path.write_text("\n".join(lines) + "\n")
    fails_cleanly(project, *source(path), name="broken", expect=[f"'{path}' line 7: not valid JSON"])


@pytest.mark.slow
def test_margins_and_ratings_past_their_bounds(project):
    rows = [dict(r, margin=1.0, chosen_rating=4, rejected_rating=2) for r in text_rows()]
    rows[4]["margin"] = 1e30
    rows[6]["rejected_rating"] = -1e30
    path = write_jsonl(project / "inputs" / "bounds.jsonl", rows)
    fails_cleanly(project, *source(path), name="bounds", expect=[
        f"invalid preference data in '{path}'",
        "a value past ±100 in field 'margin': rows 4 (row 4: margin 1e+30 is past ±100)",
        "a value past ±1000 in field 'rejected_rating': rows 6 (row 6: rejected_rating -1e+30 is past ±1000)"])


@pytest.mark.slow
def test_a_file_not_in_utf8_is_named_not_a_traceback(project):
    path = project / "inputs" / "utf16.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in text_rows()), encoding="utf-16")
    out = fails_cleanly(project, *source(path), name="utf16", expect=[
        f"'{path}' is not UTF-8 text (byte 0: invalid start byte); it looks UTF-16 encoded; save it as UTF-8"])
    assert "UnicodeDecodeError" not in out
    path = project / "inputs" / "latin1.csv"
    pd.DataFrame([dict(r, chosen=r["chosen"] + " café") for r in text_rows()]).to_csv(path, index=False,
                                                                                      encoding="latin-1")
    out = fails_cleanly(project, *source(path), name="latin1", expect=[f"'{path}' is not UTF-8 text"])
    assert "UnicodeDecodeError" not in out


@pytest.mark.slow
def test_a_utf8_file_with_a_byte_order_mark_is_read(project):
    path = project / "inputs" / "bom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in text_rows()), encoding="utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    code, out = run(project, *source(path), name="bom")
    assert code == 0, out[-3000:]
    m = latest_run(project).data.metrics
    assert sum(m[f"data/n_{s}"] for s in ("train", "validation", "calibration", "test")) == N_PROMPTS * PER_PROMPT
    assert set(saved(project, "data/03_primary/train_pairs.parquet")["prompt"]) <= {r["prompt"] for r in text_rows()}


def write_csv(path: Path, rows: list[dict], header_at: int | None = None) -> Path:
    df = pd.DataFrame(rows)
    if header_at is not None:
        df = pd.concat([df[:header_at], pd.DataFrame([dict(zip(df.columns, df.columns))]), df[header_at:]],
                       ignore_index=True)
    df.to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_repeated_csv_header_is_an_error_or_dropped_and_counted(project):
    path = write_csv(project / "inputs" / "header.csv", text_rows(), header_at=9)
    fails_cleanly(project, *source(path), name="header", expect=[
        f"invalid preference data in '{path}'",
        "the column names as values (a repeated header row) in field 'all columns': rows 9"])

    code, out = run(project, *source(path), "data_prep.validation.repeated_header=drop", name="header_drop")
    assert code == 0, out[-3000:]
    m = latest_run(project).data.metrics
    assert m["data/n_dropped_repeated_header"] == m["data/n_dropped"] == 1
    assert sum(m[f"data/n_{s}"] for s in ("train", "validation", "calibration", "test")) == N_PROMPTS * PER_PROMPT


@pytest.mark.slow
def test_rated_completions_become_pairs_with_rating_margins_and_counted_ties(project):
    """One prompt, four rated completions (UltraFeedback-style dicts); one prompt whose completions all tie."""
    rows = [{"prompt": f"Describe city {i}.",
             "completions": [{"response": f" calm bright {i} {j}", "overall_score": float(j % 3)}
                             for j in range(4)]} for i in range(N_PROMPTS * 2)]
    rows.append({"prompt": "Describe nowhere.", "completions": [{"response": " a", "overall_score": 1.0},
                                                                 {"response": " b", "overall_score": 1.0}]})
    path = write_jsonl(project / "inputs" / "rated.jsonl", rows)
    code, out = run(project, *source(path), "data_prep.completions.rule=best_vs_rest",
                    "data_prep.completions.ratings_column=null", "data_prep.completions.score_field=overall_score",
                    "data_prep.margin.rating_scale=0.5", name="rated")
    assert code == 0, out[-3000:]
    m = latest_run(project).data.metrics
    # Scores 0, 1, 2, 0: the best (2) against each lower one (0, 1, 0) is 3 pairs a prompt; the last prompt ties.
    assert sum(m[f"data/n_{s}"] for s in ("train", "validation", "calibration", "test")) == 3 * N_PROMPTS * 2
    assert m["data/n_dropped_ties"] == 1
    train = saved(project, "data/03_primary/train_pairs.parquet")
    assert (train["margin"] == 0.5 * (train["chosen_rating"] - train["rejected_rating"])).all()
    assert (train["chosen_rating"] == 2.0).all() and set(train["rejected_rating"]) <= {0.0, 1.0}


@pytest.mark.slow
def test_empty_csv_names_the_path(project):
    path = project / "inputs" / "empty.csv"
    path.write_text("")
    out = fails_cleanly(project, *source(path), name="empty", expect=[f"'{path}' is empty"])
    assert "EmptyDataError" not in out


# ---- bad parameters fail at start, naming them -------------------------------------------------------


@pytest.mark.slow
def test_split_fractions_that_do_not_sum_to_one(project):
    fails_cleanly(project, "data_prep.split.test=0.2", name="fractions", expect=[
        "data_prep.split fractions must sum to 1: train 0.6 + validation 0.1 + calibration 0.15 + test 0.2 = 1.05"])


@pytest.mark.slow
def test_a_misspelt_parameter_key(project):
    fails_cleanly(project, "data_prep.validation.bad_txt=drop", name="typo", expect=[
        "data_prep.validation", "bad_txt", "Extra inputs are not permitted"])


# ---- a valid conversational file goes through (in a fresh process) -------------------------------------


@pytest.mark.slow
def test_conversational_jsonl_goes_through_data_prep(real_run):
    root, rows, proc = real_run
    proc.wait(timeout=600)
    assert proc.returncode == 0, (root.parent / "kedro_run.log").read_text()[-3000:]

    from calibrated_rlhf.core.preferences import plain_frame

    (train,) = (root / "data" / "03_primary" / "train_pairs.parquet").glob("*/train_pairs.parquet")
    saved = plain_frame(pd.read_parquet(train))
    assert len(saved) > 0
    by_chosen = {r["chosen"][0]["content"]: r for r in rows}
    for _, row in saved.iterrows():
        source_row = by_chosen[row["chosen"][0]["content"]]
        assert row["chosen"] == source_row["chosen"] and row["prompt"] == source_row["prompt"]  # messages


def test_every_environment_validates_against_the_strict_models():
    """Each conf/<env> (with base under it) builds every typed parameter of every pipeline."""
    from kedro.config import OmegaConfigLoader
    from kedro.framework.project import pipelines
    from kedro.framework.startup import bootstrap_project
    from kedro.validation.parameter_validator import ParameterValidator

    from calibrated_rlhf import pipeline_registry
    from tests.project import ROOT

    bootstrap_project(ROOT)
    from calibrated_rlhf.settings import CONFIG_LOADER_ARGS

    envs = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and not p.name.startswith("replay_"))
    assert "tiny" in envs and "reference_workload" in envs
    for env in envs:
        loader = OmegaConfigLoader(str(ROOT / "conf"), env=None if env == "base" else env, **CONFIG_LOADER_ARGS)
        pipeline_registry.use_config(loader)  # an ensemble environment shapes the DAG
        ParameterValidator(dict(pipelines)).validate_raw_params(loader["parameters"])

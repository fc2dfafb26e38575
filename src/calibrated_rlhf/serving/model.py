"""The reward model shipped as one MLflow pyfunc model: reward model (or ensemble) + tokenizer + transform.

``mlflow.pyfunc.load_model(uri).predict(df)``:

- rows with ``prompt`` and ``response`` get ``raw``, ``calibrated`` and ``normalized`` rewards;
- rows with ``prompt``, ``chosen`` and ``rejected`` get those for both sides (``*_chosen``,
  ``*_rejected``) and ``p_chosen_preferred``, the calibrated probability that chosen is preferred.

An ensemble's model also returns the ensemble_std, ``ensemble_std`` (``ensemble_std_chosen``,
``ensemble_std_rejected``): the std of the members' calibrated rewards, where "raw" is their aggregate.

Every column takes text or a list of ``{role, content}`` messages (TRL's conversational form): a text
response to a conversational prompt is scored as the assistant's reply, rendered with the tokenizer's chat
template exactly as the reward model saw its training pairs (``core.scoring``). ``prompt`` may be omitted or
empty (the text is then scored as is). Bad requests fail with an error that names the column and rows.

Inputs longer than the model handles (prompt + response in tokens, EOS included) are refused by default,
naming the rows: the limit is the smaller of the model's ``max_position_embeddings`` (a hard limit) and the
tokenizer's ``model_max_length`` (the length the pairs were checked against in training, recorded by
``data_prep``). ``mlflow.pyfunc.load_model(uri, model_config={"overlength": "truncate"})`` truncates them
instead, on the tokenizer's ``truncation_side``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

PAIR_COLUMNS = ("chosen", "rejected")
SINGLE_COLUMNS = ("response",)
REQUIREMENTS = ("torch", "transformers", "tokenizers", "pandas", "numpy", "pydantic", "mlflow")
OVERLENGTH = ("reject", "truncate")
# The pyfunc's options; MLflow lets load_model(model_config=...) override only keys logged with the model.
MODEL_CONFIG = {"overlength": "reject"}
NO_LIMIT = 10**9  # transformers' "no limit" model_max_length is 1e30


class RequestError(ValueError):
    """A request the model cannot score; the message names the column and rows."""


def _check_text(df: pd.DataFrame, column: str, allow_empty: bool) -> None:
    from calibrated_rlhf.core.preferences import text_problem

    # text_problem lets a prompt be empty and nothing else; None stands in for a missing prompt
    field = "prompt" if allow_empty else column
    problems = [(i, text_problem("" if v is None and allow_empty else v, field)) for i, v in enumerate(df[column])]
    bad = [(i, why) for i, why in problems if why]
    if bad:
        shown = ", ".join(str(i) for i, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise RequestError(f"column '{column}' needs {'text' if allow_empty else 'non-empty text'}; bad rows: {shown} "
                           f"(row {bad[0][0]}: {bad[0][1]}; a list of {{role, content}} messages is taken too)")


def check_request(df: Any) -> str:
    """'pairs' or 'responses'; raises :class:`RequestError` on anything else."""
    if not isinstance(df, pd.DataFrame):
        raise RequestError(f"expected a DataFrame, got {type(df).__name__}")
    cols = set(df.columns)
    if set(PAIR_COLUMNS) <= cols:
        mode, texts = "pairs", PAIR_COLUMNS
    elif set(SINGLE_COLUMNS) <= cols:
        mode, texts = "responses", SINGLE_COLUMNS
    else:
        raise RequestError("expected columns prompt/response or prompt/chosen/rejected, got "
                           f"{sorted(cols) or 'none of them (MLflow drops columns outside the signature)'}")
    for col in texts:
        _check_text(df, col, allow_empty=False)
    if "prompt" in cols:
        _check_text(df, "prompt", allow_empty=True)
    return mode


def length_limit(model: Any, tokenizer: Any) -> int | None:
    """The longest input in tokens: the positions every member has, and the tokenizer's recorded length."""
    members = getattr(model, "members", None) or [model]
    limits = [getattr(m.config, "max_position_embeddings", None) for m in members]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < NO_LIMIT]
    return min(limits) if limits else None


def fit_lengths(ids: dict[str, list[list[int]]], limit: int | None, overlength: str, side: str = "right"
                ) -> dict[str, list[list[int]]]:
    """``ids`` per column, checked against ``limit``: a :class:`RequestError` naming the columns and rows
    (``overlength: reject``), or cut to ``limit`` tokens on ``side`` (``truncate``)."""
    if limit is None:
        return ids
    long = {col: [i for i, x in enumerate(seqs) if len(x) > limit] for col, seqs in ids.items()}
    long = {col: rows for col, rows in long.items() if rows}
    if long and overlength == "reject":
        parts = "; ".join(f"column '{col}' rows {', '.join(map(str, rows[:10]))}{' ...' if len(rows) > 10 else ''} "
                          f"({len(ids[col][rows[0]])} tokens in row {rows[0]})" for col, rows in long.items())
        raise RequestError(f"input longer than the model's {limit} tokens (prompt + response, EOS included): {parts}. "
                           "Shorten it, or load the model with model_config={'overlength': 'truncate'}")
    cut = (lambda x: x[:limit]) if side == "right" else (lambda x: x[-limit:])
    return {col: [cut(x) if len(x) > limit else x for x in seqs] for col, seqs in ids.items()}


class CalibratedRewardModel(mlflow.pyfunc.PythonModel):
    """Scores text with the reward model and applies the frozen reward transform."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from calibrated_rlhf.core.normalization import RewardTransform

        from calibrated_rlhf.core.ensemble import EnsembleSpec, RewardEnsemble

        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        self.transform = RewardTransform.from_dict(json.loads(Path(context.artifacts["reward_transform"]).read_text()))

        def load(key: str) -> Any:
            return AutoModelForSequenceClassification.from_pretrained(context.artifacts[key]).eval()

        if self.transform.ensemble is None:
            self.model = load("reward_model")
        else:
            spec = EnsembleSpec.from_dict(self.transform.ensemble)
            self.model = RewardEnsemble([load(f"reward_model_{i}") for i in range(spec.size)], spec)
        self.overlength = {**MODEL_CONFIG, **(getattr(context, "model_config", None) or {})}["overlength"]
        if self.overlength not in OVERLENGTH:
            raise ValueError(f"model_config overlength: expected one of {OVERLENGTH}, got {self.overlength!r}")
        self.max_length = length_limit(self.model, self.tokenizer)
        # `mlflow models serve` predicts on a pool of threads; the reward readout hooks the shared model for the
        # length of a forward pass, and a fast tokenizer is not to be shared between threads
        self._lock = threading.Lock()

    def _raw(self, prompts: list[Any], responses: dict[str, list[Any]]) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw rewards (and the ensemble's ensemble_std) of each column's responses, the columns one after another."""
        from calibrated_rlhf.core.scoring import RewardScorer

        scorer = RewardScorer(self.model, self.tokenizer, self.transform)
        with self._lock:
            ids = {col: scorer.render(prompts, texts) for col, texts in responses.items()}
            ids = fit_lengths(ids, self.max_length, self.overlength,
                              getattr(self.tokenizer, "truncation_side", "right"))
            return scorer.raw_of_ids([x for seqs in ids.values() for x in seqs])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from calibrated_rlhf.core.preferences import plain_frame

        if isinstance(model_input, pd.DataFrame):
            model_input = plain_frame(model_input)  # message lists may arrive as numpy arrays
        mode = check_request(model_input)
        prompts = list(model_input["prompt"]) if "prompt" in model_input.columns else [""] * len(model_input)
        t = self.transform
        if mode == "responses":
            raw, ensemble_std = self._raw(prompts, {"response": list(model_input["response"])})
            out = pd.DataFrame({"raw": raw, "calibrated": t.calibrate(raw), "normalized": t.normalize(raw)})
            if ensemble_std is not None:
                out["ensemble_std"] = ensemble_std
            return out
        n = len(model_input)
        raw, ensemble_std = self._raw(prompts, {c: list(model_input[c]) for c in PAIR_COLUMNS})
        r_c, r_r = raw[:n], raw[n:]
        out = pd.DataFrame({
            "raw_chosen": r_c, "raw_rejected": r_r,
            "calibrated_chosen": t.calibrate(r_c), "calibrated_rejected": t.calibrate(r_r),
            "normalized_chosen": t.normalize(r_c), "normalized_rejected": t.normalize(r_r),
            "p_chosen_preferred": t.preference_probability(r_c, r_r),
        })
        if ensemble_std is not None:
            out["ensemble_std_chosen"], out["ensemble_std_rejected"] = ensemble_std[:n], ensemble_std[n:]
        return out


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from mlflow.types.schema import AnyType

    # text or a list of {role, content} messages (check_request validates either)
    inputs = Schema([ColSpec(AnyType(), c, required=False) for c in ("prompt", "response", "chosen", "rejected")])
    outputs = Schema([ColSpec("double", c, required=False) for c in (
        "raw", "calibrated", "normalized", "raw_chosen", "raw_rejected", "calibrated_chosen",
        "calibrated_rejected", "normalized_chosen", "normalized_rejected", "p_chosen_preferred",
        "ensemble_std", "ensemble_std_chosen", "ensemble_std_rejected")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_reward_model(
    reward_model: Any,
    tokenizer: Any,
    reward_transform: dict[str, Any],
    name: str = "calibrated_reward_model",
    registered_model_name: str | None = None,
    input_example: pd.DataFrame | None = None,
) -> Any:
    """Log (and optionally register) the bundle in the active MLflow run; returns MLflow's ModelInfo.

    ``reward_model`` is one model or a ``RewardEnsemble`` (its members go in as ``reward_model_<i>``).
    """
    from calibrated_rlhf.core.ensemble import RewardEnsemble

    package = Path(__file__).resolve().parents[1]  # the whole calibrated_rlhf package, not just serving/
    with tempfile.TemporaryDirectory(prefix="pyfunc-") as tmp:
        tmp_path = Path(tmp)
        if isinstance(reward_model, RewardEnsemble):
            models = {f"reward_model_{i}": m for i, m in enumerate(reward_model.members)}
        else:
            models = {"reward_model": reward_model}
        for key, model in models.items():
            model.save_pretrained(tmp_path / key)
        tokenizer.save_pretrained(tmp_path / "tokenizer")
        (tmp_path / "reward_transform.json").write_text(json.dumps(reward_transform, indent=1))
        # Ship the library code with the model so it loads where this project is not installed.
        code = tmp_path / "code" / "calibrated_rlhf"
        shutil.copytree(package, code, ignore=shutil.ignore_patterns("__pycache__", "pipelines"))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=CalibratedRewardModel(),
            artifacts={**{key: str(tmp_path / key) for key in models}, "tokenizer": str(tmp_path / "tokenizer"),
                       "reward_transform": str(tmp_path / "reward_transform.json")},
            code_paths=[str(code)],
            signature=signature(),
            model_config=MODEL_CONFIG,
            input_example=input_example,
            pip_requirements=[f"{p}=={md.version(p)}" for p in REQUIREMENTS],
            registered_model_name=registered_model_name,
        )

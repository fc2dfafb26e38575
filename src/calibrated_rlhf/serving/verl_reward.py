"""verl's custom reward function, answered by the reward server; this file imports nothing outside the standard
library, so verl can load it by path where this project is not installed:

    custom_reward_function.path=/path/to/calibrated_rlhf/serving/verl_reward.py
    custom_reward_function.name=compute_score

The server's URL is ``CALIBRATED_RLHF_REWARD_URL`` (default ``http://127.0.0.1:5000``), its token
``CALIBRATED_RLHF_REWARD_TOKEN``. verl hands the decoded response as ``solution_str``; the prompt it was
sampled for is read from ``extra_info["prompt"]`` where the dataset puts it there (text, or the chat messages),
else the response is scored on its own. The score is the served ``normalized`` reward (the frozen z-score).

``compute_score`` takes one response (verl's ``naive`` reward manager) or lists of them (its ``batch``
manager: ``data_sources``, ``solution_strs``, ``ground_truths``, ``extra_infos``), sending one request per
call either way.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

URL_ENV, TOKEN_ENV = "CALIBRATED_RLHF_REWARD_URL", "CALIBRATED_RLHF_REWARD_TOKEN"


def _score(rows: list[dict[str, Any]]) -> list[float]:
    url = os.environ.get(URL_ENV, "http://127.0.0.1:5000").rstrip("/") + "/score"
    headers = {"Content-Type": "application/json"}
    if os.environ.get(TOKEN_ENV):
        headers["Authorization"] = f"Bearer {os.environ[TOKEN_ENV]}"
    request = urllib.request.Request(url, data=json.dumps({"inputs": rows}).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=120) as resp:
        return [float(v) for v in json.loads(resp.read())["normalized"]]


def _row(solution: str, extra_info: Any) -> dict[str, Any]:
    prompt = extra_info.get("prompt", "") if isinstance(extra_info, dict) else ""
    return {"prompt": prompt if prompt is not None else "", "response": solution}


def compute_score(data_source: Any = None, solution_str: Any = None, ground_truth: Any = None, extra_info: Any = None,
                  data_sources: Any = None, solution_strs: Any = None, ground_truths: Any = None,
                  extra_infos: Any = None, **_: Any) -> float | list[float]:
    """The served normalized reward of one response, or of each of a batch (verl's two calling forms)."""
    if solution_strs is not None:
        infos = extra_infos if extra_infos is not None else [None] * len(solution_strs)
        return _score([_row(s, e) for s, e in zip(solution_strs, infos)])
    if isinstance(solution_str, list):  # the batch form, positionally
        infos = extra_info if isinstance(extra_info, list) else [None] * len(solution_str)
        return _score([_row(s, e) for s, e in zip(solution_str, infos)])
    return _score([_row(solution_str, extra_info)])[0]

"""Best-of-n as an RL method: a pool of reference samples per prompt, ranked by the calibrated reward.

Each prompt's pool of ``pool_size`` reference responses is sampled once and scored once; best-of-n for every
``n`` is then computed exactly over it (``core.overoptimization.best_of_n``), so the curve costs one pool
and no resampling. Gains are relative to the pool's mean (the reference policy itself), per prompt, with
95% intervals over prompts, as the one evaluation protocol reports a policy's gold gain.

The proxy is the calibrated reward, aggregated as the reward model is (an ensemble's ``aggregation``
included): the transform's normalization is monotone and does not change which response ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from calibrated_rlhf.core.evaluation import mean_interval
from calibrated_rlhf.core.gold import Gold
from calibrated_rlhf.core.overoptimization import CurveFit, best_of_n, bon_kl_bound, fit_curve, held_out_r2
from calibrated_rlhf.core.policy import decode_samples, sample_ids
from calibrated_rlhf.core.scoring import RewardScorer

CURVE_COLUMNS = ("n", "kl_bound", "kl", "d", "proxy_gain", "proxy_gain_ci_low", "proxy_gain_ci_high",
                 "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high")


@dataclass(frozen=True)
class Pool:
    """Calibrated proxy and gold rewards of each prompt's reference samples, ``[prompts, pool_size]``;
    ``gold`` is None off the synthetic task."""

    proxy: np.ndarray
    gold: np.ndarray | None


def sample_pool(reference: Any, tokenizer: Any, scorer: RewardScorer, task: Gold | None,
                prompts: Sequence[Any], pool_size: int, max_new_tokens: int, seed: int) -> Pool:
    """Sample ``pool_size`` responses per prompt from the reference policy and score them once."""
    rows = sample_ids(reference, tokenizer, list(prompts), pool_size, max_new_tokens, seed=seed,
                      desc="best-of-n pool")
    texts = decode_samples(tokenizer, rows)
    proxy = scorer.score([prompt for prompt, _, _ in rows], texts).calibrated
    gold = None if task is None else task.gold_rewards([prompt for prompt, _, _ in rows], texts)
    shape = (len(prompts), pool_size)
    return Pool(proxy=np.asarray(proxy).reshape(shape), gold=None if gold is None else gold.reshape(shape))


def curve(pool: Pool, ns: Sequence[int]) -> pd.DataFrame:
    """One row per ``n``: the bound and the measured KL (mean over prompts), ``d = sqrt(kl)``, and the proxy's
    and gold's gains over the reference with 95% intervals over prompts (gold NaN without a task)."""
    gold = pool.gold if pool.gold is not None else np.full_like(pool.proxy, np.nan)
    rows = []
    for n in ns:
        picks = [best_of_n(p, g, n) for p, g in zip(pool.proxy, gold)]
        kl = float(np.mean([b.kl for b in picks]))
        proxy_gain = [b.proxy - p.mean() for b, p in zip(picks, pool.proxy)]
        gold_gain = [b.gold - g.mean() for b, g in zip(picks, gold)]
        rows.append((n, bon_kl_bound(n), kl, np.sqrt(kl), *mean_interval(proxy_gain), *mean_interval(gold_gain)))
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def fit(points: pd.DataFrame, value: str = "gold_gain") -> tuple[CurveFit, float, float]:
    """Gao et al.'s best-of-n form fitted to ``value`` against ``d``; its held-out R^2; the observed peak's d."""
    d, y = points["d"].to_numpy(), points[value].to_numpy()
    return fit_curve(d, y, "bon"), held_out_r2(d, y, "bon"), float(d[int(np.argmax(y))])

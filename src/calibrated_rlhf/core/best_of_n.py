"""Best-of-n as an RL method: a pool of reference samples per prompt, ranked by the calibrated reward.

Each prompt's pool of ``pool_size`` reference responses is sampled once and scored once; best-of-n for every
``n`` is then computed exactly over it (``core.overoptimization.best_of_n``), so the curve costs one pool
and no resampling. Gains are relative to the pool's mean (the reference policy itself), per prompt, with
95% intervals over prompts, as the one evaluation protocol reports a policy's gold gain.

The proxy is the calibrated reward, aggregated as the reward model is (an ensemble's ``aggregation``
included): the transform's normalization is monotone and does not change which response ranks first. For an
ensemble the pool also keeps each member's calibrated reward, so one pool gives the curve of every ranking a
user could choose (:func:`rankings`): each member alone and each aggregation (Coste et al., ICLR 2024, found the
conservative ones, ``min`` and ``mean_minus_std``, to hold off over-optimization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from calibrated_rlhf.core.ensemble import AGGREGATIONS, RewardEnsemble, aggregate_rewards
from calibrated_rlhf.core.evaluation import mean_interval
from calibrated_rlhf.core.gold import Gold
from calibrated_rlhf.core.overoptimization import CurveFit, best_of_n, bon_kl_bound, fit_curve, held_out_r2
from calibrated_rlhf.core.policy import decode_samples, sample_ids
from calibrated_rlhf.core.scoring import RewardScorer, score_rewards

CURVE_COLUMNS = ("n", "kl_bound", "kl", "d", "proxy_gain", "proxy_gain_ci_low", "proxy_gain_ci_high",
                 "gold_gain", "gold_gain_ci_low", "gold_gain_ci_high")


@dataclass(frozen=True)
class Pool:
    """Calibrated proxy and gold rewards of each prompt's reference samples, ``[prompts, pool_size]``;
    ``gold`` is None off the synthetic task. ``members``: an ensemble's members' calibrated rewards,
    ``[prompts, pool_size, K]`` (None for one reward model); ``std_penalty`` the ensemble's for ``mean_minus_std``."""

    proxy: np.ndarray
    gold: np.ndarray | None
    members: np.ndarray | None = None
    std_penalty: float = 1.0


def sample_pool(reference: Any, tokenizer: Any, scorer: RewardScorer, task: Gold | None,
                prompts: Sequence[Any], pool_size: int, max_new_tokens: int, seed: int) -> Pool:
    """Sample ``pool_size`` responses per prompt from the reference policy and score them once."""
    rows = sample_ids(reference, tokenizer, list(prompts), pool_size, max_new_tokens, seed=seed,
                      desc="best-of-n pool")
    texts = decode_samples(tokenizer, rows)
    prompts_of = [prompt for prompt, _, _ in rows]
    gold = None if task is None else task.gold_rewards(prompts_of, texts)
    shape = (len(prompts), pool_size)
    if not isinstance(scorer.reward_model, RewardEnsemble):
        proxy = scorer.score(prompts_of, texts).calibrated
        return Pool(proxy=np.asarray(proxy).reshape(shape), gold=None if gold is None else gold.reshape(shape))
    # An ensemble's members score the pool once: its own proxy is their aggregate, calibrated by the transform,
    # as the scorer would compute it from the same member scores.
    spec = scorer.reward_model.spec
    raw = scorer.raw_multiplier * member_raw(scorer, prompts_of, texts)
    proxy = scorer.transform.calibrate(spec.aggregate(raw)[0])
    return Pool(proxy=proxy.reshape(shape), gold=None if gold is None else gold.reshape(shape),
                members=spec.calibrate_members(raw).reshape(*shape, -1), std_penalty=spec.std_penalty)


def member_raw(scorer: RewardScorer, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
    """Each ensemble member's raw reward of each response, ``[responses, K]``."""
    ids = scorer.render(prompts, responses)
    return np.stack([score_rewards(m, ids, scorer.tokenizer.pad_token_id, scorer.batch_size)[0]
                     for m in scorer.reward_model.members], axis=1)


def rankings(pool: Pool) -> dict[str, np.ndarray]:
    """Every proxy the pool can rank by, ``[prompts, pool_size]`` each: ``transform`` (the one the reward transform
    defines) and, for an ensemble, ``member_<i>`` and each aggregation of the members."""
    out = {"transform": pool.proxy}
    if pool.members is not None:
        k = pool.members.shape[-1]
        out.update({f"member_{i}": pool.members[..., i] for i in range(k)})
        flat = pool.members.reshape(-1, k)
        out.update({agg: aggregate_rewards(flat, agg, pool.std_penalty).reshape(pool.proxy.shape)
                    for agg in AGGREGATIONS})
    return out


def curve(pool: Pool, ns: Sequence[int], proxy: np.ndarray | None = None) -> pd.DataFrame:
    """One row per ``n``: the bound and the measured KL (mean over prompts), ``d = sqrt(kl)``, and the proxy's
    and gold's gains over the reference with 95% intervals over prompts (gold NaN without a task). ``proxy``:
    the ranking (one of :func:`rankings`), by default the transform's."""
    proxy = pool.proxy if proxy is None else proxy
    gold = pool.gold if pool.gold is not None else np.full_like(proxy, np.nan)
    rows = []
    for n in ns:
        picks = [best_of_n(p, g, n) for p, g in zip(proxy, gold)]
        kl = float(np.mean([b.kl for b in picks]))
        proxy_gain = [b.proxy - p.mean() for b, p in zip(picks, proxy)]
        gold_gain = [b.gold - g.mean() for b, g in zip(picks, gold)]
        rows.append((n, bon_kl_bound(n), kl, np.sqrt(kl), *mean_interval(proxy_gain), *mean_interval(gold_gain)))
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def ranking_curves(pool: Pool, ns: Sequence[int]) -> pd.DataFrame:
    """:func:`curve` for every ranking of :func:`rankings`, stacked, the ranking's name in column ``ranking``."""
    return pd.concat([curve(pool, ns, proxy).assign(ranking=name) for name, proxy in rankings(pool).items()],
                     ignore_index=True)[["ranking", *CURVE_COLUMNS]]


def fit(points: pd.DataFrame, value: str = "gold_gain") -> tuple[CurveFit, float, float]:
    """Gao et al.'s best-of-n form fitted to ``value`` against ``d``; its held-out R^2; the observed peak's d."""
    d, y = points["d"].to_numpy(), points[value].to_numpy()
    return fit_curve(d, y, "bon"), held_out_r2(d, y, "bon"), float(d[int(np.argmax(y))])

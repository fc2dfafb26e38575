"""Every MLflow metric key the project logs, in one place, grouped by the stage that logs it.

The nodes that log a key and the report that reads it both import it from here, so a renamed key
changes in one line and cannot leave the report reading a key nobody logs any more. Plain constants
and key builders: no Kedro, no MLflow (``core`` is a plain library).

Keys are ``<stage>/<name>`` or ``<stage>/<group>/<name>``; the "Tracking" section of docs/runs-and-tracking.md lists them.
Families whose last part is data (a drop reason, a quantile level, a reward name, an ensemble member)
have a builder; the constants below are the members the code or the report names.
"""

from __future__ import annotations

# ---- data_prep: split sizes and drop counts ------------------------------------------------------------------

DATA_N_TRAIN = "data/n_train"
DATA_N_VALIDATION = "data/n_validation"
DATA_N_CALIBRATION = "data/n_calibration"
DATA_N_TEST = "data/n_test"
DATA_N_DROPPED = "data/n_dropped"


def data_n_dropped(reason: str) -> str:
    """Pairs dropped for one reason (``too_long``, ``duplicate``, ...), beside the total."""
    return f"{DATA_N_DROPPED}_{reason}"


def data_content_hash_tag(split: str) -> str:
    """A tag, not a metric: one split's content hash. Here because it shares the ``data/`` namespace."""
    return f"data/content_hash/{split}"


# ---- reward_model: test figures and training curves ---------------------------------------------------------

def rm_test(name: str) -> str:
    """A test-split figure of ``core.reward_model.pair_metrics`` (``accuracy``, ``reward_mean``, ...)."""
    return f"rm/test_{name}"


RM_TEST_ACCURACY = rm_test("accuracy")
RM_TEST_BAYES_ACCURACY = rm_test("bayes_accuracy")
RM_TEST_EXPECTED_ACCURACY = rm_test("expected_accuracy")
RM_TEST_REWARD_MEAN = rm_test("reward_mean")  # the reward offset the centering loss pins
RM_TEST_REWARD_STD = rm_test("reward_std")
RM_TEST_MARGIN_MEAN = rm_test("margin_mean")
RM_TEST_N_PAIRS = rm_test("n_pairs")

# Per logging step of TRL's RewardTrainer.
RM_TRAIN_LOSS = "rm/train/loss"
RM_TRAIN_ACCURACY = "rm/train/accuracy"
RM_TRAIN_MARGIN = "rm/train/margin"
RM_TRAIN_REWARD_MEAN = "rm/train/reward_mean"
RM_TRAIN_GRAD_NORM = "rm/train/grad_norm"
RM_TRAIN_LEARNING_RATE = "rm/train/learning_rate"
RM_TRAIN_RUNTIME_S = "rm/train/runtime_s"
RM_TRAIN_PAIRS_PER_S = "rm/train/pairs_per_s"
RM_TRAIN_PACKED_BATCH_FRACTION = "rm/train/packed_batch_fraction"
RM_TRAIN_TRIMMED_BATCH_FRACTION = "rm/train/trimmed_batch_fraction"
RM_VALIDATION_LOSS = "rm/validation/loss"
RM_VALIDATION_ACCURACY = "rm/validation/accuracy"
RM_VALIDATION_MARGIN = "rm/validation/margin"
RM_VALIDATION_REWARD_MEAN = "rm/validation/reward_mean"

# ---- calibration: the temperature and test figures before (T = 1) and after ---------------------------------

CALIBRATION_TEMPERATURE = "calibration/temperature"
CALIBRATION_TEMPERATURE_STD_ERROR = "calibration/temperature_std_error"
CALIBRATION_N_PAIRS = "calibration/n_pairs"


def calibration_test(name: str, when: str) -> str:
    """``calibration/test_<name>_<when>``, ``when`` being ``before`` or ``after`` temperature scaling."""
    if when not in ("before", "after"):
        raise ValueError(f"when must be 'before' or 'after', got {when!r}")
    return f"calibration/test_{name}_{when}"


# The figures logged before and after, by their name in the key.
CALIBRATION_TEST_FIGURES: tuple[str, ...] = ("nll", "ece", "ece_equal_width", "brier", "accuracy")
CALIBRATION_TEST_NLL_BEFORE = calibration_test("nll", "before")
CALIBRATION_TEST_NLL_AFTER = calibration_test("nll", "after")
CALIBRATION_TEST_ECE_BEFORE = calibration_test("ece", "before")  # equal-mass bins
CALIBRATION_TEST_ECE_AFTER = calibration_test("ece", "after")
# Synthetic task only: what the true preference probabilities score.
CALIBRATION_TEST_BAYES_NLL = "calibration/test_bayes_nll"
CALIBRATION_TEST_ORACLE_ECE = "calibration/test_oracle_ece"
CALIBRATION_TEST_NLL_GAP_TO_BAYES = "calibration/test_nll_gap_to_bayes"
CALIBRATION_TRUE_SCALE = "calibration/true_scale"
CALIBRATION_RECOVERED_SCALE = "calibration/recovered_scale"
# How sure: the temperature's relative standard error and the calibration size that would bring it under
# its target; bootstrap intervals over the test pairs of the after-calibration figures, of the oracle's on
# the same resamples and of the paired difference (``calibration_interval``).
CALIBRATION_TEMPERATURE_REL_STD_ERROR = "calibration/temperature_rel_std_error"
CALIBRATION_SUFFICIENT_PAIRS = "calibration/sufficient_pairs"


def calibration_interval(name: str, bound: str) -> str:
    """``calibration/test_<name>_<bound>``: ``name`` is ``ece_after``, ``oracle_nll``, ``nll_minus_oracle``, ...;
    ``bound`` ``low`` or ``high`` (the interval's ends) or ``value`` (the figure, where no other key has it)."""
    if bound not in ("low", "high", "value"):
        raise ValueError(f"bound must be 'low', 'high' or 'value', got {bound!r}")
    return f"calibration/test_{name}" if bound == "value" else f"calibration/test_{name}_{bound}"


CALIBRATION_TEST_ECE_AFTER_LOW = calibration_interval("ece_after", "low")
CALIBRATION_TEST_ECE_AFTER_HIGH = calibration_interval("ece_after", "high")
CALIBRATION_TEST_ECE_MINUS_ORACLE = calibration_interval("ece_minus_oracle", "value")
CALIBRATION_TEST_ECE_MINUS_ORACLE_LOW = calibration_interval("ece_minus_oracle", "low")
CALIBRATION_TEST_ECE_MINUS_ORACLE_HIGH = calibration_interval("ece_minus_oracle", "high")

# ---- normalization: the frozen statistics of calibrated rewards --------------------------------------------

NORMALIZATION_MEAN = "normalization/mean"
NORMALIZATION_STD = "normalization/std"
NORMALIZATION_N = "normalization/n"
NORMALIZATION_CLIP_FRACTION = "normalization/clip_fraction"
NORMALIZATION_ENSEMBLE_STD = "normalization/ensemble_std"  # ensembles: members' spread on the reference


def normalization_calibrated_quantile(level: str) -> str:
    """A quantile of the calibrated rewards, ``level`` as text (``"0.5"``)."""
    return f"normalization/calibrated_{level}"


# ---- policy_init: the SFT of the reference policy ----------------------------------------------------------

POLICY_INIT_TRAIN_LOSS = "policy_init/train/loss"
POLICY_INIT_TRAIN_RUNTIME_S = "policy_init/train/runtime_s"

# ---- ppo: per update (core.ppo's trainer history, logged as curves) ----------------------------------------

PPO_STEP = "ppo/step"  # the update number; the step of every PPO curve, not logged as a metric itself
PPO_EPISODES = "ppo/episodes"
PPO_KL = "ppo/objective/kl"
PPO_BETA = "ppo/objective/beta"  # the beta this update was penalized with
PPO_BETA_NEXT = "ppo/objective/beta_next"  # after the controller's update
PPO_BETA_EFFECTIVE = "ppo/objective/beta_effective"
PPO_KL_TARGET = "ppo/objective/kl_target"
PPO_SCORE = "ppo/objective/score"
PPO_NON_SCORE_REWARD = "ppo/objective/non_score_reward"
PPO_RLHF_REWARD = "ppo/objective/rlhf_reward"
PPO_RESPONSE_LENGTH = "ppo/rollout/response_length"
PPO_EOS_FRACTION = "ppo/rollout/eos_fraction"
PPO_VALUE_LOSS = "ppo/value/loss"
PPO_VALUE_CLIPFRAC = "ppo/value/clipfrac"
PPO_VALUE_EXPLAINED_VARIANCE = "ppo/value/explained_variance"
PPO_VALUE_MEAN = "ppo/value/mean"
PPO_POLICY_CLIPFRAC = "ppo/policy/clipfrac"
PPO_POLICY_APPROX_KL = "ppo/policy/approx_kl"
PPO_POLICY_ENTROPY = "ppo/policy/entropy"
PPO_POLICY_RATIO = "ppo/policy/ratio"
PPO_LOSS_POLICY = "ppo/losses/policy"
PPO_LOSS_TOTAL = "ppo/losses/total"
PPO_GRAD_NORM = "ppo/optim/grad_norm"
PPO_LR = "ppo/optim/lr"
PPO_EPISODES_PER_S = "ppo/perf/episodes_per_s"
PPO_ROLLOUT_S = "ppo/perf/rollout_s"
PPO_GENERATE_S = "ppo/perf/generate_s"
PPO_SCORE_S = "ppo/perf/score_s"
PPO_UPDATE_S = "ppo/perf/update_s"
PPO_NUM_PROCESSES = "ppo/perf/num_processes"  # logged once by the launcher (calibrated_rlhf.runtime.launch)


def ppo_reward(name: str) -> str:
    """Batch mean of one entry of the score function (``raw``, ``calibrated``, ``normalized``, ``gold``, ...)."""
    return f"ppo/rewards/{name}"


PPO_REWARD_GOLD = ppo_reward("gold")
PPO_REWARD_GOLD_GAP = ppo_reward("gold_gap")  # proxy minus gold, calibrated-logit units
PPO_REWARD_ENSEMBLE_STD = ppo_reward("ensemble_std")

# ---- eval: once, at the end, for every RL method (PPO, RLOO, GRPO, DPO) -----------------------------------------
# One prefix for every method, so the report compares like with like; the run's ``rl/algorithm`` tag says which
# method it was (``RL_ALGORITHM_TAG``; a PPO run logged before PPO set it is known by its ``ppo/`` curves).

def eval_key(name: str) -> str:
    """``eval/<name>``: a figure of the final policy or a summary of the training that made it."""
    return f"eval/{name}"


# The one evaluation protocol (core.evaluation): the final policy's gold reward against the reference's on
# test prompts, with a 95% interval of the gain, and its per-sequence KL to the reference on the same samples.
EVAL_GOLD_REFERENCE = eval_key("gold_reference")
EVAL_GOLD_POLICY = eval_key("gold_policy")
EVAL_GOLD_GAIN = eval_key("gold_gain")
EVAL_GOLD_GAIN_CI_LOW = eval_key("gold_gain_ci_low")
EVAL_GOLD_GAIN_CI_HIGH = eval_key("gold_gain_ci_high")
EVAL_KL_REFERENCE = eval_key("kl_reference")
EVAL_KL_REFERENCE_CI_LOW = eval_key("kl_reference_ci_low")
EVAL_KL_REFERENCE_CI_HIGH = eval_key("kl_reference_ci_high")
EVAL_PROTOCOL_KEYS: tuple[str, ...] = (EVAL_GOLD_REFERENCE, EVAL_GOLD_POLICY, EVAL_GOLD_GAIN, EVAL_GOLD_GAIN_CI_LOW,
                                       EVAL_GOLD_GAIN_CI_HIGH, EVAL_KL_REFERENCE, EVAL_KL_REFERENCE_CI_LOW,
                                       EVAL_KL_REFERENCE_CI_HIGH)
# KL tracking over training (core.kl_tracking), logged by PPO, RLOO and GRPO (DPO has no KL controller).
EVAL_KL_SECOND_HALF_MEAN = eval_key("kl_second_half_mean")
EVAL_KL_TRACKING_ERROR = eval_key("kl_tracking_error")
EVAL_FINAL_BETA = eval_key("final_beta")
EVAL_UPDATES = eval_key("updates")
# The rest of the training summary, where a method logs it.
EVAL_EPISODES_PER_S = eval_key("episodes_per_s")  # PPO: median over updates
EVAL_STOPPED_EARLY = eval_key("stopped_early")  # PPO, RLOO, GRPO: a stop rule ended training
EVAL_FINAL_GOLD_GAP = eval_key("final_gold_gap")  # PPO, synthetic task: proxy minus gold at the end
EVAL_FINAL_ENSEMBLE_STD = eval_key("final_ensemble_std")  # PPO with a reward ensemble
EVAL_RUNTIME_S = eval_key("runtime_s")  # RLOO, GRPO: the trainer's wall clock

# Where runs logged before the one prefix keep each figure: PPO under ``ppo/eval/``, RLOO and GRPO their KL
# tracking under ``rl/eval/`` and the protocol under PPO's keys, DPO the protocol under PPO's keys. The report
# reads a key, else these (``reporting.table.with_current_keys``), so runs already in a store stay readable.
_LEGACY_PPO_ONLY = (EVAL_EPISODES_PER_S, EVAL_STOPPED_EARLY, EVAL_FINAL_GOLD_GAP, EVAL_FINAL_ENSEMBLE_STD,
                    *EVAL_PROTOCOL_KEYS)
_LEGACY_PPO_AND_RL = (EVAL_KL_SECOND_HALF_MEAN, EVAL_KL_TRACKING_ERROR, EVAL_FINAL_BETA, EVAL_UPDATES)
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    **{k: ("ppo/" + k,) for k in _LEGACY_PPO_ONLY},
    **{k: ("ppo/" + k, "rl/" + k) for k in _LEGACY_PPO_AND_RL},
    EVAL_RUNTIME_S: ("rl/" + EVAL_RUNTIME_S,),
}


def legacy_keys(key: str) -> tuple[str, ...]:
    """The keys older runs logged ``key``'s figure under, newest name first; empty for a key never renamed."""
    return LEGACY_KEYS.get(key, ())


# ---- rl: TRL's RLOO and GRPO, per update (the trainer's log, renamed) --------------------------------------

RL_ALGORITHM_TAG = "rl/algorithm"  # a tag, not a metric: ppo | rloo | grpo | dpo (older PPO runs: none)
RL_KL = "rl/objective/kl"  # per sequence: TRL's per-token mean times the mean completion length
RL_KL_PER_TOKEN = "rl/objective/kl_per_token"
RL_BETA = "rl/objective/beta"  # the beta this update used
RL_BETA_NEXT = "rl/objective/beta_next"
RL_SCORE = "rl/objective/score"  # the optimized reward, before the KL penalty
RL_RESPONSE_LENGTH = "rl/rollout/response_length"
RL_CLIPPED_FRACTION = "rl/rollout/clipped_fraction"  # completions cut at response_length (no EOS)
RL_ENTROPY = "rl/policy/entropy"
RL_LOSS = "rl/losses/total"
RL_GRAD_NORM = "rl/optim/grad_norm"
RL_LR = "rl/optim/lr"


def rl_reward(name: str) -> str:
    """Batch mean of one entry of the score function (``raw``, ``calibrated``, ``normalized``, ``gold``, ...)."""
    return f"rl/rewards/{name}"


RL_REWARD_GOLD = rl_reward("gold")

# ---- dpo: TRL's DPO, and its implicit reward calibrated like a reward model ---------------------------------

def dpo_train(name: str) -> str:
    """A curve of TRL's DPO log (``loss``, ``margin``, ``accuracy``, ``runtime_s``)."""
    return f"dpo/train/{name}"


DPO_TRAIN_LOSS = dpo_train("loss")


def dpo_key(key: str) -> str:
    """``calibration/test_nll_after`` -> ``dpo/calibration/test_nll_after``: the implicit reward's figures sit
    beside the reward model's, never on them."""
    return f"dpo/{key}"


DPO_CALIBRATION_TEMPERATURE = dpo_key(CALIBRATION_TEMPERATURE)
DPO_CALIBRATION_TEST_NLL_AFTER = dpo_key(CALIBRATION_TEST_NLL_AFTER)
DPO_CALIBRATION_TEST_ECE_AFTER = dpo_key(CALIBRATION_TEST_ECE_AFTER)

# ---- best_of_n: the reference's pool ranked by the calibrated reward (core.best_of_n) -------------------------

def best_of_n_curve(name: str) -> str:
    """A point of the curve over n (the MLflow step is n): ``kl``, ``kl_bound``, ``gold_gain``, ``proxy_gain``..."""
    return f"best_of_n/curve/{name}"


def best_of_n_fit(name: str) -> str:
    """Gao et al.'s best-of-n form fitted to the gold gain: ``alpha``, ``beta``, ``r2_held_out``, ``d_peak``..."""
    return f"best_of_n/fit/{name}"


# ---- ensemble: the calibrated aggregate against its members ------------------------------------------------

ENSEMBLE_SIZE = "ensemble/size"
ENSEMBLE_TEST_NLL_AFTER = "ensemble/test_nll_after"
ENSEMBLE_BEST_MEMBER_TEST_NLL_AFTER = "ensemble/best_member_test_nll_after"
ENSEMBLE_WORST_MEMBER_TEST_NLL_AFTER = "ensemble/worst_member_test_nll_after"
ENSEMBLE_NLL_GAIN_OVER_BEST_MEMBER = "ensemble/nll_gain_over_best_member"
ENSEMBLE_TEST_STD_MEAN = "ensemble/test_std_mean"


def member_key(key: str, member: int) -> str:
    """``rm/test_nll`` -> ``rm/member_3/test_nll``: members' metrics sit beside the ensemble's, never on them."""
    group, _, rest = key.partition("/")
    return f"{group}/member_{member}/{rest}" if rest else f"member_{member}/{group}"


# ---- namespaces --------------------------------------------------------------------------------------------

# A run with no metric under these did not train anything (a reporting run, an aborted one).
TRAINING_PREFIXES: tuple[str, ...] = ("rm/", "calibration/", "normalization/", "ppo/", "rl/", "dpo/", "eval/",
                                     "best_of_n/")

"""The reward model served: the MLflow pyfunc bundle (``model``), an HTTP reward server for RL engines
(``server``, ``batcher``) and its clients (``clients``, ``verl_reward``).

Logged models pickle ``calibrated_rlhf.serving.CalibratedRewardModel`` and code imports the bundle's names from
here, so this package keeps exporting everything the former ``serving`` module did. The server's modules import
FastAPI; they load only when used.
"""

from calibrated_rlhf.serving.model import (MODEL_CONFIG, NO_LIMIT, OVERLENGTH, PAIR_COLUMNS, REQUIREMENTS,
                                           SINGLE_COLUMNS, CalibratedRewardModel, RequestError, _check_text,
                                           check_request, fit_lengths, length_limit, log_reward_model, signature)

__all__ = ["MODEL_CONFIG", "NO_LIMIT", "OVERLENGTH", "PAIR_COLUMNS", "REQUIREMENTS", "SINGLE_COLUMNS",
           "CalibratedRewardModel", "RequestError", "_check_text", "check_request", "fit_lengths", "length_limit",
           "log_reward_model", "signature"]

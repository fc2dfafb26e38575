"""RLOO, GRPO and DPO from TRL on the project's reward transform: the KL controller as a callback, the reward
callable over the library's scorer, the trainers' construction and their checkpoints (plain library: no Kedro, no
MLflow)."""

"""RLOO, GRPO and DPO from TRL on the project's reward transform: the KL controller as a callback, the reward
callable over the library's scorer, and the trainers' construction (plain library: no Kedro, no MLflow)."""

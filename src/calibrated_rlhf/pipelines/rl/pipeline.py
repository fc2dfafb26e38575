"""Wiring of ``rl``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.rl import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.train_rl,
                 ["reference_policy", "tokenizer", "reward_model", "reward_transform", "reference_responses",
                  "train_pairs", "synthetic_task", "params:rl", "params:normalization"],
                 ["rl_policy", "rl_history", "rl_kl_control_diagram", "rl_summary", "rl_tags"], name="train_rl"),
            Node(nodes.evaluate_rl_policy,
                 ["rl_policy", "reference_policy", "tokenizer", "test_pairs", "synthetic_task", "params:rl"],
                 "rl_evaluation", name="evaluate_rl_policy"),
        ]
    )

"""Wiring of ``ppo``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.ppo import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.train_ppo,
                 ["reference_policy", "tokenizer", "reward_model", "reward_transform", "reference_responses",
                  "train_pairs", "synthetic_task", "params:ppo", "params:normalization", "params:backbone"],
                 ["policy", "ppo_history", "ppo_samples", "kl_control_diagram", "ppo_summary", "ppo_tags"],
                 name="train_ppo"),
            Node(nodes.evaluate_policy,
                 ["policy", "reference_policy", "tokenizer", "test_pairs", "synthetic_task", "params:ppo"],
                 "ppo_evaluation", name="evaluate_policy"),
        ]
    )

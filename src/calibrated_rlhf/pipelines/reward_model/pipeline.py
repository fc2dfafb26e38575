"""Wiring of ``reward_model``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.reward_model import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.train_reward_model,
                 ["tokenizer", "train_pairs", "validation_pairs", "params:backbone", "params:reward_model.training"],
                 ["reward_model", "rm_training_history"], name="train_reward_model"),
            Node(nodes.score_pairs, ["reward_model", "tokenizer", "test_pairs"], "test_scores",
                 name="score_test_pairs"),
            Node(nodes.evaluate_reward_model, "test_scores", "rm_test_metrics", name="evaluate_reward_model"),
        ]
    )

"""Wiring of ``reward_model``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.pair_scores import score_pairs
from calibrated_rlhf.pipelines.reward_model import nodes


def create_pipeline(member: int | None = None, **kwargs) -> Pipeline:
    """One reward model; ``member`` = i builds member i of an ensemble (namespaced by the caller)."""
    if member is None:
        train = Node(nodes.train_reward_model,
                     ["tokenizer", "train_pairs", "validation_pairs", "params:backbone", "params:reward_model.training",
                      "params:reward_model.size"],
                     ["reward_model", "rm_training_history"], name="train_reward_model")
    else:
        train = Node(nodes.member_trainer(member),
                     ["tokenizer", "train_pairs", "validation_pairs", "params:backbone", "params:reward_model.training",
                      "params:reward_model.ensemble", "params:reward_model.size"],
                     ["reward_model", "rm_training_history"], name="train_reward_model")
    return Pipeline(
        [
            train,
            Node(score_pairs, ["reward_model", "tokenizer", "test_pairs"], "test_scores",
                 name="score_test_pairs"),
            Node(nodes.evaluate_reward_model, "test_scores", "rm_test_metrics", name="evaluate_reward_model"),
        ]
    )

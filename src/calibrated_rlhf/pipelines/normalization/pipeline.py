"""Wiring of ``normalization``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.normalization import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.reference_set, ["calibration_pairs", "reference_policy", "tokenizer", "params:normalization"],
                 "reference_responses", name="reference_responses"),
            Node(nodes.compute_reward_transform,
                 ["reward_model", "tokenizer", "reference_responses", "temperature_fit", "params:normalization"],
                 ["reward_transform", "normalization_metrics", "reward_distributions_histograms"],
                 name="compute_reward_transform"),
            Node(nodes.publish_reward_model,
                 ["reward_model", "tokenizer", "reward_transform", "test_pairs", "params:serving"],
                 "published_reward_model", name="publish_reward_model"),
        ]
    )

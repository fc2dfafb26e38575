"""Wiring of ``policy_init``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.policy_init import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.init_policy, ["tokenizer", "train_pairs", "params:backbone", "params:policy_init"],
                 ["reference_policy", "policy_init_history"], name="init_policy"),
        ]
    )

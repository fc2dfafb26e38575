"""Wiring of ``best_of_n``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.best_of_n import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.best_of_n_curve,
                 ["reference_policy", "tokenizer", "reward_model", "reward_transform", "test_pairs", "synthetic_task",
                  "params:best_of_n"],
                 ["best_of_n_points", "best_of_n_rankings"], name="best_of_n_curve"),
            Node(nodes.report_best_of_n, "best_of_n_points",
                 ["best_of_n_history", "best_of_n_fit", "best_of_n_diagram"], name="report_best_of_n"),
        ]
    )

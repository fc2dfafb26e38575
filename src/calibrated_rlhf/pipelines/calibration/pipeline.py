"""Wiring of ``calibration``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.calibration import nodes
from calibrated_rlhf.pipelines.pair_scores import score_pairs


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(score_pairs, ["reward_model", "tokenizer", "calibration_pairs"], "calibration_scores",
                 name="score_calibration_pairs"),
            Node(nodes.fit_calibration, ["calibration_scores", "params:calibration"], "temperature_fit",
                 name="fit_temperature"),
            Node(nodes.report_calibration,
                 ["test_scores", "test_pairs", "temperature_fit", "synthetic_task", "params:calibration"],
                 ["calibration_metrics", "reliability_diagram", "margin_histograms"], name="report_calibration"),
        ]
    )

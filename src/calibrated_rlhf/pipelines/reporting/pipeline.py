"""Wiring of ``reporting``: parameters only, so ``kedro run --pipelines reporting`` works alone."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.reporting import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.compare_runs, "params:reporting",
                 ["comparison_report_md", "comparison_report_html", "comparison_table", "comparison_curves"],
                 name="compare_runs"),
        ]
    )

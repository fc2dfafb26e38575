"""Wiring of ``data_prep``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.data_prep import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(nodes.load_raw_pairs, "params:data_prep.source", ["raw_pairs", "synthetic_task"],
                 name="load_raw_pairs"),
            Node(nodes.validate_pairs, ["raw_pairs", "params:data_prep.margin", "params:data_prep.validation"],
                 ["valid_pairs", "dropped_invalid"], name="validate_pairs"),
            Node(nodes.split_pairs, ["valid_pairs", "params:data_prep.split"],
                 ["train_pairs_unchecked", "validation_pairs_unchecked", "calibration_pairs_unchecked",
                  "test_pairs_unchecked"], name="split_pairs"),
            Node(nodes.build_tokenizer, ["train_pairs_unchecked", "params:backbone"], "tokenizer",
                 name="build_tokenizer"),
            Node(nodes.check_lengths,
                 ["train_pairs_unchecked", "validation_pairs_unchecked", "calibration_pairs_unchecked",
                  "test_pairs_unchecked", "tokenizer", "params:data_prep.validation"],
                 ["train_pairs", "validation_pairs", "calibration_pairs", "test_pairs", "dropped_length"],
                 name="check_lengths"),
            Node(nodes.report_data,
                 ["train_pairs", "validation_pairs", "calibration_pairs", "test_pairs", "dropped_invalid",
                  "dropped_length"], ["data_metrics", "data_tags"], name="report_data"),
        ]
    )

"""Wiring of ``data_prep``."""

from kedro.pipeline import Node, Pipeline

from calibrated_rlhf.pipelines.data_prep import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            # Loading validates: bad rows fail the run (or are dropped) before anything is saved. A file or hub
            # source arrives read by the catalog's preference_file (None for the synthetic task), its gold (if
            # any) by gold_task.
            Node(nodes.load_pairs,
                 ["preference_file", "gold_task", "params:data_prep.source", "params:data_prep.margin",
                  "params:data_prep.validation", "params:data_prep.completions"],
                 ["raw_pairs", "dropped_invalid", "synthetic_task"], name="load_pairs"),
            Node(nodes.split_pairs, ["raw_pairs", "params:data_prep.split"],
                 ["train_pairs_unchecked", "validation_pairs_unchecked", "calibration_pairs_unchecked",
                  "test_pairs_unchecked"], name="split_pairs"),
            Node(nodes.build_tokenizer, ["train_pairs_unchecked", "params:backbone", "params:data_prep.validation"],
                 "tokenizer", name="build_tokenizer"),
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

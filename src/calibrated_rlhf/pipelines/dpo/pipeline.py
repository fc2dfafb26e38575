"""Wiring of ``dpo``: training, the protocol's evaluation, and the calibration pipeline's temperature fit and
report in the namespace ``dpo`` on the implicit reward's scores (``dpo.calibration_scores``, ...)."""

import warnings

from kedro.pipeline import Node, Pipeline, pipeline

from calibrated_rlhf.pipelines import calibration
from calibrated_rlhf.pipelines.dpo import nodes

NAMESPACE = "dpo"


def create_pipeline(**kwargs) -> Pipeline:
    with warnings.catch_warnings():
        # the scoring nodes write the namespace's inputs by their dotted names on purpose
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        return _create_pipeline()


def _create_pipeline() -> Pipeline:
    train = Pipeline([
        Node(nodes.train_dpo, ["reference_policy", "tokenizer", "train_pairs", "params:dpo"],
             ["dpo_policy", "dpo_history", "dpo_tags"], name="train_dpo"),
        Node(nodes.evaluate_dpo_policy,
             ["dpo_policy", "reference_policy", "tokenizer", "test_pairs", "synthetic_task", "params:dpo"],
             "dpo_evaluation", name="evaluate_dpo_policy"),
        *[Node(nodes.score_dpo_pairs, ["dpo_policy", "reference_policy", "tokenizer", f"{split}_pairs", "params:dpo"],
               f"{NAMESPACE}.{split}_scores", name=f"score_dpo_{split}_pairs") for split in ("calibration", "test")],
    ])
    calibrate = pipeline(calibration.create_pipeline().only_nodes("fit_temperature", "report_calibration"),
                         namespace=NAMESPACE, inputs={"test_pairs", "synthetic_task"},
                         parameters={"params:calibration"})
    name = Pipeline([Node(nodes.name_dpo_metrics, f"{NAMESPACE}.calibration_metrics", "dpo_calibration_metrics",
                          name="name_dpo_metrics")])
    return train + calibrate + name

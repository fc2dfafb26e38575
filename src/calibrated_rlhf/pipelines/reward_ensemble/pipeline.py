"""Wiring of ``reward_ensemble``: members ``member_0`` .. ``member_{K-1}``, each the ``reward_model`` and
``calibration`` pipelines in its own namespace, then the aggregate, calibrated as one reward model is.

Only the members' models, scores, temperature fits and plots are namespaced; the data splits, the
tokenizer and every parameter are shared. The aggregate takes the names one reward model's outputs
have (``test_scores``, ``temperature_fit``, ``calibration_metrics``, ...), so everything downstream reads
an ensemble as it reads one model, through ``reward_ensemble`` in place of ``reward_model``.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from kedro.pipeline import Node, Pipeline, pipeline

from calibrated_rlhf.pipelines import calibration, reward_model
from calibrated_rlhf.pipelines.reward_ensemble import nodes

SHARED_DATA = {"tokenizer", "train_pairs", "validation_pairs", "test_pairs", "calibration_pairs", "synthetic_task"}
SHARED_PARAMS = {"params:backbone", "params:reward_model.training", "params:reward_model.ensemble",
                 "params:reward_model.size", "params:calibration"}


@contextmanager
def _member_names_read_outside() -> Iterator[None]:
    """The aggregation nodes read the members' namespaced outputs by their dotted names on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="One or more dataset names contain '.'")
        yield


def namespace(member: int) -> str:
    return f"member_{member}"


def member_pipeline(member: int, stage: str) -> Pipeline:
    """Member ``member``'s part of ``stage`` ("reward_model" or "calibration"), in its namespace."""
    if stage == "reward_model":
        base = reward_model.create_pipeline(member=member)
    elif stage == "calibration":
        base = calibration.create_pipeline() + Pipeline([
            Node(nodes.member_metrics_namer(member),
                 ["rm_training_history", "rm_test_metrics", "calibration_metrics"], "member_metrics",
                 name="name_member_metrics"),
        ])
    else:
        raise ValueError(f"stage must be 'reward_model' or 'calibration', got {stage!r}")
    free = base.inputs()
    return pipeline(base, namespace=namespace(member), inputs=SHARED_DATA & free, parameters=SHARED_PARAMS & free)


def create_pipeline(ensemble_size: int = 1, **kwargs) -> Pipeline:
    """Aggregation and calibration of the members' rewards (the members come from ``member_pipeline``).

    Registered by the pipeline registry only when ``reward_model.ensemble_size`` > 1.
    """
    if ensemble_size < 2:
        return Pipeline([])
    return _aggregate_pipeline([namespace(i) for i in range(ensemble_size)])


def assembly_pipeline(ensemble_size: int) -> Pipeline:
    """The node that loads the members' versioned models and temperatures as one ``reward_ensemble``.

    Stages after calibration include it, so ``kedro run --pipelines ppo`` works on its own for an
    ensemble as it does for one model (the DAG keeps a single copy of the node).
    """
    members = [namespace(i) for i in range(ensemble_size)]
    with _member_names_read_outside():
        return Pipeline([
            Node(nodes.assemble_reward_ensemble,
                 ["params:reward_model.ensemble", *[f"{m}.reward_model" for m in members],
                  *[f"{m}.temperature_fit" for m in members]],
                 "reward_ensemble", name="assemble_reward_ensemble"),
        ])


def _aggregate_pipeline(members: list[str]) -> Pipeline:
    with _member_names_read_outside():
        aggregate = assembly_pipeline(len(members)) + Pipeline([
            *[Node(nodes.aggregate_scores, ["reward_ensemble", *[f"{m}.{split}_scores" for m in members]],
                   f"{split}_scores", name=f"aggregate_{split}_scores") for split in ("test", "calibration")],
        ])
        report = Pipeline([
            Node(nodes.report_ensemble, ["test_scores", "temperature_fit", *[f"{m}.test_scores" for m in members],
                                         *[f"{m}.temperature_fit" for m in members]],
                 "ensemble_metrics", name="report_ensemble"),
        ])
    # One reward model's evaluation and calibration nodes, on the aggregate.
    evaluate = reward_model.create_pipeline().only_nodes("evaluate_reward_model")
    calibrate = calibration.create_pipeline().only_nodes("fit_temperature", "report_calibration")
    return aggregate + evaluate + calibrate + report

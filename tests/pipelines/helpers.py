"""Run a slice of a pipeline with SequentialRunner over an in-memory catalog."""

from __future__ import annotations

from typing import Any

from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Pipeline
from kedro.runner import SequentialRunner


class KeptMemoryDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so a test can read intermediate outputs too."""

    def _release(self) -> None:
        pass


def run(pipeline: Pipeline, inputs: dict[str, Any]) -> dict[str, Any]:
    """Every dataset in memory (models by reference); returns all outputs of the slice."""
    catalog = DataCatalog({name: KeptMemoryDataset(data, copy_mode="assign") for name, data in inputs.items()})
    for name in pipeline.all_outputs():
        catalog[name] = KeptMemoryDataset(copy_mode="assign")
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}


def data_prep_params(source: Any, split: Any = None, **validation: Any) -> dict[str, Any]:
    """Every input the ``data_prep`` pipeline reads: defaults, tiny backbone, the given source, and the
    catalog's ``preference_file`` and ``gold_task`` as they load for that source."""
    from calibrated_rlhf.core.backbone import BackboneParams
    from calibrated_rlhf.core.completions import CompletionParams
    from calibrated_rlhf.core.preferences import MarginParams, SplitParams, ValidationParams
    from calibrated_rlhf.datasets import GoldTaskDataset, PreferenceFileDataset
    from tests.conftest import TINY_BACKBONE

    return {
        "preference_file": PreferenceFileDataset(filepath=source.path, kind=source.kind, split=source.split).load(),
        "gold_task": GoldTaskDataset(filepath=source.gold_task).load(),
        "params:data_prep.source": source,
        "params:data_prep.margin": MarginParams(),
        "params:data_prep.validation": ValidationParams(**validation),
        "params:data_prep.split": split if split is not None else SplitParams(),
        "params:data_prep.completions": CompletionParams(),
        "params:backbone": BackboneParams(**TINY_BACKBONE),
    }

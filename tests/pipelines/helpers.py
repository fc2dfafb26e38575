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

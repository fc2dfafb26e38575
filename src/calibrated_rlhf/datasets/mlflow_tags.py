"""Save a flat dict of strings as tags of the active MLflow run (searchable, unlike artifacts)."""

from __future__ import annotations

from typing import Any

from kedro.io import AbstractDataset, DatasetError


class MlflowTagsDataset(AbstractDataset[dict[str, str], dict[str, str]]):
    """Write-only: ``save({"data/content_hash": "..."})`` sets the tags on the active run, if any."""

    def __init__(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = metadata

    def _save(self, data: dict[str, str]) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tags({k: str(v) for k, v in data.items()})

    def _load(self) -> dict[str, str]:
        raise DatasetError("MlflowTagsDataset is write-only: read tags with MlflowClient().get_run(...)")

    def _describe(self) -> dict[str, Any]:
        return {}

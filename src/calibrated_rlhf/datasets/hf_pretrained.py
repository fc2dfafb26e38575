"""A versioned Kedro dataset for anything with ``save_pretrained`` / ``from_pretrained``.

kedro-datasets has no dataset for transformers models or tokenizers, so this one stores a folder per
version (``filepath/<version>/<name>/``). A save goes to a temporary sibling first and is renamed into
place only when complete: an interrupted run never leaves a half-written model, and an existing
version is never overwritten. (Whether the run that saved a version completed is recorded apart, by
``calibrated_rlhf.runtime.run_integrity``.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractVersionedDataset, DatasetError, Version, get_filepath_str, get_protocol_and_path

from calibrated_rlhf.core.staging import make_staging_dir

LOADERS = {
    "sequence_classification": ("transformers", "AutoModelForSequenceClassification"),
    "causal_lm": ("transformers", "AutoModelForCausalLM"),
    "tokenizer": ("transformers", "AutoTokenizer"),
}


class HFPretrainedDataset(AbstractVersionedDataset[Any, Any]):
    """Save and load a transformers model or tokenizer as a (versioned) local folder.

    Example catalog entry::

        reward_model:
          type: calibrated_rlhf.datasets.HFPretrainedDataset
          filepath: data/06_models/reward_model
          kind: sequence_classification
          versioned: true
          metadata:
            mlflow_artifact_path: reward_model   # the project's hook logs the folder to MLflow
    """

    def __init__(
        self,
        *,
        filepath: str,
        kind: str,
        version: Version | None = None,
        load_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if kind not in LOADERS:
            raise DatasetError(f"HFPretrainedDataset: kind must be one of {sorted(LOADERS)}, got '{kind}'")
        protocol, path = get_protocol_and_path(filepath, version)
        if protocol != "file":
            raise DatasetError(f"HFPretrainedDataset stores local folders only, got '{filepath}'")
        super().__init__(filepath=PurePosixPath(path), version=version, exists_function=os.path.exists,
                         glob_function=self._glob)
        self._kind = kind
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    @staticmethod
    def _glob(pattern: str) -> list[str]:
        import glob

        return glob.glob(pattern)

    def _load(self) -> Any:
        import importlib

        module, name = LOADERS[self._kind]
        cls = getattr(importlib.import_module(module), name)
        return cls.from_pretrained(get_filepath_str(self._get_load_path(), "file"), **self._load_args)

    def _save(self, data: Any) -> None:
        target = Path(get_filepath_str(self._get_save_path(), "file"))
        # The staging folder names its process, so the debris of a killed save is removed by the next run.
        staging = make_staging_dir(target.parent, target.name)
        try:
            data.save_pretrained(staging)
            os.replace(staging, target)  # atomic on one filesystem; target must not exist (checked above)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), "file")
        except DatasetError:
            return False
        return os.path.isdir(path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "kind": self._kind, "version": self._version}

"""Kedro datasets of the project's own (kedro-datasets has none for transformers folders)."""

from calibrated_rlhf.datasets.hf_pretrained import HFPretrainedDataset
from calibrated_rlhf.datasets.mlflow_tags import MlflowTagsDataset

__all__ = ["HFPretrainedDataset", "MlflowTagsDataset"]

"""Kedro datasets of the project's own (kedro-datasets has none for transformers folders, nor one that reads
preference rows or a gold task naming the file, line and field of a malformed one)."""

from calibrated_rlhf.datasets.gold_task import GoldTaskDataset
from calibrated_rlhf.datasets.hf_pretrained import HFPretrainedDataset
from calibrated_rlhf.datasets.mlflow_tags import MlflowTagsDataset
from calibrated_rlhf.datasets.preference_file import PreferenceFileDataset

__all__ = ["GoldTaskDataset", "HFPretrainedDataset", "MlflowTagsDataset", "PreferenceFileDataset"]

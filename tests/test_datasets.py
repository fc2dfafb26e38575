import os

import pytest
import torch
from kedro.io.core import DatasetError, Version

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone
from calibrated_rlhf.datasets import HFPretrainedDataset
from tests.conftest import TINY_BACKBONE


def test_model_round_trips_through_versioned_folders(tmp_path, tiny_tokenizer):
    model = build_reward_backbone(BackboneParams(**TINY_BACKBONE), tiny_tokenizer)
    ds = HFPretrainedDataset(filepath=str(tmp_path / "rm"), kind="sequence_classification", version=Version(None, None))
    ds.save(model)
    loaded = HFPretrainedDataset(filepath=str(tmp_path / "rm"), kind="sequence_classification",
                                 version=Version(None, None)).load()
    ids = torch.tensor([tiny_tokenizer("Describe the food in Paris.")["input_ids"]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    # a second save is a new version; the first is untouched
    first = sorted(os.listdir(tmp_path / "rm"))
    HFPretrainedDataset(filepath=str(tmp_path / "rm"), kind="sequence_classification",
                        version=Version(None, None)).save(model)
    assert len(os.listdir(tmp_path / "rm")) == 2 and set(first) <= set(os.listdir(tmp_path / "rm"))


def test_an_existing_version_is_never_overwritten(tmp_path, tiny_tokenizer):
    ds = HFPretrainedDataset(filepath=str(tmp_path / "tok"), kind="tokenizer", version=Version(None, "v1"))
    ds.save(tiny_tokenizer)
    with pytest.raises(DatasetError, match="must not exist"):
        HFPretrainedDataset(filepath=str(tmp_path / "tok"), kind="tokenizer", version=Version(None, "v1")).save(
            tiny_tokenizer)


def test_a_failed_save_leaves_nothing_behind(tmp_path):
    class Broken:
        def save_pretrained(self, path):
            (path / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")

    ds = HFPretrainedDataset(filepath=str(tmp_path / "m"), kind="causal_lm", version=Version(None, "v1"))
    with pytest.raises(DatasetError, match="disk full"):
        ds.save(Broken())
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert leftovers == []
    assert not ds.exists()


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(DatasetError, match="kind must be one of"):
        HFPretrainedDataset(filepath=str(tmp_path / "x"), kind="vision")

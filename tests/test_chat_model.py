"""The chat-model folder ``conf/chat`` runs from (``python -m calibrated_rlhf.runtime.chat_model``), and the error a
missing model folder gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from calibrated_rlhf.runtime.chat_model import main
from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone, check_model_source, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_the_folder_is_a_qwen2_chatml_checkpoint_without_a_pad_token(chat_checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(chat_checkpoint)
    assert config.model_type == "qwen2" and config.pad_token_id is None
    tokenizer = AutoTokenizer.from_pretrained(chat_checkpoint)
    assert tokenizer.pad_token is None and tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_an_existing_folder_is_never_overwritten(chat_checkpoint, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in chat_checkpoint.iterdir()}
    assert main([str(chat_checkpoint)]) == 0
    assert "left as it is" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in chat_checkpoint.iterdir()} == before
    partial = tmp_path / "partial"  # a folder that holds something else: an error, and its content stays
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="partial"):
        main([str(partial), "--hidden-size", "16"])
    assert [p.name for p in partial.iterdir()] == ["notes.txt"]


def test_a_missing_model_folder_is_named_with_the_command_that_writes_one(tmp_path):
    missing = str(tmp_path / "models" / "qwen2-chat")
    for load in (lambda: load_tokenizer(missing),
                 lambda: build_causal_backbone(BackboneParams(name_or_path=missing), tokenizer=None)):
        with pytest.raises(ValueError, match=re.escape(f"no model folder at {missing!r}")) as err:
            load()
        assert f"python -m calibrated_rlhf.runtime.chat_model {missing}" in str(err.value)
    assert check_model_source("Qwen/Qwen2-0.5B") == "Qwen/Qwen2-0.5B"  # a hub id goes on to transformers
    assert check_model_source(str(tmp_path)) == str(tmp_path)


def test_the_chat_environment_reads_the_folder_the_docs_write():
    folder = yaml.safe_load((ROOT / "conf" / "chat" / "parameters.yml").read_text())["backbone"]["name_or_path"]
    assert f"python -m calibrated_rlhf.runtime.chat_model {folder} && kedro run --env chat" in (ROOT / "docs" / "data-and-models.md").read_text()

"""The tests' chat-model folder: ``calibrated_rlhf.runtime.chat_model`` at a tiny size (Qwen2, hidden 32, one
layer, a ChatML tokenizer without a pad token), written with ``save_pretrained`` like a downloaded model."""

from __future__ import annotations

from pathlib import Path

from calibrated_rlhf.runtime.chat_model import ChatModelSpec, save_chat_model

TINY = ChatModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=128)


def save_chat_checkpoint(folder: Path, seed: int = 0) -> Path:
    return save_chat_model(folder, TINY.model_copy(update={"seed": seed}))

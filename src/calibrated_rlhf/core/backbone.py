"""Backbones: a tiny transformer built from a config with a tokenizer trained locally, or any
pretrained model given by hub id or local folder.

The tiny default exists so the whole pipeline runs offline on a laptop; real users set
``name_or_path`` and everything downstream is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# A minimal chat template so conversational data works with the locally trained tokenizer: <bos>, then each
# message as "<role> content" closed by <eos>, which is the template's end of turn (the policy stops there).
# The generation prompt ends on the role marker, a whole word, so the prompt's ids are a prefix of the
# ids of prompt + reply (no token merges across the boundary) and the reply's first word keeps its space.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<' + message['role'] + '> ' + message['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)


def chat_corpus_text(message: dict) -> str:
    """A message as :data:`CHAT_TEMPLATE` writes it (without its special tokens): the text a tokenizer
    trained for that template learns from, so the role markers become tokens of their own."""
    return f"<{message['role']}> {message['content']}"


class BackboneParams(BaseModel):
    """Where the backbone comes from, and the shape of the tiny default."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    name_or_path: str | None = Field(
        None, description="Hub id or local folder of a pretrained model; null builds the tiny model from config."
    )
    vocab_size: int = Field(512, ge=64, description="BPE vocabulary size of the locally trained tokenizer.")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(256, ge=16)
    seed: int = Field(0, description="Seed of the random initialisation.")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level-free BPE tokenizer (Metaspace pre-tokenizer) on ``texts``.

    A <bos> is prepended by the post-processor so the first real token is never position 0's
    only context; <eos> is appended by the callers that need it (TRL does for reward pairs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """Load a pretrained tokenizer; give it a pad token if it has none (reward batches need padding)."""
    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(params: BackboneParams, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_hidden_layers,
        num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_attention_heads,
        max_position_embeddings=params.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_reward_backbone(params: BackboneParams, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A sequence-classification model with one output: the scalar reward."""
    if params.name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(
            params.name_or_path, num_labels=1, dtype=torch.float32
        )
    else:
        torch.manual_seed(params.seed)
        cfg = tiny_config(params, tokenizer)
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def build_causal_backbone(params: BackboneParams, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A causal LM: the policy that writes responses."""
    if params.name_or_path:
        return AutoModelForCausalLM.from_pretrained(params.name_or_path, dtype=torch.float32)
    torch.manual_seed(params.seed)
    return AutoModelForCausalLM.from_config(tiny_config(params, tokenizer), dtype=torch.float32)

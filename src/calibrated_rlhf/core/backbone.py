"""Backbones: a tiny transformer built from a config with a tokenizer trained locally, or any
pretrained model given by hub id or local folder.

The tiny default exists so the whole pipeline runs offline on a laptop; real users set
``name_or_path`` and everything downstream is unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Literal

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
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

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


def check_model_source(name_or_path: str) -> str:
    """``name_or_path`` unchanged, or an error when it names a local folder that does not exist.

    A hub id is ``owner/name`` (or a bare name); anything else (absolute, ``./``, ``~`` or more than one
    ``/``) can only be a folder. Without this check transformers would ask the hub for it and, offline,
    fail with a message about the network instead of the missing folder.
    """
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return name_or_path
    windows_path = os.sep != "/" and os.sep in name_or_path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or windows_path:
        raise ValueError(f"no model folder at {name_or_path!r} (from {os.getcwd()}); a small chat model for trying "
                         f"the pipeline is written by `python -m calibrated_rlhf.runtime.chat_model {name_or_path}`")
    return name_or_path


class BackboneParams(BaseModel):
    """Where the backbone comes from, and the shape of the tiny default."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the run instead of being ignored

    name_or_path: str | None = Field(
        None, description="Hub id or local folder of a pretrained model; null builds the tiny model from config."
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file (llama.cpp's format) inside the name_or_path folder to read the model and "
        "tokenizer from, dequantized to dense weights; needs the `gguf` extra. null: the folder's own files.")
    vocab_size: int = Field(512, ge=64, description="BPE vocabulary size of the locally trained tokenizer.")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(256, ge=16)
    seed: int = Field(0, description="Seed of the random initialisation.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights' dtype of every model built or loaded for training (reward model, SFT, "
        "PPO's policy and value model); half precision is for GPUs.")
    attn_implementation: str | None = Field(
        None, description="transformers' attention kernel (eager, sdpa, flash_attention_2, ...); null: its default.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (reward model, SFT, PPO): less memory, "
        "about a third more compute.")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def load_kwargs(self) -> dict:
        """What ``from_pretrained`` / ``from_config`` take for the dtype and the attention kernel."""
        kw: dict = {"dtype": self.torch_dtype}
        if self.attn_implementation is not None:
            kw["attn_implementation"] = self.attn_implementation
        return kw


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


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerFast:
    """Load a pretrained tokenizer (from the folder, or from its GGUF file); give it a pad token if it has
    none (reward batches need padding)."""
    if gguf_file:
        from calibrated_rlhf.core.gguf import gguf_path, require_gguf

        require_gguf()
        gguf_path(check_model_source(name_or_path), gguf_file)
        tok = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    else:
        tok = AutoTokenizer.from_pretrained(check_model_source(name_or_path))
    ensure_pad_token(tok)
    return tok


def ensure_pad_token(tokenizer) -> None:
    """Pad with EOS where the tokenizer has no pad token, as causal-LM checkpoints often have none.

    Padding is always masked out (attention masks; the reward is read at the last non-pad token, which
    ``config.pad_token_id`` locates), so sharing EOS's id is harmless. The saved tokenizer keeps it.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS "
                             "token; add one to its folder (special_tokens_map.json)")
        tokenizer.pad_token = tokenizer.eos_token


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
    """A sequence-classification model with one output: the scalar reward.

    From a causal-LM checkpoint transformers keeps the trunk and adds a freshly initialised ``score``
    head, drawn under ``params.seed``; ``config.pad_token_id`` is set so the reward is read at each sequence's
    last real token.
    """
    ensure_pad_token(tokenizer)
    # A checkpoint's new score head is drawn from torch's global generator, as a tiny model's every weight is.
    # Unseeded, it followed whatever the process had drawn before: backbone.seed did nothing, and two runs of
    # the real model's environment trained from different heads and ended at different weights.
    torch.manual_seed(params.seed)
    if params.name_or_path:
        model = reward_model_from_causal_lm(check_model_source(params.name_or_path), params)
    else:
        cfg = tiny_config(params, tokenizer)
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg, **params.load_kwargs())
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def reward_model_from_causal_lm(name_or_path: str, params: BackboneParams) -> PreTrainedModel:
    """The checkpoint's trunk with a fresh ``score`` head, its LM head left behind.

    transformers reports exactly that (a new ``score``, an unused ``lm_head``) as a warning table on every
    such load; the expected part is said in one log line and only a surprise is warned about.
    """
    loader = hf_logging.get_logger("transformers.modeling_utils")
    level = loader.level
    loader.setLevel(hf_logging.ERROR)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, output_loading_info=True, **params.load_kwargs(), **_gguf_kwargs(params))
    finally:
        loader.setLevel(level)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("lm_head.")]
    if missing or unexpected:
        log.warning("reward model from %s: weights newly initialised %s, checkpoint weights unused %s",
                    name_or_path, missing, unexpected)
    log.info("reward model from %s: its trunk, a new score head", name_or_path)
    return model


def build_causal_backbone(params: BackboneParams, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A causal LM: the policy that writes responses."""
    if params.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(check_model_source(params.name_or_path), **params.load_kwargs(),
                                                     **_gguf_kwargs(params))
    else:
        torch.manual_seed(params.seed)
        model = AutoModelForCausalLM.from_config(tiny_config(params, tokenizer), **params.load_kwargs())
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _gguf_kwargs(params: BackboneParams) -> dict:
    """Read ``params.gguf_file`` dequantized: a plain model the stages can train and save."""
    if not params.gguf_file:
        return {}
    from calibrated_rlhf.core.gguf import dense_load_kwargs

    return dense_load_kwargs(params.name_or_path, params.gguf_file)


def prepare_for_training(model: PreTrainedModel, params: BackboneParams) -> PreTrainedModel:
    """A model loaded elsewhere (a stage's input) in the configured dtype, attention kernel and
    gradient checkpointing; the trainers of TRL do the checkpointing part themselves."""
    model = model.to(params.torch_dtype)
    if params.attn_implementation is not None:
        model.set_attn_implementation(params.attn_implementation)
    if params.gradient_checkpointing:
        # non-reentrant: gradients reach the adapters even where the frozen embeddings need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model

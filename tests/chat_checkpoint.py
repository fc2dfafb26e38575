"""A small checkpoint of a real architecture, saved the way a downloaded model is stored.

Qwen2 (hidden 32, one layer), a BPE tokenizer trained on the synthetic task's text with ChatML's
special tokens and chat template, and, as in many causal-LM checkpoints, no pad token. Both are
written with ``save_pretrained``: the pipeline reads the folder through ``from_pretrained``, the code
path of a hub download.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def synthetic_corpus() -> list[str]:
    """Every prompt and response word the synthetic task can produce (all word lists, all templates)."""
    from calibrated_rlhf.core.synthetic import SyntheticSpec, make_pairs, make_task

    spec = SyntheticSpec(n_pairs=480, n_words=40)
    pairs = make_pairs(spec, make_task(spec))
    return list(pairs["prompt"]) + list(pairs["chosen"]) + list(pairs["rejected"])


def chat_tokenizer(corpus: list[str], vocab_size: int = 800):
    """Byte-level BPE (Qwen2's scheme) with ChatML's tokens and no pad token: EOS is the end of turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"], model_max_length=128)
    fast.chat_template = CHATML
    return fast


def save_chat_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write the tokenizer and a randomly initialised Qwen2 causal LM into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tokenizer = chat_tokenizer(synthetic_corpus())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Qwen2's tokenizer class pads with <|endoftext|> unless the folder says otherwise; say it has no pad
    # token, as Llama 3 or Mistral checkpoints do
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "pad_token": None}, indent=2))
    return folder

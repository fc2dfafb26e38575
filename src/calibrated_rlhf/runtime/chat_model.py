"""A small chat-model folder of a real architecture, saved the way a downloaded model is stored.

``python -m calibrated_rlhf.runtime.chat_model FOLDER`` writes a randomly initialised Qwen2 causal LM and a
byte-level BPE tokenizer (Qwen2's scheme) trained on the synthetic task's words, with ChatML's special
tokens and chat template and, like Llama 3 or Mistral checkpoints, no pad token. Both are written with
``save_pretrained``, so the pipeline reads the folder through ``from_pretrained``: the code path of a hub
download. ``conf/chat`` runs the whole DAG from such a folder; the tests build a smaller one.

The folder is written to a staging sibling and renamed into place, so a killed build leaves nothing a
run would load; an existing folder is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ChatModelSpec(BaseModel):
    """Shape of the Qwen2 model; the defaults are the default backbone's sizes (``conf/base``)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(800, ge=300, description="BPE vocabulary: the 256 bytes, 3 special tokens, merges.")
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1, description="Grouped-query attention, as Qwen2 checkpoints use.")
    max_position_embeddings: int = Field(256, ge=16)
    seed: int = Field(0, description="Seed of the random initialisation.")


def synthetic_corpus() -> list[str]:
    """Every prompt and response word the synthetic task can produce (all word lists, all templates)."""
    from calibrated_rlhf.core.synthetic import WORDS, SyntheticSpec, make_pairs, make_task

    spec = SyntheticSpec(n_pairs=480, n_words=len(WORDS))
    pairs = make_pairs(spec, make_task(spec))
    return list(pairs["prompt"]) + list(pairs["chosen"]) + list(pairs["rejected"])


def chat_tokenizer(corpus: list[str], vocab_size: int):
    """Byte-level BPE with ChatML's tokens and no pad token: ``<|im_end|>`` is EOS and the end of turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"], model_max_length=256)
    fast.chat_template = CHATML
    return fast


def save_chat_model(folder: str | os.PathLike[str], spec: ChatModelSpec | None = None) -> Path:
    """Write the tokenizer and a randomly initialised Qwen2 causal LM into ``folder`` (which must not exist)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from calibrated_rlhf.core.staging import make_staging_dir

    spec = spec or ChatModelSpec()
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} exists; the chat model is written to a new folder only")
    tokenizer = chat_tokenizer(synthetic_corpus(), spec.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    staging = make_staging_dir(folder.parent, folder.name)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # Qwen2's tokenizer class pads with <|endoftext|> unless the folder says otherwise; say it has no pad
    # token, as Llama 3 or Mistral checkpoints do
    config_file = staging / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "pad_token": None}, indent=2))
    os.replace(staging, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibrated_rlhf.runtime.chat_model",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="where to write the model; an existing folder is left as it is")
    for name, field in ChatModelSpec.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=field.default, help=field.description)
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if (folder / "config.json").exists():
        print(f"{folder} already holds a model; left as it is")
        return 0
    spec = ChatModelSpec(**{name: getattr(args, name) for name in ChatModelSpec.model_fields})
    print(f"wrote {save_chat_model(folder, spec)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

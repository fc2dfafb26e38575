"""Tiny models, tokenizer and score function shared by the PPO tests (no tests in here)."""

from __future__ import annotations

import torch

WORDS = [f"w{i}" for i in range(24)]
PROMPTS = [f"say {a} {b}" for a in ("red", "blue", "green", "gray") for b in ("cat", "dog", "fox", "owl")]
# hidden utility per word: the first quarter are good, the rest mildly bad
UTILITY = {w: (1.0 if i < 6 else -0.3) for i, w in enumerate(WORDS)}


def build_tokenizer():
    """Word-level tokenizer over a fixed vocabulary with <pad>/<bos>/<eos>/<unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab_words = specials + ["say", "red", "blue", "green", "gray", "cat", "dog", "fox", "owl"] + WORDS
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    return fast


def tiny_llama_config(tok, hidden: int = 32, layers: int = 1):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=len(tok),
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )


def tiny_models(tok, seed: int = 0, hidden: int = 32, layers: int = 1, value: bool = True):
    """(policy, value_model or None), deterministic given the seed."""
    import copy

    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

    cfg = tiny_llama_config(tok, hidden, layers)
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg)
    vm = None
    if value:
        vcfg = copy.deepcopy(cfg)
        vcfg.num_labels = 1
        torch.manual_seed(seed + 1)
        vm = AutoModelForSequenceClassification.from_config(vcfg)
    return policy, vm


def gold_reward(response: str) -> float:
    words = response.split()
    if not words:
        return 0.0
    return sum(UTILITY.get(w, -1.0) for w in words) / len(words)


def score_fn(prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
    """normalized = gold = mean word utility; 'raw' is a rescaled copy to check extra keys are logged."""
    gold = torch.tensor([gold_reward(r) for r in responses], dtype=torch.float32)
    return {"normalized": gold, "gold": gold, "raw": 3.0 * gold + 1.0}

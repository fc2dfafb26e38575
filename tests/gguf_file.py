"""A tiny Llama written as a GGUF file, the way llama.cpp's converter lays one out.

Byte-level BPE tokenizer with ChatML's tokens (the one ``calibrated_rlhf.runtime.chat_model`` trains), random
weights, the 2-D weights stored Q8_0-quantized (so reading it exercises dequantization) and the norms
in float32. The tests convert it through ``python -m calibrated_rlhf.runtime.gguf_model`` and train on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calibrated_rlhf.runtime.chat_model import CHATML, chat_tokenizer, synthetic_corpus


def write_tiny_gguf(path: Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, vocab_size: int = 400, seed: int = 0) -> Path:
    import gguf

    tokenizer = chat_tokenizer(synthetic_corpus(), vocab_size)
    n_vocab = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n_vocab)))
    merges = [m if isinstance(m, str) else " ".join(m)
              for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    w.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    w.add_chat_template(CHATML)

    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], quantize: bool = True) -> None:
        data = (rng.standard_normal(shape) * (0.02 if quantize else 0.1) + (0 if quantize else 1)).astype(np.float32)
        if quantize:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)

    head_dim = hidden // heads
    add("token_embd.weight", (n_vocab, hidden))
    add("output_norm.weight", (hidden,), quantize=False)
    add("output.weight", (n_vocab, hidden))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), quantize=False)
        add(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        add(f"blk.{i}.ffn_norm.weight", (hidden,), quantize=False)
        add(f"blk.{i}.ffn_gate.weight", (intermediate, hidden))
        add(f"blk.{i}.ffn_up.weight", (intermediate, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, intermediate))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""What one reward-model training step costs on the real model, by what trains: full fine-tuning, LoRA on every
linear layer, LoRA on the top layers only, against a forward pass without gradients (docs/real_model.md).

    python bench/real_model_steps.py [MODEL_FOLDER] [--threads 1] [--top 4] [--batch 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from calibrated_rlhf.core.backbone import BackboneParams, build_reward_backbone, load_tokenizer
from calibrated_rlhf.core.lora import LoraParams, add_adapters

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="data/01_raw/smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=4, help="layers adapted by the top-layers variant")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    ids = torch.randint(100, len(tokenizer) - 1, (args.batch, args.tokens))
    for name in ("full", "lora_all", f"lora_top{args.top}", "forward_only"):
        model = build_reward_backbone(BackboneParams(name_or_path=args.model), tokenizer)
        n_layers = model.config.num_hidden_layers
        if name.startswith("lora"):
            targets = "all-linear" if name == "lora_all" else [
                f"layers.{i}.{m}" for i in range(n_layers - args.top, n_layers) for m in LINEAR]
            add_adapters(model, LoraParams(r=16, alpha=32, target_modules=targets), "SEQ_CLS")
            model.score.weight.requires_grad_(True)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            if name == "forward_only":
                with torch.no_grad():
                    model(ids)
            else:
                model(ids).logits.sum().backward()
            times.append(time.perf_counter() - start)
        print(f"{name}: s/step ({args.batch} x {args.tokens} tokens): {[round(t, 2) for t in times]}", flush=True)


if __name__ == "__main__":
    main()

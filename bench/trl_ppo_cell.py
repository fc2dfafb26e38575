"""One run of TRL 1.12's PPO through the anchor's own code, at another width, batch or response length.

Runs in ``.venv-trl112`` (see ``bench_ppo.py``); ``bench_cost_curves.py`` calls it once per cell::

    .venv-trl112/bin/python bench/trl_ppo_cell.py --hidden 256 --batch 16 --response-length 48 --updates 4

The anchor (``trl_ppo_anchor.py --single --gc-freeze``) fixes batch 16, response length 24 and the
workload's width; those three are swapped in where the anchor reads them, everything else is the anchor's.
"""

from __future__ import annotations

import argparse
import json
import sys

from paths import BASELINES, HERE


def with_adapters(trainer_class, n: int, top_layers):
    """PPOTrainer with LoRA on the top ``n`` layers, set up as ``bench_ppo.py --lora-top`` sets up ours."""
    from peft import LoraConfig, inject_adapter_in_model

    def build(**kw):
        policy, value = kw["model"], kw["value_model"]
        targets = top_layers(policy.config, n)
        value.model.load_state_dict(policy.model.state_dict())
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=targets), value)
        for name, p in value.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("score."))
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM")
        return trainer_class(**{**kw, "ref_model": None, "peft_config": peft_config})

    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=24)
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of every model")
    ap.add_argument("--lora-top", type=int, default=None,
                    help="LoRA r=16 on the top N layers: the policy through PPOTrainer's peft_config (its reference "
                    "the policy with adapters off), the value model from the policy's trunk with the same adapters")
    a = ap.parse_args()
    sys.path[:0] = [str(BASELINES), str(HERE)]
    import torch
    import trl.experimental.ppo as trl_ppo
    import trl_ppo_anchor as anchor
    import workload as W
    from bench_ppo import resize, top_layers

    llama_config, ppo_config = W.llama_config, trl_ppo.PPOConfig
    W.llama_config = lambda *args, **kw: resize(llama_config(*args, **kw), a.hidden, a.layers, a.heads,
                                                a.intermediate)
    gpu = torch.cuda.is_available()
    # the anchor pins use_cpu=True and bf16=False; on a GPU host the run goes there, in the models' dtype
    trl_ppo.PPOConfig = lambda **kw: ppo_config(**{**kw, "response_length": a.response_length,
                                                   "per_device_train_batch_size": a.batch, "use_cpu": not gpu,
                                                   "bf16": gpu and a.dtype == "bfloat16"})
    if a.lora_top:
        trl_ppo.PPOTrainer = with_adapters(trl_ppo.PPOTrainer, a.lora_top, top_layers)
    torch.set_default_dtype(getattr(torch, a.dtype))  # every model of the run in that dtype, as in ours
    res = anchor.single(a.ppo_epochs, "random", a.updates * a.batch, None, gc_freeze=True)
    res["peak_memory_mib"] = (torch.cuda.max_memory_allocated() / 2**20 if gpu else res["peak_rss_mib"])
    res["dtype"] = a.dtype
    for k in ("log_history", "update_s_all", "kl_coef_seen_per_update", "non_score_reward_per_update",
              "kl_per_update", "logged_keys", "output_dir_contents"):
        res.pop(k, None)
    print("RESULT_JSON=" + json.dumps(res))


if __name__ == "__main__":
    main()

"""Benchmark this project's PPO against TRL's last PPO (trl 1.12) on the reference workload (bench/baselines).

Workload (from ``bench/baselines/workload.py``, as in ``trl_ppo_anchor.py``): its BPE tokenizer and
2-layer Llama, the train prompts, batch 16, response length 24, 32 updates (512 episodes), fixed KL
weight 0.05, a random-init reward model (seed 2) and value model (seed 1), policy seed 0.

Each measured run is a fresh process (``--single``) so peak RSS is per run. Usage::

    python bench/bench_ppo.py                 # ours at 1 and 4 PPO epochs + TRL anchor if its venv exists
    python bench/bench_ppo.py --repeats 3     # medians over fresh processes
    python bench/bench_ppo.py --single --ppo-epochs 4

The TRL anchor (``bench/baselines/trl_ppo_anchor.py``) runs in ``.venv-trl112``, made by
``bash bench/baselines/setup_trl112.sh``, with ``--single --gc-freeze``.
Results go to ``bench/results/ppo.json`` (``ppo_shared.json`` with ``--value-model shared``: a value
head on the policy trunk instead of TRL's separate value network, so not like-for-like).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import BASELINES, HERE, TRL_PY

RESULTS = HERE / "results" / "ppo.json"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resize(cfg, hidden: int | None, layers: int | None = None, heads: int | None = None,
           intermediate: int | None = None):
    """The workload's Llama at another size (intermediate 2x hidden unless given), for cost curves and GPU runs."""
    if hidden:
        cfg.hidden_size, cfg.intermediate_size = hidden, intermediate or 2 * hidden
    if layers:
        cfg.num_hidden_layers = layers
    if heads:
        cfg.num_attention_heads = cfg.num_key_value_heads = heads
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 512)
    return cfg


def top_layers(cfg, n: int) -> list[str]:
    """The linear layers of a Llama config's top ``n`` decoder layers, as LoRA target modules."""
    layers = range(cfg.num_hidden_layers - n, cfg.num_hidden_layers)
    return [f"layers.{i}.{m}" for i in layers for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                      "mlp.down_proj")]


def peak_memory_mib() -> float:
    """torch.cuda.max_memory_allocated on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def single(ppo_epochs: int, total_episodes: int, value_model: str, overrides: dict | None = None,
           batch: int = 16, response_length: int = 24, hidden: int | None = None, layers: int | None = None,
           heads: int | None = None, intermediate: int | None = None, dtype: str = "float32",
           lora_top: int | None = None) -> dict:
    """One measured run of this project's PPO, in this process. ``lora_top``: rank-16 adapters on the top layers'
    linear layers of the policy and of a value model started from the policy's trunk (as ``conf/real_model``
    trains), the reference the policy with its adapters off."""
    sys.path.insert(0, str(BASELINES))
    import numpy as np
    import torch
    import workload as W
    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

    from calibrated_rlhf.core.ppo import PPOConfig, PPOTrainer

    t_setup0 = time.perf_counter()
    wl = W.build_workload()
    tok = W.build_tokenizer(wl)
    cfg = resize(W.llama_config(len(tok), tok), hidden, layers, heads, intermediate)
    torch.set_default_dtype(getattr(torch, dtype))  # every model of the run in that dtype, as in the TRL cell
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    ref_policy = copy.deepcopy(policy)
    vcfg = copy.deepcopy(cfg)
    vcfg.num_labels = 1
    torch.manual_seed(1)
    value = AutoModelForSequenceClassification.from_config(vcfg) if value_model == "separate" else None
    if lora_top:
        value.model.load_state_dict(policy.model.state_dict())
        ref_policy = None
        overrides = {**(overrides or {}), "lora": {"r": 16, "alpha": 32, "target_modules": top_layers(cfg, lora_top)}}
    torch.manual_seed(2)
    rm = AutoModelForSequenceClassification.from_config(vcfg).eval()
    if torch.cuda.is_available():  # where TRL keeps its reward model too
        rm = rm.cuda()
    rm_backbone = rm.model

    # reward-model scoring as TRL's get_reward does it: score head at the last non-pad token
    def score_fn(prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        enc = tok([p + r + tok.eos_token for p, r in zip(prompts, responses)], padding=True,
                  return_tensors="pt")
        with torch.inference_mode():
            enc = enc.to(rm.device)
            h = rm_backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            last = enc["attention_mask"].sum(1) - 1
            s = rm.score(h[torch.arange(h.shape[0]), last]).squeeze(-1)
        return {"normalized": s.float().cpu()}

    config = PPOConfig(**{
        "seed": 0, "num_updates": total_episodes // batch, "batch_size": batch, "num_mini_batches": 1,
        "num_ppo_epochs": ppo_epochs, "response_length": response_length, "sampling_temperature": 1.0,
        "learning_rate": 5e-5, "kl_control": "fixed", "beta": 0.05, "value_model": value_model, **(overrides or {}),
    })
    prompts = [r["prompt"] for r in wl["train"]]
    trainer = PPOTrainer(config, policy, tok, prompts, score_fn, ref_policy=ref_policy, value_model=value)
    t_setup = time.perf_counter() - t_setup0
    rss_before = W.current_rss_mib()
    ends: list[float] = []
    trainer.callbacks.append(lambda *_: ends.append(time.perf_counter()))
    t0 = time.perf_counter()
    result = trainer.train()
    t_train = time.perf_counter() - t0
    upd = np.diff(np.array([t0] + ends))
    h = result.history
    return {
        "impl": "ours",
        "versions": W.versions(),
        "torch_threads": torch.get_num_threads(),
        "num_ppo_epochs": ppo_epochs,
        "value_model": value_model,
        "overrides": overrides or {},
        "episodes_done": result.episodes,
        "ppo_updates": result.updates,
        "setup_s": t_setup,
        "train_wall_s": t_train,
        "episodes_per_s": result.episodes / t_train,
        "s_per_update_median": float(np.median(upd)),
        "first_update_s": float(upd[0]),
        "steady_state_episodes_per_s": float(result.episodes / (len(upd) * np.median(upd))),
        "rollout_s_total": float(sum(x["ppo/perf/rollout_s"] for x in h)),
        # the PPO epochs (forward and backward of policy and value): the same fp32 math as TRL's
        "optimize_s_total": t_train - float(sum(x["ppo/perf/rollout_s"] for x in h)),
        "generate_s_total": float(sum(x["ppo/perf/generate_s"] for x in h)),
        "score_s_total": float(sum(x["ppo/perf/score_s"] for x in h)),
        "rss_before_train_mib": rss_before,
        "peak_rss_mib": W.peak_rss_mib(),
        "peak_memory_mib": peak_memory_mib(),
        "dtype": dtype,
        "n_params_policy": sum(p.numel() for p in policy.parameters()),
        "batch_size": batch,
        "response_length": response_length,
        "hidden_size": cfg.hidden_size,
        "scores_first_last": [h[0]["ppo/rewards/normalized"], h[-1]["ppo/rewards/normalized"]],
        "kl_first_last": [h[0]["ppo/objective/kl"], h[-1]["ppo/objective/kl"]],
    }


def _cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait_s: float = 240.0, threshold: float = 0.1) -> float:
    """Wait until other processes leave the CPUs alone (busy fraction < threshold over 2 s)."""
    t0 = time.time()
    while True:
        b0 = _cpu_busy_s()
        time.sleep(2.0)
        frac = (_cpu_busy_s() - b0) / (2.0 * (os.cpu_count() or 1))
        if frac < threshold or time.time() - t0 > max_wait_s:
            return frac


def run_child(cmd: list[str], env: dict | None = None, attempts: int = 3, max_foreign: float = 0.05) -> dict:
    """Run one measured child; rerun (up to ``attempts``) when other processes took CPU meanwhile.

    ``foreign_cpu_frac`` is the CPU time used by anything but the child, as a fraction of the
    machine's capacity over the run: with 2 cores, a neighbour's burst skews timings a lot.
    """
    best = None
    for _ in range(attempts):
        wait_quiet()
        b0, c0, t0 = _cpu_busy_s(), _children_cpu_s(), time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.time() - t0
        foreign = max(0.0, (_cpu_busy_s() - b0) - (_children_cpu_s() - c0)) / (wall * (os.cpu_count() or 1))
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"child failed (rc={proc.returncode}): {' '.join(cmd)}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT_JSON=")][-1]
        res = json.loads(line[len("RESULT_JSON="):])
        res["foreign_cpu_frac"] = foreign
        if best is None or foreign < best["foreign_cpu_frac"]:
            best = res
        if foreign <= max_foreign:
            break
    return best


def median(runs: list[dict], key: str) -> float:
    vals = sorted(r[key] for r in runs)
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def clean(runs: list[dict], max_foreign: float = 0.05) -> list[dict]:
    """Runs that no other process disturbed; all runs if none qualifies."""
    ok = [r for r in runs if r["foreign_cpu_frac"] <= max_foreign]
    return ok or runs


KEYS = ["episodes_per_s", "steady_state_episodes_per_s", "s_per_update_median", "train_wall_s", "peak_rss_mib",
        "foreign_cpu_frac"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--single", action="store_true", help="one measured run in this process")
    ap.add_argument("--ppo-epochs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--total-episodes", type=int, default=512)
    ap.add_argument("--value-model", choices=["separate", "shared"], default="separate")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL anchor")
    ap.add_argument("--batch", type=int, default=16, help="episodes per update (with --single)")
    ap.add_argument("--response-length", type=int, default=24, help="tokens per response (with --single)")
    ap.add_argument("--hidden", type=int, default=None, help="model width (with --single; default the workload's 128)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (with --single)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (with --single)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (with --single; default 2x hidden)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of every model")
    ap.add_argument("--lora-top", type=int, default=None,
                    help="with --single: LoRA r=16 on the top N layers of the policy and value model")
    ap.add_argument("--override", default="{}",
                    help='PPOConfig fields as JSON, e.g. \'{"speed": {"cpu_parallel": false}}\'')
    a = ap.parse_args()
    if a.single:
        res = single(a.ppo_epochs[0], a.total_episodes, a.value_model, json.loads(a.override),
                     a.batch, a.response_length, a.hidden, a.layers, a.heads, a.intermediate, a.dtype, a.lora_top)
        print("RESULT_JSON=" + json.dumps(res))
        return

    have_trl = TRL_PY.exists() and not a.no_trl
    if not have_trl and not a.no_trl:
        print(f"no TRL venv at {TRL_PY} (bash bench/baselines/setup_trl112.sh makes it); reporting ours only", flush=True)
    out: dict = {"workload": "bench/baselines/workload.py: batch 16, response_length 24, fixed beta 0.05",
                 "value_model": a.value_model, "override": json.loads(a.override),
                 "total_episodes": a.total_episodes, "repeats": a.repeats, "settings": {}}
    anchor_env = dict(os.environ, ANCHOR_OUT=os.path.join(tempfile.gettempdir(), "anchors_bench"))
    for ep in a.ppo_epochs:
        setting: dict = {}
        # interleave ours and TRL so slow drifts of the machine hit both alike
        ours, trl = [], []
        for i in range(a.repeats):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--single", "--ppo-epochs", str(ep),
                   "--total-episodes", str(a.total_episodes), "--value-model", a.value_model,
                   "--override", a.override]
            ours.append(run_child(cmd))
            print(f"[ours epochs={ep} run {i + 1}] " + json.dumps({k: round(ours[-1][k], 3) for k in KEYS}), flush=True)
            if have_trl:
                cmd = [str(TRL_PY), str(BASELINES / "trl_ppo_anchor.py"), "--single", "--gc-freeze",
                       "--ppo-epochs", str(ep), "--total-episodes", str(a.total_episodes)]
                r = run_child(cmd, env=anchor_env)
                r.pop("log_history", None)
                trl.append(r)
                print(f"[trl  epochs={ep} run {i + 1}] " + json.dumps({k: round(r[k], 3) for k in KEYS}), flush=True)
        setting["ours"] = {"medians": {k: median(clean(ours), k) for k in KEYS}, "runs": ours}
        if trl:
            setting["trl_gc_freeze"] = {"medians": {k: median(clean(trl), k) for k in KEYS}, "runs": trl}
            mo, mt = setting["ours"]["medians"], setting["trl_gc_freeze"]["medians"]
            setting["ratio_ours_over_trl"] = {
                "episodes_per_s": mo["episodes_per_s"] / mt["episodes_per_s"],
                "steady_state_episodes_per_s": mo["steady_state_episodes_per_s"] / mt["steady_state_episodes_per_s"],
                "peak_rss": mo["peak_rss_mib"] / mt["peak_rss_mib"],
                # each run against the TRL run right after it: the machine's speed drifts between
                # minutes (shared host), and adjacent runs share most of that drift
                "paired_episodes_per_s_median": median(
                    [{"r": o["episodes_per_s"] / t["episodes_per_s"]} for o, t in zip(ours, trl)], "r"),
                # the ratio if ours sampled, scored and ran every no-grad forward in no time at all: what the
                # optimization epochs alone allow, however fast the rollout becomes
                "ceiling_free_rollout": mt["train_wall_s"] / median(clean(ours), "optimize_s_total"),
                "optimize_share_of_ours": median(clean(ours), "optimize_s_total") / mo["train_wall_s"],
            }
        # where the time goes (medians, seconds): ours' sampling, the passes after it (reference, old
        # values, scoring, the first PPO forward) and the optimization epochs; TRL's generation, reward and
        # value reads, every forward (reference and PPO epochs), and the rest (backward, optimizer, bookkeeping)
        setting["phases_s"] = {"ours": {k: median(clean(ours), k + "_s_total")
                                        for k in ("generate", "score", "rollout", "optimize")}}
        if trl:
            t = {k: median(clean(trl), k + "_s_total") for k in ("generate", "get_reward", "forward")}
            t["rest"] = median(clean(trl), "train_wall_s") - sum(t.values())
            setting["phases_s"]["trl_gc_freeze"] = t
        out["settings"][f"ppo_epochs_{ep}"] = setting
    results = RESULTS if a.value_model == "separate" else RESULTS.with_name(f"ppo_{a.value_model}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(out, indent=1))
    for name, s in out["settings"].items():
        line = {"ours_eps": round(s["ours"]["medians"]["episodes_per_s"], 1),
                "ours_rss_mib": round(s["ours"]["medians"]["peak_rss_mib"])}
        if "trl_gc_freeze" in s:
            line.update({"trl_eps": round(s["trl_gc_freeze"]["medians"]["episodes_per_s"], 1),
                         "trl_rss_mib": round(s["trl_gc_freeze"]["medians"]["peak_rss_mib"]),
                         "ratio": round(s["ratio_ours_over_trl"]["episodes_per_s"], 2),
                         "paired_ratio_median": round(s["ratio_ours_over_trl"]["paired_episodes_per_s_median"], 2),
                         "ceiling_free_rollout": round(s["ratio_ours_over_trl"]["ceiling_free_rollout"], 2),
                         "optimize_share_of_ours": round(s["ratio_ours_over_trl"]["optimize_share_of_ours"], 2)})
        print(name, json.dumps(line))
        print(f"{name} phases_s", json.dumps({side: {k: round(v, 2) for k, v in ph.items()}
                                             for side, ph in s["phases_s"].items()}))
    print("wrote", results)


if __name__ == "__main__":
    main()

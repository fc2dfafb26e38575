"""Each stage's speed paths behind one switch: ``RewardTrainingParams.speed`` and ``PPOConfig.speed``.

``enabled: false`` runs the plain path, what transformers (and TRL's trainer) do, whatever the other knobs
say; :meth:`RewardSpeed.active` and :meth:`PPOSpeed.active` give the knobs that apply, so no caller reads a
knob past the switch. The defaults are the fast paths, each tested to give the plain path's numbers up to
float rounding.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RewardSpeed(BaseModel):
    """The reward model's training speed paths (``reward_model.training.speed``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="The stage's one switch: false trains through the model's own forward, one padded batch, "
        "as TRL's RewardTrainer does, whatever the knobs below say.",
    )
    padding_free: bool = Field(
        True,
        description="Pack each batch's pairs into rows without padding, each pair's shared prompt run once (the "
        "rejected side attends to it, not to the chosen side), or its sequences apart where they share little: "
        "the same rewards, loss and gradients from fewer tokens (core/speed/pair_packing.py). Models whose attention "
        "takes no custom mask (flash-attention kernels), and batches a cost model prices cheaper padded, keep "
        "padded batches, split by length_buckets.",
    )
    length_buckets: int = Field(
        3,
        ge=1,
        description="Run each batch's sequences, sorted by length, as at most this many forward passes, each "
        "padded only to its own longest: the shorter side of a pair stops paying for the longer one. "
        "Same loss and gradients; 1 = one padded batch, as TRL does.",
    )
    bucket_cost_tokens: float = Field(
        250.0,
        ge=0,
        description="What one more forward and backward pass costs, in tokens: a split into length buckets "
        "must save more padded tokens than this. Short batches then run whole, as in TRL; 0 = always the "
        "fewest padded tokens. The default is the workload's Llama (hidden 128, 2 layers) on 2 CPU threads "
        "(bench/bench_forward_cost.py); on 1 thread, or for a wider model, whose tokens cost more, it is lower.",
    )

    def active(self) -> "RewardSpeed":
        """The knobs that apply: these, or with the switch off no packing and one padded batch."""
        return self if self.enabled else self.model_copy(update={"padding_free": False, "length_buckets": 1})


class PPOSpeed(BaseModel):
    """PPO's speed paths (``ppo.trainer.speed``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True,
        description="The stage's one switch: false samples and runs every forward through the model's own "
        "forward with torch's thread count, on one thread, with malloc untouched, whatever the knobs below say.",
    )
    decode_threads: int | None = Field(
        1,
        gt=0,
        description="Intra-op CPU threads while decoding (restored afterwards). A decoding step of a small "
        "model is a chain of tiny ops where extra threads mostly add synchronisation; None keeps torch's "
        "setting. No effect on GPU work.",
    )
    fast_decode: bool = Field(
        True,
        description="Sample with a lean KV-cached decoding step (preallocated cache, fused projections) "
        "for Llama, Mistral and Qwen2 policies; other architectures, and any model whose first step "
        "disagrees with its own forward, use the model's forward. Same samples up to float rounding.",
    )
    trim_last_layer: bool = Field(
        True,
        description="Run each model's last decoder layer only at the positions PPO reads (the last prompt "
        "token and the response), for Llama, Mistral and Qwen2 models: earlier layers still see the whole "
        "sequence. The first forward of each model is checked against its full forward; other architectures, "
        "and any model that disagrees, keep the full forward. Same values up to float rounding.",
    )
    frozen_trunk: bool = Field(
        True,
        description="With adapters on the top layers only, run the layers below the first trained one once per "
        "batch, after sampling, and start every later forward (reference logprobs, old values, each PPO epoch's "
        "policy and value model) above them (core/speed/frozen_trunk.py). Llama, Mistral and Qwen2 models whose "
        "frozen layers equal the policy's; each model's first use is checked against its full forward. No effect "
        "on full fine-tuning, where layer 0 trains. Same values up to float rounding.",
    )
    cpu_malloc_tuning: bool = Field(
        True,
        description="On CPU under glibc (Linux), raise malloc's mmap and trim thresholds for the process when the "
        "trainer is built, so the activation buffers autograd frees after every op are reused instead of being "
        "unmapped and mapped again, a page fault per page touched. Process-wide; keeps a pool of freed memory "
        "mapped.",
    )
    cpu_parallel: bool = Field(
        True,
        description="On CPU, in a single process with a separate value model, run the value model's "
        "forward/backward on a second thread alongside the policy's (one intra-op thread each). Same "
        "gradients; for small models it keeps two cores busier than one two-threaded stream.",
    )

    def active(self) -> "PPOSpeed":
        """The knobs that apply: these, or with the switch off every one off (torch's thread count)."""
        if self.enabled:
            return self
        return self.model_copy(update={"decode_threads": None, "fast_decode": False, "trim_last_layer": False,
                                       "frozen_trunk": False, "cpu_malloc_tuning": False, "cpu_parallel": False})

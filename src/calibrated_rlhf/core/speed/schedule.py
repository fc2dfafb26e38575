"""Where PPO's passes run: the one seam for CPU performance tricks.

The trainer calls a schedule at three fixed points: around sampling (:meth:`Sequential.decoding`,
the thread count for decoding), the passes that follow sampling (:meth:`Sequential.old_passes`:
reference logprobs, old values, scoring) and one minibatch's forward, backward and gradient
clipping (:meth:`Sequential.backward`). :class:`Sequential` runs
them on the calling thread in that order; :class:`CpuOverlap` runs the value model on a second
thread beside the policy. Both give the same numbers with one intra-op thread everywhere.

With a single minibatch, the first PPO forward runs at the rollout's parameters, so it also
yields the old values (``reuse_first``): the value model's rollout forward is saved on any device.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch
from torch import nn


S = TypeVar("S")
# The algorithm's types, duck-typed so that this package imports no algorithm: a batch of model inputs (``ids``,
# ``attn``, ``pos``, ``start``, ``sampling_temperature``, ``trunk``; PPO's ``rollout.Inputs``) and a policy with its
# value model behind one forward (``policy``, ``value_model``, ``policy_logits``, ``values``; PPO's
# ``PolicyAndValue``).
Inputs = Any
PolicyAndValue = Any
# A loss half: the network's output -> (statistics to log, the loss to backpropagate).
LossFn = Callable[[torch.Tensor], "tuple[dict[str, torch.Tensor], torch.Tensor]"]

__all__ = ["CpuOverlap", "OldPasses", "Sequential", "cpu_threads", "make_schedule", "tune_glibc_malloc"]


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@dataclass
class OldPasses(Generic[S]):
    """What the rollout needs after sampling, and when scoring started and ended."""

    ref_logprobs: torch.Tensor
    values: torch.Tensor  # float, unmasked
    first: tuple[torch.Tensor, torch.Tensor] | None  # (logits, values) of the first PPO forward, in graph
    scored: S
    t_score_start: float
    t_score_end: float


class Sequential:
    """Every pass on the calling thread, through the (possibly DDP-wrapped) model."""

    pool: ThreadPoolExecutor | None = None

    def __init__(self, accelerator: Any, model: nn.Module, unwrapped: PolicyAndValue, reuse_first: bool,
                 decode_threads: int | None = None) -> None:
        self.accelerator = accelerator
        self.model = model
        self.unwrapped = unwrapped
        self.reuse_first = reuse_first
        self.decode_threads = decode_threads

    def decoding(self) -> contextlib.AbstractContextManager:
        """Around sampling: the intra-op thread count that suits a decoding step (None: torch's)."""
        return cpu_threads(self.decode_threads)

    def old_passes(self, x: Inputs, reference: Callable[[], torch.Tensor], old_values: Callable[[], torch.Tensor],
                   score: Callable[[], S], was_training: bool) -> OldPasses[S]:
        """Reference logprobs and old values (in eval mode), then scoring, then the first forward if reused."""
        with torch.inference_mode():
            ref = reference()
            values = None if self.reuse_first else old_values()
        if was_training:
            self.model.train()
        t_score = time.perf_counter()
        scored = score()
        t_scored = time.perf_counter()
        first = (self.model(x.ids, x.attn, x.pos, x.start, x.sampling_temperature, x.trunk) if self.reuse_first
                 else None)
        if first is not None:
            values = first[1].detach().float()
        return OldPasses(ref, values, first, scored, t_score, t_scored)

    def backward(self, x: Inputs, first: tuple[torch.Tensor, torch.Tensor] | None, policy_loss: LossFn,
                 value_loss: LossFn, max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Forward (unless ``first`` is given), backward and clipping: (statistics, loss, gradient norm)."""
        logits, vpred = first if first is not None else self.model(x.ids, x.attn, x.pos, x.start,
                                                                   x.sampling_temperature, x.trunk)
        p_stats, p_loss = policy_loss(logits)
        v_stats, v_loss = value_loss(vpred)
        total = p_loss + v_loss
        self.accelerator.backward(total)
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return {**p_stats, **v_stats}, total.detach(), grad_norm


class CpuOverlap(Sequential):
    """Policy on this thread, value model on a worker thread, one intra-op thread each.

    Policy and value are independent networks: for ops this small, two single-threaded streams,
    one per core, beat one two-threaded stream. Each side takes its own gradient norms right after
    its backward, the first half of the clipping. Single process, separate value model only.
    """

    def __init__(self, accelerator: Any, model: nn.Module, unwrapped: PolicyAndValue, reuse_first: bool,
                 decode_threads: int | None = None) -> None:
        super().__init__(accelerator, model, unwrapped, reuse_first, decode_threads)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-value")
        # in model.parameters() order: the policy's, then the value model's
        self.grad_params = tuple([p for p in part.parameters() if p.requires_grad]
                                 for part in (unwrapped.policy, unwrapped.value_model))

    def old_passes(self, x: Inputs, reference: Callable[[], torch.Tensor], old_values: Callable[[], torch.Tensor],
                   score: Callable[[], S], was_training: bool) -> OldPasses[S]:
        """With the first forward reused: reference and value forwards on the worker while this
        thread scores and runs the policy forward, four independent passes, two per core."""
        if not self.reuse_first:
            return super().old_passes(x, reference, old_values, score, was_training)
        if was_training:
            self.model.train()  # dropout is off (reuse_first): the mode only matters for consistency

        def worker_job() -> tuple[torch.Tensor, torch.Tensor]:
            torch.set_num_threads(1)  # a thread's intra-op setting is its own
            with torch.inference_mode():
                ref = reference()
            return ref, self.unwrapped.values(x.ids, x.attn, x.pos, x.start, x.trunk)

        worker = self.pool.submit(worker_job)
        t_score = time.perf_counter()
        with cpu_threads(1):
            try:
                scored = score()
                logits = self.unwrapped.policy_logits(x.ids, x.attn, x.pos, x.start, x.sampling_temperature,
                                                      x.trunk)
            finally:
                ref, vpred = worker.result()  # waits even when scoring failed
        return OldPasses(ref, vpred.detach().float(), (logits, vpred), scored, t_score, time.perf_counter())

    def backward(self, x: Inputs, first: tuple[torch.Tensor, torch.Tensor] | None, policy_loss: LossFn,
                 value_loss: LossFn, max_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        policy_params, value_params = self.grad_params
        logits, vpred = first if first is not None else (None, None)

        def value_job() -> tuple[dict[str, torch.Tensor], torch.Tensor, list[torch.Tensor]]:
            torch.set_num_threads(1)
            v = vpred if vpred is not None else self.unwrapped.values(x.ids, x.attn, x.pos, x.start, x.trunk)
            stats, v_loss = value_loss(v)
            self.accelerator.backward(v_loss)
            return stats, v_loss.detach(), grad_norms(value_params)

        with cpu_threads(1):
            future = self.pool.submit(value_job)
            try:
                lg = logits if logits is not None else self.unwrapped.policy_logits(
                    x.ids, x.attn, x.pos, x.start, x.sampling_temperature, x.trunk)
                p_stats, p_loss = policy_loss(lg)
                self.accelerator.backward(p_loss)
                p_norms = grad_norms(policy_params)
            finally:
                v_stats, v_loss, v_norms = future.result()  # waits even when the policy half failed
        grad_norm = self._clip_by_norms(p_norms + v_norms, max_norm)
        return {**p_stats, **v_stats}, p_loss.detach() + v_loss, grad_norm

    def _clip_by_norms(self, norms: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` from per-tensor norms already taken, in ``model.parameters()`` order.

        Same total norm and scaling as torch's; the multiply is skipped when the factor is exactly 1.
        """
        if not norms:
            return torch.tensor(0.0)
        total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
        factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if float(factor) < 1.0:
            torch._foreach_mul_([p.grad for group in self.grad_params for p in group if p.grad is not None], factor)
        return total


def make_schedule(config: Any, accelerator: Any, model: nn.Module, unwrapped: PolicyAndValue) -> Sequential:
    """The schedule the config and device allow; tunes glibc malloc on CPU when asked to.

    ``config``: PPO's (its ``speed``, ``num_mini_batches``, ``value_model``, ``disable_dropout`` and ``lora``)."""
    on_cpu = accelerator.device.type == "cpu"
    speed = config.speed.active()
    if speed.cpu_malloc_tuning and on_cpu:
        tune_glibc_malloc()
    reuse_first = config.num_mini_batches == 1 and config.value_model == "separate" and config.disable_dropout
    # with LoRA the reference is the policy with its adapters off: it must not run beside the policy's forward
    overlap = (speed.cpu_parallel and on_cpu and accelerator.num_processes == 1 and config.value_model == "separate"
               and config.lora is None)
    return (CpuOverlap if overlap else Sequential)(accelerator, model, unwrapped, reuse_first,
                                                   speed.decode_threads if on_cpu else None)


def grad_norms(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The 2-norm of each gradient present, as ``clip_grad_norm_`` takes them."""
    grads = [p.grad for p in params if p.grad is not None]
    return list(torch._foreach_norm(grads, 2.0)) if grads else []


# glibc's mallopt parameters (malloc.h) and the values set: buffers up to 32 MiB come from the heap
# and stay there, where the default dynamic threshold hands many activation-sized ones to mmap
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20


def tune_glibc_malloc() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl) has no such entry point
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * MALLOC_MMAP_THRESHOLD_BYTES)
    )

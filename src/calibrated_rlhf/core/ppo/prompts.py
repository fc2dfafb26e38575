"""The prompt stream PPO samples from: a seeded shuffled order, epoch after epoch, sliced by rank.

Prompts are text or conversational (message lists, rendered with the chat template's generation prompt,
see ``core.chat``), one kind per stream."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from calibrated_rlhf.core.chat import prompt_ids, prompt_kind
from calibrated_rlhf.core.checkpointing.checkpoints import digest
from calibrated_rlhf.core.preferences import plain


class PromptStream:
    """Prompts tokenized once (the tokenizer's special tokens or the chat template, no truncation) and
    served a global batch at a time; every rank walks the same order and takes its own slice of each batch."""

    def __init__(self, prompts: Sequence[Any], tokenizer: Any, seed: int, batch_size: int, rank: int,
                 world_size: int) -> None:
        self.texts = plain(list(prompts))  # text or message lists, as the score function receives them
        self.conversational = prompt_kind(self.texts) == "conversational"
        self.ids: list[list[int]] = prompt_ids(tokenizer, self.texts)
        self.tokenizer = tokenizer
        self.seed = seed
        self.batch_size = batch_size
        self.rank = rank
        self.global_batch = batch_size * world_size
        if len(self.texts) < self.global_batch:
            raise ValueError(f"{len(self.texts)} prompts < one global batch ({self.global_batch})")
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)
        self._decoded: dict[int, str] = {}

    def next_indices(self) -> list[int]:
        """This rank's prompt indices for the next update."""
        G = self.global_batch
        if self.pos + G > len(self.texts):
            # drop the ragged tail so every update has a full global batch
            self.epoch += 1
            self.pos = 0
            self._perm = self._permutation(self.epoch)
        start = self.pos + self.rank * self.batch_size
        idx = self._perm[start:start + self.batch_size].tolist()
        self.pos += G
        return idx

    def decoded(self, i: int) -> str | None:
        """The prompt's tokens decoded back to text (cached: every response is cut against it); None for a
        conversational prompt, whose response is the assistant turn decoded on its own."""
        if self.conversational:
            return None
        text = self._decoded.get(i)
        if text is None:
            text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
            self._decoded[i] = text
        return text

    def chat_fingerprint(self, tokenizer: Any, end_of_turn: int) -> dict[str, Any]:
        """What renders conversational prompts and ends their replies, for the resume fingerprint (nothing
        for text prompts)."""
        if not self.conversational:
            return {}
        return {"chat_template": digest(tokenizer.chat_template), "end_of_turn": end_of_turn}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.pos = int(state["pos"])
        self._perm = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 10_007, epoch]).permutation(len(self.texts))

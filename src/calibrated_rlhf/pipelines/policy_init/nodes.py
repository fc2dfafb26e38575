"""Nodes of ``policy_init``: thin adapters over ``calibrated_rlhf.core.policy``."""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import Field

from calibrated_rlhf.core import metric_keys as keys
from calibrated_rlhf.core.backbone import BackboneParams, build_causal_backbone
from calibrated_rlhf.core.policy import SFTParams, sft_policy
from calibrated_rlhf.pipelines.metrics import as_history
from calibrated_rlhf.pipelines.params import StrictParams


class PolicyInitParams(StrictParams):
    """Where the reference policy comes from."""

    name_or_path: str | None = Field(
        None, description="Hub id or local folder of a causal LM used as is; null fine-tunes the backbone (SFT)."
    )
    gguf_file: str | None = Field(
        None, description="A GGUF file inside the name_or_path folder to read that model from (see backbone).")
    sft: SFTParams = SFTParams()


def init_policy(
    tokenizer: Any, train_pairs: pd.DataFrame, backbone: BackboneParams, params: PolicyInitParams
) -> tuple[Any, dict[str, list[dict[str, float]]]]:
    """The reference policy: the given model, or the backbone fine-tuned on the training pairs' chosen responses."""
    if params.name_or_path:
        return build_causal_backbone(backbone.model_copy(
            update={"name_or_path": params.name_or_path, "gguf_file": params.gguf_file}), tokenizer), {}
    model = build_causal_backbone(backbone, tokenizer)
    model, history = sft_policy(model, tokenizer, list(train_pairs["prompt"]), list(train_pairs["chosen"]),
                                params.sft, backbone.gradient_checkpointing)
    return model, as_history(history, {"loss": keys.POLICY_INIT_TRAIN_LOSS,
                                       "train_runtime": keys.POLICY_INIT_TRAIN_RUNTIME_S})

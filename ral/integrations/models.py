"""Model glue for transformers causal LMs and VLMs: the backbone, the LM head, hidden states.

Wrappers that hold the transformers LM as ``.lm`` and embed their own inputs with
``.embed(input_ids, **model_kwargs)`` (the embedded tasks' ``TinyVLM``) are unwrapped here, in one place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["backbone", "language_model", "forward_hidden", "lm_head_params", "next_token_rows"]


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder backbone of a transformers causal LM (returns ``last_hidden_state``, post-norm)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError("model: expected a transformers *ForCausalLM / *ForConditionalGeneration with a "
                         "separate backbone (model.base_model) and LM head (get_output_embeddings())")
    return base


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers LM of a wrapper that holds it as ``.lm`` (e.g. the grounding task's TinyVLM)."""
    return getattr(model, "lm", model)


def forward_hidden(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, **model_kwargs) -> Tensor:
    """Final (post-norm) hidden states (B, S, D) without the LM head. Wrappers with ``.lm`` and
    ``.embed(input_ids, **model_kwargs)`` (TinyVLM) feed ``inputs_embeds``; others take input_ids."""
    if hasattr(model, "lm") and hasattr(model, "embed"):
        embeds = model.embed(input_ids, **model_kwargs)
        return backbone(model.lm)(inputs_embeds=embeds, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    return backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           **model_kwargs).last_hidden_state


def lm_head_params(model: torch.nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    head = language_model(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def next_token_rows(hidden: Tensor, response_mask: Tensor) -> Tensor:
    """The hidden states (N, D) that predict the response tokens: position t-1 for every t with
    response_mask[:, t] True (row-major order, the same order as ``response_mask[:, 1:][m]``)."""
    pred = response_mask[:, 1:].to(torch.bool)
    return hidden[:, :-1][pred]

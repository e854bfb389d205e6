"""The explainer's training loss: next-token cross-entropy on explanation tokens only."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .batches import IGNORE
from .explainer import injecting
from .projection import Projection


class ExplainerLM(nn.Module):
    """Wraps a causal LM (and, for vector tasks, the projection Pi) so forward() returns the mean loss
    over explanation tokens.

    The LM head runs only at positions that predict a label: with Gemma's 262k vocabulary the full
    [B, T, V] logits would dominate time and memory (see benchmarks/run.py).
    """

    def __init__(self, model: nn.Module, restrict_head: bool = True, projection: Optional[Projection] = None,
                 vec_id: Optional[int] = None):
        super().__init__()
        self.model = model
        self.restrict_head = restrict_head
        self.projection = projection  # a submodule: DeepSpeed trains it when its maps require grad
        self.vec_id = vec_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                vectors: Optional[torch.Tensor] = None, vector_keys: Optional[list[str]] = None) -> torch.Tensor:
        # input_ids, attention_mask, labels: [B, T]; vectors [B', d_target] for the rows' [vec] tokens
        mapped = None
        if vectors is not None:
            if self.vec_id is None:
                raise ValueError("this batch carries vectors but the explainer has no [vec] token")
            mapped = self.projection(vectors, vector_keys) if self.projection is not None else vectors
        with injecting(self.model, self.vec_id, mapped):
            return self._loss(input_ids, attention_mask, labels)

    def _loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != IGNORE  # [B, T-1]
        if not self.restrict_head:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]  # [B, T-1, V]
            return F.cross_entropy(logits[keep].float(), targets[keep])
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state  # no KV cache: nothing decodes
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V], N = explanation tokens
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), targets[keep])  # mean over explanation tokens

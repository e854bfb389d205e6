"""Low-rank adapters (LoRA) for explainer fine-tuning: the paper trains task B and a 70B explainer with
LoRA r=128. The base weights stay frozen; each adapted linear layer adds (alpha / r) * B A x. Exports
keep the adapters only; loading one merges them into the base weights (`merge_lora_`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from selfexplain.groundtruth.errors import ConfigError


@dataclass
class LoraConfig:
    """Which linear layers get adapters, and their size."""

    r: int = 128
    """Rank of each adapter (the paper: 128)."""
    alpha: float = 256.0
    """Scale numerator: the adapter's output is multiplied by alpha / r."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
    """Names (last path component) of the linear layers to adapt."""

    def check(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be at least 1, got {self.r}")
        if not self.target_modules:
            raise ValueError("target_modules: name at least one linear layer")


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + (alpha / r) B A x."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        like = {"dtype": base.weight.dtype, "device": base.weight.device}  # beside the weight (a GPU, for ZeRO 0-2)
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, **like))  # [r, d_in]
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, **like))  # [d_out, r]
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # B = 0: training starts at the base model
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def apply_lora(model: nn.Module, cfg: LoraConfig) -> int:
    """Freeze the model and wrap every target linear layer in a LoraLinear; returns how many.
    (TrainConfig.train_embeddings decides separately whether the embedding matrix trains.)"""
    for p in model.parameters():
        p.requires_grad_(False)
    pattern = re.compile(rf"(^|\.)({'|'.join(map(re.escape, cfg.target_modules))})$")
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(name)]
    if not targets:
        raise ConfigError(f"lora.target_modules {cfg.target_modules} match no linear layer of {type(model).__name__}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraLinear(getattr(parent, child), cfg.r, cfg.alpha))
    return len(targets)


@torch.no_grad()
def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into the weight it adapts (W + (alpha / r) B A) and put the plain linear layer
    back, in place: a loaded LoRA export then runs as fast as the base model. Returns how many."""
    merged = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]
    for name, m in merged:
        weight = m.base.weight
        weight.copy_((weight.float() + m.scale * m.lora_b.float() @ m.lora_a.float()).to(weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    return len(merged)

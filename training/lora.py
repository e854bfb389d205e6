"""Low-rank adapters (LoRA) for explainer fine-tuning, through peft: the paper trains task B and a 70B
explainer with LoRA r=128. The base weights stay frozen; each adapted linear layer adds (alpha / r) B A x,
with B = 0 at the start (peft's default initialisation). Exports are PEFT adapter folders
(training/export_format.py), which `PeftModel.from_pretrained` loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


def peft_config(cfg: LoraConfig, base: str = "", trainable_token_indices: dict[str, list[int]] | None = None):
    """peft's LoraConfig for ours: no dropout (the paper's), the base model named for the adapter folder,
    and (in exports only) the vector-token rows the adapter carries."""
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base or None,
                           trainable_token_indices=trainable_token_indices or None)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """The model with every target linear layer adapted and everything else frozen (a peft PeftModel;
    TrainConfig.train_embeddings decides separately whether the embedding matrix trains)."""
    import peft

    try:
        return peft.get_peft_model(model, peft_config(cfg, getattr(model, "name_or_path", "")))
    except ValueError as e:
        if "not found" not in str(e) and "target modules" not in str(e).lower():
            raise
        raise ConfigError(f"lora.target_modules {cfg.target_modules} match no linear layer of "
                          f"{type(model).__name__}") from None


def adapted_layers(model: nn.Module) -> int:
    """How many layers of a PeftModel carry LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in model.modules())

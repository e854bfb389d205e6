"""Residual-stream SAEs with sae-lens: trained here on corpus activations, or loaded pretrained.

Training uses sae-lens's TopK SAE and SAETrainer fed from an in-memory iterator of activation batches
(no TransformerLens). Activations are normalised to a fixed average norm while training
("expected_average_only_in"; without it small models end with almost every feature dead) and the
scale is folded back into the weights at the end, so the SAE reads raw activations.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..errors import ConfigError, DataSourceError
from ..models import default_device

METRIC_TOKENS = 50_000  # tokens a pretrained SAE's L0 / explained variance / dead fraction are measured on


@dataclass
class SAEConfig:
    """Where each layer's SAE comes from, and how it is trained when it is trained here."""

    pretrained: Optional[str] = None
    """Null: train one SAE per layer on the corpus activations. Otherwise a sae-lens folder saved with
    save_inference_model (may contain '{layer}'), or 'release:<release>:<sae_id>' for a sae-lens
    pretrained release (sae_id may contain '{layer}'; needs the hub, i.e. a cluster)."""
    d_sae: int = 768
    """Features per SAE (of a pretrained one: its width, which the dry run's memory plan reads)."""
    k: int = 16
    """Active features per token (TopK SAE)."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 256
    """Activation vectors per step."""
    lr: float = 3.0e-3
    """Adam learning rate, decayed to a tenth over the last fifth (on 5k SmolLM2 tokens, 600 steps:
    3e-3 left 8% of 768 features dead and explained 0.80 of the variance; 4e-4 left 80% dead; on
    Gemma-3-270M 6e-3 and 1e-2 left more dead than 3e-3 with more steps)."""

    def check(self) -> None:
        if self.pretrained is None and not (0 < self.k < self.d_sae):
            raise ValueError(f"sae.k must be between 1 and d_sae - 1 ({self.d_sae}), got {self.k}")


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of rows of acts [N, d]."""
    g = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(acts))
    while True:
        order = torch.randperm(len(acts), generator=g)
        for start in range(0, len(acts) - size + 1, size):
            yield acts[order[start:start + size].to(acts.device)]


def train_sae(acts: np.ndarray, cfg: SAEConfig, seed: int = 0, device: Optional[str] = None):
    """A TopK SAE trained on acts [N, d_in] on `device` (default: a GPU where one is visible; the
    activations move there once); returns the sae-lens SAE."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    device = device or default_device()
    if len(acts) < cfg.batch_size:
        raise ConfigError(f"only {len(acts)} activation vectors to train an SAE on; use more corpus texts "
                         f"or a smaller sae.batch_size ({cfg.batch_size})")
    torch.manual_seed(seed)
    data = torch.from_numpy(np.array(acts, dtype=np.float32)).to(device)  # a copy: acts may be a read-only memmap
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.shape[1], d_sae=cfg.d_sae, k=cfg.k, device=device,
                                                normalize_activations="expected_average_only_in"))
    window = max(1, cfg.steps // 3)  # "dead" = silent for a third of training
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name="constant", lr_decay_steps=cfg.steps // 5,
        dead_feature_window=window, feature_sampling_window=window, device=device,
        n_batches_for_norm_estimate=max(1, min(50, len(data) // cfg.batch_size)))
    return SAETrainer(trainer_cfg, sae, _batches(data, cfg.batch_size, seed)).fit()


def encoder(sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of activations [n, d_in] -> feature activations [n, d_sae] on the SAE's device (fp32 out)."""
    device, dtype = sae.W_dec.device, sae.W_dec.dtype
    return lambda rows: sae.encode(rows.to(device, dtype)).float()


def _row_chunks(acts: np.ndarray, chunk: int, device) -> Iterator[torch.Tensor]:
    for start in range(0, len(acts), chunk):
        yield torch.from_numpy(np.array(acts[start:start + chunk], dtype=np.float32)).to(device)  # copied off a memmap


@torch.no_grad()
def encode(sae, acts: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Feature activations [N, d_sae] of acts [N, d_in], encoded chunk by chunk on the SAE's device.
    Dense: for small sets (mining streams instead, see exemplars.mine_exemplars)."""
    if not len(acts):
        return np.zeros((0, sae.cfg.d_sae), np.float32)
    encode_rows = encoder(sae)
    return torch.cat([encode_rows(rows).cpu() for rows in _row_chunks(acts, chunk, sae.W_dec.device)]).numpy()


@torch.no_grad()
def sae_metrics(sae, acts: np.ndarray, chunk: int = 4096) -> dict:
    """L0 (mean active features per token), explained variance and the fraction of features that never
    fire, on acts [N, d_in]; streamed in chunks (no [N, d_sae] codes)."""
    device = sae.W_dec.device
    encode_rows = encoder(sae)
    mean = torch.zeros(acts.shape[1], dtype=torch.float64, device=device)
    for rows in _row_chunks(acts, chunk, device):
        mean += rows.double().sum(0)
    mean /= max(len(acts), 1)
    active = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    l0 = residual = total = 0.0
    for rows in _row_chunks(acts, chunk, device):
        features = encode_rows(rows)
        recon = sae.decode(features.to(sae.W_dec.dtype)).float()
        residual += float(((rows - recon) ** 2).double().sum())
        total += float(((rows.double() - mean) ** 2).sum())
        l0 += float((features > 0).sum())
        active += (features > 0).sum(0)
    return {"l0": l0 / max(len(acts), 1),
            "explained_variance": 1 - residual / total if total else 0.0,
            "dead_fraction": float((active == 0).float().mean()),
            "d_sae": int(sae.cfg.d_sae), "tokens": len(acts)}


def decoder_directions(sae) -> np.ndarray:
    """Each feature's decoder direction, unit norm: [d_sae, d_in] (the vectors the explainer reads)."""
    w = sae.W_dec.detach().float()
    return (w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)).cpu().numpy()


def save_sae(sae, folder: Path) -> None:
    """sae-lens's inference format (weights + cfg.json), loadable by load_sae: a training SAE converts
    itself; a loaded (pretrained, inference) one is already in it."""
    folder.mkdir(parents=True, exist_ok=True)
    save = getattr(sae, "save_inference_model", None) or sae.save_model
    save(str(folder))


_RELEASE = re.compile(r"^release:([^:]+):(.+)$")


def load_sae(source: str, layer: int, device: Optional[str] = None):
    """The SAE of one layer from a folder or a sae-lens release (see SAEConfig.pretrained), on `device`
    (default: a GPU where one is visible)."""
    from sae_lens import SAE

    device = device or default_device()
    source = source.replace("{layer}", str(layer))
    match = _RELEASE.match(source)
    if match:
        return SAE.from_pretrained(match.group(1), match.group(2), device=device)
    if not (Path(source) / "cfg.json").is_file():
        raise DataSourceError(f"no sae-lens SAE in {source} (expected cfg.json there, written by save_inference_model)")
    return SAE.load_from_disk(source, device=device)

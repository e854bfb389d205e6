"""What a training job is: its settings (TrainConfig), the job itself (TrainJob: model, data, output
folder), the dtype rule they must satisfy, and the DeepSpeed config they stand for."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

from selfexplain.groundtruth.generation import PromptFormat
from selfexplain.groundtruth.layout import CHECKPOINTS, EXPORT, PROJECTION_INIT, STOP, TRAIN_LOG
from selfexplain.groundtruth.models import ModelSpec
from selfexplain.groundtruth.records import iter_records

from .controls import TRAINED_CONTROLS
from .projection import ProjectionConfig
from .lora import LoraConfig


@dataclass
class TrainConfig:
    """Explainer fine-tuning (defaults: the paper's constant LR 5e-5, weight decay 0.01)."""

    micro_batch_size: int = 4
    """Examples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    epochs: int = 1
    """Passes over the train split (ignored when max_steps is set)."""
    max_steps: Optional[int] = None
    """Optimizer steps in all; null: epochs x steps per epoch."""
    max_steps_by_task: dict[str, int] = field(default_factory=dict)
    """Optimizer steps for the named tasks' jobs (the others: max_steps), e.g. {activation_patching: 120}."""
    lr: float = 5e-5
    """Constant learning rate (the paper's; 1e-5 it used later for input ablation on 8B models)."""
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    """Gradient norm clip; 0 disables."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """ZeRO-offload of optimizer state to CPU (stage 1-3)."""
    bucket_size: int = 50_000_000
    """ZeRO reduce/allgather bucket size in elements. DeepSpeed's default (5e8 = 2 GB of fp32 per
    bucket) made a 135M model's step 1.6x slower than plain AdamW on CPU; 5e7 removes most of that."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 halves memory on GPUs; on these CPUs it was measured about 2x slower than fp32."""
    checkpoint_every: int = 50
    """Save a resumable DeepSpeed checkpoint every this many optimizer steps."""
    keep_checkpoints: int = 1
    """Older checkpoints than the newest this many are deleted (each holds optimizer state: ~16 bytes
    per parameter in fp32, 2 GB for SmolLM2)."""
    keep_checkpoints_after_export: bool = False
    """Keep DeepSpeed checkpoints once the final export is written (a finished export is never resumed)."""
    length_window: int = 16
    """Micro-batches whose examples are sorted by length together, so a batch pads to similar lengths
    (training/batches.py micro_batch_order); 1: plain random batches."""
    log_every: int = 5
    """Log loss every this many optimizer steps."""
    prompt_format: PromptFormat = "auto"
    """How the explainer sees its prompt: chat template, plain text, auto (chat if available)."""
    max_seq_len: int = 512
    """Tokens per example; longer prompts lose their start."""
    restrict_lm_head: bool = True
    """Compute the LM head only where a loss is taken (explanation tokens)."""
    num_workers: int = 1
    """Training ranks (Ray Train workers)."""
    worker_cpus: float = 1.0
    """CPUs reserved per worker; torch threads per worker follow from it."""
    concurrent_groups: int = 1
    """Ray Train worker groups training at once, each taking its share of the jobs in turn (a group:
    num_workers x worker_cpus). On a small machine two 1-CPU groups beat one 2-CPU group: a job's loading,
    tokenizer and export run on one core, and small batches use a second thread poorly."""
    use_gpu: bool = False
    """One GPU per worker (clusters)."""
    backend: Optional[str] = None
    """torch.distributed backend of the Ray Train group; null: nccl with GPUs, gloo without (gloo also
    runs the logical GPUs of a simulated cluster)."""
    use_ray: bool = True
    """Run through Ray Train; false runs the same loop in this process (world size 1)."""
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    """Pi from the target's hidden size to the explainer's, for tasks whose records carry vectors."""
    train_embeddings: bool = True
    """Train the input embedding matrix (and an LM head tied to it). Off, Gemma-3-270M trains 38% of
    its weights: its 262k x 640 embedding is the rest, and its AdamW update dominates a CPU step."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input for backward and recompute the rest (one more forward per
    step, about a third more FLOPs): activations shrink from ~34 x seq x batch x hidden bytes per layer
    (bf16) to ~2 x, which a 70B explainer's long prompts need (the dry run prints both)."""
    lora: Optional[LoraConfig] = None
    """Low-rank adapters instead of a full fine-tune (the paper: r=128 for activation patching);
    null: every weight is trained. Exports keep the adapters only (merged when loaded)."""

    RESOURCES = ("use_ray", "num_workers", "worker_cpus", "concurrent_groups")
    """Where and how many at once: no part of what an explainer learns (nor of its export's identity)."""

    def for_task(self, task: str) -> "TrainConfig":
        """The settings one task's jobs train with (another task's step count is no part of them)."""
        steps = self.max_steps_by_task.get(task, self.max_steps)
        return replace(self, max_steps=steps, max_steps_by_task={})

    def check(self) -> None:
        if any(steps < 1 for steps in self.max_steps_by_task.values()):
            raise ValueError(f"max_steps_by_task: every count must be at least 1, got {self.max_steps_by_task}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3")
        for name in ("micro_batch_size", "grad_accum", "epochs", "checkpoint_every", "num_workers", "log_every",
                     "length_window", "concurrent_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")


def precision_conflict(dtype: str, precision: str) -> Optional[str]:
    """Why an explainer loaded as `dtype` cannot train in `precision`, or None. bf16 training keeps fp32
    master weights (DeepSpeed casts the model to bf16 and the optimizer holds fp32 copies); fp32 training
    of 16-bit weights would update them in place, losing every step smaller than their rounding."""
    if precision == "fp32" and dtype != "float32":
        return (f"{dtype} weights with train.precision fp32 would be trained without fp32 master weights; "
                f"set train.precision: bf16 (fp32 master weights, bf16 compute) or the model's dtype: float32")
    if precision == "bf16" and dtype == "float16":
        return "float16 weights with train.precision bf16: load the model as bfloat16 or float32"
    return None


@dataclass
class WandbRun:
    """Where a job's W&B run goes: the pipeline's project, entity and mode, and its group."""

    project: str
    entity: Optional[str]
    mode: str  # offline | online
    group: str  # the pipeline run's group: the W&B UI shows a run's jobs together
    dir: str  # the run folder (its wandb/ holds the offline runs)


@dataclass
class TrainJob:
    """One explainer to fine-tune on one target's records: all a rank needs to know."""

    task: str
    target: str
    explainer: str
    explainer_spec: ModelSpec
    data_dir: str  # the train split folder (shards + manifest)
    out_dir: str  # checkpoints/ and export/ go here
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    target_spec: Optional[ModelSpec] = None  # the target, for fitting an lstsq projection
    max_records_per_layer: Optional[int] = None  # train on the first n records of each layer (data-efficiency curve)
    control: Optional[str] = None  # a trained control (training/controls.py): its records are rewritten
    wandb: Optional[WandbRun] = None  # where rank 0 logs live curves (none: train_log.jsonl only)

    def records(self) -> list:
        """The job's train records: all of data_dir, or the first max_records_per_layer of each layer
        (the split is shuffled within each layer, so these are nested random subsets); a control job's
        as its control rewrites them."""
        records = list(iter_records(Path(self.data_dir)))
        if self.control is not None:
            records = TRAINED_CONTROLS[self.control].rewrite(records)
        if self.max_records_per_layer is None:
            return records
        taken: Counter = Counter()
        subset = []
        for r in records:
            layer = tuple(r.layers or ())
            taken[layer] += 1
            if taken[layer] <= self.max_records_per_layer:
                subset.append(r)
        return subset

    def records_per_layer(self) -> int:
        """Train records of the most populated layer (what the data-efficiency curve plots against)."""
        return max(Counter(tuple(r.layers or ()) for r in self.records()).values(), default=0)

    @property
    def projection_init_path(self) -> Path:
        """Where the projection an explainer starts from is kept (fitted once, reused by eval)."""
        return Path(self.out_dir) / PROJECTION_INIT

    @property
    def export_dir(self) -> Path:
        return Path(self.out_dir) / EXPORT

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / CHECKPOINTS

    @property
    def train_log(self) -> Path:
        return Path(self.out_dir) / TRAIN_LOG

    @property
    def stop_file(self) -> Path:
        """Written by a driver on SIGTERM: the ranks checkpoint and stop (see training/preemption.py)."""
        return Path(self.out_dir) / STOP

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainJob":
        raw = json.loads(text)
        raw["explainer_spec"] = ModelSpec(**raw["explainer_spec"])
        raw["target_spec"] = ModelSpec(**raw["target_spec"]) if raw.get("target_spec") else None
        raw["wandb"] = WandbRun(**raw["wandb"]) if raw.get("wandb") else None
        train = raw["train"]
        raw["train"] = TrainConfig(**{**train, "projection": ProjectionConfig(**train["projection"]),
                                      "lora": LoraConfig(**train["lora"]) if train.get("lora") else None})
        return cls(**raw)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config a TrainConfig stands for (also printed by --dry-run)."""
    zero: dict = {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.bucket_size,
                  "allgather_bucket_size": cfg.bucket_size}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers full weights
        zero["stage3_prefetch_bucket_size"] = cfg.bucket_size
        del zero["allgather_bucket_size"]  # not a stage-3 setting
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        # torch_adam: torch's AdamW instead of DeepSpeed's compiled op (no build on CPU machines); fused: one
        # pass over ZeRO's flat partition per step (unfused, each of Adam's ~8 elementwise ops streamed the
        # whole 400 MB partition through memory: 0.47 s of a 4 s SmolLM2 step on 2 cores)
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True,
                                                  "fused": True}},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own logging, rank 0 only
        "wall_clock_breakdown": False,
    }

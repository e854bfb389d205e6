"""Scale on paper: what each stage of a config needs on a GPU cluster, without loading a model.

For every stage the plan gives GPUs, units of work, the memory per training rank under each ZeRO stage,
FLOPs and GPU-hours. Model shapes come from config.json (a local folder, or the shapes of the paper's
hub models below); FLOPs from the standard counts (forward 2 x params per token, training 6 x params per
token, LoRA ~4 x: no weight gradients for the frozen matrices); GPU-hours = FLOPs / (peak x utilisation).
The utilisations are assumptions stated in the plan (`ScalePlanConfig`), checked against throughput this
code measures on the CPU quickstart (docs/SCALING.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from selfexplain.eval.rows import applicable_controls, control_placeholders, plan_rows
from selfexplain.groundtruth.models import ModelSpec
from selfexplain.groundtruth.tasks import TASKS


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes (enough for parameter, memory and FLOP counts)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def params(self) -> int:
        kv = self.hidden * self.kv_heads // self.heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn + 2 * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int, modules: tuple[str, ...]) -> int:
        """Trainable parameters of rank-r adapters on the named projections of every layer."""
        kv = self.hidden * self.kv_heads // self.heads
        dims = {"q_proj": (self.hidden, self.hidden), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (self.hidden, self.hidden), "gate_proj": (self.hidden, self.ffn),
                "up_proj": (self.hidden, self.ffn), "down_proj": (self.ffn, self.hidden)}
        return self.layers * sum(r * (dims[m][0] + dims[m][1]) for m in modules if m in dims)


# config.json sizes of the paper's models (published model cards), so a dry run needs no download.
KNOWN_SHAPES = {
    "meta-llama/Llama-3.1-8B": Shape(32, 4096, 14336, 32, 8, 128256),
    "meta-llama/Llama-3.1-8B-Instruct": Shape(32, 4096, 14336, 32, 8, 128256),
    "Qwen/Qwen3-8B": Shape(36, 4096, 12288, 32, 8, 151936),
    "meta-llama/Llama-3.1-70B-Instruct": Shape(80, 8192, 28672, 64, 8, 128256),
    "meta-llama/Llama-3.3-70B-Instruct": Shape(80, 8192, 28672, 64, 8, 128256),
}


def shape_of(spec: ModelSpec) -> Optional[Shape]:
    """The shape of a hub model we know or of a local folder's config.json; None otherwise."""
    if spec.source in KNOWN_SHAPES:
        return KNOWN_SHAPES[spec.source]
    config = Path(spec.source) / "config.json"
    if config.exists():
        c = json.loads(config.read_text())
        c = c.get("text_config", c)
        return Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                     c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"],
                     bool(c.get("tie_word_embeddings", False)))
    return None


@dataclass
class ScalePlanConfig:
    """Assumptions of the dry-run's GPU estimates (the hardware and how well each stage uses it). Measure
    your own: a short run's train_log.jsonl gives seconds per step; utilisation = 6 x params x tokens per
    second / peak."""

    gpu_peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989; A100: 312)."""
    gpu_memory_gb: float = 80.0
    train_utilisation: float = 0.35
    """Model FLOPs utilisation of training (ZeRO-3 on 8 GPUs: 0.3-0.45 is typical)."""
    inference_utilisation: float = 0.10
    """Of batched greedy generation and patching sweeps (memory-bound decoding)."""
    node_memory_gb: float = 256.0
    """Host memory of a node (what ground-truth actors, Ray tasks and the driver share)."""


def memory_per_rank_gb(params: int, trainable: int, ranks: int, stage: int, bf16: bool) -> float:
    """Model, gradient and optimizer state per rank (no activations). Mixed precision keeps bf16 weights
    and grads plus an fp32 master copy and Adam's two moments (16 bytes per trainable parameter); fp32
    keeps 4 + 4 + 8. Frozen weights (LoRA) cost their 2 or 4 bytes and are partitioned only by ZeRO-3."""
    w = 2 if bf16 else 4
    frozen = (params - trainable) * w
    weights, grads, optim = trainable * w, trainable * w, trainable * (12 if bf16 else 8)
    if stage == 0:
        total = frozen + weights + grads + optim
    elif stage == 1:
        total = frozen + weights + grads + optim / ranks
    elif stage == 2:
        total = frozen + weights + (grads + optim) / ranks
    else:
        total = (frozen + weights + grads + optim) / ranks
    return total / 1e9


def activation_gb(shape: Shape, seq_len: int, micro_batch: int, bf16: bool, checkpointing: bool = False) -> float:
    """Activations kept for backward, flash attention (Korthikanti et al. 2022: 34 x s x b x h bytes per
    layer in 16-bit). With gradient checkpointing each layer keeps only its input (2 x s x b x h) and one
    layer's full set lives at a time, while it is recomputed."""
    per_layer = 34 * seq_len * micro_batch * shape.hidden
    kept = (2 * seq_len * micro_batch * shape.hidden * shape.layers + per_layer) if checkpointing else per_layer * shape.layers
    return kept * (1 if bf16 else 2) / 1e9


def gpu_hours(flops: float, plan: ScalePlanConfig, training: bool) -> float:
    rate = plan.gpu_peak_tflops * 1e12 * (plan.train_utilisation if training else plan.inference_utilisation)
    return flops / rate / 3600


def _items(cfg, spec, task_cfg) -> int:
    """Work items per target: counted by the task's recipe, or (a source not on this machine) the paper's."""
    try:
        return spec.recipe.count_items(task_cfg, cfg.seed)
    except (FileNotFoundError, ValueError):
        return spec.work.paper_items


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:,.1f} GB"


def memory_lines(cfg, task: str, plan_of_task: Callable, t: Shape, dtype_bytes: int) -> list[str]:
    """A task's memory per step on one target (its TaskWork.memory), each checked against
    scale.gpu_memory_gb and scale.node_memory_gb."""
    plan = cfg.scale
    memory = plan_of_task(cfg.tasks[task], t, dtype_bytes, cfg.groundtruth.batch_size)
    lines = [f"  memory per stage, {task} ({memory.summary}; "
             f"{plan.gpu_memory_gb:g} GB GPUs, {plan.node_memory_gb:g} GB nodes):"]
    for name, gpu, host in memory.steps:
        fits = gpu <= plan.gpu_memory_gb * 1e9 and host <= plan.node_memory_gb * 1e9
        lines.append(f"    {name}: GPU {_gb(gpu)}, host {_gb(host)}: {'fits' if fits else 'does NOT fit'}")
    return lines + [f"    disk: {memory.disk}"]


def _train_line(cfg, task: str, work, e: Shape, explainer: str, target: str, records: int, jobs: int) -> tuple[float, str]:
    """GPU-hours and the dry-run line of one explainer's training on one target (with its trained controls)."""
    plan, tc = cfg.scale, cfg.train
    bf16 = tc.precision == "bf16"
    trainable = e.lora_params(tc.lora.r, tuple(tc.lora.target_modules)) if tc.lora else e.params
    per_token = 4 * e.params + 2 * trainable if tc.lora else 6 * e.params
    per_token += 2 * e.params if tc.gradient_checkpointing else 0  # the recomputing forward
    epochs = tc.epochs if tc.max_steps is None else 1
    flops = per_token * work.explainer_tokens * records * epochs * jobs
    hours = gpu_hours(flops, plan, training=True)
    memory = ", ".join(f"ZeRO-{z} {memory_per_rank_gb(e.params, trainable, tc.num_workers, z, bf16):.1f}" for z in range(4))
    seq = min(tc.max_seq_len, work.explainer_tokens)
    act, other = (activation_gb(e, seq, tc.micro_batch_size, bf16, on)
                  for on in (tc.gradient_checkpointing, not tc.gradient_checkpointing))
    fits = memory_per_rank_gb(e.params, trainable, tc.num_workers, tc.zero_stage, bf16) + act <= plan.gpu_memory_gb
    return hours, (f"  train {task}: {explainer} on {target}{f' (+{jobs - 1} controls)' if jobs > 1 else ''}: "
                   f"~{records:,} records, "
                   f"{'LoRA ' + format(trainable / 1e6, '.0f') + 'M' if tc.lora else 'full'} trainable; "
                   f"{flops:.2e} FLOPs, {hours:,.1f} GPU-h on {tc.num_workers} GPUs; GB per rank "
                   f"(weights+grads+Adam) {memory}; activations {act:.1f} GB/micro-batch "
                   f"(gradient checkpointing {'on; off' if tc.gradient_checkpointing else 'off; on'}: {other:.1f} GB); "
                   f"ZeRO-{tc.zero_stage} {'fits' if fits else 'does NOT fit'} in {plan.gpu_memory_gb:g} GB")


def scale_plan(cfg) -> list[str]:
    """Dry-run lines: per target / explainer and stage, GPUs, FLOPs, GPU-hours and memory per rank."""
    plan = cfg.scale
    gp, ec = cfg.groundtruth, cfg.eval
    shapes = {name: shape_of(spec) for name, spec in cfg.models.items()}
    unknown = [cfg.models[n].source for n, s in shapes.items() if s is None]
    lines = [f"scale (assumes {plan.gpu_peak_tflops:g} TFLOP/s bf16 GPUs of {plan.gpu_memory_gb:g} GB, utilisation "
             f"{plan.train_utilisation:g} training / {plan.inference_utilisation:g} inference):"]
    if unknown:
        return lines + [f"  shapes unknown for {', '.join(unknown)}: give a local folder with config.json, "
                        "or add them to distributed/scaling.py KNOWN_SHAPES"]
    total = 0.0
    for name, s in shapes.items():
        lines.append(f"  {name}: {s.params / 1e9:.2f}B parameters ({s.layers} layers, d={s.hidden})")
    for task, task_cfg in cfg.tasks.items():
        spec = TASKS[task]
        work = spec.work
        items = _items(cfg, spec, task_cfg)
        records, test = work.records(task_cfg, items)
        for target in cfg.targets:
            t = shapes[target]
            gt_flops = 2 * t.params * work.target_tokens * work.passes(task_cfg) * items
            hours = gpu_hours(gt_flops, plan, training=False)
            total += hours
            per_shard = work.items_per_shard(task_cfg) if work.items_per_shard else gp.items_per_shard
            lines.append(f"  groundtruth {task} on {target}: {items:,} items -> {-(-items // per_shard)} shards; "
                         f"{gt_flops:.2e} FLOPs, {hours:,.1f} GPU-h on {gp.actors} x {gp.actor_gpus:g} GPU actors")
            if work.memory is not None:
                lines += memory_lines(cfg, task, work.memory, t, 2 if cfg.models[target].dtype != "float32" else 4)
            for explainer in cfg.explainers:
                e = shapes[explainer]
                controlled = explainer == target or ec.trained_controls_for == "all"
                jobs = 1 + (len(applicable_controls(spec, ec)) if controlled else 0)  # with its trained controls
                hours, line = _train_line(cfg, task, work, e, explainer, target, records, jobs)
                total += hours
                lines.append(line)
                rows = sum(len(ec.selfie_scales) if r.kind.scaled else 1  # generations per test record
                           for r in plan_rows(spec, "test", ec, explainer, None, controls=control_placeholders(spec, ec) if controlled else []))
                eval_flops = 2 * e.params * (work.explainer_tokens + (ec.max_new_tokens or 50)) * test * rows
                hours = gpu_hours(eval_flops, plan, training=False)
                total += hours
                lines.append(f"  eval {task}: {explainer} on {target}: ~{test:,} test records x {rows} rows, "
                             f"{hours:,.1f} GPU-h")
    lines.append(f"  total: {total:,.0f} GPU-hours")
    return lines

"""Explainer fine-tuning: a DeepSpeed engine over ExplainerLM, checkpoints every K steps, resume, export.

The loop knows nothing of Ray: `run_training(job, rank, world)` runs on every rank of an already
initialised process group (Ray Train sets one up; `python -m training.step JOB.json` under torchrun,
or alone as a single process, sets one up itself).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from groundtruth.generation import PromptFormat
from groundtruth.models import KEEP, ModelSpec, hidden_size, load_model
from groundtruth.records import iter_records

from . import checkpoints
from .batches import collate, encode_example
from .explainer import Projection, ProjectionConfig, add_vector_tokens, key_layers, vector_key
from .export import export_explainer
from .lora import LoraConfig, apply_lora
from .loss import ExplainerLM
from .preemption import PreemptionWatch, TrainingPreempted, crash_if_injected
from .projection_fit import initial_projection


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
    lora: Optional[LoraConfig] = None
    """Low-rank adapters instead of a full fine-tune (the paper: r=128 for activation patching);
    null: every weight is trained. Exports merge the adapters into the weights."""

    def check(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3")
        for name in ("micro_batch_size", "grad_accum", "epochs", "checkpoint_every", "num_workers", "log_every"):
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

    def records(self) -> list:
        """The job's train records: all of data_dir, or the first max_records_per_layer of each layer
        (the split is shuffled within each layer, so these are nested random subsets)."""
        records = list(iter_records(Path(self.data_dir)))
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
        return Path(self.out_dir) / "projection_init.pt"

    @property
    def export_dir(self) -> Path:
        return Path(self.out_dir) / "export"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"

    @property
    def stop_file(self) -> Path:
        """Written by a driver on SIGTERM: the ranks checkpoint and stop (see training/preemption.py)."""
        return Path(self.out_dir) / "STOP"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainJob":
        raw = json.loads(text)
        raw["explainer_spec"] = ModelSpec(**raw["explainer_spec"])
        raw["target_spec"] = ModelSpec(**raw["target_spec"]) if raw.get("target_spec") else None
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
        # torch_adam: torch's AdamW instead of DeepSpeed's compiled op (no build on CPU machines)
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own logging, rank 0 only
        "wall_clock_breakdown": False,
    }


def micro_batch_order(n_examples: int, rank: int, world: int, micro: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches (example indices) for one epoch.

    One seeded permutation per epoch, dealt round-robin to ranks and cut to the same length on every
    rank, so every rank takes the same number of steps (a rank that ran out would hang the others).
    """
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_rank = n_examples // world
    mine = order[rank::world][:per_rank]
    return [mine[i:i + micro] for i in range(0, per_rank - micro + 1, micro)]


def rank_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK where GPUs are visible (torchrun and Ray Train both set
    LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group_if_needed() -> tuple[int, int]:
    """(rank, world) of the current process group, creating a gloo/nccl group from env if none. The
    rank's GPU becomes the current device first: NCCL collectives and broadcast_object_list use it."""
    import deepspeed
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")
    if torch.cuda.is_available():
        torch.cuda.set_device(rank_device())
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size()


def on_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on the engine's device (DeepSpeed moves the model, not the
    batch); lists such as vector_keys stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_training(job: TrainJob, report: Optional[Callable[[dict], None]] = None) -> dict:
    """Fine-tune job.explainer_spec on job.data_dir; resume from the newest checkpoint; export at the end.

    Returns a summary (steps, final loss, seconds). Every rank must call it; rank 0 writes the logs and
    the export. SIGTERM (preemption) writes a checkpoint at the current step and raises TrainingPreempted.
    """
    with PreemptionWatch(job.stop_file) as watch:
        return _train(job, report, watch)


def _universal_tag(folder: Path, point: checkpoints.ResumePoint, rank: int, world: int) -> str:
    """Rank 0 converts the checkpoint to a universal one; every rank gets its tag, or the error."""
    import torch.distributed as dist

    outcome: list = [None]
    if rank == 0:
        try:
            outcome = [checkpoints.to_universal(folder, point, world)]
        except checkpoints.ResumeError as err:
            outcome = [err]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def _train(job: TrainJob, report: Optional[Callable[[dict], None]], watch: PreemptionWatch) -> dict:
    import deepspeed
    import torch.distributed as dist

    cfg = job.train
    conflict = precision_conflict(job.explainer_spec.dtype, cfg.precision)
    if conflict:
        raise ValueError(f"{job.explainer}: {conflict}")
    skip_inference_allreduce_op()
    rank, world = init_process_group_if_needed()
    torch.manual_seed(job.seed)
    ds_config = deepspeed_config(cfg, world)
    device = rank_device()
    records = job.records()
    # Pi first: an lstsq fit loads both models plainly, which it could not once zero.Init is active
    projection = (job_projection(job, records, hidden_size(job.explainer_spec), str(device))
                  if any(r.vector is not None for r in records) else None)
    keep_alive = None
    if cfg.zero_stage == 3:  # from_pretrained then builds the model partitioned (zero.Init)
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (must outlive model construction)
    # ZeRO 0-2: straight onto the rank's GPU (no full host copy per rank); ZeRO-3: where zero.Init put it
    model, tokenizer = load_model(job.explainer_spec, KEEP if cfg.zero_stage == 3 else str(device))
    model.train()
    wrapper_args: dict = {}
    if projection is not None:
        wrapper_args = {"vec_id": add_vector_tokens(model, tokenizer).vec, "projection": projection}
    if cfg.lora is not None:
        adapted = apply_lora(model, cfg.lora)
        if rank == 0:
            print(f"[train {job.explainer}<-{job.target}] LoRA r={cfg.lora.r} on {adapted} linear layers", flush=True)
    model.get_input_embeddings().weight.requires_grad_(cfg.train_embeddings)
    examples = [encode_example(tokenizer, r, cfg.prompt_format, cfg.max_seq_len) for r in records]
    per_epoch = len(micro_batch_order(len(examples), rank, world, cfg.micro_batch_size, job.seed, 0))
    steps_per_epoch = per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"{job.data_dir}: {len(examples)} train records are too few for {world} ranks x micro batch "
            f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum}"
        )
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs

    wrapper = ExplainerLM(model, restrict_head=cfg.restrict_lm_head, **wrapper_args)
    ckpt_dir = job.checkpoint_dir
    point = checkpoints.resume_point(ckpt_dir, world, cfg.zero_stage)
    if point is not None and point.universal:
        ds_config = checkpoints.universal_config(ds_config)
    engine, *_ = deepspeed.initialize(
        model=wrapper, model_parameters=[p for p in wrapper.parameters() if p.requires_grad], config=ds_config
    )
    step = 0
    if point is not None:
        tag = _universal_tag(ckpt_dir, point, rank, world) if point.universal else point.tag
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        step = int(client["step"]) if client else 0
        if rank == 0:
            how = f" (a {point.tag} of another world size, as a universal checkpoint)" if point.universal else ""
            print(f"[train {job.explainer}<-{job.target}] resumed at step {step}/{total_steps}{how}", flush=True)
    log_path = Path(job.out_dir) / "train_log.jsonl"
    if rank == 0:
        _truncate_log(log_path, step)  # entries past the resumed step belong to a run that was lost
    started, last_loss = time.time(), float("nan")
    order_epoch, order = -1, []
    while step < total_steps:
        losses = []
        for micro_index in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
            epoch, within = divmod(micro_index, per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not one per micro-batch
                order_epoch = epoch
                order = micro_batch_order(len(examples), rank, world, cfg.micro_batch_size, job.seed, epoch)
            rows = order[within]
            batch = on_device(collate([examples[i] for i in rows], tokenizer.pad_token_id), engine.device)
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        step += 1
        last_loss = sum(losses) / len(losses)
        if step % cfg.log_every == 0 or step == total_steps:
            mean = torch.tensor([last_loss], device=engine.device)  # NCCL reduces device tensors only
            dist.all_reduce(mean)
            entry = {"step": step, "loss": mean.item() / world, "seconds": round(time.time() - started, 2)}
            if rank == 0:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                print(f"[train {job.explainer}<-{job.target}] step {step}/{total_steps} loss {entry['loss']:.4f}", flush=True)
            if report is not None:
                report(entry)
        # The last step is exported instead; its checkpoint is only worth writing if kept afterwards.
        final_kept = step == total_steps and cfg.keep_checkpoints_after_export
        saved = (step % cfg.checkpoint_every == 0 and step < total_steps) or final_kept
        if saved:
            checkpoints.save(engine, ckpt_dir, step, world, rank, cfg.keep_checkpoints)
        if watch.any_rank_signalled(world, engine.device):
            if not saved:
                checkpoints.save(engine, ckpt_dir, step, world, rank, cfg.keep_checkpoints)
            if rank == 0:
                print(f"[train {job.explainer}<-{job.target}] SIGTERM: checkpoint at step {step} written, exiting", flush=True)
            raise TrainingPreempted(step)
        crash_if_injected(rank, step)
    export_explainer(engine, wrapper, tokenizer, job, rank, steps=step)
    dist.barrier()
    # Without destroy() the engine outlives this function: DeepSpeed keeps hooks on it and turns Python's
    # cyclic GC off while any engine is live, so a process training job after job (a Ray Train group, the
    # in-process path) kept every model and optimizer state and was OOM-killed at the tenth job.
    engine.destroy()
    if rank == 0 and not cfg.keep_checkpoints_after_export:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return {"steps": step, "loss": last_loss, "seconds": time.time() - started, "world": world}


def skip_inference_allreduce_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory allreduce op on first use (~70 s) and maps a 69 MB
    /dev/shm buffer per rank that it never unlinks (15 GB had piled up on this machine, then an OOM kill).
    Only its tensor-parallel inference allreduce uses them; training's collectives go through
    torch.distributed. Marked incompatible before DeepSpeed's comm backend starts, the op is never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def vector_keys(records: list) -> list[str]:
    """The target layers (as vector keys) the records' vectors come from."""
    return sorted({vector_key(r.layers) for r in records if r.vector is not None}, key=lambda k: key_layers(k)[0])


def job_projection(job: TrainJob, records: list, d_explainer: int, device: Optional[str] = None):
    """The projection a job's explainer starts from, for the vector keys and size its records have (an
    lstsq fit, if it must happen here, runs its models on `device`)."""
    d_target = next(r.vector.shape[0] for r in records if r.vector is not None)
    kind = job.train.projection.kind_for(job.explainer, job.target)
    return initial_projection(job.projection_init_path, kind, vector_keys(records), d_target, d_explainer,
                              job.target_spec, job.explainer_spec, job.train.projection, job.seed, device)


def fit_for_job(job: TrainJob, keys: list[str], device: Optional[str] = None) -> Projection:
    """The lstsq Pi of a job's (explainer, target) pair over `keys`, its models on `device`."""
    from .projection_fit import fit_projection

    return fit_projection(keys, job.target_spec, job.explainer_spec, job.train.projection, job.seed,
                          job.train.projection.is_trainable("lstsq"), device)


def prefit_projections(jobs: list[TrainJob], fit: Callable[[TrainJob, list[str]], Projection] = fit_for_job) -> None:
    """Fit the lstsq projections of jobs before their ranks start (they then load them instead of each
    fitting). Jobs of one (explainer, target) pair share one fit over the union of their keys (both
    models run over the fit passages once for every task), saved per job as its keys' subset. `fit`
    runs one fit (distributed/ makes it a Ray task holding a GPU)."""
    from .projection_fit import save_projection

    groups: dict[str, list[tuple[TrainJob, list[str]]]] = {}
    for job in jobs:
        if job.train.projection.kind_for(job.explainer, job.target) != "lstsq" or job.target_spec is None:
            continue
        records = list(iter_records(Path(job.data_dir)))
        if not any(r.vector is not None for r in records):
            continue
        keys = vector_keys(records)
        if job.projection_init_path.exists() and Projection.load(job.projection_init_path).keys == keys:
            continue
        pair = json.dumps([asdict(job.explainer_spec), asdict(job.target_spec), asdict(job.train.projection), job.seed],
                          sort_keys=True)
        groups.setdefault(pair, []).append((job, keys))
    for members in groups.values():
        job = members[0][0]
        union = sorted({k for _, keys in members for k in keys}, key=lambda k: [int(x) for x in k.split("-")])
        shared = fit(job, union)
        for member, keys in members:
            save_projection(shared.subset(keys), member.projection_init_path)


def _truncate_log(path: Path, last_step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m training.step JOB.json`: one rank of a job, e.g. under torchrun (no Ray)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m training.step JOB.json   (run under torchrun for several ranks)")
    job = TrainJob.from_json(Path(argv[0]).read_text())
    job.stop_file.unlink(missing_ok=True)  # left by a preempted Ray run; every rank clears it before the rendezvous
    summary = run_training(job)
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""The training loop: a DeepSpeed engine over ExplainerLM, checkpoints every K steps, resume, export.
What a job is lives in training/job.py; how its explainer reads vectors in training/vectors.py.

The loop knows nothing of Ray: `run_training(job)` runs on every rank of an already initialised
process group (Ray Train sets one up and says which device is the rank's; `python -m selfexplain.training.step
JOB.json` under torchrun, or alone as a single process, sets one up itself).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from selfexplain.groundtruth.dataset import DegenerateSetError
from selfexplain.groundtruth.errors import ConfigError
from selfexplain.groundtruth.models import KEEP, hidden_size, load_model

from . import checkpoints
from .allocator import tune_this_process
from .batches import collate, encode_example, micro_batch_order
from .explainer import add_vector_tokens
from .export import export_explainer
from .job import TrainJob, deepspeed_config, precision_conflict
from .live_log import JobCurves, memory_gb
from .lora import adapted_layers, apply_lora
from .loss import ExplainerLM
from .preemption import PreemptionWatch, TrainingPreempted, crash_if_injected
from .vectors import job_projection, match_injection_norm


def rank_device(given: Optional[torch.device] = None) -> torch.device:
    """This rank's device: the one its launcher gives (Ray Train's `ray.train.torch.get_device()`, which
    knows how it mapped GPUs to workers), else cuda:LOCAL_RANK where GPUs are visible (torchrun sets
    LOCAL_RANK), else the CPU. A GPU named where none is visible (a simulated cluster's logical GPUs) is
    not this rank's: it computes on the CPU."""
    if given is not None and (torch.device(given).type != "cuda" or torch.cuda.is_available()):
        return torch.device(given)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_process_group_if_needed(device: Optional[torch.device] = None) -> tuple[int, int]:
    """(rank, world) of the current process group, creating a gloo/nccl group from env if none. The
    rank's GPU (rank_device(device)) becomes the current device first: NCCL collectives and
    broadcast_object_list use it. DeepSpeed's own comm is set up over the group either way: where a
    launcher made the group (Ray Train), zero.Init would otherwise read a world size of 1 when a ZeRO-3
    model loads, and refuse the batch settings."""
    import deepspeed
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    backend = dist.get_backend() if dist.is_initialized() else ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # over an existing group: no new one
    return dist.get_rank(), dist.get_world_size()


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")
"""What a process group is found by: set in this process's environment by an in-process run above."""


def without_rendezvous(env: dict) -> dict:
    """An environment for a child process that makes its own process group: this one's rendezvous left
    out (its MASTER_PORT is taken by this process's store)."""
    return {k: v for k, v in env.items() if k not in RENDEZVOUS}


def on_device(batch: dict, device: torch.device) -> dict:
    """A collated batch with its tensors on the engine's device (DeepSpeed moves the model, not the
    batch); lists such as vector_keys stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_training(job: TrainJob, report: Optional[Callable[[dict], None]] = None,
                 device: Optional[torch.device] = None) -> dict:
    """Fine-tune job.explainer_spec on job.data_dir; resume from the newest checkpoint; export at the end.

    Returns a summary (steps, final loss, seconds). Every rank must call it; rank 0 writes the logs and
    the export. `device`: the rank's, where its launcher says (default: rank_device()). SIGTERM
    (preemption) writes a checkpoint at the current step and raises TrainingPreempted.
    """
    with PreemptionWatch(job.stop_file) as watch:
        return _train(job, report, watch, rank_device(device))


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


@dataclass
class Prepared:
    """A rank's explainer, ready to train: the DeepSpeed engine over it and the encoded examples."""

    engine: object
    wrapper: ExplainerLM
    tokenizer: object
    examples: list
    per_epoch: int  # micro-batches per epoch on this rank
    total_steps: int
    zero3_config: object = None  # HfDeepSpeedConfig under ZeRO-3: transformers reads it while it lives


def rank_projection(job: TrainJob, records: list, rank: int, device: torch.device):
    """The Pi this rank's explainer starts from. An lstsq Pi is fitted at most once per job: rank 0 loads
    it (`selfexplain jobs` and the Ray train stage fit it before the ranks start) or, where nobody did,
    fits and saves it, while the other ranks wait and then load it from the job's folder. Every rank
    fitting would load both models per rank: 8-16 copies of a 70B explainer on one GPU each."""
    import torch.distributed as dist

    fitted = job.train.projection.kind_for(job.explainer, job.target) == "lstsq"
    if fitted and rank != 0:
        dist.barrier()  # rank 0 has the fit saved
    projection = job_projection(job, records, hidden_size(job.explainer_spec), str(device))
    if fitted and rank == 0:
        dist.barrier()
    return projection


def _explainer(job: TrainJob, ds_config: dict, rank: int, device: torch.device) -> tuple[ExplainerLM, object, object]:
    """The explainer (with its [vec] tokens, Pi and LoRA adapters where configured) wrapped for the loss,
    its tokenizer, and under ZeRO-3 the HfDeepSpeedConfig that must outlive it."""
    cfg = job.train
    records = job.records()
    # Pi first: an lstsq fit loads both models plainly, which it could not once zero.Init is active
    projection = (rank_projection(job, records, rank, device) if any(r.vector is not None for r in records)
                  else None)
    keep_alive = None
    if cfg.zero_stage == 3:  # from_pretrained then builds the model partitioned (zero.Init)
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    # ZeRO 0-2: straight onto the rank's GPU (no full host copy per rank); ZeRO-3: where zero.Init put it
    model, tokenizer = load_model(job.explainer_spec, KEEP if cfg.zero_stage == 3 else str(device))
    model.train()
    wrapper_args: dict = {}
    if projection is not None:
        # Pi computes in the training precision at every ZeRO stage, as every other weight does (DeepSpeed
        # casts the module under ZeRO 0-2 but not what zero.Init did not build under ZeRO-3); where Pi
        # trains, the optimizer keeps its fp32 master copy. docs/GPU.md states the rule.
        match_injection_norm(projection, job, model).to(torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
        wrapper_args = {"vec_id": add_vector_tokens(model, tokenizer).vec, "projection": projection}
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora)
        if rank == 0:
            print(f"[train {job.explainer}<-{job.target}] LoRA r={cfg.lora.r} on {adapted_layers(model)} linear layers",
                  flush=True)
    model.get_input_embeddings().weight.requires_grad_(cfg.train_embeddings)
    if cfg.gradient_checkpointing:
        # non-reentrant: gradients reach adapters and Pi even where no input requires grad (frozen embeddings)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ExplainerLM(model, restrict_head=cfg.restrict_lm_head, **wrapper_args), tokenizer, keep_alive


def _prepare(job: TrainJob, rank: int, world: int, device: torch.device) -> tuple[Prepared, int]:
    """The rank's engine and examples, and the step to start from (resumed from the newest checkpoint,
    through a universal checkpoint when it was written by another number of ranks)."""
    cfg = job.train
    ds_config = deepspeed_config(cfg, world)
    wrapper, tokenizer, keep_alive = _explainer(job, ds_config, rank, device)
    examples = [encode_example(tokenizer, r, cfg.prompt_format, cfg.max_seq_len) for r in job.records()]
    per_epoch = len(micro_batch_order([len(e.ids) for e in examples], rank, world, cfg.micro_batch_size, job.seed, 0,
                                      cfg.length_window))
    steps_per_epoch = per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise DegenerateSetError(
            f"{job.data_dir}: {len(examples)} train records are too few for {world} ranks x micro batch "
            f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum}"
        )
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    point = checkpoints.resume_point(job.checkpoint_dir, world, cfg.zero_stage)
    if point is not None and point.universal:
        ds_config = checkpoints.universal_config(ds_config)
    engine = initialize_engine(wrapper, ds_config, world)
    step = 0
    if point is not None:
        tag = _universal_tag(job.checkpoint_dir, point, rank, world) if point.universal else point.tag
        _, client = engine.load_checkpoint(str(job.checkpoint_dir), tag=tag)
        step = int(client["step"]) if client else 0
        if rank == 0:
            how = f" (a {point.tag} of another world size, as a universal checkpoint)" if point.universal else ""
            print(f"[train {job.explainer}<-{job.target}] resumed at step {step}/{total_steps}{how}", flush=True)
    return Prepared(engine, wrapper, tokenizer, examples, per_epoch, total_steps, keep_alive), step


def initialize_engine(wrapper: torch.nn.Module, ds_config: dict, world: int):
    """The DeepSpeed engine training wrapper's trainable parameters. On one rank without ZeRO it skips
    the gradient all-reduce: there is nothing to reduce, yet DeepSpeed flattened every gradient into a
    fresh 430 MB buffer and copied it back each SmolLM2 step (in one profiled step: 0.09 s of 2.3 s in a
    plain process, 0.76 s of 3.7 s in a Ray Train worker, where the buffer's pages faulted in anew). With ZeRO the
    optimizer's own reduction also moves gradients into its partitions, so it stays."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=wrapper, model_parameters=[p for p in wrapper.parameters() if p.requires_grad], config=ds_config
    )
    if world == 1 and ds_config["zero_optimization"]["stage"] == 0:
        engine.enable_backward_allreduce = False
    return engine


def _optimizer_step(job: TrainJob, run: Prepared, step: int, rank: int, world: int, order_of) -> tuple[float, int]:
    """One optimizer step (grad_accum micro-batches); returns the mean micro-batch loss and the tokens read."""
    cfg, engine = job.train, run.engine
    losses, tokens = [], 0
    for micro_index in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        epoch, within = divmod(micro_index, run.per_epoch)
        rows = order_of(epoch)[within]
        batch = on_device(collate([run.examples[i] for i in rows], run.tokenizer.pad_token_id), engine.device)
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    return sum(losses) / len(losses), tokens


def _log(job: TrainJob, run: Prepared, step: int, loss: float, tokens: int, step_seconds: float, seconds: float,
         rank: int, world: int, curves: JobCurves, report: Optional[Callable[[dict], None]]) -> None:
    """Every step where the job has a W&B run: the ranks' mean loss and summed tokens to it (rank 0); every
    log_every steps and the last also to train_log.jsonl, the console and the launcher's report. Without a
    W&B run the other steps add no collective to the loop."""
    import torch.distributed as dist

    logged = step % job.train.log_every == 0 or step == run.total_steps
    if job.wandb is None and not logged:  # the same answer on every rank: the all-reduce stays collective
        return
    reduced = torch.tensor([loss, float(tokens)], device=run.engine.device)  # NCCL reduces device tensors only
    dist.all_reduce(reduced)
    mean_loss, all_tokens = reduced[0].item() / world, reduced[1].item()
    curves.log(step, {"loss": mean_loss, "lr": run.engine.get_lr()[0], "tokens_per_s": all_tokens / max(step_seconds, 1e-9),
                      "memory_gb": memory_gb(run.engine.device), "epoch": step * job.train.grad_accum / run.per_epoch})
    if not logged:
        return
    entry = {"step": step, "loss": mean_loss, "seconds": round(seconds, 2)}
    if rank == 0:
        with open(job.train_log, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        print(f"[train {job.explainer}<-{job.target}] step {step}/{run.total_steps} loss {entry['loss']:.4f}", flush=True)
    if report is not None:
        report(entry)


def _train(job: TrainJob, report: Optional[Callable[[dict], None]], watch: PreemptionWatch,
           device: torch.device) -> dict:
    import torch.distributed as dist

    cfg = job.train
    conflict = precision_conflict(job.explainer_spec.dtype, cfg.precision)
    if conflict:
        raise ConfigError(f"{job.explainer}: {conflict}")
    skip_inference_allreduce_op()
    rank, world = init_process_group_if_needed(device)
    torch.manual_seed(job.seed)
    run, step = _prepare(job, rank, world, device)
    if rank == 0:
        _truncate_log(job.train_log, step)  # entries past the resumed step were lost
    orders: dict[int, list] = {}  # one permutation per epoch, not one per micro-batch

    def order_of(epoch: int) -> list:
        if epoch not in orders:
            orders.clear()
            orders[epoch] = micro_batch_order([len(e.ids) for e in run.examples], rank, world, cfg.micro_batch_size,
                                              job.seed, epoch, cfg.length_window)
        return orders[epoch]

    started = time.time()
    curves = JobCurves(job, rank)
    try:
        step, last_loss = _steps(job, run, step, rank, world, order_of, watch, curves, report, started)
        export_explainer(run.engine, run.wrapper, run.tokenizer, job, rank, steps=step)
    finally:  # a preempted or failed job's curves end where it stopped
        curves.finish()
    dist.barrier()
    # Without destroy() the engine outlives this function: DeepSpeed keeps hooks on it and turns Python's
    # cyclic GC off while any engine is live, so a process training job after job (a Ray Train group, the
    # in-process path) kept every model and optimizer state and was OOM-killed at the tenth job.
    run.engine.destroy()
    if rank == 0 and not cfg.keep_checkpoints_after_export:
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return {"steps": step, "loss": last_loss, "seconds": time.time() - started, "world": world}


def _steps(job: TrainJob, run: Prepared, step: int, rank: int, world: int, order_of, watch: PreemptionWatch,
           curves: JobCurves, report: Optional[Callable[[dict], None]], started: float) -> tuple[int, float]:
    """Optimizer steps from `step` to the last, logging and checkpointing; returns the last step and loss."""
    cfg, last_loss = job.train, float("nan")
    while step < run.total_steps:
        step_started = time.time()
        last_loss, tokens = _optimizer_step(job, run, step, rank, world, order_of)
        step += 1
        _log(job, run, step, last_loss, tokens, time.time() - step_started, time.time() - started, rank, world, curves,
             report)
        # The last step is exported instead; its checkpoint is only worth writing if kept afterwards.
        final_kept = step == run.total_steps and cfg.keep_checkpoints_after_export
        saved = (step % cfg.checkpoint_every == 0 and step < run.total_steps) or final_kept
        if saved:
            checkpoints.save(run.engine, job.checkpoint_dir, step, world, rank, cfg.keep_checkpoints)
        if watch.any_rank_signalled(world, run.engine.device):
            if not saved:
                checkpoints.save(run.engine, job.checkpoint_dir, step, world, rank, cfg.keep_checkpoints)
            if rank == 0:
                print(f"[train {job.explainer}<-{job.target}] SIGTERM: checkpoint at step {step} written, exiting", flush=True)
            raise TrainingPreempted(step)
        crash_if_injected(rank, step)
    return step, last_loss


def skip_inference_allreduce_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory allreduce op on first use (~70 s) and maps a 69 MB
    /dev/shm buffer per rank that it never unlinks (15 GB had piled up on this machine, then an OOM kill).
    Only its tensor-parallel inference allreduce uses them; training's collectives go through
    torch.distributed. Marked incompatible before DeepSpeed's comm backend starts, the op is never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _truncate_log(path: Path, last_step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m selfexplain.training.step JOB.json`: one rank of a job, e.g. under torchrun (no Ray)."""
    tune_this_process()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m selfexplain.training.step JOB.json   (run under torchrun for several ranks)")
    job = TrainJob.from_json(Path(argv[0]).read_text())
    job.stop_file.unlink(missing_ok=True)  # left by a preempted Ray run; every rank clears it before the rendezvous
    summary = run_training(job)
    if summary and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

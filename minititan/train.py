"""The training loop: one function, `train(cfg)`, run identically by every rank.

A step: read the global batch for this step (a pure function of seed and step), take this
rank's rows, run forward + backward over its micro-batches (the loss of each is the summed token
cross-entropy divided by the global token count, so gradients just add up), finish the cross-rank
gradient sums, take an AdamW step on the gradients clipped by their global norm. Everything about
parallelism comes from the Layout (minititan/layout/); train_step shows where each of its
synchronisation points runs. Nothing reads a device value on the host except on logging steps and
saves: what the ranks must agree on every step (is the step finite, was a rank asked to stop)
rides in the gradient norm's all-reduce and reaches the host one step late (core/guard.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from minititan import resume
from minititan.collectives.comm_trace import CommTracer, group_names
from minititan.collectives.mesh import Mesh, init_distributed
from minititan.core import checkpoint as ckpt
from minititan.core import model
from minititan.core.config import AgreedError, Config, UserError, config_to_toml
from minititan.core.data import Batch, prefetcher, token_source
from minititan.core.determinism import make_deterministic
from minititan.core.guard import StepGuard, nonfinite_tensors
from minititan.core.memory import is_out_of_memory, memory_in_use
from minititan.core.metrics import MetricsLogger, Timer, peak_flops, say
from minititan.core.optim import AdamW, clip_coefficient, local_sq_norm, lr_at
from minititan.core.preemption import StopRequest
from minititan.core.profiling import StepProfiler
from minititan.core.validation import Validator
from minititan.data.loader import to_device
from minititan.layout import parallelize
from minititan.layout.contract import Layout
from minititan.layout.microbatches import forward_backward


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("training.device = cuda but no CUDA device is visible: use training.device = cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup(cfg: Config):
    """Device, process group, mesh and layout for this rank."""
    device = pick_device(cfg.training.device)
    rank, world = init_distributed(device.type, cfg.comm.timeout_s)
    if cfg.training.deterministic:
        make_deterministic(device, rank)  # before any CUDA work
    mesh = Mesh(parallelize.mesh_sizes(cfg, world), rank, cfg.comm.timeout_s)
    torch.manual_seed(cfg.training.seed)
    layout = parallelize.build(cfg, mesh, device)
    return device, mesh, layout


def train(cfg: Config) -> list[dict]:
    """Train; returns the logged metric rows (rank 0 prints them)."""
    stop = StopRequest()  # first: a SIGTERM during the set-up still ends in a checkpoint
    cfg = parallelize.with_global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    device, mesh, layout = setup(cfg)
    t = cfg.training
    n_micro = layout.facts.n_micro
    optimizer = AdamW(layout.params, cfg.optimizer, model_compiled=cfg.compile.enable)
    data = token_source(cfg)
    validator = Validator(cfg, layout, data, n_micro, device)
    folder = resume.checkpoint_folder(cfg)
    start = restore(cfg, layout, optimizer)
    logger = MetricsLogger(cfg.job.dump_folder, cfg.metrics.jsonl, model.flops_per_token(cfg.model, t.seq_len),
                           peak_flops(device, cfg.float8.enable), mesh.world_size, t.steps, enabled=mesh.rank == 0,
                           resumed_step=start)
    say(f"minititan: {model.num_params(cfg.model):,} params, {mesh}, device {device}, {n_micro} micro-batch(es) "
        f"per step, AdamW {optimizer.implementation}, steps {start + 1}..{t.steps}", mesh.rank)
    for name, epochs in data.epochs(t.seed, t.steps, t.global_batch_size, t.seq_len).items():
        say(f"data: {name}: {epochs:.3g} epochs of its training tokens by step {t.steps}", mesh.rank)
    batches = prefetcher(cfg, data, layout.facts.data_rank, layout.facts.data_size, start + 1, device)
    guard = StepGuard(device, t.skip_nonfinite_steps, stop, lambda: diverged_advice(cfg, folder), mesh.rank)
    profiler = StepProfiler(cfg.profiling, cfg.job.dump_folder, mesh.rank, device, t.steps)
    tracer = CommTracer(group_names(mesh.groups, mesh.sizes), device) if cfg.comm.trace else None
    global_tokens = t.global_batch_size * t.seq_len
    rows, timer, since, step = [], Timer(device), 0, start
    try:
        for step in range(start + 1, t.steps + 1):
            profiler.step_begin(step)
            loss_sum, grad_norm, lr = train_step(cfg, layout, optimizer, batches.get(step), step, n_micro, device,
                                                 guard)
            since += 1
            val = validator.run() if validator.due(step) else {}
            timer.start += val.get("val_time_s", 0.0)  # step times leave validation out
            log_now = step % cfg.metrics.log_freq == 0 or step in (start + 1, t.steps) or bool(val)
            save_now = cfg.checkpoint.enable and (step % cfg.checkpoint.interval == 0 or step == t.steps)
            # the host reads the guard's flags one step late, or of this step where it waits anyway
            stopping = guard.settle(step if log_now or save_now else step - 1)
            if stopping:
                guard.settle(step)  # the step about to be saved is read too
            if log_now:
                extra = {name: value for metrics in layout.log_metrics for name, value in metrics().items()}
                rows.append(logger.log(step, global_loss(loss_sum, layout), grad_norm.item(), lr,
                                       global_tokens * since, timer.lap(), since, device, extra=extra | val))
                since = 0
            if save_now or (stopping and cfg.checkpoint.enable):
                save(cfg, layout, optimizer, folder, step)
            profiler.step_end(step)
            if tracer:
                tracer.end_step()
            if stopping:
                ckpt.wait_for_async_save()
                saved = f"checkpoint saved in {folder}" if cfg.checkpoint.enable else "checkpoint.enable = false: not saved"
                say(f"stopped by signal after step {step}; {saved}", mesh.rank)
                break
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(out_of_memory_advice(cfg, step, device, profiler, mesh.rank)) from None
    finally:
        batches.close()
    say(f"data: {batches.summary()}", mesh.rank)
    ckpt.wait_for_async_save()  # an async save's files are written and renamed before train returns
    if tracer:
        tracer.close()
        say(tracer.table(), mesh.rank)
        tracer.write(Path(cfg.job.dump_folder) / "comm_trace" / f"rank{mesh.rank}.json")
    return rows


def train_step(cfg: Config, layout: Layout, optimizer: AdamW, batch: Batch, step: int, n_micro: int,
               device: torch.device, guard: StepGuard) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step on this rank's rows of the step's global batch. Returns the rank's loss
    share and the grad norm as device tensors (read on logging steps only: no host sync here).
    A step whose gradient norm is not finite is not applied (the guard's skip flag, on the device).
    The layout's synchronisation points run in this order: start_last_microbatch inside
    forward_backward, then the lists below."""
    t, facts = cfg.training, layout.facts
    batch = to_device(batch, device)
    loss_share = forward_backward(layout, batch.inputs, batch.labels, n_micro, facts.loss_scale,
                                  positions=batch.positions, documents=batch.documents)
    for finish in layout.finish_grads:  # the cross-rank gradient sums: DDP, FSDP, sequence parallel's norms, MoE's
        finish()
    for update in layout.after_grads:  # MoE: the expert-bias update reads the summed loads and clears them
        update()
    grad_norm, skip = guard.reduce(step, owned_grad_sq_norm(layout), loss_share)  # one all-reduce: norm and flags
    lr = lr_at(step, cfg.optimizer.lr, t.steps, cfg.lr_scheduler)
    optimizer.step(lr, grad_scale=clip_coefficient(grad_norm, t.max_norm), skip=skip)  # clipped as AdamW reads them
    for update in layout.after_optimizer_step:  # fp8 all-gather with precompute_scale: next step's weight scales
        update()
    for p in layout.params.values():
        p.grad = None
    return loss_share, grad_norm, lr


def out_of_memory_advice(cfg: Config, step: int, device: torch.device, profiler, rank: int) -> str:
    t, ac = cfg.training, cfg.activation_checkpoint
    used, total = memory_in_use(device)
    fixes = [f"lower training.local_batch_size (now {t.local_batch_size}; micro-batches keep the global batch)"]
    if ac.mode != "full":
        fixes.append(f"set activation_checkpoint.mode = {'selective' if ac.mode == 'none' else 'full'}")
    fixes.append("shard more (parallelism.dp_shard, tp) or enable float8")
    where = (f"the allocator history is in {profiler.oom_snapshot_path}" if profiler.memory else
             "set profiling.memory_snapshot = true to record where the memory went")
    return (f"out of memory on rank {rank} in step {step} ({used / 2**30:.1f} of {total / 2**30:.1f} GiB of "
            f"{'GPU' if device.type == 'cuda' else 'host'} memory in use): " + "; or ".join(fixes) + f". {where}")


def owned_grad_sq_norm(layout: Layout) -> torch.Tensor:
    """This rank's share of the squared gradient norm, as a device scalar; summed over all ranks
    (guard.reduce) it is the global one. Each element is counted once: by the rank that owns it in
    a checkpoint (layout.chunks of the grads, per parameter even inside an FSDP shard; padding is in
    no chunk)."""
    grads = {n: p.grad for n, p in layout.params.items() if p.grad is not None}
    owned = [g for g, s in layout.chunks(grads).values() if s.owner]
    return local_sq_norm(owned).to(next(iter(layout.params.values())).device)


def global_loss(loss_share: torch.Tensor, layout: Layout) -> float:
    loss = loss_share.clone()
    if dist.get_world_size(layout.loss_group) > 1:
        dist.all_reduce(loss, group=layout.loss_group)
    return loss.item()


# ---------------------------------------------------------------- checkpoints


def save(cfg: Config, layout: Layout, optimizer: AdamW, folder: Path, step: int) -> None:
    tensors = dict(layout.chunks(layout.params))
    for kind, state in (("exp_avg", optimizer.exp_avg), ("exp_avg_sq", optimizer.exp_avg_sq)):
        tensors |= {f"optim.{kind}.{n}": v for n, v in layout.chunks(state).items()}
    bad = nonfinite_tensors({n: t for n, (t, _) in tensors.items()})
    if bad:
        raise AgreedError(f"step {step} is not saved: {len(bad)} tensor(s) hold inf or NaN ({', '.join(bad[:3])}). "
                          + diverged_advice(cfg, folder))
    ckpt.save(folder, step, tensors, config=config_to_toml(cfg), extra={"optimizer_steps": optimizer.steps},
              async_save=cfg.checkpoint.async_save, timeout_s=cfg.comm.timeout_s,
              keep_latest_k=cfg.checkpoint.keep_latest_k)


def diverged_advice(cfg: Config, folder: Path) -> str:
    """What a run that went non-finite keeps, and how to go on from it (every rank says the same)."""
    newest = ckpt.latest(folder) if cfg.checkpoint.enable else None
    kept = (f"Nothing non-finite is ever saved: the newest checkpoint, {newest}, is intact, and a rerun resumes "
            f"from it" if newest else "No checkpoint was saved before it")
    return (f"{kept}. Rerun with a lower --optimizer.lr (now {cfg.optimizer.lr:g}) or more "
            f"--lr_scheduler.warmup_steps (now {cfg.lr_scheduler.warmup_steps}), or let up to N such steps be "
            f"skipped with --training.skip_nonfinite_steps=N")


def restore(cfg: Config, layout: Layout, optimizer: AdamW) -> int:
    """Load what the run starts from (resume.py: the newest readable checkpoint, or load_path);
    returns the step to continue from."""
    resuming = resume.start_points(cfg)[1]

    def load(c: ckpt.Checkpoint) -> None:
        with torch.no_grad():
            for name, (view, s) in layout.chunks(layout.params).items():
                view.copy_(c.read(name, s))
            if resuming:
                for kind, state in (("exp_avg", optimizer.exp_avg), ("exp_avg_sq", optimizer.exp_avg_sq)):
                    for name, (view, s) in layout.chunks(state).items():
                        view.copy_(c.read(f"optim.{kind}.{name}", s))
                optimizer.steps = int(c.manifest.extra.get("optimizer_steps", c.step))
        c.verify()

    c = resume.load_first_readable(cfg, load)
    if c is None:
        return 0
    unused = " (checkpoint.load_path is used only when the folder holds no checkpoint)" if (
        resuming and cfg.checkpoint.load_path) else ""
    say(f"{'resumed from' if resuming else 'loaded parameters from'} {c.path} (step {c.step}){unused}",
        dist.get_rank())
    return c.step if resuming else 0

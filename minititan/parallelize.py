"""From (config, mesh) to a Layout: what this rank holds, the ops its forward calls, how grads sync.

A Layout is everything the training loop needs to know about parallelism:
  params        the local fp32 master tensors the optimizer updates (full tensors, slices, shards)
  chunks(d)     maps a dict shaped like params (the params, their grads, optimizer moments) to
                {full name: (tensor view, Slice)}: what a checkpoint writes and reads; the views whose
                Slice.owner is set are also what this rank counts in the gradient norm (one copy of
                every element over all ranks)
  ops           the model.Ops the forward calls
  data_rank/size  which rows of the global batch this rank reads
  loss_group    summing the per-rank loss over it gives the global loss
  prepare       (inputs, labels) -> (inputs, labels, positions): this rank's part of its rows
  start_last_microbatch / finish_grads   hooks around the backward of a step's last micro-batch
  forward_context   a context manager each micro-batch's forward runs in (FSDP's resharding)
  forward_backward  None, or what replaces the trainer's loop over micro-batches (pipeline parallel)
  after_grads   runs after the gradient reduction, before clipping (MoE: the expert-bias update)
  log_metrics   () -> {name: float} for the log line; collective, called at log steps (MoE: expert loads)
  after_optimizer_step  runs right after the optimizer step (fp8 all-gather: precompute the weights' scales)
Each parallelism adds its piece here; the mechanisms live in minititan/collectives/.

The layout is composed dimension by dimension over the mesh (pp x dp_replicate x dp_shard x cp x tp):
  pp            each rank keeps only the tensors of its pipeline stages and runs them with the
                schedule's action list (minititan/pipeline.py)
  tp            each rank keeps its tensor-parallel slice of every tensor (collectives/tensor_parallel.py)
  cp            each rank keeps its load-balanced part of every sequence; attention is ring attention
                (collectives/ring_attention.py)
  dp_replicate  each rank reads its own rows of the global batch
  dp_shard      FSDP: each rank keeps a flat shard of every unit of its tp slices, sharded over
                (dp_shard, cp), so cp alone shards too, as in torchtitan (collectives/fsdp.py);
                with dp_replicate too it is HSDP
  ep            (model.name = "moe") folds into dp_shard x cp: each rank keeps E/ep experts of every
                MoE layer, and tokens travel to their experts by all-to-all (minititan/moe_layout.py)
Ranks that differ only along the data dims (dp_replicate, cp) hold identical tensors and sum their
gradients, because each saw different tokens; under FSDP they sum them into their own shards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from minititan import moe_layout, pipeline
from minititan.collectives import ring_attention
from minititan.collectives import tensor_parallel as tpm
from minititan.collectives.data_parallel import GradAllReducer
from minititan.collectives.fsdp import FSDP
from minititan.collectives.fsdp_float8 import enable_float8_all_gather
from minititan.collectives.mesh import Mesh
from minititan.core import mixed_precision, model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.checkpoint import Slice
from minititan.core.config import Config, UserError, hidden_dim
from minititan.core.float8 import float8_all_gather_applies, float8_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def whole_sequences(inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    return inputs, labels, None  # positions None: 0..seq_len-1


@dataclasses.dataclass
class Layout:
    params: dict[str, Tensor]
    chunks: Callable[[dict[str, Tensor]], dict[str, tuple[Tensor, Slice]]]
    ops: model.Ops
    data_rank: int
    data_size: int
    loss_group: dist.ProcessGroup
    prepare: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]] = whole_sequences
    start_last_microbatch: Callable[[], None] = lambda: None
    finish_grads: Callable[[], None] = lambda: None
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext
    forward_backward: Callable | None = None  # (inputs, labels, n_micro, scale) -> loss share; pp replaces the loop
    after_grads: Callable[[], None] = lambda: None
    log_metrics: Callable[[], dict[str, float]] = dict
    after_optimizer_step: Callable[[], None] = lambda: None  # fp8 all-gather: precompute the weights' scales


NOT_YET: dict[str, str] = {}  # parallel dims not implemented yet: dim -> what it is
DATA_DIMS = ("dp_replicate", "dp_shard", "cp")  # ranks along these see different tokens


def build(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    validate(cfg, mesh)
    return composed_layout(cfg, mesh, device)


def validate(cfg: Config, mesh: Mesh) -> None:
    """Refuse, before any collective, a layout that is not implemented or does not divide the model."""
    par, m = cfg.parallelism, cfg.model
    for dim, what in NOT_YET.items():
        if getattr(par, dim) > 1 or mesh.sizes.get(dim, 1) > 1:  # dp_shard = -1 may fill the world
            raise UserError(f"parallelism.{dim} > 1 ({what}) is not implemented yet: set parallelism.{dim} = 1")
    if par.async_tp and cfg.float8.enable:
        raise UserError("parallelism.async_tp and float8.enable both replace the linear op; "
                        "set one of them to false")
    if par.async_tp and not par.sequence_parallel:
        raise UserError("parallelism.async_tp overlaps the sequence-parallel collectives with the matmuls: "
                        "set parallelism.sequence_parallel = true as well (or async_tp = false)")
    pipeline.validate(cfg, mesh.size("pp"))
    moe_layout.validate(cfg, mesh)
    tp, cp, seq_len = mesh.size("tp"), mesh.size("cp"), cfg.training.seq_len
    try:
        if cp > 1:
            ring_attention.check_divisible(seq_len, cp)
        if tp > 1:
            tpm.check_tp_divisibility(tp, m.n_heads, m.n_kv_heads, hidden_dim(m), m.vocab_size,
                                      seq_len=seq_len // cp if par.sequence_parallel else None)
    except ValueError as e:
        raise UserError(str(e)) from None


def composed_layout(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    """dp_replicate x dp_shard x cp x tp. Every rank keeps its tp slice of every tensor: whole, with ranks
    along the data dims holding the same slices and summing their gradients (DDP over dp_replicate);
    or, with dp_shard x cp > 1, FSDP-sharded over (dp_shard, cp) (see add_fsdp)."""
    par = cfg.parallelism
    tp, tp_rank = mesh.size("tp"), mesh.local_rank("tp")
    shapes = pipeline.held_shapes(cfg, mesh)  # under pp: only this rank's stages
    tp_boxes = {name: tp_box(name, shape, tp_rank, tp) for name, shape in shapes.items()}
    apart = moe_layout.held_apart(cfg, mesh, shapes)  # MoE: expert_bias (and expert slices under ep) live outside
    tp_boxes = {name: box for name, box in tp_boxes.items() if name not in apart}
    # The storage step: without dp_shard or cp each rank keeps its local tensor whole. With either, FSDP
    # flat-shards each unit's local tensors over (dp_shard, cp), the Slices get the flat range,
    # and ops.gather all-gathers the unit.
    fsdp = fsdp_storage(cfg, mesh, device, tp_boxes) if mesh.size("dp_shard", "cp") > 1 else None
    if fsdp is None:
        seed = cfg.training.seed
        params = {name: model.init_box(cfg.model, seed, name, box, device).requires_grad_()
                  for name, box in tp_boxes.items()}
        slices = {name: Slice(shape=list(shapes[name]), box=box, owner=is_owner(mesh, name))
                  for name, box in tp_boxes.items()}

        def chunks(tensors):
            return {name: (t, slices[name]) for name, t in tensors.items()}
    else:
        params, chunks = fsdp.shards, fsdp_chunks(fsdp, mesh, shapes, tp_boxes)

    ops = base_ops(cfg, pipeline.layers_per_forward(cfg, mesh))
    if fsdp is not None:
        ops.gather = fsdp_gather(fsdp)
    if tp > 1:
        ops = dataclasses.replace(ops, **tpm.tp_ops(mesh.group("tp"), par.sequence_parallel, par.async_tp))
    if cfg.float8.enable:  # last: it wraps whatever gather and linear the layout chose
        ops = float8_ops(ops, recipe=cfg.float8.recipe, filter=tuple(cfg.float8.filter), device=device,
                         force_recompute_weight_in_bwd=cfg.float8.force_recompute_weight_in_bwd)
    layout = Layout(params=params, chunks=chunks, ops=ops,
                    data_rank=mesh.local_rank("dp_replicate", "dp_shard"),
                    data_size=mesh.size("dp_replicate", "dp_shard"), loss_group=mesh.group(*DATA_DIMS))
    if mesh.size("cp") > 1:
        add_context_parallel(layout, cfg, mesh, device)
    if fsdp is None:
        add_grad_sync(layout, cfg, mesh)
    else:
        add_fsdp(layout, fsdp, cfg, mesh)
        if cfg.float8.fsdp_all_gather:
            add_float8_all_gather(layout, fsdp, cfg)
    if cfg.model.name == "moe":
        moe_layout.add_moe(layout, cfg, mesh, device, shapes, apart)
    if mesh.size("pp") > 1:
        pipeline.add_pipeline(layout, cfg, mesh, device)
    return layout


def tp_box(name: str, shape: tuple[int, ...], tp_rank: int, tp: int) -> list[list[int]]:
    """[start, stop) per dim of the full tensor: this tp rank's slice (all of it for replicated tensors)."""
    box = [[0, s] for s in shape]
    dim = tpm.tp_shard_dim(name)
    if dim is not None:
        n = shape[dim] // tp
        box[dim] = [tp_rank * n, (tp_rank + 1) * n]
    return box


def is_owner(mesh: Mesh, name: str, sharded_over: tuple[str, ...] = ()) -> bool:
    """One copy of every element is written to checkpoints and counted in the gradient norm: the copy
    at coordinate 0 of every mesh dim the local tensor is replicated over (the data dims, and tp for
    the tensors tp does not split). FSDP's shard dims are not among them: each rank along them holds
    a different part. Nor is pp: each tensor lives on one pp rank only."""
    data_dims = tuple(d for d in DATA_DIMS if d not in sharded_over)
    replicated_over = data_dims + (("tp",) if tpm.tp_shard_dim(name) is None else ())
    return all(mesh.coords[d] == 0 for d in replicated_over)


def add_context_parallel(layout: Layout, cfg: Config, mesh: Mesh, device: torch.device) -> None:
    """Each cp rank keeps its load-balanced part of every sequence (with its tokens' global positions
    for RoPE); attention fetches the other cp ranks' keys and values (cp_rotate: ring or allgather)."""
    cp, cp_rank, seq_len = mesh.size("cp"), mesh.local_rank("cp"), cfg.training.seq_len
    positions = ring_attention.shard_positions(seq_len, cp_rank, cp, device)

    def prepare(inputs, labels):
        return (ring_attention.shard_sequence(inputs, cp_rank, cp), ring_attention.shard_sequence(labels, cp_rank, cp),
                positions)

    layout.prepare = prepare
    layout.ops.attention = functools.partial(ring_attention.context_parallel_attention, group=mesh.group("cp"),
                                             rotate=cfg.parallelism.cp_rotate)


def add_grad_sync(layout: Layout, cfg: Config, mesh: Mesh) -> None:
    """Sum gradients over the data dims that replicate the params (bucketed, overlapped with the last
    micro-batch's backward); under sequence parallel also sum the replicated norms' gradients over tp, since each
    tp rank saw only its part of the sequence."""
    reducer = None
    if mesh.size("dp_replicate", "cp") > 1:
        reducer = GradAllReducer(layout.params, mesh.group("dp_replicate", "cp"), DTYPES[cfg.training.reduce_dtype])
        layout.start_last_microbatch = lambda: setattr(reducer, "enabled", True)
    sequence_parallel = mesh.size("tp") > 1 and cfg.parallelism.sequence_parallel
    tp_group = mesh.group("tp") if sequence_parallel else None
    params = layout.params  # these only: tensors added later (moe_layout's) sum their own grads

    def finish_grads():
        if reducer is not None:
            reducer.finish()
            reducer.enabled = False
        if sequence_parallel:
            tpm.allreduce_replicated_grads(params, tp_group)

    layout.finish_grads = finish_grads


# ---------------------------------------------------------------- FSDP / HSDP (dp_shard x cp > 1)

FSDP_DIMS = ("dp_shard", "cp")  # the shard group; cp ranks hold the same params, so FSDP folds them in (as torchtitan)


def fsdp_storage(cfg: Config, mesh: Mesh, device: torch.device, tp_boxes: dict[str, list[list[int]]]) -> FSDP:
    """FSDP over this rank's tp slices (each tp rank shards its own local tensors), flat-sharded over
    (dp_shard, cp) and, with dp_replicate > 1, replicated over it (HSDP). Filled one unit at a time,
    so no rank ever holds its whole local model."""
    units: dict[str, list[str]] = {}
    for name in tp_boxes:
        units.setdefault(model.unit_of(name), []).append(name)
    local_shapes = {name: tuple(b - a for a, b in box) for name, box in tp_boxes.items()}
    t = cfg.training
    replicate = mesh.group("dp_replicate") if mesh.size("dp_replicate") > 1 else None
    fsdp = FSDP(local_shapes, units, mesh.group(*FSDP_DIMS), replicate, device=device,
                param_dtype=DTYPES[t.param_dtype], reduce_dtype=DTYPES[t.reduce_dtype],
                reshard_after_forward=cfg.parallelism.fsdp_reshard_after_forward)
    for names in units.values():
        fsdp.load_full({n: model.init_box(cfg.model, cfg.training.seed, n, tp_boxes[n], device) for n in names})
    return fsdp


def fsdp_chunks(fsdp: FSDP, mesh: Mesh, shapes: dict[str, tuple[int, ...]], tp_boxes: dict[str, list[list[int]]]):
    """chunks() for tensors shaped like the shards, keyed by unit: each parameter's part of a shard
    as a 1-D view, with its Slice (the tp box, and the flat range inside it). Padding is in no chunk,
    and a parameter this rank holds nothing of is left out."""
    slices = {}
    for unit in fsdp.order:
        for name, (start, stop, _) in fsdp.shard_ranges(unit).items():
            slices[name] = Slice(shape=list(shapes[name]), box=tp_boxes[name], flat=[start, stop],
                                 owner=is_owner(mesh, name, sharded_over=FSDP_DIMS))

    def chunks(tensors):
        return {name: (fsdp.param_slice(name, t), slices[name])
                for unit, t in tensors.items() for name in fsdp.shard_ranges(unit)}

    return chunks


def fsdp_gather(fsdp: FSDP) -> Callable:
    """ops.gather: the unit all-gathered by FSDP (which casts to param_dtype itself), under local names."""
    def gather(params, unit):
        return {model.local_name(name): t for name, t in fsdp.gather(unit).items()}

    return gather


def add_fsdp(layout: Layout, fsdp: FSDP, cfg: Config, mesh: Mesh) -> None:
    """Forward in fsdp.resharding(): a unit's gathered params are freed after its forward and gathered
    again in backward. Each unit's grads are reduce-scattered (SUM) over (dp_shard, cp) as soon as its
    backward is done (then all-reduced over dp_replicate under HSDP); finish_grads waits for the last.

    parallelism.fsdp_reduce_every_microbatch = false: earlier micro-batches only add up the full grads
    locally (one full grad buffer of memory), the last micro-batch reduces the sum once.
    Sequence parallel: each tp rank saw part of the sequence, so the norms' grads (tp does not split
    the norms) are summed over tp after the reduction; tp peers have the same shard layout, so the
    same view holds the same elements on each."""
    layout.forward_context = fsdp.resharding
    every = cfg.parallelism.fsdp_reduce_every_microbatch
    fsdp.reduce_grads = every
    if not every:
        layout.start_last_microbatch = lambda: setattr(fsdp, "reduce_grads", True)
    sequence_parallel = mesh.size("tp") > 1 and cfg.parallelism.sequence_parallel
    tp_group = mesh.group("tp") if sequence_parallel else None

    def finish_grads():
        fsdp.finish_grad_sync()
        fsdp.reduce_grads = every
        if sequence_parallel:
            grads = {unit: shard.grad for unit, shard in fsdp.shards.items() if shard.grad is not None}
            norms = [view for name, (view, _) in layout.chunks(grads).items() if tpm.tp_shard_dim(name) is None]
            sum_in_place(norms, tp_group)

    layout.finish_grads = finish_grads


def add_float8_all_gather(layout: Layout, fsdp: FSDP, cfg: Config) -> None:
    """float8.fsdp_all_gather: FSDP all-gathers the weights that run in fp8 (tensorwise) as fp8 bytes,
    cast with a scale shared over the shard group, and the linears use them as gathered
    (collectives/fsdp_float8.py). With float8.precompute_scale the scales of all of them come
    from one all-reduce right after each optimizer step instead of one per unit at its first gather."""
    fp8_names = [name for unit in fsdp.order for name, shape in zip(fsdp.layouts[unit].names, fsdp.layouts[unit].shapes)
                 if float8_all_gather_applies(name, shape, tuple(cfg.float8.filter))]
    if not fp8_names:
        return
    fp8 = enable_float8_all_gather(fsdp, fp8_names)
    if cfg.float8.precompute_scale:
        layout.after_optimizer_step = lambda: fp8.precompute_scales(fsdp.shards)


def sum_in_place(tensors: list[Tensor], group: dist.ProcessGroup) -> None:
    """All-reduce (SUM) these tensors (views into bigger ones) in place, with one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, summed in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(summed.view_as(t))


def base_ops(cfg: Config, layers_per_forward: int | None = None) -> model.Ops:
    """The single-device ops: select each unit's params (cast to the compute dtype) and run blocks
    with the configured activation checkpointing and compile."""
    ops = model.default_ops(cfg.model)
    dtype = DTYPES[cfg.training.param_dtype]
    if dtype != torch.float32:
        ops.gather = cast_gather(ops.gather, dtype, keep_linear_weights=not pipeline.splits_backward(cfg))
        ops.linear = mixed_precision.linear
    if cfg.compile.enable:  # the loss too: the fp32 upcast and log-softmax fuse into one pass over the logits
        ops.cross_entropy = torch.compile(ops.cross_entropy)
    ac = cfg.activation_checkpoint
    ops.run_block = block_runner(ac.mode, ac.selective, cfg.compile.enable, layers_per_forward or cfg.model.n_layers)
    return ops


def cast_gather(select: Callable, dtype: torch.dtype, keep_linear_weights: bool) -> Callable:
    """ops.gather casting the unit's fp32 masters to the compute dtype, except (keep_linear_weights)
    the linears' weights: mixed_precision.linear casts those itself so that their gradients come out
    of the GEMM in fp32. Zero bubble keeps the casts here: it splits the backward at autograd's
    own matmul nodes (schedules/split_backward.py), and a custom Function's backward cannot be split."""
    def gather(params, unit):
        return {n: t if keep_linear_weights and model.is_linear_weight(n, t.shape) else t.to(dtype)
                for n, t in select(params, unit).items()}

    return gather

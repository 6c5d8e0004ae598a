"""From (config, world) to this rank's Layout: the refusals, the facts, then the recipe.

    check(cfg, world)                  every refusal the config and the world size decide, before any
                                       rank starts: one UserError naming the fix (cli, tests)
    layout = build(cfg, mesh, device)  this rank's Layout (contract.py)

build applies one dimension of the mesh pp x dp_replicate x dp_shard x cp x tp after another to
the single-device layout, each from its own file beside the mechanism it drives (pipeline.py,
tensor_parallel.py, fsdp.py or data_parallel.py, context_parallel.py, moe.py; Float8 here).
Ranks that differ only along the data dims (dp_replicate, dp_shard, cp) see different tokens and
sum their gradients; under FSDP into their own shards. docs/architecture.md has the map.
"""
from __future__ import annotations

import functools
from typing import Callable

import msgspec
import torch

from minititan.collectives.mesh import Mesh, resolve_degrees
from minititan.core import mixed_precision, model
from minititan.core.activation_checkpoint import block_runner
from minititan.core.config import ActivationCheckpoint, Compile, Config, UserError
from minititan.core.float8 import float8_ops
from minititan.layout import context_parallel, data_parallel, fsdp, moe, pipeline, tensor_parallel
from minititan.layout.contract import DATA_DIMS, Facts, Layout, may_share_casts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- refusals


def mesh_sizes(cfg: Config, world: int) -> dict[str, int]:
    par = cfg.parallelism
    try:
        return resolve_degrees(world, pp=par.pp, dp_replicate=par.dp_replicate, dp_shard=par.dp_shard,
                               cp=par.cp, tp=par.tp)
    except ValueError as e:
        raise UserError(f"parallelism: {e}") from None


def with_global_batch(cfg: Config, world: int) -> Config:
    """training.global_batch_size = 0 (unset) becomes local_batch_size x data-parallel ranks."""
    if cfg.training.global_batch_size:
        return cfg
    sizes = mesh_sizes(cfg, world)
    derived = cfg.training.local_batch_size * sizes["dp_replicate"] * sizes["dp_shard"]
    return msgspec.structs.replace(cfg, training=msgspec.structs.replace(cfg.training, global_batch_size=derived))


def check(cfg: Config, world: int) -> None:
    """Every refusal that needs only the config and the world size, as one UserError naming the fix:
    the one way to ask whether a layout is refused, and with which words (the CLI asks it before
    any rank starts, so that bad input is one line rather than one per rank)."""
    refuse(cfg, Mesh(mesh_sizes(cfg, world), rank=0))  # no process groups: they are made on first use


def uncompiled_blocks(cfg: Config) -> list[str]:
    """One line per kind of block that torch.compile will run eagerly under this config, for
    `minititan train` to print as a warning. dynamo cannot break a graph inside a checkpointed
    block; under full checkpointing (and every N-th block's) block_runner checkpoints such a block
    outside its compiled pieces, but a selective policy cannot replay compiled pieces, so there the
    block runs whole eagerly (docs/plan.md measures what that costs)."""
    ac = cfg.activation_checkpoint
    if not cfg.compile.enable or ac.mode != "selective" or ac.selective.isdigit():
        return []
    cannot = (f'a graph break torch.compile cannot make inside a block checkpointed by a selective policy '
              f'(activation_checkpoint.selective = "{ac.selective}")')
    compiles = 'activation_checkpoint.mode = "full" (compiled in pieces) or "none"'
    advice = {
        "ep_exact": f"the exact expert-parallel exchange reads its split sizes on the host, {cannot}: the MoE blocks "
                    f"run uncompiled; set parallelism.ep_capacity_factor > 0 (e.g. 1.25: no host read), or "
                    f"{compiles}, to compile them",
        "async_tp": f"async TP's collectives (async_op=True) are {cannot}: the tensor-parallel blocks run uncompiled; "
                    f"set parallelism.async_tp = false (sequence parallel compiles), or {compiles}, to compile them",
        "cp": f"context-parallel attention runs under torch.compiler.disable, {cannot}: the attention blocks "
              f"run uncompiled; set {compiles} to compile them"}
    return [advice[cause] for cause in graph_breaks(cfg)]


def refuse(cfg: Config, mesh: Mesh) -> None:
    """Refuse, before any collective, a layout that does not divide the model or the batch."""
    par, seq_len = cfg.parallelism, cfg.training.seq_len
    if par.async_tp and cfg.float8.enable:
        raise UserError("parallelism.async_tp and float8.enable both replace the linear op; "
                        "set one of them to false")
    if par.async_tp and not par.sequence_parallel:
        raise UserError("parallelism.async_tp overlaps the sequence-parallel collectives with the matmuls: "
                        "set parallelism.sequence_parallel = true as well (or async_tp = false)")
    pipeline.refuse(cfg, mesh.size("pp"))
    moe.refuse(cfg, mesh)
    if mesh.size("cp") > 1:
        context_parallel.refuse(seq_len, mesh.size("cp"))
    if mesh.size("tp") > 1:
        sp_seq_len = seq_len // mesh.size("cp") if par.sequence_parallel else None  # what one tp group splits
        tensor_parallel.refuse(cfg.model, mesh.size("tp"), sp_seq_len)
    microbatches(cfg, mesh.size("dp_replicate", "dp_shard"))


def microbatches(cfg: Config, data_size: int) -> int:
    t = cfg.training
    per_rank = t.global_batch_size // data_size
    if t.global_batch_size % data_size or per_rank % t.local_batch_size:
        raise UserError(f"training.global_batch_size={t.global_batch_size} must be a multiple of "
                        f"training.local_batch_size={t.local_batch_size} x data-parallel ranks={data_size}")
    return per_rank // t.local_batch_size


# ---------------------------------------------------------------- the facts and the recipe


def layout_facts(cfg: Config, mesh: Mesh) -> Facts:
    par, t = cfg.parallelism, cfg.training
    sequence_parallel = mesh.size("tp") > 1 and par.sequence_parallel
    pp = mesh.size("pp")
    return Facts(model=cfg.model, seed=t.seed, param_dtype=DTYPES[t.param_dtype], reduce_dtype=DTYPES[t.reduce_dtype],
                 loss_scale=1.0 / (t.global_batch_size * t.seq_len),
                 data_rank=mesh.local_rank("dp_replicate", "dp_shard"), data_size=mesh.size("dp_replicate", "dp_shard"),
                 n_micro=microbatches(cfg, mesh.size("dp_replicate", "dp_shard")),
                 fsdp=mesh.size(*fsdp.FSDP_DIMS) > 1, reshard_after_forward=par.fsdp_reshard_after_forward,
                 reduce_every_microbatch=par.fsdp_reduce_every_microbatch, ep=par.ep,
                 sequence_parallel=sequence_parallel,
                 async_tp=sequence_parallel and par.async_tp,
                 sequence_dims=("cp", "tp") if sequence_parallel else ("cp",),
                 n_stages=pp * pipeline.virtual_stages(cfg) if pp > 1 else 1,
                 stages=pipeline.rank_layers(cfg, mesh.local_rank("pp")) if pp > 1 else {0: range(cfg.model.n_layers)},
                 splits_backward=pp > 1 and par.pp_schedule == "zero_bubble")


def build(cfg: Config, mesh: Mesh, device: torch.device) -> Layout:
    refuse(cfg, mesh)
    facts, par = layout_facts(cfg, mesh), cfg.parallelism
    loss_group = mesh.group("pp", *DATA_DIMS) if mesh.size("pp") > 1 else mesh.group(*DATA_DIMS)
    casts = mixed_precision.StepCasts(facts.param_dtype) if shares_casts(facts) else None
    layout = Layout(facts, base_ops(facts, cfg.compile, cfg.activation_checkpoint, casts,
                                    graph_breaking_blocks(cfg)), loss_group)
    if casts is not None:
        layout.finish_grads.append(casts.clear)

    # What this rank holds: its stages' tensors (pp), its tp slice of each; MoE keeps expert_bias,
    # and under ep its expert slices, apart (moe.py holds them).
    shapes = pipeline.held_shapes(facts)
    apart = moe.held_apart(facts, mesh, shapes)
    boxes = {name: box for name, box in tensor_parallel.boxes(shapes, mesh).items() if name not in apart}

    # How it stores them and sums their gradients over the data dims: flat shards over dp_shard x cp
    # (HSDP: replicated over dp_replicate), or whole tensors summed by DDP over dp_replicate x cp.
    if facts.fsdp:
        main = fsdp.apply(layout, boxes, shapes, mesh, device)
    else:
        main = data_parallel.apply(layout, boxes, shapes, mesh, device)

    # The other dimensions, each adding its ops and, in this order, its sync points.
    if mesh.size("tp") > 1:
        tensor_parallel.apply(layout, main, mesh)
    if mesh.size("cp") > 1:
        context_parallel.apply(layout, mesh, device, cfg.training.seq_len, par.cp_rotate)
    if cfg.model.name == "moe":
        moe.apply(layout, mesh, device, shapes, apart, cfg.model.bias_update_rate, cfg.parallelism.ep_capacity_factor,
                  moe.float8_experts(cfg.float8))
    if cfg.float8.enable:  # last: it wraps whatever gather and linear the layout chose
        f8 = cfg.float8
        layout.ops = float8_ops(layout.ops, recipe=f8.recipe, filter=tuple(f8.filter), device=device,
                                force_recompute_weight_in_bwd=f8.force_recompute_weight_in_bwd)
        if facts.fsdp and f8.fsdp_all_gather:
            fsdp.float8_all_gather(layout, main.fsdp, tuple(f8.filter), f8.precompute_scale)
    if mesh.size("pp") > 1:
        pipeline.apply(layout, cfg, mesh, device)
    return layout


def shares_casts(facts: Facts) -> bool:
    """The gather's casts shared by a step's micro-batches (mixed_precision.StepCasts): where FSDP
    does not gather (and cast) on its own and contract.may_share_casts allows it."""
    return not facts.fsdp and may_share_casts(facts)


# ---------------------------------------------------------------- the single-device ops


def graph_breaks(cfg: Config) -> dict[str, tuple[str, ...]]:
    """What breaks dynamo's graph in this layout -> the block functions (by name) it is in: the
    exact ep exchange reads its split sizes on the host (the MoE layer), cp's ring runs under
    torch.compiler.disable (the attention), async TP's collectives have async_op=True (every
    tensor-parallel block)."""
    p, breaks = cfg.parallelism, {}
    if cfg.model.name == "moe" and p.ep > 1 and p.ep_capacity_factor == 0:
        breaks["ep_exact"] = ("moe_layer",)
    if p.tp > 1 and p.async_tp:
        breaks["async_tp"] = ("attention_block", "feed_forward_block")
    if p.cp > 1:
        breaks["cp"] = ("attention_block",)
    return breaks


def graph_breaking_blocks(cfg: Config) -> frozenset[str]:
    return frozenset(name for names in graph_breaks(cfg).values() for name in names)


def base_ops(facts: Facts, compile: Compile, ac: ActivationCheckpoint,
             casts: mixed_precision.StepCasts | None = None, graph_breaking: frozenset[str] = frozenset()) -> model.Ops:
    """The single-device ops: select each unit's params (cast to the compute dtype; once per step
    with `casts`) and run blocks with the configured activation checkpointing and compile."""
    ops = model.default_ops(facts.model)
    if facts.param_dtype != torch.float32:
        ops.gather = cast_gather(ops.gather, facts.param_dtype, keep_masters=not facts.splits_backward, casts=casts)
        ops.linear = mixed_precision.linear
        ops.embedding = functools.partial(mixed_precision.embedding, dtype=facts.param_dtype)
    if compile.enable:  # the loss too: the fp32 upcast and log-softmax fuse into one pass over the logits
        ops.cross_entropy = torch.compile(ops.cross_entropy)
    first_stage = next(iter(facts.stages.values()))  # AC's every-N-th counts restart at each forward
    ops.run_block = block_runner(ac.mode, ac.selective, compile.enable, len(first_stage), graph_breaking)
    return ops


def cast_gather(select: Callable, dtype: torch.dtype, keep_masters: bool,
                casts: mixed_precision.StepCasts | None = None) -> Callable:
    """ops.gather casting the unit's fp32 masters to the compute dtype, except (keep_masters) those
    whose op casts them itself: the linears' weights (mixed_precision.linear, so that their gradients
    come out of the GEMM in fp32) and the embedding table (mixed_precision.embedding casts only the
    rows it looks up). Zero bubble keeps the casts here: it splits the backward at autograd's own
    matmul nodes (schedules/split_backward.py), and a custom Function's backward cannot be split.
    With `casts`, each master is cast once per step (mixed_precision.StepCasts)."""
    def casts_itself(name: str, shape) -> bool:
        return keep_masters and (model.is_linear_weight(name, shape) or name == "tok_embeddings")

    cast = mixed_precision.caster(dtype, casts)

    def gather(params, unit):
        return {n: t if casts_itself(n, t.shape) else cast(t) for n, t in select(params, unit).items()}

    return gather

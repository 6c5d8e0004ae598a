"""Mixture of experts in the trainer: the MoE op, expert parallel, the expert-bias update, the load metrics.

model.name = "moe" trains on every layout parallelize.composed_layout builds (one process,
dp_replicate, dp_shard (FSDP / HSDP), cp, pp, tp with or without sequence parallel / async TP), plus
expert parallel (parallelism.ep). `add_moe` adds to such a layout:

  ops.moe       moe.moe_feed_forward with aux_loss_scale = 1 / global label tokens (the factor the
                trainer applies to loss_sum), the sequence group its balance statistics are summed
                over, and under ep a run_experts that ships each token to the rank holding its
                expert and back (collectives/expert_parallel.py)
  after_grads   moe.update_expert_bias, between the gradient reduction and clipping: it reads the
                loads summed in expert_bias.grad, nudges the bias toward balance, clears the grad
  log_metrics   moe/max_load_over_mean (worst layer, last step) and moe/balance_loss, for the log line

Tensors held apart. Two kinds of MoE tensors do not fit the layout's ordinary storage, so they are
plain local fp32 tensors outside it (outside FSDP), each with its own gradient sum:

  expert_bias     update_expert_bias needs all E loads, and its "gradient" is a token count that
                  must be summed exactly and never reach the optimizer. Whole on every rank;
                  summed in fp32 over all data dims (dp_replicate, dp_shard, cp).
  expert weights  under ep > 1 each rank holds E/ep experts of every MoE layer: the dim-0 slice
                  of its position in its ep group. The ranks holding the same slice (the expert-dp
                  group x dp_replicate) replicate it and sum its gradients.

ep folds into the data dims dp_shard x cp (expert_parallel.ep_layout): ep groups are runs of ep
consecutive data ranks. The expert weights are replicated, not FSDP-sharded, over their
expert-dp group: FSDP here is one object over one shard group. With ep = dp_shard x cp, the
usual choice, that group is a single rank and nothing is replicated; otherwise each rank holds
E/ep experts whole (dp_shard x cp / ep copies of them in the group).

MoE and tp. tensor_parallel.py splits none of the MoE tensors: they are replicated over tp, and the
MoE layer never enters a tensor-parallel region (it calls no into_tp / out_of_tp). It runs on
whatever part of the residual stream the rank holds:
  plain tp         the whole sequence, on every tp rank alike: the same routing, outputs and grads.
  sequence         each tp rank's slice of the sequence, routed and computed locally (ep exchanges
  parallel         tokens between ranks of the same tp coordinate); the output stays sequence-
                   sharded. No activation crosses tp (only the balance statistics, below), and no
                   token is computed tp times, as it would be if the layer all-gathered the
                   sequence, ran the experts on all of it on every tp rank and kept its slice.
                   The price is the one data parallel pays: tp ranks saw different tokens, so the
                   MoE tensors' grads and loads are partial and are summed over tp. The layout's
                   own tensors (ffn_norm, router, shared and, at ep 1, routed experts) are summed
                   with the norms by parallelize; the tensors held apart here fold tp into their
                   sum groups. Async TP is sequence parallel with an overlapped matmul for the TP
                   regions; the MoE layer has none, so it uses the plain linear.

Sequences split over ranks (cp, and tp under sequence parallel). The sequence-wise balance loss
needs each whole sequence's token counts and mean scores: moe.sequence_balance_loss sums them over
this sequence group with a differentiable all-reduce, so the aux loss, its gradients and
moe/balance_loss are those of one process. The loads need nothing new: they are per-token counts,
summed over the ranks like gradients.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from minititan.collectives import expert_parallel as ep_lib
from minititan.collectives.data_parallel import GradAllReducer
from minititan.collectives.mesh import Mesh
from minititan.core import model, moe
from minititan.core.checkpoint import Slice
from minititan.core.config import Config, UserError

DATA_DIMS = ("dp_replicate", "dp_shard", "cp")  # parallelize.DATA_DIMS (which imports this file)


def validate(cfg: Config, mesh: Mesh) -> None:
    """One UserError naming the fix for an expert-parallel layout the model or mesh cannot make."""
    par, m = cfg.parallelism, cfg.model
    if m.name != "moe":
        if par.ep > 1:
            raise UserError(f"parallelism.ep={par.ep} splits the experts of a mixture of experts, but model.name = "
                            f"{m.name!r}: set model.name = \"moe\" or parallelism.ep = 1")
        return
    if m.n_experts % par.ep:
        raise UserError(f"model.n_experts={m.n_experts} must be divisible by parallelism.ep={par.ep}: "
                        f"every ep rank holds the same number of experts")
    data = mesh.size("dp_shard", "cp")
    if data % par.ep:
        raise UserError(f"parallelism.ep={par.ep} must divide dp_shard x cp = {data}: ep splits the data ranks "
                        f"into groups that exchange tokens; raise parallelism.dp_shard or lower parallelism.ep")


def tp_splits_sequence(cfg: Config, mesh: Mesh) -> bool:
    """Sequence parallel (async TP implies it): each tp rank holds a slice of the sequence."""
    return mesh.size("tp") > 1 and cfg.parallelism.sequence_parallel


def sequence_dims(cfg: Config, mesh: Mesh) -> tuple[str, ...]:
    """The mesh dims over which the ranks hold parts of the same sequences."""
    return ("cp", "tp") if tp_splits_sequence(cfg, mesh) else ("cp",)


def held_apart(cfg: Config, mesh: Mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[list[int]]]:
    """The tensors this rank keeps outside the layout's ordinary storage -> the box of the full
    tensor it holds: every expert_bias whole, and under ep its slice of the expert weights."""
    if cfg.model.name != "moe":
        return {}
    ep = cfg.parallelism.ep
    ep_rank = mesh.local_rank("dp_shard", "cp") % ep  # ep groups are runs of ep consecutive data ranks
    boxes = {}
    for name, shape in shapes.items():
        box = [[0, s] for s in shape]
        if ep > 1 and ep_lib.is_expert_param(name):
            mine = ep_lib.expert_range(shape[0], ep_rank, ep)
            box[0] = [mine.start, mine.stop]
        elif not moe.is_expert_bias(name):
            continue
        boxes[name] = box
    return boxes


def add_moe(layout, cfg: Config, mesh: Mesh, device: torch.device, shapes: dict[str, tuple[int, ...]],
            apart: dict[str, list[list[int]]]) -> None:
    """Give a layout built without the `apart` tensors (see held_apart) those tensors, the MoE op,
    their gradient sums, the expert-bias update and the load metrics."""
    ep = cfg.parallelism.ep
    split_over_tp = tp_splits_sequence(cfg, mesh)
    ep_group, replicas, replica_group = expert_groups(mesh, ep, split_over_tp) if ep > 1 else (None, [mesh.rank], None)
    held = {}
    slices = {}
    for name, box in apart.items():
        full = model.init(cfg.model, cfg.training.seed, device, names=[name])[name]  # one tensor at a time
        held[name] = full[tuple(slice(a, b) for a, b in box)].clone().requires_grad_()
        slices[name] = Slice(shape=list(shapes[name]), box=box, owner=is_apart_owner(mesh, name, replicas))
    layout.params = {**layout.params, **held}
    layout.chunks = chunks_with_apart(layout.chunks, slices)
    layout.ops.gather = gather_with_apart(layout.ops.gather, apart, getattr(torch, cfg.training.param_dtype))

    aux_log: list[Tensor] = []
    run_experts = moe.run_experts if ep_group is None else ep_lib.parallel_experts(moe.run_experts, ep_group)
    seq_dims = sequence_dims(cfg, mesh)
    sequence_group = mesh.group(*seq_dims) if mesh.size(*seq_dims) > 1 else None
    local_linear = mesh.size("tp") > 1 and cfg.parallelism.async_tp
    layout.ops.moe = moe_op(cfg, run_experts, aux_log, sequence_group, local_linear)
    add_apart_grad_sync(layout, cfg, mesh, held, replica_group)
    add_balancing(layout, cfg, aux_log, device)


def expert_groups(mesh: Mesh, ep: int, split_over_tp: bool) -> tuple[dist.ProcessGroup, list[int],
                                                                     dist.ProcessGroup | None]:
    """This rank's ep group, the ranks that hold the same experts and sum their grads (its expert-dp
    group across all of dp_replicate, and across tp when tp splits the sequence), and their group
    (None if it is this rank alone). Collective: every rank calls it.

    The rank order is row-major over pp x dp_replicate x dp_shard x cp x tp, so dp_replicate x
    dp_shard is one data dim of the same order; since ep divides dp_shard x cp, folding ep into
    that merged dim gives the same ep groups as folding it into dp_shard x cp, and expert-dp
    groups (stride ep) that run over every dp_replicate replica. tp varies fastest, so the tp
    peers of a rank q at tp coordinate 0 are q + t."""
    merged = Mesh({**mesh.sizes, "dp_replicate": 1, "dp_shard": mesh.size("dp_replicate", "dp_shard")}, mesh.rank)
    ep_lists, replica_lists = ep_lib.ep_layout(merged, ep)
    if split_over_tp:
        tp = mesh.size("tp")
        replica_lists = [[q + t for q in ranks for t in range(tp)] for ranks in replica_lists if ranks[0] % tp == 0]
    ep_group = new_groups(ep_lists, mesh)
    replicas = next(ranks for ranks in replica_lists if mesh.rank in ranks)
    replica_group = new_groups(replica_lists, mesh) if len(replicas) > 1 else None
    return ep_group, replicas, replica_group


def new_groups(rank_lists: list[list[int]], mesh: Mesh) -> dist.ProcessGroup:
    mine = None
    for ranks in rank_lists:  # every rank creates every group, in the same order
        group = dist.new_group(ranks, timeout=mesh.timeout)
        mine = group if mesh.rank in ranks else mine
    return mine


def is_apart_owner(mesh: Mesh, name: str, replicas: list[int]) -> bool:
    """One copy of every element goes to checkpoints and the grad norm: expert_bias from the rank at
    coordinate 0 of every dim it is replicated over (the data dims and tp), an expert slice from the
    first of the ranks holding it, at tp coordinate 0 (MoE layers are replicated over tp too)."""
    if moe.is_expert_bias(name):
        return all(mesh.coords[d] == 0 for d in DATA_DIMS + ("tp",))
    return mesh.coords["tp"] == 0 and mesh.rank == replicas[0]


def chunks_with_apart(chunks, slices: dict[str, Slice]):
    """layout.chunks for dicts that also hold the tensors kept apart (whole local tensors)."""
    def with_apart(tensors):
        rest = {name: t for name, t in tensors.items() if name not in slices}
        return chunks(rest) | {name: (t, slices[name]) for name, t in tensors.items() if name in slices}
    return with_apart


def gather_with_apart(gather, apart: dict[str, list[list[int]]], dtype: torch.dtype):
    """ops.gather that adds a unit's tensors kept apart, which FSDP does not hold. expert_bias goes in as
    the fp32 master itself: its grad slot counts tokens, which a cast to bf16 would round."""
    apart_of_unit: dict[str, list[str]] = {}
    for name in apart:
        apart_of_unit.setdefault(model.unit_of(name), []).append(name)

    def gather_unit(params, unit):
        got = gather(params, unit)
        for name in apart_of_unit.get(unit, ()):
            local = model.local_name(name)
            if moe.is_expert_bias(name):
                got[local] = params[name]
            elif local not in got:  # without FSDP the ordinary gather has already selected and cast it
                got[local] = params[name].to(dtype)
        return got

    return gather_unit


def moe_op(cfg: Config, run_experts, aux_log: list[Tensor], sequence_group: dist.ProcessGroup | None,
           local_linear: bool):
    """ops.moe: the MoE layer scaled like the trainer's loss, its balance statistics summed over the
    sequence group, logging its balance loss in training forwards (not in validation's).
    local_linear (async TP): the layout's linear defers a plain tensor's matmul to the out_of_tp
    that follows it; the MoE layer has no out_of_tp, so its shared experts use F.linear."""
    scale = 1.0 / (cfg.training.global_batch_size * cfg.training.seq_len)

    def moe_layer(p, x, model_cfg, ops):
        if local_linear:
            ops = dataclasses.replace(ops, linear=F.linear)
        return moe.moe_feed_forward(p, x, model_cfg, ops, run_experts=run_experts, aux_loss_scale=scale,
                                    aux_log=aux_log if torch.is_grad_enabled() else None,
                                    sequence_group=sequence_group)

    return moe_layer


def add_apart_grad_sync(layout, cfg: Config, mesh: Mesh, held: dict[str, Tensor],
                        replica_group: dist.ProcessGroup | None) -> None:
    """Sum the grads of the tensors kept apart, bucketed and overlapped with the last micro-batch's
    backward like plain data parallel: the expert-bias loads over all data dims (in fp32, so the
    counts stay exact), the expert slices over the ranks that hold the same experts; under sequence
    parallel both over tp too (each tp rank routed its own slice of the tokens)."""
    reducers = []
    biases = {name: t for name, t in held.items() if moe.is_expert_bias(name)}
    bias_dims = DATA_DIMS + (("tp",) if tp_splits_sequence(cfg, mesh) else ())
    if biases and mesh.size(*bias_dims) > 1:
        reducers.append(GradAllReducer(biases, mesh.group(*bias_dims), torch.float32))
    experts = {name: t for name, t in held.items() if name not in biases}
    if experts and replica_group is not None:
        reducers.append(GradAllReducer(experts, replica_group, getattr(torch, cfg.training.reduce_dtype)))
    if not reducers:
        return
    start_before, finish_before = layout.start_last_microbatch, layout.finish_grads

    def start_last_microbatch():
        start_before()
        for reducer in reducers:
            reducer.enabled = True

    def finish_grads():
        finish_before()
        for reducer in reducers:
            reducer.finish()
            reducer.enabled = False

    layout.start_last_microbatch, layout.finish_grads = start_last_microbatch, finish_grads


def add_balancing(layout, cfg: Config, aux_log: list[Tensor], device: torch.device) -> None:
    """after_grads: the expert-bias update (every step, even at rate 0: it clears the loads from the
    bias grad). log_metrics: the last step's load metrics over the whole model; under pp each pp
    rank holds some layers, so they are reduced over the loss group (MAX of the worst load, mean of
    the balance losses). Device values until log_metrics reads them."""
    last: dict[str, object] = {}

    def after_grads():
        last["loads"] = moe.update_expert_bias(layout.params, cfg.model.bias_update_rate)
        last["balance"] = list(aux_log)
        aux_log.clear()

    def log_metrics() -> dict[str, float]:
        if not last:
            return {}
        loads, balance = last["loads"], last["balance"]
        local = moe.load_metrics(loads, balance) if loads.numel() else {}
        worst = local.get("moe/max_load_over_mean", torch.zeros((), device=device)).float().reshape(1)
        n = float(len(balance))
        sum_and_count = torch.stack([local.get("moe/balance_loss", torch.zeros((), device=device)).float() * n,
                                     torch.tensor(n, device=device)])
        if dist.get_world_size(layout.loss_group) > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=layout.loss_group)
            dist.all_reduce(sum_and_count, group=layout.loss_group)
        total, count = sum_and_count.tolist()
        out = {"moe/max_load_over_mean": worst.item()}
        if count:
            out["moe/balance_loss"] = total / count
        return out

    layout.after_grads, layout.log_metrics = after_grads, log_metrics

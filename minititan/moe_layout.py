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
kept outside it, each with its own gradient sum:

  expert_bias     update_expert_bias needs all E loads, and its "gradient" is a token count that
                  must be summed exactly and never reach the optimizer. A plain fp32 tensor, whole
                  on every rank; summed in fp32 over all data dims (dp_replicate, dp_shard, cp).
  expert weights  under ep > 1 each rank holds E/ep experts of every MoE layer: the dim-0 slice
                  of its position in its ep group. The ranks of its dp_shard x cp group holding
                  the same slice form its expert-dp group; the layout's FSDP (one shard group,
                  dp_shard x cp, over which every rank holds the same full tensors) cannot shard
                  them, so they get an FSDP object of their own (expert FSDP, below).

ep folds into the data dims dp_shard x cp (expert_parallel.ep_layout): ep groups are runs of ep
consecutive data ranks, expert-dp groups the dp_shard x cp / ep ranks of stride ep. Like the
dense layers under FSDP / HSDP, each rank's expert slice is

  sharded         over the expert-dp group when it has more than one rank (ep < dp_shard x cp):
                  a second FSDP object (collectives/fsdp.py) holds one flat fp32 shard per MoE
                  layer (unit layers.{i}.moe.experts: w1, w2, w3), keyed by that unit name in
                  layout.params. ops.gather all-gathers a layer's experts (in param_dtype) with
                  its feed-forward unit; each forward runs in both FSDP objects' resharding()
                  (they nest), so the gathered experts are freed after the layer and gathered
                  again for its backward; the grads are reduce-scattered into the shard as soon
                  as the layer's backward is done. Each rank keeps 1 / (dp_shard x cp / ep) of
                  its E/ep experts: params, grads and optimizer state. Checkpoint chunks are
                  each parameter's expert box plus the flat range of it in this shard.
  whole           when the expert-dp group is this rank alone (ep = dp_shard x cp, the usual
                  choice): a plain local fp32 tensor per parameter, nothing to shard.
  replicated      over the replicate group: the same coordinates on all of dp_replicate (HSDP's
                  replicas), and on tp, which splits none of the MoE tensors. The grads are
                  summed over dp_replicate (after the reduce-scatter when sharded), and over tp
                  too when tp splits the sequence (below).

With ep = 1 there is nothing apart but expert_bias: the experts are ordinary tensors of the
layout, FSDP-sharded with the rest of their feed-forward unit over dp_shard x cp.

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

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives import expert_parallel as ep_lib
from minititan.collectives.data_parallel import GradAllReducer
from minititan.collectives.fsdp import FSDP
from minititan.collectives.mesh import Mesh
from minititan.core import mixed_precision, model, moe
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
    tensor it holds: every expert_bias whole, and under ep its slice of the expert weights (which
    add_moe FSDP-shards over the expert-dp group when that has more than one rank)."""
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
    ep_group, expert_dp_group, replicate_group = expert_groups(cfg, mesh) if ep > 1 else (None, None, None)
    sharded = {name: box for name, box in apart.items() if expert_dp_group is not None and ep_lib.is_expert_param(name)}
    whole = {name: box for name, box in apart.items() if name not in sharded}
    seed = cfg.training.seed
    held = {name: model.init_box(cfg.model, seed, name, box, device).requires_grad_() for name, box in whole.items()}
    slices = {name: Slice(shape=list(shapes[name]), box=box, owner=is_apart_owner(mesh, name))
              for name, box in whole.items()}
    experts = expert_fsdp(cfg, device, sharded, expert_dp_group, replicate_group) if sharded else None
    layout.params = {**layout.params, **held, **(experts.shards if experts else {})}
    layout.chunks = chunks_with_apart(layout.chunks, slices, experts, mesh, shapes, sharded)
    layout.ops.gather = gather_with_apart(layout.ops.gather, whole, getattr(torch, cfg.training.param_dtype), experts)

    aux_log: list[Tensor] = []
    run_experts = moe.run_experts if ep_group is None else ep_lib.parallel_experts(moe.run_experts, ep_group)
    seq_dims = sequence_dims(cfg, mesh)
    sequence_group = mesh.group(*seq_dims) if mesh.size(*seq_dims) > 1 else None
    local_linear = mesh.size("tp") > 1 and cfg.parallelism.async_tp
    layout.ops.moe = moe_op(cfg, run_experts, aux_log, sequence_group, local_linear)
    add_apart_grad_sync(layout, cfg, mesh, held, replicate_group)
    if experts is not None:
        add_expert_fsdp(layout, experts, cfg)
    add_balancing(layout, cfg, aux_log, device)


def expert_groups(cfg: Config, mesh: Mesh) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None,
                                                     dist.ProcessGroup | None]:
    """This rank's three expert groups (collective: every rank calls it):
      ep group         the ep consecutive data ranks that exchange tokens (ep_lib.ep_layout)
      expert-dp group  the ranks of its dp_shard x cp group that hold the same experts (stride ep),
                       over which they are FSDP-sharded; None if it is this rank alone (ep =
                       dp_shard x cp)
      replicate group  the ranks that hold the same experts and the same part of them, and sum
                       their grads: the same coordinates on all of dp_replicate (like HSDP's
                       replicas), and on all of tp when tp splits the sequence (each tp rank
                       routed its own tokens); None if it is this rank alone."""
    ep_lists, expert_dp_lists = ep_lib.ep_layout(mesh, cfg.parallelism.ep)
    ep_group = new_groups(ep_lists, mesh)
    expert_dp_group = new_groups(expert_dp_lists, mesh) if len(expert_dp_lists[0]) > 1 else None
    dims = ("dp_replicate", "tp") if tp_splits_sequence(cfg, mesh) else ("dp_replicate",)
    replicate_group = mesh.group(*dims) if mesh.size(*dims) > 1 else None
    return ep_group, expert_dp_group, replicate_group


def new_groups(rank_lists: list[list[int]], mesh: Mesh) -> dist.ProcessGroup:
    mine = None
    for ranks in rank_lists:  # every rank creates every group, in the same order
        group = dist.new_group(ranks, timeout=mesh.timeout)
        mine = group if mesh.rank in ranks else mine
    return mine


def expert_fsdp(cfg: Config, device: torch.device, boxes: dict[str, list[list[int]]],
                expert_dp_group: dist.ProcessGroup, replicate_group: dist.ProcessGroup | None) -> FSDP:
    """FSDP over this rank's expert slices, one unit per MoE layer (layers.{i}.moe.experts, its
    w1, w2, w3), flat-sharded over the expert-dp group and replicated over the replicate group.
    A second FSDP object beside the layout's: its shard group differs. Filled one unit at a time."""
    units: dict[str, list[str]] = {}
    for name in boxes:
        units.setdefault(expert_unit(name), []).append(name)
    t = cfg.training
    experts = FSDP({name: tuple(b - a for a, b in box) for name, box in boxes.items()}, units, expert_dp_group,
                   replicate_group, device=device, param_dtype=getattr(torch, t.param_dtype),
                   reduce_dtype=getattr(torch, t.reduce_dtype),
                   reshard_after_forward=cfg.parallelism.fsdp_reshard_after_forward)
    for names in units.values():
        experts.load_full({n: model.init_box(cfg.model, cfg.training.seed, n, boxes[n], device) for n in names})
    return experts


def expert_unit(name: str) -> str:
    """layers.3.moe.experts.w1 -> layers.3.moe.experts: the unit (and layout.params key) of its shard."""
    return name.rsplit(".", 1)[0]


def is_apart_owner(mesh: Mesh, name: str) -> bool:
    """One copy of every element goes to checkpoints and the grad norm: expert_bias from the rank at
    coordinate 0 of every dim it is replicated over (the data dims and tp); an expert slice, or its
    part of it under expert FSDP, from the rank at coordinate 0 of dp_replicate and tp (MoE layers
    are replicated over tp too), since the ranks along dp_shard x cp hold different experts or parts."""
    dims = DATA_DIMS if moe.is_expert_bias(name) else ("dp_replicate",)
    return all(mesh.coords[d] == 0 for d in dims + ("tp",))


def chunks_with_apart(chunks, slices: dict[str, Slice], experts: FSDP | None, mesh: Mesh,
                      shapes: dict[str, tuple[int, ...]], expert_boxes: dict[str, list[list[int]]]):
    """layout.chunks for dicts that also hold the tensors kept apart: whole local tensors, and the
    expert shards (keyed by unit) as one 1-D view per parameter whose Slice is its expert box and
    the flat range of it this rank holds (as parallelize.fsdp_chunks; padding is in no chunk)."""
    expert_slices = {}
    for unit in experts.order if experts else ():
        for name, (start, stop, _) in experts.shard_ranges(unit).items():
            expert_slices[name] = Slice(shape=list(shapes[name]), box=expert_boxes[name], flat=[start, stop],
                                        owner=is_apart_owner(mesh, name))
    expert_units = experts.order if experts else []

    def with_apart(tensors):
        rest = {name: t for name, t in tensors.items() if name not in slices and name not in expert_units}
        out = chunks(rest) | {name: (t, slices[name]) for name, t in tensors.items() if name in slices}
        for unit in (u for u in expert_units if u in tensors):  # in order: the grad norm sums them so
            out |= {name: (experts.param_slice(name, tensors[unit]), expert_slices[name])
                    for name in experts.shard_ranges(unit)}
        return out
    return with_apart


def gather_with_apart(gather, whole: dict[str, list[list[int]]], dtype: torch.dtype, experts: FSDP | None):
    """ops.gather that adds a unit's tensors kept apart, which the layout's FSDP does not hold.
    expert_bias goes in as the fp32 master itself: its grad slot counts tokens, which a cast to bf16
    would round. Sharded experts are all-gathered by their own FSDP (cast to param_dtype there)."""
    whole_of_unit: dict[str, list[str]] = {}
    for name in whole:
        whole_of_unit.setdefault(model.unit_of(name), []).append(name)
    experts_of_unit = {model.unit_of(unit): unit for unit in experts.order} if experts else {}

    def gather_unit(params, unit):
        sharded = experts.gather(experts_of_unit[unit]) if unit in experts_of_unit else {}
        # the plain gather (no FSDP in the layout) selects the unit's tensors by name, experts
        # included; the layout's FSDP gather returns only its own: add them either way
        got = gather(params | sharded, unit) if sharded else gather(params, unit)
        got |= {model.local_name(name): t for name, t in sharded.items()}
        for name in whole_of_unit.get(unit, ()):
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
    that follows it; the MoE layer has no out_of_tp, so its shared experts use the plain one."""
    scale = 1.0 / (cfg.training.global_batch_size * cfg.training.seq_len)

    def moe_layer(p, x, model_cfg, ops):
        if local_linear:
            ops = dataclasses.replace(ops, linear=mixed_precision.linear)
        return moe.moe_feed_forward(p, x, model_cfg, ops, run_experts=run_experts, aux_loss_scale=scale,
                                    aux_log=aux_log if torch.is_grad_enabled() else None,
                                    sequence_group=sequence_group)

    return moe_layer


def add_apart_grad_sync(layout, cfg: Config, mesh: Mesh, held: dict[str, Tensor],
                        replicate_group: dist.ProcessGroup | None) -> None:
    """Sum the grads of the whole tensors kept apart, bucketed and overlapped with the last
    micro-batch's backward like plain data parallel: the expert-bias loads over all data dims (in
    fp32, so the counts stay exact; under sequence parallel over tp too), whole expert slices over
    the replicate group."""
    reducers = []
    biases = {name: t for name, t in held.items() if moe.is_expert_bias(name)}
    bias_dims = DATA_DIMS + (("tp",) if tp_splits_sequence(cfg, mesh) else ())
    if biases and mesh.size(*bias_dims) > 1:
        reducers.append(GradAllReducer(biases, mesh.group(*bias_dims), torch.float32))
    experts = {name: t for name, t in held.items() if name not in biases}
    if experts and replicate_group is not None:
        reducers.append(GradAllReducer(experts, replicate_group, getattr(torch, cfg.training.reduce_dtype)))
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


def add_expert_fsdp(layout, experts: FSDP, cfg: Config) -> None:
    """The sharded experts' FSDP hooks, beside the layout's own: every forward also runs inside
    experts.resharding() (FSDP objects' resharding contexts nest, so views of both objects' gathered
    buffers are saved as references); each MoE layer's expert grads are reduce-scattered over the
    expert-dp group (then all-reduced over the replicate group) as soon as its backward is done,
    on every micro-batch or only the last as parallelism.fsdp_reduce_every_microbatch says, and
    finish_grads waits for the last of them."""
    every = cfg.parallelism.fsdp_reduce_every_microbatch
    experts.reduce_grads = every
    context_before, start_before = layout.forward_context, layout.start_last_microbatch
    finish_before = layout.finish_grads

    def forward_context():
        both = contextlib.ExitStack()
        both.enter_context(context_before())
        both.enter_context(experts.resharding())
        return both

    def start_last_microbatch():
        start_before()
        experts.reduce_grads = True

    def finish_grads():
        finish_before()
        experts.finish_grad_sync()
        experts.reduce_grads = every

    layout.forward_context, layout.start_last_microbatch, layout.finish_grads = (
        forward_context, start_last_microbatch, finish_grads)


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

"""Mixture of experts glue (model.name = "moe", parallelism.ep): core/moe.py and
collectives/expert_parallel.py in a layout of any other dimensions (docs/moe.md tells the whole story).

`apply` gives the layout:

  ops.moe            moe.moe_feed_forward with aux_loss_scale = the trainer's loss scale, logging
                     its balance loss in training forwards, and under ep a run_experts that ships
                     each token to the rank holding its expert and back
  ops.sum_over_sequence  the balance statistics summed over the ranks holding parts of the same
                     sequences (cp, and tp under sequence parallel): the layer's one collective
  after_grads        moe.update_expert_bias, between the gradient sums and clipping
  log_metrics        moe/max_load_over_mean (worst layer, last step), moe/balance_loss, per MoE layer
                     the busiest and idlest expert's load over the mean (and moe/dropped_fraction
                     under the capped ep exchange)

and two storages for the tensors that do not fit its main one, each with its own gradient sum:

  expert_bias     whole on every rank (update_expert_bias needs all E loads), its "gradient" a
                  token count summed exactly, in fp32, over all data dims (and tp under SP)
  expert weights  under ep > 1, this rank's E/ep experts of every MoE layer (ep folds into
                  dp_shard x cp: ep groups are runs of ep consecutive data ranks). Whole when
                  ep = dp_shard x cp; else FSDP-sharded over the expert-dp group (the ranks holding
                  the same experts) by an FSDP of their own, one unit per MoE layer
                  (layers.{i}.moe.experts). Summed over dp_replicate (and tp under SP).

The model's tp plan splits no MoE tensor: under tp the MoE layer runs on whatever part of the
sequence the rank holds, and under sequence parallel its tensors' grads are summed over tp like
the norms'.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import Tensor

from minititan.collectives import expert_parallel as ep_lib
from minititan.collectives import tensor_parallel as tpm
from minititan.collectives.fsdp import FSDP
from minititan.collectives.mesh import Mesh
from minititan.core import mixed_precision, model, moe
from minititan.core.config import Config, Float8, Model, UserError
from minititan.core.float8 import filtered
from minititan.layout import data_parallel, fsdp
from minititan.layout.contract import DATA_DIMS, Facts, Layout, may_share_casts, owns


def refuse(cfg: Config, mesh: Mesh) -> None:
    """One UserError naming the fix for an expert-parallel layout the model or mesh cannot make."""
    par, m = cfg.parallelism, cfg.model
    if par.ep_capacity_factor < 0 or (par.ep_capacity_factor > 0 and par.ep == 1):
        raise UserError(f"parallelism.ep_capacity_factor={par.ep_capacity_factor} caps the rows each expert-parallel "
                        f"rank sends a peer: it must be 0 (exact exchange) or positive with parallelism.ep > 1")
    if m.name != "moe":
        if par.ep > 1:
            raise UserError(f"parallelism.ep={par.ep} splits the experts of a mixture of experts, but model.name = "
                            f"{m.name!r}: set model.name = \"moe\" or parallelism.ep = 1")
        return
    if m.n_experts % par.ep:
        raise UserError(f"model.n_experts={m.n_experts} must be divisible by parallelism.ep={par.ep}: "
                        f"every ep rank holds the same number of experts")
    data = mesh.size(*fsdp.FSDP_DIMS)
    if data % par.ep:
        raise UserError(f"parallelism.ep={par.ep} must divide dp_shard x cp = {data}: ep splits the data ranks "
                        f"into groups that exchange tokens; raise parallelism.dp_shard or lower parallelism.ep")


def held_apart(facts: Facts, mesh: Mesh, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[list[int]]]:
    """The tensors this rank keeps outside the layout's main storage -> the box of the full tensor
    it holds: every expert_bias whole, and under ep its slice of the expert weights."""
    if facts.model.name != "moe":
        return {}
    ep = facts.ep
    ep_rank = mesh.local_rank(*fsdp.FSDP_DIMS) % ep  # ep groups are runs of ep consecutive data ranks
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


def apply(layout: Layout, mesh: Mesh, device: torch.device, shapes: dict[str, tuple[int, ...]],
          apart: dict[str, list[list[int]]], bias_update_rate: float, capacity_factor: float = 0.0,
          fp8: bool = False) -> None:
    """Hold the `apart` tensors (see held_apart), and add the MoE ops, their gradient sums, the
    expert-bias update and the load metrics. capacity_factor: parallelism.ep_capacity_factor (the
    capped exchange when > 0); fp8: the experts' grouped GEMMs in Float8 (float8_experts)."""
    facts = layout.facts
    ep_group = expert_dp_group = replicate_group = None
    if facts.ep > 1:
        ep_group, expert_dp_group = ep_lib.ep_groups(mesh, facts.ep)  # collective: every rank makes every group
        if dist.get_world_size(expert_dp_group) == 1:
            expert_dp_group = None
        dims = ("dp_replicate", "tp") if facts.sequence_parallel else ("dp_replicate",)
        replicate_group = mesh.group(*dims) if mesh.size(*dims) > 1 else None
    # one copy of each element is written: expert_bias from coordinate 0 of every data dim and tp; an
    # expert slice (or its part under expert FSDP) from coordinate 0 of dp_replicate and tp, since
    # the ranks along dp_shard x cp hold different experts or parts
    owners = {name: owns(mesh, name, () if moe.is_expert_bias(name) else fsdp.FSDP_DIMS) for name in apart}
    sharded = {name: box for name, box in apart.items() if expert_dp_group is not None and ep_lib.is_expert_param(name)}
    whole = data_parallel.whole_tensors(facts, {n: b for n, b in apart.items() if n not in sharded}, shapes, owners,
                                        device)
    layout.hold(whole)
    experts = None
    if sharded:
        units: dict[str, list[str]] = {}
        for name in sharded:
            units.setdefault(name.rsplit(".", 1)[0], []).append(name)  # layers.3.moe.experts.w1 -> layers.3.moe.experts
        experts = fsdp.shard(facts, units, sharded, shapes, owners, expert_dp_group, replicate_group, device)

    balance = ExpertBalance(whole.params, bias_update_rate, facts.model, layout.loss_group, device)
    run_experts = None if ep_group is None else ep_lib.parallel_experts(  # None: every expert here
        functools.partial(moe.run_experts, fp8=fp8), ep_group, capacity_factor, balance.drop_log)
    layout.ops.moe = moe_op(run_experts, facts.loss_scale, balance.balance_log, plain_linear=facts.async_tp, fp8=fp8)
    if mesh.size(*facts.sequence_dims) > 1:
        layout.ops.sum_over_sequence = functools.partial(sum_over_sequence, group=mesh.group(*facts.sequence_dims))
    # Whole expert slices (ep without expert FSDP, so beside an FSDP main storage, whose gather does not
    # hold them) are cast here: once per step where may_share_casts allows it
    casts = None
    whole_experts = {name: t for name, t in whole.params.items() if not moe.is_expert_bias(name)}
    if whole_experts and may_share_casts(facts):
        casts = mixed_precision.StepCasts(facts.param_dtype)
        layout.finish_grads.append(casts.clear)
    layout.ops.gather = gather_with_apart(layout.ops.gather, whole.params, facts.param_dtype,
                                          experts.fsdp if experts else None, casts)

    biases = {name: t for name, t in whole.params.items() if moe.is_expert_bias(name)}
    bias_dims = DATA_DIMS + (("tp",) if facts.sequence_parallel else ())
    if mesh.size(*bias_dims) > 1:  # in fp32, so the counts stay exact
        data_parallel.sum_grads(layout, biases, mesh.group(*bias_dims), torch.float32)
    if whole_experts and replicate_group is not None:
        data_parallel.sum_grads(layout, whole_experts, replicate_group, facts.reduce_dtype)
    if experts is not None:
        fsdp.attach(layout, experts)
    layout.after_grads.append(balance.update)
    layout.log_metrics.append(balance.metrics)


def float8_experts(f8: Float8) -> bool:
    """The routed experts' GEMMs in Float8 (torch._scaled_grouped_mm): float8.enable, unless a
    float8.filter entry names them ("moe", "experts", "moe.experts")."""
    return f8.enable and not filtered("moe.experts", tuple(f8.filter))


def sum_over_sequence(stats: Tensor, seq_len: int, group: dist.ProcessGroup) -> tuple[Tensor, int]:
    """ops.sum_over_sequence: every rank of the group holds an equal part of the same sequences."""
    return tpm.sum_over_ranks(stats, group), seq_len * dist.get_world_size(group)


def moe_op(run_experts, aux_loss_scale: float, balance_log: Tensor, plain_linear: bool, fp8: bool):
    """ops.moe: the MoE layer scaled like the trainer's loss, logging its balance loss in training
    forwards. plain_linear (async TP): the layout's linear defers a plain tensor's matmul to the
    out_of_tp that follows it; the MoE layer has no out_of_tp, so its shared experts use the plain one.
    run_experts: None (every expert here) or expert parallel's; fp8: the experts' grouped GEMMs in Float8."""
    def moe_layer(p, x, model_cfg, ops):
        if plain_linear:
            ops = dataclasses.replace(ops, linear=mixed_precision.linear)
        return moe.moe_feed_forward(p, x, model_cfg, ops, run_experts=run_experts, aux_loss_scale=aux_loss_scale,
                                    balance_log=balance_log if torch.is_grad_enabled() else None, fp8=fp8)

    return moe_layer


def gather_with_apart(gather, whole: dict[str, Tensor], dtype: torch.dtype, experts: FSDP | None,
                      casts: mixed_precision.StepCasts | None = None):
    """ops.gather that adds a unit's tensors kept apart, which the main storage does not hold.
    expert_bias goes in as the fp32 master itself: its grad slot counts tokens, which a cast to bf16
    would round. Sharded experts are all-gathered by their own FSDP (cast to param_dtype there);
    whole ones are cast to `dtype` here, once per step with `casts`."""
    cast = mixed_precision.caster(dtype, casts)

    whole_of_unit: dict[str, list[str]] = {}
    for name in whole:
        whole_of_unit.setdefault(model.unit_of(name), []).append(name)
    experts_of_unit = {model.unit_of(unit): unit for unit in experts.order} if experts else {}

    def gather_unit(params, unit):
        sharded = experts.gather(experts_of_unit[unit]) if unit in experts_of_unit else {}
        # the plain gather (no FSDP in the layout) selects the unit's tensors by name, experts
        # included; the main FSDP's gather returns only its own: add them either way
        got = gather(params | sharded, unit) if sharded else gather(params, unit)
        got |= {model.local_name(name): t for name, t in sharded.items()}
        for name in whole_of_unit.get(unit, ()):
            local = model.local_name(name)
            if moe.is_expert_bias(name):
                got[local] = params[name]
            elif local not in got:  # without FSDP the ordinary gather has already selected and cast it
                got[local] = cast(params[name])
        return got

    return gather_unit


class ExpertBalance:
    """The expert-bias update (every step, even at rate 0: it clears the loads from the bias grad)
    and the last step's load metrics: the loads per MoE layer of the whole model (each pp rank holds
    some layers: the table is filled with MAX over the loss group, on whose data ranks the summed
    loads are equal) with their busiest and idlest experts against the mean, the mean balance loss,
    and under the capped ep exchange the mean fraction of routed (token, expert) pairs dropped.
    Device values until metrics() reads them."""

    def __init__(self, tensors: dict[str, Tensor], rate: float, cfg: Model, loss_group: dist.ProcessGroup,
                 device: torch.device):
        self.tensors, self.rate, self.loss_group, self.device = tensors, rate, loss_group, device
        self.moe_layers = [i for i in range(cfg.n_layers) if moe.is_moe_layer(cfg, i)]
        self.n_experts = cfg.n_experts
        # running (sum, count) on the device: the MoE layers add their balance loss in each training
        # forward, the capped ep exchange the fraction it dropped (moe.log_mean)
        self.balance_log = torch.zeros(2, device=device)
        self.drop_log = torch.zeros(2, device=device)
        self.loads: Tensor | None = None
        self.layers: list[int] = []
        self.balance, self.dropped = torch.zeros(2, device=device), torch.zeros(2, device=device)  # the last step's

    def update(self) -> None:
        self.loads = moe.update_expert_bias(self.tensors, self.rate)
        self.layers = moe.expert_bias_layers(self.tensors)
        self.balance.copy_(self.balance_log)  # into the tensors kept for it: no allocation per step
        self.dropped.copy_(self.drop_log)
        self.balance_log.zero_()
        self.drop_log.zero_()

    def metrics(self) -> dict[str, float]:
        if self.loads is None:
            return {}
        table = torch.zeros(len(self.moe_layers), self.n_experts, device=self.device)
        if self.layers:
            table[[self.moe_layers.index(i) for i in self.layers]] = self.loads
        sums = torch.cat([self.balance, self.dropped])
        if dist.get_world_size(self.loss_group) > 1:
            dist.all_reduce(table, op=dist.ReduceOp.MAX, group=self.loss_group)
            dist.all_reduce(sums, group=self.loss_group)
        busiest, idlest = (v.tolist() for v in moe.load_spread(table))
        balance, n_balance, dropped, n_dropped = sums.tolist()
        out = {"moe/max_load_over_mean": max(busiest),
               "moe/max_load_over_mean_by_layer": {str(i): round(v, 4) for i, v in zip(self.moe_layers, busiest)},
               "moe/min_load_over_mean_by_layer": {str(i): round(v, 4) for i, v in zip(self.moe_layers, idlest)}}
        if n_balance:
            out["moe/balance_loss"] = balance / n_balance
        if n_dropped:
            out["moe/dropped_fraction"] = dropped / n_dropped
        return out
